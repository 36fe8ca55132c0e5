"""Small interfaces the use cases are written against; adapters live in vmq.store and vmq.hypervisor.

The store is one Protocol per Redis structure (``Clock``, ``Rounds``, ``Replies``, ``VmRecords``, ``Hosts``,
``Keyring``, ``Stats``, ``AuditLog``) and ``Store``, their composition; ``vmq.store.redis.RedisStore``
implements it. Every store method raises only ``StoreUnavailable``/``StoreError``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from vmq.model import (
    RESPONDER_CHANNEL,
    AuditEvent,
    DomainInfo,
    DomainStatus,
    HostContext,
    JudgeContext,
    Placement,
    Transition,
    TransitionResult,
    VmPlacement,
    VmRecord,
)
from vmq.telemetry import MetricsSnapshot

if TYPE_CHECKING:  # vmq.hypervisor imports this module: a runtime import here would be circular
    from vmq.codec import RawEntry, RoundBook
    from vmq.hypervisor.types import ActivitySample, AgentAnswer
    from vmq.relayed import AgentBatch, AgentBatchResult

Info = dict[str, str]


class Clock(Protocol):
    """Redis' clock: every deadline and arrival is measured in it."""

    def time_ms(self) -> int: ...

    def time_us(self) -> int: ...


class Lease(Protocol):
    """The judge lock as one holder holds it: true while held."""

    @property
    def token(self) -> bytes: ...

    def __bool__(self) -> bool: ...

    def renew(self) -> bool: ...


class Rounds(Protocol):
    """Probe rounds: numbering, nonces, send times, deadlines, and the judge lock."""

    def start_round(self, nonce: str, reply_timeout_ms: int, rounds_kept: int, wire_version: int,
                    min_gap_ms: int = 0) -> tuple[int, int, bool]: ...

    def current_round(self) -> int: ...

    def due_rounds(self, now_ms: int) -> list[tuple[int, int]]: ...

    def next_deadline(self) -> int | None: ...

    def finish_round(self, round_id: int) -> None: ...

    def round_book(self) -> RoundBook: ...

    def round_sent_times(self) -> dict[int, int]: ...

    def round_sent_ms(self, round_id: int) -> int | None: ...

    def judge_lock(self, lease_s: float, wait_s: float) -> AbstractContextManager[Lease]: ...


class Replies(Protocol):
    """The reply log: entries as Redis sends them, liveness of each VM, and replies lost unread."""

    def read_replies(self, after_id: str, up_to_ms: int, count: int) -> tuple[list[RawEntry], int]: ...

    def reply_backlog(self) -> tuple[int | None, float]: ...

    def reply_cursor(self) -> str: ...

    def last_rounds(self, vms: Sequence[str]) -> list[float | None]: ...

    def record_replies(self, rounds: Mapping[str, int], arrivals: Mapping[str, int], payloads: Mapping[str, bytes],
                       rejects: Mapping[str, int], valid_count: int, cursor: str, read: int = 0,
                       lock_token: bytes = b"", finished: Mapping[str, int] | None = None,
                       unasked: Mapping[str, int] | None = None) -> bool: ...

    def evidence_lost_until(self) -> int: ...

    def apply_agent_batches(self, batches: Sequence[AgentBatch]) -> AgentBatchResult: ...

    def silent_since(self, round_id: int) -> list[str]: ...

    def answered_count(self, round_id: int) -> int: ...

    def last_seen_many(self, vms: Sequence[str]) -> list[float | None]: ...


class VmRecords(Protocol):
    """Each VM's record: read, moved by compare-and-set (vmq.lifecycle), claimed, placed, budgeted."""

    def records(self, vms: Sequence[str]) -> list[VmRecord]: ...

    def record(self, vm: str) -> VmRecord: ...

    def placements(self, vms: Sequence[str]) -> list[VmPlacement]: ...

    def app_unhealthy(self) -> dict[str, dict[str, Any]]: ...

    def note_app_health(self, unhealthy: Mapping[str, Mapping[str, Any]], healthy: Sequence[str]) -> None: ...

    def all_vms(self) -> list[str]: ...

    def attention(self) -> set[str]: ...

    def schedule_maintenance_end(self, vm: str, until_ms: int) -> None: ...

    def maintenance_ends_due(self, now_ms: int, count: int = 500) -> list[tuple[str, int]]: ...

    def drop_maintenance_end(self, vm: str, until_ms: int) -> None: ...

    def hosts_of(self, vms: Sequence[str]) -> list[str]: ...

    def restarting_by_host(self) -> dict[str, int]: ...

    def judge_context(self, vms: Sequence[str], window_start_ms: int) -> JudgeContext: ...

    def transition(self, spec: Transition) -> TransitionResult: ...

    def transition_many(self, specs: Sequence[Transition]) -> list[TransitionResult]: ...

    def claim_restart(self, vm: str, generation: int, incident: str, claimant: str,
                      hold_ms: int | None = None) -> bool: ...

    def uncount_restart(self, vm: str, generation: int, at_ms: int) -> None: ...

    def reset_budget(self, vm: str) -> None: ...

    def set_fields(self, vm: str, fields: Mapping[str, Any]) -> None: ...

    def write_many(self, updates: Mapping[str, Mapping[str, Any]]) -> None: ...

    def set_policy_overrides(self, vm: str, fields: Mapping[str, str]) -> None: ...

    def start_monitoring(self, vm: str, now_ms: int) -> None: ...

    def register_vm(self, vm: str, now_ms: int) -> bool: ...

    def place_domains(self, host: str, listed: Sequence[DomainInfo], now_ms: int,
                      active: Collection[DomainStatus], migrating: Iterable[str] = (),
                      listed_us: int = 0) -> list[Placement]: ...


