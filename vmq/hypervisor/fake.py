"""In-memory twin of LibvirtHypervisor with the libvirt test driver's semantics, for tests and demos.

Transitions, as measured on the test driver (and on QEMU for the reasons):

    operation  allowed from              result
    reset      active (running, paused)  status and reason unchanged
    suspend    running                   paused, reason "user"
    resume     paused                    running, reason "unpaused"
    start      shut off or crashed       running, reason "booted"
    destroy    active                    shutoff, reason "destroyed"

Anything else raises DomainOperationFailed, like libvirt does. ``DomainStatus.OTHER`` counts as active.
Activity counters start at zero for every domain and move only when a test says so (``set_activity``,
``advance``); like libvirt, an inactive domain reports every counter as None.

Channels: a domain has the ``channels`` of its DomainInfo; ``set_channels`` declares them with their host
sockets. Guest agent: every domain has a fake agent, mode ``answer`` by default, like the test driver (whose
``getTime`` answers on any running domain, channel or not); ``set_agent`` switches it to ``hang`` (the call
takes its whole timeout, then AgentTimeout), ``absent`` (AgentUnavailable, as QEMU says "not connected"),
``garbage`` (the answer is nonsense: AgentAnswerInvalid from the same checks the libvirt adapter runs).
Checks in the adapter's order: a call in flight on the domain (AgentBusy), then the domain not running
(DomainNotRunning, "domain is not running"), then the agent's mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass, field, replace
from enum import Enum
from typing import TypeVar

from vmq.errors import (
    AgentBusy,
    AgentTimeout,
    AgentUnavailable,
    ChannelNotFound,
    DomainNotFound,
    DomainNotRunning,
    DomainOperationFailed,
    HypervisorUnavailable,
    LockRefused,
)
from vmq.hypervisor.types import ActivitySample, AgentAnswer, HostCapacity, guest_time_ms, reduce_guest_info
from vmq.hypervisor.xmldesc import definition_facts, scrub_definition
from vmq.intent import NO_INTENT, Intent
from vmq.model import RESPONDER_CHANNEL, DomainInfo, DomainStatus

T = TypeVar("T")

#: The real qemu-ga's guest-ping through libvirtd, p50 (FIELD-NOTES): the fake agent's default latency.
AGENT_LATENCY_S = 0.0013


class AgentMode(str, Enum):
    """How a fake guest agent behaves (see the module docstring)."""

    ANSWER = "answer"
    HANG = "hang"
    ABSENT = "absent"
    GARBAGE = "garbage"


def _default_guest_info() -> dict[str, object]:
    """A small guest as libvirt's guestInfo() reports it (flat typed parameters)."""
    return {"os.id": "debian", "os.version-id": "12", "hostname": "guest", "fs.count": 1, "fs.0.mountpoint": "/",
            "fs.0.fstype": "ext4", "fs.0.used-bytes": 1 << 30, "fs.0.total-bytes": 8 << 30}


@dataclass(frozen=True)
class _Agent:
    """One fake guest agent: its mode, answer latency and the raw guestInfo() parameters it answers."""

    mode: AgentMode = AgentMode.ANSWER
    latency_s: float | Callable[[], float] = AGENT_LATENCY_S  # a callable draws each call's latency
    info: Mapping[str, object] = field(default_factory=_default_guest_info)

_ACTIVE = frozenset({DomainStatus.RUNNING, DomainStatus.PAUSED, DomainStatus.OTHER})
_INACTIVE = frozenset({DomainStatus.SHUTOFF, DomainStatus.CRASHED})


class _Keep(Enum):
    """Marker for "leave this counter as it is" in ``set_activity``."""

    KEEP = "keep"


_KEEP = _Keep.KEEP


@dataclass(frozen=True)
class _Counters:
    """One fake domain's cumulative counters; None is a counter the fake host "cannot give"."""

    cpu_time_ns: int | None = 0
    disk_read_bytes: int | None = 0
    disk_write_bytes: int | None = 0
    net_rx_bytes: int | None = 0
    net_tx_bytes: int | None = 0


def _grow(value: int | None, by: int) -> int | None:
    """A counter advanced by ``by``; an unknown counter stays unknown."""
    return None if value is None else value + by


