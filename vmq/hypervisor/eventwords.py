"""libvirt's event numbers as words, read off libvirt-python's own constants (imported on first use)."""

from __future__ import annotations

import functools
from typing import Any

from vmq.hypervisor.types import EVENTS

__all__ = ["constant_word", "event_words"]


def _libvirt() -> Any:
    import libvirt

    return libvirt


def event_words(event: int, detail: int) -> tuple[str, str]:
    """libvirt's lifecycle ``(event, detail)`` numbers as lowercase words; "unknown" for newer numbers."""
    events, details = _word_tables()
    return events.get(event, "unknown"), details.get((event, detail), "unknown")


@functools.cache
def _word_tables() -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    """Read the words off libvirt-python's constants (VIR_DOMAIN_EVENT_STOPPED_DESTROYED -> "destroyed")."""
    libvirt = _libvirt()
    events: dict[int, str] = {}
    details: dict[tuple[int, int], str] = {}
    for word in EVENTS:
        prefix = f"VIR_DOMAIN_EVENT_{word.upper()}"
        number = getattr(libvirt, prefix)
        events[number] = word
        for constant in dir(libvirt):
            if constant.startswith(f"{prefix}_") and not constant.endswith("_LAST"):
                details[(number, getattr(libvirt, constant))] = constant.removeprefix(f"{prefix}_").lower()
    return events, details


def constant_word(prefix: str, number: int) -> str:
    """The word of libvirt's constant ``<prefix><WORD>`` equal to ``number``, lowercase with "-" for "_"
    (VIR_DOMAIN_EVENT_WATCHDOG_INJECTNMI -> "injectnmi"); "unknown" if none."""
    libvirt = _libvirt()
    for name in dir(libvirt):
        if name.startswith(prefix) and not name.endswith("_LAST") and getattr(libvirt, name) == number:
            return name.removeprefix(prefix).lower().replace("_", "-")
    return "unknown"
