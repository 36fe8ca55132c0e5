"""The beat schedule as data: entry -> task name and interval, from Settings. No logic here."""

from __future__ import annotations

from typing import Any

from vmq.config import Settings
from vmq.routing import MONITOR_QUEUE, PROBE_TASK


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """One probe round every T1 (``VMQ_PROBE_INTERVAL_S``).

    No Celery ``expires``: Celery would check it on the worker's own clock (docs/reliability.md, clock
    faults); a backlog of probes is harmless, start_round.lua refuses a round under 0.6 x T1 after the last.
    """
    return {
        "vmq-probe-round": {
            "task": PROBE_TASK,
            "schedule": settings.probe_interval_s,
            "options": {"queue": MONITOR_QUEUE},
        },
    }
