"""The beat schedule as data: entry -> task name and interval, from Settings. No logic here."""

from __future__ import annotations

from typing import Any

from vmq.config import Settings

PROBE_TASK = "vmq.monitor.probe_round"
MONITOR_QUEUE = "vmq.monitor"


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """One probe round every T1 (``VMQ_PROBE_INTERVAL_S``); a stale probe is dropped, never queued up."""
    return {
        "vmq-probe-round": {
            "task": PROBE_TASK,
            "schedule": settings.probe_interval_s,
            "options": {"queue": MONITOR_QUEUE, "expires": settings.probe_interval_s},
        },
    }
