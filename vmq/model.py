"""Domain nouns of vmq: frozen dataclasses and str enums, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from vmq.intent import Intent


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
    WATCHDOG = "watchdog"  # the guest's watchdog device fired (detail: its action)
    IO_ERROR = "io_error"  # a disk I/O error (detail: its reason, e.g. enospc)
    AGENT = "agent"  # the guest agent connected or disconnected (detail: the state): evidence, never a verdict
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
    WRONG_HOST = "wrong_host"  # a host relayed an answer for a VM its record places elsewhere
    WRONG_PATH = "wrong_path"  # an answer on a path the VM is not on


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


#: Version of the answer documents vmq writes itself for relayed ``agent`` answers (docs/protocol.md).
WIRE_VERSION_RELAYED = 1


class ProbePath(str, Enum):
    """How a VM's answers reach the monitor."""

    REDIS = "redis"  # the vmq responder in the guest talks to Redis itself
    CHANNEL = "channel"  # the vmq responder answers over a virtio-serial port; its host relays
    AGENT = "agent"  # the QEMU guest agent answers its host; nothing of vmq in the guest


_PATH_VALUES = frozenset(path.value for path in ProbePath)

#: virtio-serial port names (``<target type='virtio' name='...'/>`` of a domain's ``<channel>``).
AGENT_CHANNEL = "org.qemu.guest_agent.0"
RESPONDER_CHANNEL = "org.vmq.responder.0"


def detect_probe_path(channels: Iterable[str]) -> ProbePath:
    """The probe path a domain's channels allow, best first: vmq's responder channel, the guest agent, Redis."""
    names = set(channels)
    if RESPONDER_CHANNEL in names:
        return ProbePath.CHANNEL
    if AGENT_CHANNEL in names:
        return ProbePath.AGENT
    return ProbePath.REDIS


@dataclass(frozen=True)
class DomainInfo:
    """One libvirt domain as a host reports it; ``reason`` is libvirt's state reason in words, ``channels``
    the names of its virtio-serial channels and ``intent`` its vmq metadata (both from the domain's XML)."""

    name: str
    uuid: str
    status: DomainStatus
    reason: str = ""
    channels: tuple[str, ...] = ()
    intent: Intent | None = None  # its vmq metadata (vmq.intent), None: none, or not read


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
    relay_alive: bool = True  # a relayed VM's host relays probe rounds (always True on the redis path)
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
    not_enrolled: str = ""  # why vmq leaves this VM alone by the operators' intent (vmq.intent), "" if enrolled
    watchdog: str = ""  # the action of the guest watchdog that just fired (a domain event), "" otherwise
    app_unhealthy: str = ""  # which liveness checks its replies say failed their threshold, "" when none


class AuditEvent(str, Enum):
    """Every ``type`` an entry of the audit stream (``vmq events``) can have; the value is the wire word."""

    # transitions of a VM's state (vmq.lifecycle)
    HEALTHY = "healthy"  # first valid reply, no incident open
    RECOVERED = "recovered"  # first valid reply after an incident
    FAULTY = "faulty"
    FAILED = "failed"
    RESTART_REQUESTED = "restart_requested"
    RESTART_DISPATCHED = "restart_dispatched"
    DISPATCH_FAILED = "dispatch_failed"
    RESTARTED = "restarted"
    RESTART_FAILED = "restart_failed"
    RESTART_MISROUTED = "restart_misrouted"
    RESTART_LEFT_ALONE = "restart_left_alone"
    SILENT_BUT_ACTIVE = "silent_but_active"
    UNREACHABLE = "unreachable"
    REACHABLE = "reachable"
    MAINTENANCE = "maintenance"
    MAINTENANCE_ENDED = "maintenance_ended"
    DISABLED = "disabled"
    ENABLED = "enabled"
    CLEARED = "cleared"
    # events that change no state
    DECISION = "decision"
    ESCALATED = "escalated"
    RESTART_REFUSED = "restart_refused"
    RESTART_SKIPPED = "restart_skipped"
    EVIDENCE_LOST = "evidence_lost"
    DOMAIN_EVENT = "domain_event"
    DOMAIN_EVENT_IGNORED = "domain_event_ignored"
    MIGRATED = "migrated"
    OPERATOR_ACTION = "operator_action"
    OVERRIDES = "overrides"
    PROBE_PATH = "probe_path"
    INTENT = "intent"  # a VM's libvirt metadata (vmq.intent) changed, or could not be read
    APP_UNHEALTHY = "app_unhealthy"  # a reply says a liveness check failed its threshold (once per episode)
    KEY_ROTATED = "key_rotated"
    RESTARTS_SUSPENDED = "restarts_suspended"
    RESTARTS_RESUMED = "restarts_resumed"
    STORM = "storm"
    HOST_SUSPECT = "host_suspect"
    STORM_OVER = "storm_over"
    HOST_DOWN = "host_down"
    HOST_UP = "host_up"
    HOST_DEGRADED = "host_degraded"
    HOST_RECOVERED = "host_recovered"
    HOST_MAINTENANCE = "host_maintenance"
    # failover of a dead host's VMs (vmq.failover_flow)
    FENCED = "fenced"  # the dead host is proven off (how, by whom)
    FENCE_FAILED = "fence_failed"  # not proven off: nothing of it starts elsewhere
    FAILOVER_HELD = "failover_held"  # the whole incident is held (not fenced, too many hosts silent ...)
    FAILOVER_REFUSED = "failover_refused"  # one VM is not started elsewhere, with why
    FAILOVER_STARTED = "failover_started"  # its start was sent to the chosen host's queue
    FAILOVER_DONE = "failover_done"  # the chosen host started it
    FAILOVER_FAILED = "failover_failed"  # the chosen host could not start it (lock manager refused ...)


