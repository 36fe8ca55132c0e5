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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import astuple, dataclass, replace
from enum import Enum

from vmq.errors import DomainNotFound, DomainOperationFailed, HypervisorUnavailable
from vmq.hypervisor.types import ActivitySample
from vmq.model import DomainInfo, DomainStatus

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
        """Define ``domains`` on a fake host; raises ValueError on duplicate names or ABSENT status."""
        self.uri = uri
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._unavailable = False
        self._domains: dict[str, DomainInfo] = {}
        self._counters: dict[str, _Counters] = {}
        for info in domains:
            if info.status is DomainStatus.ABSENT:
                raise ValueError(f"domain {info.name!r}: a defined domain cannot be {info.status.value}")
            if info.name in self._domains:
                raise ValueError(f"domain {info.name!r} defined twice")
            self._domains[info.name] = info

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
