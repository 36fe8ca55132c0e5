"""Settings of every vmq process, read once from ``VMQ_*`` environment variables at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmq.errors import ConfigError
from vmq.keys import Keys, valid_name


class Settings(BaseSettings):
    """Frozen configuration; units are in the names. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="VMQ_", frozen=True, extra="ignore")

    # -- where the state lives
    redis_url: str = Field("redis://127.0.0.1:6379/0", description=(
        "Redis for state, broker and replies: redis://[user:password@]host:port/db, rediss:// for TLS, "
        "or unix://. The password is never printed (`vmq config` masks it)."))
    redis_sentinels: str = Field("", description=(
        "Redis Sentinel for high availability: a comma list of sentinels (host:port,host:port) asked for the "
        "master of VMQ_REDIS_SENTINEL_MASTER; VMQ_REDIS_URL then gives only the user, password and db. "
        "Empty: connect to VMQ_REDIS_URL itself."))
    redis_sentinel_master: str = Field("vmq", description=(
        "With VMQ_REDIS_SENTINELS: the name the sentinels monitor the master under."))
    namespace: str = Field("vmq", description="Prefix of every Redis key and channel; one per cluster.")
    # -- the method: T1, T2 and the restart condition
    probe_interval_s: float = Field(2.0, gt=0, le=3600, description="T1: a probe round is sent this often.")
    reply_timeout_s: float = Field(6.0, gt=0, le=86400, description=(
        "T2: a VM whose valid reply has not arrived this long after a probe is faulty. Must exceed T1; "
        "judged by the arrival times Redis records, so a late judge judges the same."))
    boot_grace_s: float = Field(30.0, ge=0, description=(
        "A VM is not judged this long after it (re)started or was first monitored."))
    recovery_timeout_s: float = Field(60.0, gt=0, description=(
        "After a restart the guest must answer within this, or the next rung of the ladder is tried."))
    restart_timeout_s: float = Field(60.0, gt=0, description=(
        "A `restarting` VM whose host has not finished the task by then is judged again."))
    restart_task_expires_s: float = Field(30.0, gt=0, description=(
        "A restart task its host worker starts later than this after the verdict (Redis time) is skipped as "
        "stale."))
    max_restarts: int = Field(3, ge=0, description="Restart budget: at most this many restarts per VM per window.")
    restart_window_s: float = Field(3600.0, gt=0, description="The sliding window of the restart budget.")
    backoff_base_s: float = Field(10.0, ge=0, description=(
        "Back-off between attempts of one incident: base x 2^(n-1), +-20 % jitter."))
    backoff_max_s: float = Field(300.0, ge=0, description="Cap of the back-off.")
    max_concurrent_restarts_per_host: int = Field(2, ge=1, description=(
        "At most this many restarts in flight on one host."))
    enroll: Literal["all", "opt-in"] = Field("all", description=(
        "Which VMs vmq watches and restarts: all (unless a domain's vmq metadata says <enroll>no</enroll>), or "
        "opt-in (only domains whose vmq metadata says <enroll>yes</enroll>; docs/operations.md)."))
    app_liveness: Literal["restart", "flag"] = Field("restart", description=(
        "A VM whose responder reports a liveness health check failing its threshold is judged as a silent one: "
        "restart (budget, back-off, ladder and guards apply) or flag only."))
    guest_maintenance_max_s: float = Field(14400.0, ge=0, description=(
        "Longest maintenance a guest may declare itself (`vmq_responder.py --maintenance 2h`, for OS updates); "
        "0: guests cannot."))
    storm_fraction: float = Field(0.3, gt=0, le=1, description=(
        "Storm guard: when more than this fraction of the cluster (or of one host) goes silent in one "
        "round, vmq suspects itself or the network and holds those restarts."))
    storm_min_vms: int = Field(3, ge=1, description="The storm guard needs at least this many silent VMs.")
    activity_blocks_reset: bool = Field(True, description=(
        "Corroboration: a silent guest still reading or writing its disks or sending on its network "
        "(above VMQ_ACTIVITY_MIN_BYTES_PER_S) is not reset."))
    activity_window_s: float = Field(1.0, gt=0, le=30, description=(
        "The two activity samples are taken this far apart."))
    activity_min_bytes_per_s: float = Field(16384.0, ge=0, description=(
        "Disk reads/writes or network sends at this rate or more make a silent guest `silent but active`; "
        "slower I/O is background noise. CPU time and received bytes never hold a reset."))
    webhook_url: str = Field("", description=(
        "Notifications are POSTed here as JSON, one per audit event of a subscribed class, retried with back-off; "
        "empty: off."))
    webhook_classes: str = Field("failed", description=(
        "Comma-separated event classes to notify (all, or: failed, faulty, app_unhealthy, restarted, restart_failed, recovered, "
        "storm, storm_over, host_down, host_up, host_degraded, unreachable, evidence_lost, restarts_suspended)."))
    webhook_format: Literal["vmq", "alertmanager"] = Field("vmq", description=(
        "vmq: the audit event as `vmq events --json` prints it, with its class; alertmanager: Alertmanager's "
        "webhook payload (version 4), one alert per event."))
    # -- host workers
    host_name: str = Field("", description=(
        "Host workers only: this hypervisor's name; the worker consumes the queue host.<name>."))
    libvirt_uri: str = Field("qemu:///system", description=(
        "Host workers only: libvirt connection, e.g. qemu:///system, qemu+ssh://root@node1/system, "
        "test:///default."))
    host_heartbeat_ttl_s: float = Field(15.0, gt=0, description=(
        "A host whose heartbeat is older than this is `down`, its VMs `unreachable`."))
    host_heartbeat_interval_s: float = Field(1.0, gt=0, description=(
        "Host workers renew their heartbeat this often; 3 missed renewals stop restarts there."))
    probe_path_detect: bool = Field(False, description=(
        "Host workers set each VM's probe path from its domain's virtio channels (org.vmq.responder.0: channel; "
        "org.qemu.guest_agent.0: agent; neither: redis) unless `vmq path` chose one. Off: redis unless chosen."))
    inventory_interval_s: float = Field(5.0, gt=0, description=(
        "Host workers list their domains this often (placement, migrations, shut-off domains)."))
    relay_agent_timeout_s: float = Field(1.0, gt=0, le=60, description=(
        "Host workers only: a guest-agent ping of an `agent` VM waits at most this long (and never more than "
        "0.8 x VMQ_PROBE_INTERVAL_S); an agent that does not answer in time gives no answer that round."))
    relay_info_interval_s: float = Field(30.0, gt=0, le=3600, description=(
        "Host workers only: an `agent` VM's guest info (OS, hostname, filesystems) is read and sent with its answer "
        "this often (VMware Tools refreshes its guest info every 30 s by default); liveness is every round."))
    relay_form: Literal["cover", "compact"] = Field("cover", description=(
        "Host workers only: how a host writes its `agent` VMs' answers. cover: one entry per round naming the "
        "VMs that did not answer, Redis keeps the others covered (a round costs O(hosts + changes) centrally); "
        "compact: one entry per round naming every VM that answered (vmq before 2026-12-07)."))
    # -- failover of a dead host's VMs (issue 18; docs/operations.md, "Failover")
    failover: bool = Field(False, description=(
        "Start the VMs of a dead host on surviving hosts, once that host is proven off (fenced): its fence agent "
        "(VMQ_FENCE_CONFIG), or an operator's `vmq hosts fence-confirm`. Off: a dead host's VMs stay unreachable."))
    failover_default: bool = Field(False, description=(
        "VMs whose libvirt metadata says nothing about <failover> are failed over (on) or left down (off)."))
    fence_config: str = Field("", description=(
        "TOML file of fence devices per host ([hosts.NAME] agent, options, timeout_s): ClusterLabs fence agents "
        "run as `off` then `status`. Without one, only `vmq hosts fence-confirm` proves a host off."))
    failover_require_locks: bool = Field(True, description=(
        "A VM is failed over only to a host whose libvirt lock manager (virtlockd) runs: even a wrong fence then "
        "cannot start a disk twice. Off only where the storage itself refuses a second writer."))
    failover_cpu_overcommit: float = Field(4.0, gt=0, le=64, description=(
        "vCPUs a host may hold per physical CPU when a failover places VMs (memory is never overcommitted)."))
    lock_manager: Literal["auto", "lockd", "none"] = Field("auto", description=(
        "Host workers only: the lock manager this host's libvirt uses (qemu.conf lock_manager); auto reads "
        "/etc/libvirt/qemu.conf for a local qemu:///system URI."))
    virtlockd_socket: str = Field("/run/libvirt/virtlockd-sock", description=(
        "Host workers only: virtlockd's socket; a host with lockd whose virtlockd does not answer is not "
        "failover-safe."))
    # -- replies, keys and retention
    max_reply_bytes: int = Field(8192, ge=256, description="Replies larger than this are refused as oversized.")
    reply_save_interval_s: float = Field(10.0, ge=0, description=(
        "Each VM's latest state parameters are saved to Redis at most this often (the judging monitor keeps "
        "the newest in memory for verdicts); 0 saves every reply."))
    key_rotation_grace_s: float = Field(3600.0, ge=0, description=(
        "`vmq keys rotate`: the old key is still accepted this long."))
    reply_stream_maxlen: int = Field(200_000, ge=1000, description=(
        "The reply stream is trimmed to about this many entries."))
    events_maxlen: int = Field(100_000, ge=100, description=(
        "The audit stream is trimmed to about this many events."))
    rounds_kept: int = Field(64, ge=4, description="Probe rounds remembered (nonces accepted for replies).")
    # -- operations
    metrics_port: int = Field(9464, ge=0, le=65535, description=(
        "The monitor worker serves Prometheus /metrics on this port; 0 disables."))
    metrics_addr: str = Field("0.0.0.0", description="Address the /metrics server binds.")
    log_level: str = Field("INFO", description="Log level of vmq's loggers (DEBUG, INFO, WARNING, ERROR).")

    @field_validator("namespace")
    @classmethod
    def _namespace_ok(cls, value: str) -> str:
        if not valid_name(value):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("webhook_classes")
    @classmethod
    def _classes_ok(cls, value: str) -> str:
        from vmq.notifications import parse_classes  # vmq.notifications imports vmq.model only

        try:
            parse_classes(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _level_ok(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

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

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_ok(cls, value: str) -> str:
        for address in filter(None, (part.strip() for part in value.split(","))):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port (e.g. 10.0.0.5:26379,10.0.0.6:26379)")
        return value

    @model_validator(mode="after")
    def _sentinel_needs_plain_redis_url(self) -> Settings:
        if self.redis_sentinels.strip() and not self.redis_url.startswith("redis://"):
            raise ValueError("VMQ_REDIS_URL: with VMQ_REDIS_SENTINELS it must be redis://[user:password@]host/db "
                             "(TLS and unix sockets through Sentinel are not supported)")
        return self

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

    @property
    def host_fresh_ms(self) -> int:
        """A host counts as alive for restarts while its heartbeat was renewed this recently: 3 renewals."""
        return int(3 * self.host_heartbeat_interval_s * 1000)

    @property
    def relay_fresh_ms(self) -> int:
        """A host's relay counts as working while it handled a probe round this recently: 3 rounds."""
        return int(3 * self.probe_interval_s * 1000)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """VMQ_REDIS_SENTINELS as (host, port) pairs; empty without Sentinel."""
        pairs = [a.strip().rpartition(":") for a in self.redis_sentinels.split(",") if a.strip()]
        return [(host, int(port)) for host, _, port in pairs]

    @property
    def celery_url(self) -> str:
        """The broker and result-backend URL: VMQ_REDIS_URL, or with Sentinel kombu's form
        ``sentinel://[user:password@]host:port/db;sentinel://...`` (the master name goes in transport options)."""
        if not self.sentinel_addresses:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        userinfo = parts.netloc.rpartition("@")[0]
        credentials = f"{userinfo}@" if userinfo else ""
        db = parts.path.strip("/") or "0"
        return ";".join(f"sentinel://{credentials}{host}:{port}/{db}" for host, port in self.sentinel_addresses)

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


def responder_url(url: str) -> tuple[str, str | None]:
    """A redis-py URL as the responder takes it: no query, so ``?ssl_ca_certs=PATH`` (the CA of a rediss://
    URL, see docs/deployment.md) becomes the responder's ``tls_ca_file``; the other options are dropped
    (the responder always verifies the server's certificate)."""
    parts = urlsplit(url)
    ca_files = parse_qs(parts.query).get("ssl_ca_certs")
    return urlunsplit(parts._replace(query="", fragment="")), (ca_files[-1] if ca_files else None)
