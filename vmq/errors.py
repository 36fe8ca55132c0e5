"""The one error tree of vmq.

    VmqError
    ├── ConfigError               a setting is missing or invalid (names the VMQ_* variable)
    ├── CodecError                a probe or reply failed decoding/verification (``reason`` says why)
    ├── StoreError                the state store (Redis) failed
    │   └── StoreUnavailable      Redis cannot be reached
    ├── HypervisorError           libvirt failed
    │   ├── HypervisorUnavailable the hypervisor connection is down or hangs
    │   ├── DomainNotFound        no such domain on this host
    │   └── DomainOperationFailed libvirt refused an action on a domain
    └── TaskTimeout               no worker answered a task the CLI sent in time (vmq.taskclient)

Adapters raise these ``from`` the library error; nothing above the adapters catches ``redis.*`` or
``libvirt.libvirtError``.
"""

from __future__ import annotations


class VmqError(Exception):
    """Base of every error vmq raises on purpose."""


class ConfigError(VmqError):
    """A setting is invalid; the message names the environment variable."""


class CodecError(VmqError):
    """A wire message was rejected; ``reason`` is one of ``vmq.model.RejectReason`` values."""

    def __init__(self, reason: str, detail: str, vm: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.vm = vm  # set only once the VM is known to have a key (never an attacker's free choice)


class StoreError(VmqError):
    """The state store failed."""


class StoreUnavailable(StoreError):
    """The state store cannot be reached."""


class HypervisorError(VmqError):
    """The hypervisor failed."""


class HypervisorUnavailable(HypervisorError):
    """The hypervisor connection is down or did not answer in time."""


class DomainNotFound(HypervisorError):
    """No domain of that name on this hypervisor."""


class DomainOperationFailed(HypervisorError):
    """The hypervisor refused or failed an action on a domain."""


class TaskTimeout(VmqError):
    """No worker returned the result of a task sent by vmq.taskclient.call_task within its timeout."""
