"""Pure nouns of the hypervisor layer and the decisions on them: activity samples and lifecycle events.

No I/O and no libvirt: vmq.hypervisor.libvirt fills ActivitySample, vmq.hypervisor.events DomainEvent.

A sample holds cumulative counters as libvirt reports them (CPU time since the domain started, bytes
moved by all disks and all interfaces); only the difference between two samples means something, and
``moving`` is that difference reduced to "which counters went up", and ``busy`` the decision a reset waits
on: which of the guest's own I/O counters grew faster than a floor. A counter the hypervisor cannot give
(domain not running, device without statistics) is None and never counts.

Guest-agent answers (``AgentAnswer``, ``guest_time_ms``, ``reduce_guest_info``) are checked here, so the
libvirt adapter and its fake reject the same nonsense with the same AgentAnswerInvalid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from xml.etree import ElementTree

from vmq.errors import AgentAnswerInvalid
from vmq.model import DomainEventKind


@dataclass(frozen=True)
class HostCapacity:
    """What a host has, as libvirt says: physical CPUs and memory, and what its active domains hold of them."""

    cpus: int
    memory_mib: int
    vcpus_used: int
    memory_used_mib: int


@dataclass(frozen=True)
class ActivitySample:
    """Cumulative counters of one domain at one instant (``taken_monotonic_s``: time.monotonic)."""

    cpu_time_ns: int | None
    disk_read_bytes: int | None
    disk_write_bytes: int | None
    net_rx_bytes: int | None
    net_tx_bytes: int | None
    taken_monotonic_s: float


# The counters of an ActivitySample, in field order; ``moving`` reports these names.
COUNTERS: tuple[str, ...] = tuple(
    field.name for field in fields(ActivitySample) if field.name != "taken_monotonic_s"
)


def moving(a: ActivitySample, b: ActivitySample) -> list[str]:
    """Names of the counters that grew from ``a`` to ``b``, in COUNTERS order; None counters are ignored."""
    grown: list[str] = []
    for name in COUNTERS:
        before, after = getattr(a, name), getattr(b, name)
        if before is not None and after is not None and after > before:
            grown.append(name)
    return grown


#: Counters that show the guest itself doing work (reading or writing its disks, sending on its network).
#: CPU time is not one: an idle QEMU guest always accrues some, and a livelocked one accrues the most.
#: Received bytes are not either: they arrive whatever the guest's state (probes, broadcasts).
WORK_COUNTERS: tuple[str, ...] = ("disk_read_bytes", "disk_write_bytes", "net_tx_bytes")


def busy(a: ActivitySample, b: ActivitySample, min_bytes_per_s: float) -> list[str]:
    """The WORK_COUNTERS that grew at ``min_bytes_per_s`` or more between the two samples: evidence that a
    silent guest is still working (like vSphere HA's I/O check), not merely powered on."""
    window_s = max(1e-3, b.taken_monotonic_s - a.taken_monotonic_s)
    out: list[str] = []
    for name in WORK_COUNTERS:
        before, after = getattr(a, name), getattr(b, name)
        if before is not None and after is not None and (after - before) / window_s >= min_bytes_per_s:
            out.append(name)
    return out


def device_targets(domain_xml: str, device: str) -> list[str]:
    """Target names (``<target dev=...>``) of every ``<devices><device>`` of a domain XML; ValueError."""
    try:
        root = ElementTree.fromstring(domain_xml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    targets: list[str] = []
    for element in root.findall(f"./devices/{device}"):
        if device == "disk" and element.find("source") is None:
            continue  # an empty CD-ROM tray: no statistics to give
        target = element.find("target")
        name = target.get("dev") if target is not None else None
        if name:
            targets.append(name)
    return targets


def total(values: Iterable[int | None]) -> int | None:
    """Sum of per-device counters, or None if there are none or any is unknown (all or nothing)."""
    # A partial sum would jump up when a device answers again, and fake activity.
    known: list[int] = []
    for value in values:
        if value is None or value < 0:  # libvirt reports -1 for a counter it does not keep
            return None
        known.append(value)
    return sum(known) if known else None


# libvirt's lifecycle events, as the words DomainEvent.event carries (VIR_DOMAIN_EVENT_<WORD>).
EVENTS: tuple[str, ...] = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)

#: DomainEvent.event of a domain's metadata change (its detail: the namespace URI of the element changed).
METADATA_EVENT = "metadata"

# classify(): an exact (event, detail) entry wins over an entry for the whole event; else OTHER.
_KIND_BY_DETAIL: dict[tuple[str, str], DomainEventKind] = {
    ("stopped", "crashed"): DomainEventKind.CRASH,
    ("stopped", "failed"): DomainEventKind.CRASH,  # QEMU process killed or died
    ("stopped", "destroyed"): DomainEventKind.OPERATOR_STOP,
    ("stopped", "shutdown"): DomainEventKind.OPERATOR_STOP,
    ("stopped", "saved"): DomainEventKind.OPERATOR_STOP,
    ("stopped", "from_snapshot"): DomainEventKind.OPERATOR_STOP,
    ("stopped", "migrated"): DomainEventKind.MIGRATING_AWAY,
    ("suspended", "migrated"): DomainEventKind.MIGRATING_AWAY,
    ("suspended", "postcopy"): DomainEventKind.MIGRATING_AWAY,
}
_KIND_BY_EVENT: dict[str, DomainEventKind] = {
    "watchdog": DomainEventKind.WATCHDOG,  # vmq.hypervisor.events: VIR_DOMAIN_EVENT_ID_WATCHDOG
    "io_error": DomainEventKind.IO_ERROR,  # VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON
    "agent": DomainEventKind.AGENT,  # VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE
    "crashed": DomainEventKind.CRASH,  # panics too: (crashed, panicked) from a pvpanic or hyperv panic device
    "shutdown": DomainEventKind.OPERATOR_STOP,
    "suspended": DomainEventKind.PAUSED,
    "resumed": DomainEventKind.RESUMED,
    "started": DomainEventKind.STARTED,
}


@dataclass(frozen=True)
class DomainEvent:
    """One lifecycle event in words, e.g. ``event="stopped", detail="destroyed"`` (see event_words)."""

    name: str
    uuid: str
    event: str
    detail: str


def classify(event: DomainEvent) -> DomainEventKind:
    """What a lifecycle event means for vmq: CRASH, OPERATOR_STOP, MIGRATING_AWAY, PAUSED, ... or OTHER."""
    return _KIND_BY_DETAIL.get((event.event, event.detail)) or _KIND_BY_EVENT.get(event.event,
                                                                                DomainEventKind.OTHER)


@dataclass(frozen=True)
class AgentAnswer:
    """One answered guest-agent ping: the guest's wall clock (ms since the epoch; None if the call gives no
    time) and how long the call took as the host saw it (ms, lookup and libvirt round trip included)."""

    guest_time_ms: int | None
    latency_ms: float


_NS_PER_S = 1_000_000_000


def guest_time_ms(answer: object) -> int:
    """The guest time in ms from libvirt-python's ``getTime()`` answer ``{'seconds': s, 'nseconds': ns}``;
    raises AgentAnswerInvalid on anything else (not a dict, missing or non-integer fields, out of range)."""
    if not isinstance(answer, Mapping):
        raise AgentAnswerInvalid(f"guest time is not a mapping of seconds and nseconds: {answer!r:.80}")
    seconds, nanoseconds = answer.get("seconds"), answer.get("nseconds", 0)
    for field_name, value in (("seconds", seconds), ("nseconds", nanoseconds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise AgentAnswerInvalid(f"guest time field {field_name!r} is not a non-negative integer: {value!r:.80}")
    assert isinstance(seconds, int) and isinstance(nanoseconds, int)  # checked above; for the type checker
    if nanoseconds >= _NS_PER_S:
        raise AgentAnswerInvalid(f"guest time nseconds out of range: {nanoseconds}")
    return seconds * 1000 + nanoseconds // 1_000_000


def _optional_str(info: Mapping[str, object], key: str) -> str | None:
    value = info.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AgentAnswerInvalid(f"guest info {key!r} is not a string: {value!r:.80}")
    return value


def _optional_int(info: Mapping[str, object], key: str) -> int | None:
    value = info.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AgentAnswerInvalid(f"guest info {key!r} is not a non-negative integer: {value!r:.80}")
    return value


def reduce_guest_info(info: object) -> dict[str, object]:
    """libvirt's flat ``guestInfo()`` parameters (``os.id``, ``hostname``, ``fs.<i>.used-bytes``, ...) reduced
    to a small JSON-able dict::

        {"os_id": "debian", "os_version_id": "12", "hostname": "web-1",
         "filesystems": [{"mountpoint": "/", "fstype": "ext4", "used_bytes": 1, "total_bytes": 2}]}

    Missing facts are None (an agent may not support every command); raises AgentAnswerInvalid when the
    answer is not a mapping or a fact has the wrong type."""
    if not isinstance(info, Mapping):
        raise AgentAnswerInvalid(f"guest info is not a mapping: {info!r:.80}")
    count = _optional_int(info, "fs.count") or 0
    filesystems: list[dict[str, object]] = []
    for index in range(count):
        prefix = f"fs.{index}."
        filesystems.append(
            {
                "mountpoint": _optional_str(info, prefix + "mountpoint"),
                "fstype": _optional_str(info, prefix + "fstype"),
                "used_bytes": _optional_int(info, prefix + "used-bytes"),
                "total_bytes": _optional_int(info, prefix + "total-bytes"),
            }
        )
    return {
        "os_id": _optional_str(info, "os.id"),
        "os_version_id": _optional_str(info, "os.version-id"),
        "hostname": _optional_str(info, "hostname"),
        "filesystems": filesystems,
    }
