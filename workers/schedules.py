"""Beat's scheduler, made to keep time when the beat node's wall clock jumps back.

Celery beat times interval entries from their last run in wall-clock time, so a clock stepped back made it
wait out the jump with nothing probed (docs/reliability.md, "beat's clock jumping back"). A forward jump only
makes the entry due at once: one early round, which start_round.lua refuses if under 0.6 x T1 after the last.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import PersistentScheduler
from celery.schedules import schedule
from celery.utils.time import maybe_make_aware

log = logging.getLogger(__name__)


class SteadyScheduler(PersistentScheduler):
    """Celery's default scheduler (``-s`` file and all), except that an entry due further ahead than its own
    interval, which only a clock that went back explains, counts its last run as now: the next probe is one
    T1 away, not the size of the jump plus T1. Also after a restart on a clock that went back meanwhile (the
    last runs come from the ``-s`` file)."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One beat iteration, with the entries re-timed if the clock went back since they last ran (checked
        again after it: the heap it builds at start-up or on a schedule change may be the one that is off)."""
        self._retime_if_the_clock_went_back()
        interval: float = super().tick(*args, **kwargs)
        return 0.0 if self._retime_if_the_clock_went_back() else interval

    def _retime_if_the_clock_went_back(self) -> bool:
        heap = self._heap
        if not heap:
            return False
        now = self._when(heap[0][2], 0)
        ahead = max(event[0] - now - _interval_s(event[2].schedule) for event in heap)
        if ahead <= 1.0:
            return False
        log.warning("beat: the clock went back by about %.0f s: the schedule is timed again from now", ahead)
        for entry in self.schedule.values():
            entry_now = maybe_make_aware(entry.default_now())
            if maybe_make_aware(entry.last_run_at) > entry_now:
                entry.last_run_at = entry_now
        self.populate_heap()
        return True


def _interval_s(entry_schedule: object) -> float:
    """An interval entry's period in seconds; infinite for others (a crontab's next run may be far ahead)."""
    return entry_schedule.seconds if isinstance(entry_schedule, schedule) else float("inf")