class FakeHypervisor:
    """The Hypervisor port in memory; thread-safe; records every call in ``calls``."""

    def __init__(self, uri: str = "fake://", domains: Iterable[DomainInfo] = ()) -> None:
        """Define ``domains`` on a fake host (with no vmq metadata unless their ``intent`` says, as libvirt reads
        a domain XML without it); raises ValueError on duplicate names or ABSENT status."""
        self.uri = uri
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._unavailable = False
        self._domains: dict[str, DomainInfo] = {}
        self._counters: dict[str, _Counters] = {}
        self._sockets: dict[str, dict[str, str | None]] = {}
        self._agents: dict[str, _Agent] = {}
        self._agent_in_flight: set[str] = set()
        self._definitions: dict[str, str] = {}  # name -> XML given to define_and_start (else one is made up)
        self.locked_disks: set[str] = set()  # names whose start the "lock manager" refuses (test helper)
        self.host_capacity = (16, 65536)  # (CPUs, MiB) this fake host has
        for info in domains:
            if info.status is DomainStatus.ABSENT:
                raise ValueError(f"domain {info.name!r}: a defined domain cannot be {info.status.value}")
            if info.name in self._domains:
                raise ValueError(f"domain {info.name!r} defined twice")
            self._domains[info.name] = info if info.intent is not None else replace(info, intent=NO_INTENT)

    def __repr__(self) -> str:
        """Show the URI and the number of domains."""
        return f"FakeHypervisor({self.uri!r}, domains={len(self._domains)})"

    # -- the port -----------------------------------------------------------------------------------

    def list_domains(self) -> list[DomainInfo]:
        """All defined domains, sorted by name."""
        with self._lock:
            self._enter("list_domains", "")
            return sorted(self._domains.values(), key=lambda info: info.name)

    def domain_info(self, name: str) -> DomainInfo:
        """One domain's status and reason; raises DomainNotFound."""
        with self._lock:
            self._enter("domain_info", name)
            return self._get("domain_info", name)

    def activity(self, name: str) -> ActivitySample:
        """The domain's counters now (all None while it is not active); raises DomainNotFound."""
        with self._lock:
            self._enter("activity", name)
            info = self._get("activity", name)
            counters = self._counters.get(name, _Counters())
            if info.status not in _ACTIVE:
                counters = _Counters(None, None, None, None, None)
            return ActivitySample(
                counters.cpu_time_ns,
                counters.disk_read_bytes,
                counters.disk_write_bytes,
                counters.net_rx_bytes,
                counters.net_tx_bytes,
                taken_monotonic_s=time.monotonic(),
            )

    def reset(self, name: str) -> None:
        """Hard-reset an active domain (state unchanged); raises DomainOperationFailed if shut off."""
        self._transition("reset", name, _ACTIVE, None, "domain is not running")

    def resume(self, name: str) -> None:
        """Resume a paused domain; raises DomainOperationFailed if it is not paused."""
        self._transition(
            "resume", name, {DomainStatus.PAUSED}, (DomainStatus.RUNNING, "unpaused"), "domain is not paused"
        )

    def start(self, name: str) -> None:
        """Start a shut-off domain (counters restart from zero); raises DomainOperationFailed if active."""
        self._transition(
            "start", name, _INACTIVE, (DomainStatus.RUNNING, "booted"), "domain is already running"
        )
        with self._lock:  # a new emulator process counts from zero; a counter it cannot give stays None
            counters = self._counters.get(name, _Counters())
            self._counters[name] = _Counters(*(None if value is None else 0 for value in astuple(counters)))

    def suspend(self, name: str) -> None:
        """Pause a running domain; raises DomainOperationFailed if it is not running."""
        self._transition(
            "suspend", name, {DomainStatus.RUNNING}, (DomainStatus.PAUSED, "user"), "domain is not running"
        )

    def destroy(self, name: str) -> None:
        """Power an active domain off (reason "destroyed"); raises DomainOperationFailed if already off."""
        self._transition(
            "destroy", name, _ACTIVE, (DomainStatus.SHUTOFF, "destroyed"), "domain is not running"
        )

    def channel_socket(self, name: str, channel: str = RESPONDER_CHANNEL) -> str:
        """The host socket ``set_channels`` declared; raises DomainNotFound, ChannelNotFound."""
        with self._lock:
            self._enter("channel_socket", name)
            info = self._get("channel_socket", name)
            what = f"channel_socket {name!r} on {self.uri}"
            if channel not in info.channels:
                raise ChannelNotFound(f"{what}: no virtio channel {channel!r}")
            path = self._sockets.get(name, {}).get(channel)
            if path is None:
                raise ChannelNotFound(f"{what}: channel {channel!r} has no socket path")
            return path

    def agent_ping(self, name: str, timeout_s: float) -> AgentAnswer:
        """The fake agent's guest time (this machine's clock) after its latency; raises as the port says."""

        def answer(agent: _Agent, latency_ms: float) -> AgentAnswer:
            if agent.mode is AgentMode.GARBAGE:
                return AgentAnswer(guest_time_ms({"seconds": "soon", "nseconds": -1}), latency_ms)
            now_ns = time.time_ns()
            raw = {"seconds": now_ns // 1_000_000_000, "nseconds": now_ns % 1_000_000_000}
            return AgentAnswer(guest_time_ms(raw), latency_ms)

        return self._agent_call("agent_ping", name, timeout_s, answer)

    def guest_info(self, name: str, timeout_s: float) -> dict[str, object]:
        """The fake agent's guest info, reduced as the libvirt adapter reduces it; raises as agent_ping."""

        def answer(agent: _Agent, _latency_ms: float) -> dict[str, object]:
            return reduce_guest_info("garbage" if agent.mode is AgentMode.GARBAGE else agent.info)

        return self._agent_call("guest_info", name, timeout_s, answer)

    def definition(self, name: str) -> str:
        """The XML it was defined from, or a minimal one (1 vCPU, 1024 MiB); raises DomainNotFound."""
        with self._lock:
            self._enter("definition", name)
            info = self._get("definition", name)
            return scrub_definition(self._definitions.get(name) or _minimal_xml(info))

    def define_and_start(self, domain_xml: str) -> None:
        """Define (or redefine) and start; LockRefused for names in ``locked_disks``; DomainOperationFailed if
        the domain is already active."""
        name, uuid, _memory, _vcpus = definition_facts(domain_xml)
        with self._lock:
            self._enter("define_and_start", name)
            known = self._domains.get(name)
            if known is not None and known.status in _ACTIVE:
                raise DomainOperationFailed(f"define_and_start {name!r} on {self.uri} failed: domain is already "
                                            f"running (it is {known.status.value})")
            if name in self.locked_disks:
                raise LockRefused(f"start {name!r} on {self.uri} refused by the lock manager: resource busy "
                                  "(simulated lease held elsewhere)")
            self._definitions[name] = domain_xml
            base = known or DomainInfo(name, uuid, DomainStatus.SHUTOFF, "", intent=NO_INTENT)
            self._domains[name] = replace(base, uuid=uuid or base.uuid, status=DomainStatus.RUNNING, reason="booted")

    def capacity(self) -> HostCapacity:
        """``host_capacity`` and what the active domains' definitions hold."""
        with self._lock:
            self._enter("capacity", "")
            vcpus = memory = 0
            for info in self._domains.values():
                if info.status in _ACTIVE:
                    _name, _uuid, mib, count = definition_facts(self._definitions.get(info.name) or _minimal_xml(info))
                    vcpus, memory = vcpus + count, memory + mib
            return HostCapacity(self.host_capacity[0], self.host_capacity[1], vcpus, memory)

    def close(self) -> None:
        """Record the close; idempotent, never raises, and the fake stays usable like a reopened one."""
        with self._lock:
            self.calls.append(("close", ""))

    # -- test helpers -------------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """Make a domain crash as QEMU reports a killed emulator (CRASHED, "crashed"); not recorded."""
        with self._lock:
            info = self._get("crash", name)
            self._domains[name] = replace(info, status=DomainStatus.CRASHED, reason="crashed")

    def set_activity(
        self,
        name: str,
        *,
        cpu_time_ns: int | None | _Keep = _KEEP,
        disk_read_bytes: int | None | _Keep = _KEEP,
        disk_write_bytes: int | None | _Keep = _KEEP,
        net_rx_bytes: int | None | _Keep = _KEEP,
        net_tx_bytes: int | None | _Keep = _KEEP,
    ) -> None:
        """Set the given counters (None: "cannot give"), keep the others; not recorded; DomainNotFound."""
        given = {
            "cpu_time_ns": cpu_time_ns,
            "disk_read_bytes": disk_read_bytes,
            "disk_write_bytes": disk_write_bytes,
            "net_rx_bytes": net_rx_bytes,
            "net_tx_bytes": net_tx_bytes,
        }
        with self._lock:
            self._get("set_activity", name)
            changes = {counter: value for counter, value in given.items() if value is not _KEEP}
            self._counters[name] = replace(self._counters.get(name, _Counters()), **changes)

    def advance(self, name: str, cpu_ns: int = 0, disk_bytes: int = 0, net_bytes: int = 0) -> None:
        """Grow CPU time, both disk and both network counters; not recorded; raises DomainNotFound."""
        with self._lock:
            self._get("advance", name)
            counters = self._counters.get(name, _Counters())
            self._counters[name] = _Counters(
                _grow(counters.cpu_time_ns, cpu_ns),
                _grow(counters.disk_read_bytes, disk_bytes),
                _grow(counters.disk_write_bytes, disk_bytes),
                _grow(counters.net_rx_bytes, net_bytes),
                _grow(counters.net_tx_bytes, net_bytes),
            )

    def set_channels(self, name: str, channels: Mapping[str, str | None]) -> None:
        """Give a domain exactly these virtio channels, name -> host socket path (None: no unix socket);
        not recorded; raises DomainNotFound."""
        with self._lock:
            info = self._get("set_channels", name)
            self._domains[name] = replace(info, channels=tuple(channels))
            self._sockets[name] = dict(channels)

    def set_intent(self, name: str, intent: Intent | None, unreadable: bool = False) -> None:
        """Give a domain this vmq metadata (as ``virsh metadata --set`` would; None: remove it); ``unreadable``:
        its XML cannot be read, so listings say nothing of its intent (DomainInfo.intent None)."""
        with self._lock:
            info = self._get("set_intent", name)
            self._domains[name] = replace(info, intent=None if unreadable else intent or NO_INTENT)

    def set_agent(
        self,
        name: str,
        mode: AgentMode | str = AgentMode.ANSWER,
        latency_s: float | Callable[[], float] = AGENT_LATENCY_S,
        info: Mapping[str, object] | None = None,
    ) -> None:
        """Set a domain's fake agent: its mode, answer latency (s, or a callable drawing each call's) and raw
        guestInfo() parameters (None: a small Debian guest); not recorded; raises DomainNotFound, ValueError on
        an unknown mode."""
        agent = _Agent(AgentMode(mode), latency_s, _default_guest_info() if info is None else dict(info))
        with self._lock:
            self._get("set_agent", name)
            self._agents[name] = agent

    def set_unavailable(self, flag: bool = True) -> None:
        """While set, every port call (except close) raises HypervisorUnavailable, like a dead libvirtd."""
        with self._lock:
            self._unavailable = flag

    # -- machinery ----------------------------------------------------------------------------------

    def _enter(self, operation: str, name: str) -> None:
        """Record the call, then fail it if the fake host is unavailable; caller holds the lock."""
        self.calls.append((operation, name))
        if self._unavailable:
            what = f"{operation} {name!r}" if name else operation
            raise HypervisorUnavailable(f"{what} on {self.uri} failed, hypervisor unavailable (simulated)")

    def _agent_call(
        self, operation: str, name: str, timeout_s: float, answer: Callable[[_Agent, float], T]
    ) -> T:
        """One fake agent call: the checks in the adapter's order, the agent's latency outside the lock."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        what = f"{operation} {name!r} on {self.uri}"
        with self._lock:
            self._enter(operation, name)
            info = self._get(operation, name)
            if name in self._agent_in_flight:
                raise AgentBusy(f"{what}: another guest-agent call on this domain is still in flight")
            if info.status is not DomainStatus.RUNNING:
                raise DomainNotRunning(f"{what} failed: domain is not running (it is {info.status.value})")
            agent = self._agents.get(name, _Agent())
            if agent.mode is AgentMode.ABSENT:
                raise AgentUnavailable(f"{what} failed, no guest agent: QEMU guest agent is not connected")
            self._agent_in_flight.add(name)
        try:
            started = time.perf_counter()
            latency_s = agent.latency_s() if callable(agent.latency_s) else agent.latency_s
            if agent.mode is AgentMode.HANG or latency_s > timeout_s:
                time.sleep(timeout_s)
                raise AgentTimeout(f"{what}: no answer within {timeout_s:g} s")
            time.sleep(latency_s)
            return answer(agent, (time.perf_counter() - started) * 1000.0)
        finally:
            with self._lock:
                self._agent_in_flight.discard(name)

    def _get(self, operation: str, name: str) -> DomainInfo:
        """Look a domain up by name; caller holds the lock; raises DomainNotFound."""
        try:
            return self._domains[name]
        except KeyError:
            raise DomainNotFound(f"{operation} {name!r}: no domain {name!r} on {self.uri}") from None

    def _transition(
        self,
        operation: str,
        name: str,
        allowed: Iterable[DomainStatus],
        result: tuple[DomainStatus, str] | None,
        refusal: str,
    ) -> None:
        """Apply one lifecycle operation atomically; ``result`` None keeps the domain as it is."""
        with self._lock:
            self._enter(operation, name)
            info = self._get(operation, name)
            if info.status not in allowed:
                raise DomainOperationFailed(
                    f"{operation} {name!r} on {self.uri} failed: {refusal} (it is {info.status.value})"
                )
            if result is not None:
                status, reason = result
                self._domains[name] = replace(info, status=status, reason=reason)


def _minimal_xml(info: DomainInfo) -> str:
    """A definition for a domain the fake was given as a DomainInfo (1 vCPU, 1 GiB)."""
    return (f"<domain type='test'><name>{info.name}</name><uuid>{info.uuid}</uuid>"
            "<memory unit='KiB'>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>")
