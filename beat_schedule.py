"""The beat schedule as data: entry -> task name and interval, from Settings. No logic here."""

from __future__ import annotations

from typing import Any

from vmq.config import Settings
from vmq.routing import MONITOR_QUEUE, NOTIFY_EVENTS_TASK, PROBE_TASK

#: How often the notifier reads the audit stream when a webhook is configured (s).
NOTIFY_EVERY_S = 1.0


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """One probe round every T1 (``VMQ_PROBE_INTERVAL_S``); with ``VMQ_WEBHOOK_URL``, the notifier every second
    (its ``expires`` is harmless: a late notifier run only means the next one sends the same events).

    No Celery ``expires``: Celery would check it on the worker's own clock (docs/reliability.md, clock
    faults); a backlog of probes is harmless, start_round.lua refuses a round under 0.6 x T1 after the last.
    """
    schedule: dict[str, Any] = {
        "vmq-probe-round": {
            "task": PROBE_TASK,
            "schedule": settings.probe_interval_s,
            "options": {"queue": MONITOR_QUEUE},
        },
    }
    if settings.webhook_url:  # notifications by event class, read from the audit stream (vmq.notifications)
        schedule["vmq-notify-events"] = {
            "task": NOTIFY_EVENTS_TASK,
            "schedule": NOTIFY_EVERY_S,
            "options": {"queue": MONITOR_QUEUE, "expires": 10 * NOTIFY_EVERY_S},
        }
    return schedule
