"""The beat schedule as data: entry -> task name and interval, from Settings. No logic here."""

from __future__ import annotations

from typing import Any

from vmq.config import Settings

PROBE_TASK = "vmq.monitor.probe_round"
MONITOR_QUEUE = "vmq.monitor"


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """One probe round every T1 (``VMQ_PROBE_INTERVAL_S``).

    No Celery ``expires``: Celery compares it with the worker's own clock, so a monitor node whose clock ran
    more than T1 ahead of beat's discarded every probe and nothing was monitored any more
    (tests/integration/test_faults.py, the clock test). A backlog of probes (a monitor that was down) is
    harmless without it: start_round.lua refuses a round less than 0.6 x T1 after the last one by Redis' clock.
    """
    return {
        "vmq-probe-round": {
            "task": PROBE_TASK,
            "schedule": settings.probe_interval_s,
            "options": {"queue": MONITOR_QUEUE},
        },
    }