def _values(*events: AuditEvent) -> frozenset[str]:
    return frozenset(event.value for event in events)


#: Events `vmq explain` lists as a VM's decisions (wire words, to test the ``type`` of an entry read back).
EXPLAINED_EVENTS = _values(
    AuditEvent.FAULTY, AuditEvent.DECISION, AuditEvent.RESTART_DISPATCHED, AuditEvent.RESTARTED,
    AuditEvent.RESTART_FAILED, AuditEvent.RESTART_SKIPPED, AuditEvent.RESTART_LEFT_ALONE,
    AuditEvent.SILENT_BUT_ACTIVE, AuditEvent.RECOVERED, AuditEvent.FAILED, AuditEvent.ESCALATED,
    AuditEvent.UNREACHABLE, AuditEvent.DOMAIN_EVENT, AuditEvent.MAINTENANCE, AuditEvent.MAINTENANCE_ENDED,
    AuditEvent.CLEARED, AuditEvent.HEALTHY, AuditEvent.INTENT, AuditEvent.FAILOVER_REFUSED,
    AuditEvent.FAILOVER_STARTED, AuditEvent.FAILOVER_DONE, AuditEvent.FAILOVER_FAILED)
#: What a host worker reports about a restart request it carried out or gave back.
HOST_OUTCOME_EVENTS = _values(
    AuditEvent.RESTARTED, AuditEvent.RESTART_FAILED, AuditEvent.RESTART_SKIPPED, AuditEvent.RESTART_LEFT_ALONE,
    AuditEvent.RESTART_MISROUTED, AuditEvent.SILENT_BUT_ACTIVE, AuditEvent.DISPATCH_FAILED)
#: Events that end an incident one way or the other.
INCIDENT_END_EVENTS = _values(AuditEvent.RECOVERED, AuditEvent.HEALTHY, AuditEvent.FAILED)


@dataclass(frozen=True)
class HostContext:
    """What the judge needs to know about a host."""

    alive: bool
    degraded: bool
    maintenance_until_ms: int  # 0: none; -1: until lifted
    vm_count: int
    relay_seen_ms: int = 0  # when its relay last handled a probe round (Redis ms; 0: never)
    relay_finished: bool = False  # its relay reported the round being judged finished (read by the monitor)

    def in_maintenance(self, now_ms: int) -> bool:
        """True while the host's maintenance window lasts."""
        return self.maintenance_until_ms == -1 or self.maintenance_until_ms > now_ms

    def relay_fresh(self, now_ms: int, fresh_ms: int) -> bool:
        """True while the host's relay handled a probe round within ``fresh_ms``."""
        return self.relay_seen_ms > 0 and now_ms - self.relay_seen_ms <= fresh_ms


@dataclass(frozen=True)
class JudgeContext:
    """What the judge reads about the VMs it judges, index-aligned with them."""

    restarts: list[int]  # restarts in the budget window
    last_replies: list[str | None]  # last saved reply (JSON text)
    keyed: set[str]  # VMs with a responder key
    suspended: bool  # the kill switch
    unasked_rounds: list[int]  # the latest round each VM's host relay could not ask it (0: none)


@dataclass(frozen=True)
class Placement:
    """What one host's listing of a domain did to its VM's record (see vmq/lua/place.lua)."""

    vm: str
    written: bool  # False: the record stays with previous_host, alive and with the domain defined there
    previous_host: str  # the host the record named before ("" for a VM never placed)
    migrated: bool  # the domain is active here after it ran on previous_host
    started: bool  # the domain is active here and was not before: booted_at_ms was set


@dataclass(frozen=True)
class Transition:
    """One compare-and-set of a VM's state with its audit event (carried out by vmq/lua/transition.lua).

    ``expected_generation`` None: any generation; ``count_restart`` adds the attempt to the VM's restart
    budget (kept for ``restart_window_ms``).
    """

    vm: str
    from_states: tuple[VmState, ...]
    to_state: VmState
    now_ms: int
    event: Mapping[str, Any]
    fields: Mapping[str, Any] = field(default_factory=dict)
    expected_generation: int | None = None
    count_restart: bool = False
    restart_window_ms: int = 3_600_000