class Hosts(Protocol):
    """Registered hosts: heartbeats, info, domain listings, guard episodes, kill switch."""

    def host_context(self, hosts: Iterable[str], now_ms: int, fresh_ms: int,
                     round_id: int | None = None) -> dict[str, HostContext]: ...

    def set_kill_switch(self, seconds: float | None, on: bool = True) -> None: ...

    def guard_episodes(self) -> dict[str, int]: ...

    def set_guard_episodes(self, start: Mapping[str, int], end: Iterable[str]) -> None: ...

    def set_host_fields(self, host: str, fields: Mapping[str, Any]) -> None: ...

    def vms_on_host(self, host: str) -> list[str]: ...

    def heartbeat(self, host: str, info: Mapping[str, Any], ttl_ms: int) -> None: ...

    def drop_heartbeat(self, host: str) -> None: ...

    def hosts_overview(self) -> list[tuple[str, bool, Info]]: ...

    def host_info(self, host: str) -> Info: ...

    def domain_names(self, host: str) -> set[str]: ...

    def store_domains(self, host: str, domains: Mapping[str, str]) -> None: ...


class Keyring(Protocol):
    """Each VM's responder key, rotated-out keys in grace."""

    def secrets(self) -> dict[str, bytes]: ...

    def previous_secrets(self) -> dict[str, tuple[bytes, int]]: ...

    def set_secret(self, vm: str, secret_hex: str) -> None: ...

    def delete_secret(self, vm: str) -> bool: ...

    def rotate_secret(self, vm: str, new_hex: str, grace_ms: int) -> int: ...

    def monitored_count(self) -> int: ...


class Stats(Protocol):
    """Counters and histograms behind /metrics (writes are best effort)."""

    def incr_stat(self, name: str, amount: int = 1) -> None: ...

    def counters(self) -> tuple[dict[str, int], dict[str, int]]: ...

    def record_fault(self, last_valid_ms: int, now_ms: int) -> None: ...

    def record_recoveries(self, seconds: Sequence[float]) -> None: ...

    def count_restart_outcome(self, host: str, action: str, result: str) -> None: ...

    def metrics_snapshot(self) -> MetricsSnapshot: ...


class AuditLog(Protocol):
    """The audit stream (``vmq events``)."""

    def append(self, event_type: AuditEvent, vm: str, host: str, now_ms: int, **data: Any) -> None: ...

    def read(self, after: str = "-", count: int = 1000,
             block_ms: int | None = None) -> list[tuple[str, dict[str, str]]]: ...

    def notifier_lease(self, lease_s: float) -> AbstractContextManager[bool]: ...

    def notification_cursor(self) -> str | None: ...

    def set_notification_cursor(self, cursor: str) -> None: ...

    def last_id(self) -> str: ...


class ProbeFeed(Protocol):
    """A subscription to the probe rounds as they are published."""

    def get(self, timeout_s: float) -> bytes | None: ...

    def close(self) -> None: ...


class Relays(Protocol):
    """Host agents' side of the relayed paths: hear probes, append batches of relayed answers."""

    def subscribe_probes(self) -> ProbeFeed: ...

    def append(self, host: str, answers: Sequence[Mapping[str, Any]], finished_round: int | None = None,
               unasked: Sequence[str] = ()) -> list[str]: ...


class Store(Protocol):
    """vmq's whole state, one part per structure."""

    @property
    def clock(self) -> Clock: ...

    @property
    def rounds(self) -> Rounds: ...

    @property
    def replies(self) -> Replies: ...

    @property
    def relayed(self) -> Replies: ...

    @property
    def vms(self) -> VmRecords: ...

    @property
    def hosts(self) -> Hosts: ...

    @property
    def keyring(self) -> Keyring: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def relays(self) -> Relays: ...


class Hypervisor(Protocol):
    """One host's hypervisor. Every method raises only vmq.errors.HypervisorError subclasses.

    Implementations: ``vmq.hypervisor.libvirt.LibvirtHypervisor`` (with vmq.hypervisor.agent, importing libvirt)
    and ``vmq.hypervisor.fake.FakeHypervisor`` (its in-memory twin).
    """

    uri: str

    def list_domains(self) -> list[DomainInfo]:
        """All domains defined on this host, active or not, with their virtio channel names."""
        ...

    def domain_info(self, name: str) -> DomainInfo:
        """One domain's status and virtio channel names; raises DomainNotFound."""
        ...

    def channel_socket(self, name: str, channel: str = RESPONDER_CHANNEL) -> str:
        """Host-side unix socket path of a virtio channel; raises DomainNotFound, ChannelNotFound."""
        ...

    def agent_ping(self, name: str, timeout_s: float) -> AgentAnswer:
        """Guest time and call latency from the domain's QEMU guest agent, within ``timeout_s``; raises
        AgentBusy (a call on that domain in flight), AgentTimeout, AgentUnavailable, AgentAnswerInvalid,
        DomainNotRunning, DomainNotFound."""
        ...

    def guest_info(self, name: str, timeout_s: float) -> dict[str, object]:
        """OS id/version, hostname and filesystems from the domain's guest agent; raises as agent_ping."""
        ...

    def activity(self, name: str) -> ActivitySample:
        """Cumulative CPU, disk and network counters of a domain (None: unknown); raises DomainNotFound."""
        ...

    def reset(self, name: str) -> None:
        """Hard-reset a running domain (like pressing the reset button)."""
        ...

    def resume(self, name: str) -> None:
        """Resume a paused domain."""
        ...

    def start(self, name: str) -> None:
        """Start (libvirt `create`) a shut-off domain."""
        ...

    def suspend(self, name: str) -> None:
        """Pause a running domain (operator action)."""
        ...

    def destroy(self, name: str) -> None:
        """Power a domain off hard (operator action)."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent."""
        ...
