"""Small interfaces the use cases are written against; adapters live in vmq.store and vmq.hypervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from vmq.model import DomainInfo

if TYPE_CHECKING:  # vmq.hypervisor imports this module: a runtime import here would be circular
    from vmq.hypervisor.types import ActivitySample


class Hypervisor(Protocol):
    """One host's hypervisor. Every method raises only vmq.errors.HypervisorError subclasses.

    Implementations: ``vmq.hypervisor.libvirt.LibvirtHypervisor`` (the only module importing libvirt)
    and ``vmq.hypervisor.fake.FakeHypervisor`` (its in-memory twin).
    """

    uri: str

    def list_domains(self) -> list[DomainInfo]:
        """All domains defined on this host, active or not."""
        ...

    def domain_info(self, name: str) -> DomainInfo:
        """One domain's status; raises DomainNotFound."""
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