@dataclass(frozen=True)
class TransitionResult:
    """What a compare-and-set found: applied or not, the state before it, and the generation after it."""

    applied: bool
    previous: str
    generation: int


def _int(value: str | None) -> int:
    return int(value) if value else 0


@dataclass(frozen=True)
class VmRecord:
    """A VM's stored record (``<ns>:vm:<id>``), parsed once; times in Redis ms, 0 when never set.

    ``exists`` is False for a VM with no record (removed or never seen); ``overrides`` holds its
    ``policy.<knob>`` fields by knob name.
    """

    vm: str
    exists: bool = False
    state: VmState = VmState.UNKNOWN
    generation: int = 0
    state_since_ms: int = 0
    host: str = ""
    domain_status: DomainStatus | None = None  # None: never listed by a host
    domain_reason: str = ""
    booted_at_ms: int = 0
    monitored_since_ms: int = 0
    incident: str = ""
    incident_opened_ms: int = 0
    attempts: int = 0
    last_restart_ms: int = 0
    decision: str = ""
    decision_action: str = ""
    decision_grounds: str = ""
    boot_id: str = ""
    claim: str = ""
    maintenance_until_ms: int = 0
    overrides: Mapping[str, str] = field(default_factory=dict)
    probe_path_set: ProbePath | None = None  # the operator's choice (`vmq path`), None: detect
    probe_path_detected: ProbePath = ProbePath.REDIS  # from the domain's channels, by its host's inventory
    intent: Mapping[str, str] = field(default_factory=dict)  # ``intent.<name>`` fields: its libvirt metadata

    @classmethod
    def parse(cls, vm: str, fields: Mapping[str, str]) -> VmRecord:
        """The record from its hash fields (an empty hash: ``exists`` False). Raises ValueError on a state or
        number that is not one."""
        if not fields:
            return cls(vm)
        get = fields.get
        status = get("domain_status")
        return cls(
            vm=vm, exists=True, state=VmState(get("state") or VmState.UNKNOWN.value),
            generation=_int(get("generation")), state_since_ms=_int(get("state_since_ms")), host=get("host", ""),
            domain_status=DomainStatus(status) if status else None, domain_reason=get("domain_reason", ""),
            booted_at_ms=_int(get("booted_at_ms")), monitored_since_ms=_int(get("monitored_since_ms")),
            incident=get("incident", ""), incident_opened_ms=_int(get("incident_opened_ms")),
            attempts=_int(get("attempts")), last_restart_ms=_int(get("last_restart_ms")),
            decision=get("decision", ""), decision_action=get("decision_action", ""),
            decision_grounds=get("decision_grounds", ""), boot_id=get("boot_id", ""), claim=get("claim", ""),
            maintenance_until_ms=_int(get("maintenance_until_ms")),
            overrides={name[7:]: value for name, value in fields.items() if name.startswith("policy.")},
            probe_path_set=ProbePath(get("probe_path_set")) if get("probe_path_set") else None,
            probe_path_detected=ProbePath(get("probe_path_detected") or ProbePath.REDIS.value),
            intent={name[7:]: value for name, value in fields.items() if name.startswith("intent.") and value},
        )

    @property
    def probe_path(self) -> ProbePath:
        """The path this VM's answers take: the operator's choice (`vmq path`), else its libvirt metadata's
        (vmq.intent), else what its domain's channels allow."""
        if self.probe_path_set:
            return self.probe_path_set
        said = self.intent.get("probe_path", "")
        return ProbePath(said) if said in _PATH_VALUES else self.probe_path_detected

    @property
    def relayed(self) -> bool:
        """True when its host relays its answers (``channel`` or ``agent``)."""
        return self.probe_path is not ProbePath.REDIS

    @property
    def grace_anchor_ms(self) -> int:
        """Where the boot grace counts from: the later of the last boot and the start of monitoring."""
        return max(self.booted_at_ms, self.monitored_since_ms)


class VmPlacement(NamedTuple):
    """Where a VM's record places it and on which probe path (``exists`` False: no record): all that vouching
    for a relayed answer needs (vmq.relayed), read for every relayed answer, hence a tuple, not a VmRecord."""

    vm: str
    exists: bool
    host: str
    probe_path: ProbePath


@dataclass(frozen=True)
class RestartRequest:
    """What the monitor asks a host worker to do; JSON-serialisable (``asdict``), times in Redis ms."""

    vm: str
    host: str
    generation: int
    incident: str
    round: int
    issued_ms: int
    hard: bool = False  # destroy + create instead of reset (second rung of the ladder)
    crashed: bool = False  # the hypervisor reported a crash: no activity check needed
    manual: bool = False  # an operator asked (`vmq restart`): no activity check either
    expires_ms: int = 0  # after this the host must not act on it (the verdict is stale); 0: never
