"""In-memory twin of LibvirtHypervisor with the libvirt test driver's semantics, for tests and demos.

Transitions, as measured on the test driver (and on QEMU for the reasons):

    operation  allowed from              result
    reset      active (running, paused)  status and reason unchanged
    suspend    running                   paused, reason "user"
    resume     paused                    running, reason "unpaused"
    start      shut off or crashed       running, reason "booted"
    destroy    active                    shutoff, reason "destroyed"

Anything else raises DomainOperationFailed, like libvirt does. ``DomainStatus.OTHER`` counts as active.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace

from vmq.errors import DomainNotFound, DomainOperationFailed, HypervisorUnavailable
from vmq.model import DomainInfo, DomainStatus

_ACTIVE = frozenset({DomainStatus.RUNNING, DomainStatus.PAUSED, DomainStatus.OTHER})
_INACTIVE = frozenset({DomainStatus.SHUTOFF, DomainStatus.CRASHED})


class FakeHypervisor:
    """The Hypervisor port in memory; thread-safe; records every call in ``calls``."""

    def __init__(self, uri: str = "fake://", domains: Iterable[DomainInfo] = ()) -> None:
        """Define ``domains`` on a fake host; raises ValueError on duplicate names or ABSENT status."""
        self.uri = uri
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._unavailable = False
        self._domains: dict[str, DomainInfo] = {}
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

    def reset(self, name: str) -> None:
        """Hard-reset an active domain (state unchanged); raises DomainOperationFailed if shut off."""
        self._transition("reset", name, _ACTIVE, None, "domain is not running")

    def resume(self, name: str) -> None:
        """Resume a paused domain; raises DomainOperationFailed if it is not paused."""
        self._transition(
            "resume", name, {DomainStatus.PAUSED}, (DomainStatus.RUNNING, "unpaused"), "domain is not paused"
        )

    def start(self, name: str) -> None:
        """Start a shut-off domain; raises DomainOperationFailed if it is already active."""
        self._transition(
            "start", name, _INACTIVE, (DomainStatus.RUNNING, "booted"), "domain is already running"
        )

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
