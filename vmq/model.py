"""Domain nouns of vmq: frozen dataclasses and str enums, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class VmState(str, Enum):
    """Health state of a VM as vmq sees it (see docs/states.md for the transitions)."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    FAULTY = "faulty"
    RESTARTING = "restarting"
    RECOVERING = "recovering"
    FAILED = "failed"
    MAINTENANCE = "maintenance"
    DISABLED = "disabled"
    UNREACHABLE = "unreachable"  # its host's worker is gone: nothing vmq can see or do until it returns


class DomainStatus(str, Enum):
    """The hypervisor's own view of a domain, reduced to what the restart action depends on."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"  # shut off on purpose (operator shutdown/destroy, saved, migrated away)
    CRASHED = "crashed"  # shut off because the guest or its emulator crashed
    OTHER = "other"  # blocked, pmsuspended, being shut down, no state
    ABSENT = "absent"  # not defined on any live host


class DomainEventKind(str, Enum):
    """What a libvirt lifecycle event means for vmq (vmq.hypervisor.types.classify); the value travels in
    the domain-event task's arguments and in audit events."""

    CRASH = "crash"
    OPERATOR_STOP = "operator_stop"  # destroyed, shut down, saved, restored from a snapshot
    MIGRATING_AWAY = "migrating_away"
    PAUSED = "paused"
    RESUMED = "resumed"
    STARTED = "started"
    OTHER = "other"  # defined, undefined, pmsuspended, ...: nothing the monitor acts on


#: The kinds a host reports to the monitor; OTHER is noise and stays on the host.
REPORTED_EVENT_KINDS: frozenset[DomainEventKind] = frozenset(DomainEventKind) - {DomainEventKind.OTHER}


class RejectReason(str, Enum):
    """Why a reply did not count as a valid answer."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_VM = "unknown_vm"
    STALE_NONCE = "stale_nonce"
    REPLAYED = "replayed"


class Action(str, Enum):
    """What the restart condition decided for a silent VM."""

    NONE = "none"  # not judged (grace, maintenance, restart in progress, ...)
    FLAG = "flag"  # faulty, but no restart now (host down, kill switch, ...)
    RESTART = "restart"  # route a restart task to the VM's host
    FAIL = "fail"  # budget exhausted: quarantine as `failed` until an operator clears it


class RestartAction(str, Enum):
    """What a host worker did to a domain."""

    RESET = "reset"
    RESUME_RESET = "resume+reset"
    CREATE = "create"
    DESTROY_CREATE = "destroy+create"  # the ladder's second rung, when a reset did not bring it back
    LEFT_ALONE = "left_alone"


@dataclass(frozen=True)
class DomainInfo:
    """One libvirt domain as a host reports it; ``reason`` is libvirt's state reason in words."""

    name: str
    uuid: str
    status: DomainStatus
    reason: str = ""


@dataclass(frozen=True)
class Probe:
    """One probe round: broadcast to every guest; ``sent_ms`` is Redis server time."""

    round: int
    nonce: str
    sent_ms: int


@dataclass(frozen=True)
class Reply:
    """A verified reply from a guest; ``arrival_ms`` comes from the Redis stream id (server clock)."""

    vm: str
    round: int
    nonce: str
    boot_id: str
    arrival_ms: int
    params: dict[str, Any] = field(default_factory=dict)
    message: bytes = b""  # the verified wire bytes, stored as-is (re-encoding costs more than decoding)
    previous_key: bool = False  # signed with the VM's rotated-out key, inside its grace period


@dataclass(frozen=True)
class Decision:
    """Outcome of the restart condition, with the human-readable reasons that led to it.

    ``hard`` asks for the second rung of the ladder: destroy + create instead of a reset.
    """

    action: Action
    reasons: tuple[str, ...]
    hard: bool = False


@dataclass(frozen=True)
class VmView:
    """Everything the restart condition needs to know about one VM (times in Redis ms)."""

    vm: str
    state: VmState
    host: str
    state_since_ms: int
    has_key: bool = True
    host_alive: bool = True
    domain_status: DomainStatus = DomainStatus.RUNNING
    domain_reason: str = ""
    booted_at_ms: int = 0
    last_valid_ms: int = 0
    restarts_in_window: int = 0
    restarts_suspended: bool = False
    host_degraded: bool = False  # the host worker lives but cannot reach libvirt
    host_maintenance: bool = False
    incident_attempts: int = 0  # restarts already tried in this incident (the ladder's rung)
    last_restart_ms: int = 0
    host_restarts_in_flight: int = 0
    storm: str = ""  # why the storm/partition guard holds this round, "" when it does not
