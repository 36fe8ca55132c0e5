"""The one error tree of vmq.

    VmqError
    ├── ConfigError               a setting is missing or invalid (names the VMQ_* variable)
    ├── CodecError                a probe or reply failed decoding/verification (``reason`` says why)
    ├── StoreError                the state store (Redis) failed
    │   └── StoreUnavailable      Redis cannot be reached
    ├── HypervisorError           libvirt failed
    │   ├── HypervisorUnavailable the hypervisor connection is down or hangs
    │   ├── DomainNotFound        no such domain on this host
    │   ├── DomainOperationFailed libvirt refused an action on a domain
    │   │   └── DomainNotRunning  ... because the domain is not running (paused, shut off): agent calls
    │   ├── ChannelNotFound       the domain has no such virtio channel with a host unix socket
    │   └── AgentError            a guest-agent call on a domain failed
    │       ├── AgentUnavailable  no agent connected, none configured, or the driver has no agent calls
    │       ├── AgentTimeout      the agent did not answer in time
    │       │   └── AgentBusy     another agent call on that domain is still in flight
    │       └── AgentAnswerInvalid the agent answered something that is not a valid answer
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


class DomainNotRunning(DomainOperationFailed):
    """The action needs a running domain and this one is paused, shut off or crashed (libvirt: "domain is not
    running"); a DomainOperationFailed, so callers of the lifecycle actions see no change."""


class LockRefused(DomainOperationFailed):
    """libvirt's lock manager (virtlockd) refused to start a domain: one of its disks is leased elsewhere."""


class ChannelNotFound(HypervisorError):
    """The domain has no virtio channel of that name, or the channel has no host-side unix socket."""


class AgentError(HypervisorError):
    """A QEMU guest-agent call on one domain failed; the hypervisor itself is fine."""


class AgentUnavailable(AgentError):
    """No agent to ask: none connected in the guest, no agent channel configured, or agent calls unsupported."""


class AgentTimeout(AgentError):
    """The guest agent did not answer within the call's timeout (libvirt's or vmq's own)."""


class AgentBusy(AgentTimeout):
    """Another agent call on the same domain is still in flight: refused at once rather than queued behind it."""


class AgentAnswerInvalid(AgentError):
    """The guest agent answered, but not with a valid answer (wrong type, out-of-range values)."""


class TaskTimeout(VmqError):
    """No worker returned the result of a task sent by vmq.taskclient.call_task within its timeout."""
