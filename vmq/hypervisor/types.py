"""Pure nouns of the hypervisor layer and the decisions on them: activity samples and lifecycle events.

No I/O and no libvirt: vmq.hypervisor.libvirt fills ActivitySample, vmq.hypervisor.events DomainEvent.

A sample holds cumulative counters as libvirt reports them (CPU time since the domain started, bytes
moved by all disks and all interfaces); only the difference between two samples means something, and
``moving`` is that difference reduced to "which counters went up", and ``busy`` the decision a reset waits
on: which of the guest's own I/O counters grew faster than a floor. A counter the hypervisor cannot give
(domain not running, device without statistics) is None and never counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from xml.etree import ElementTree

from vmq.model import DomainEventKind


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
    "crashed": DomainEventKind.CRASH,
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
