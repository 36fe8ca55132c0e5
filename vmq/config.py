"""Settings of every vmq process, read once from ``VMQ_*`` environment variables at the entry point."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmq.errors import ConfigError
from vmq.keys import Keys, valid_name


class Settings(BaseSettings):
    """Frozen configuration; units are in the names. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="VMQ_", frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "vmq"
    probe_interval_s: float = Field(2.0, gt=0, le=3600)  # T1
    reply_timeout_s: float = Field(6.0, gt=0, le=86400)  # T2, must exceed T1
    boot_grace_s: float = Field(30.0, ge=0)
    recovery_timeout_s: float = Field(60.0, gt=0)
    restart_timeout_s: float = Field(60.0, gt=0)  # a `restarting` VM older than this is judged again
    restart_task_expires_s: float = Field(30.0, gt=0)
    max_restarts: int = Field(3, ge=0)
    restart_window_s: float = Field(3600.0, gt=0)
    backoff_base_s: float = Field(10.0, ge=0)  # wait base * 2^(n-1) between attempts of one incident
    backoff_max_s: float = Field(300.0, ge=0)
    max_concurrent_restarts_per_host: int = Field(2, ge=1)
    storm_fraction: float = Field(0.3, gt=0, le=1)  # more silent than this in one round: suspect ourselves
    storm_min_vms: int = Field(3, ge=1)
    activity_blocks_reset: bool = True  # a silent guest whose CPU/disk/net counters move is not reset
    activity_window_s: float = Field(1.0, gt=0, le=30)
    webhook_url: str = ""  # escalations are POSTed here as JSON (retried with back-off)
    host_name: str = ""
    libvirt_uri: str = "qemu:///system"
    host_heartbeat_ttl_s: float = Field(15.0, gt=0)  # after this the host is `down`, its VMs `unreachable`
    host_heartbeat_interval_s: float = Field(1.0, gt=0)  # renewed this often; 3 missed = no restarts there
    inventory_interval_s: float = Field(5.0, gt=0)
    max_reply_bytes: int = Field(8192, ge=256)
    reply_stream_maxlen: int = Field(200_000, ge=1000)
    events_maxlen: int = Field(100_000, ge=100)
    rounds_kept: int = Field(64, ge=4)
    log_level: str = "INFO"

    @field_validator("namespace")
    @classmethod
    def _namespace_ok(cls, value: str) -> str:
        if not valid_name(value):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("host_name")
    @classmethod
    def _host_ok(cls, value: str) -> str:
        if value and not valid_name(value):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_ok(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _t2_exceeds_t1(self) -> Settings:
        if self.reply_timeout_s <= self.probe_interval_s:
            raise ValueError(
                f"VMQ_REPLY_TIMEOUT_S ({self.reply_timeout_s}) must be greater than "
                f"VMQ_PROBE_INTERVAL_S ({self.probe_interval_s})"
            )
        return self

    @property
    def keys(self) -> Keys:
        """The key builder for this namespace."""
        return Keys(self.namespace)

    def require_host(self) -> str:
        """The host name of a host worker; raises ConfigError if VMQ_HOST_NAME is unset."""
        if not self.host_name:
            raise ConfigError("VMQ_HOST_NAME: required for a host worker (e.g. VMQ_HOST_NAME=node1)")
        return self.host_name


def load_settings(overrides: Mapping[str, object] | None = None) -> Settings:
    """Read settings from the environment (plus ``overrides``); a bad value raises ConfigError naming it."""
    try:
        return Settings(**dict(overrides or {}))  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err.get("loc", ()) if part != "__root__"]
            name = "VMQ_" + loc[0].upper() if loc else "settings"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(msg if msg.startswith("VMQ_") else f"{name}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
