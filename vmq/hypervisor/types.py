"""Activity counters of one domain, and the pure arithmetic on them; no I/O, no libvirt.

A sample holds cumulative counters as libvirt reports them (CPU time since the domain started, bytes
moved by all disks and all interfaces); only the difference between two samples means something, and
``moving`` is that difference reduced to "which counters went up". A counter the hypervisor cannot give
(domain not running, device without statistics) is None and never counts as moving.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from dataclasses import dataclass, fields


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
    """Names of the counters that grew from ``a`` to ``b``, in COUNTERS order; None on either side is ignored."""
    grown: list[str] = []
    for name in COUNTERS:
        before, after = getattr(a, name), getattr(b, name)
        if before is not None and after is not None and after > before:
            grown.append(name)
    return grown


def device_targets(domain_xml: str, device: str) -> list[str]:
    """Target names (``<target dev=...>``) of every ``<devices><device>`` in a domain's XML, in order.

    Disks without a ``<source>`` (an empty CD-ROM tray) are left out: they have no statistics to give.
    Raises ValueError on a document that is not XML.
    """
    try:
        root = ElementTree.fromstring(domain_xml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    targets: list[str] = []
    for element in root.findall(f"./devices/{device}"):
        if device == "disk" and element.find("source") is None:
            continue
        target = element.find("target")
        name = target.get("dev") if target is not None else None
        if name:
            targets.append(name)
    return targets


def total(values: Iterable[int | None]) -> int | None:
    """Sum of per-device counters, or None if there are none or any is unknown.

    All or nothing on purpose: a partial sum would jump up when a device answers again and fake activity.
    """
    known: list[int] = []
    for value in values:
        if value is None or value < 0:  # libvirt reports -1 for a counter it does not keep
            return None
        known.append(value)
    return sum(known) if known else None
