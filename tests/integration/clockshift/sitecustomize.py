"""Test-only: shift this process's wall clock by the seconds written in $CLOCKSHIFT_FILE (re-read every 0.1 s).

Put this directory first on PYTHONPATH of one process (a guest's responder, a monitor worker) to give it a
wrong clock, or a clock that jumps when the test rewrites the file. Python's ``time.time``/``time.time_ns``
and ``datetime.now``/``utcnow``/``today`` (what Celery uses for countdowns and ETAs) are shifted;
``time.monotonic`` is not (a wall-clock jump does not move it either). Never on a production path.
"""

from __future__ import annotations

import datetime as _dt
import os
import time as _time

_FILE = os.environ.get("CLOCKSHIFT_FILE", "")
_real_time, _real_time_ns, _real_monotonic = _time.time, _time.time_ns, _time.monotonic
_cache = [0.0, -1.0]  # offset_s, read at (monotonic)


def _offset() -> float:
    now = _real_monotonic()
    if now - _cache[1] > 0.1:
        try:
            with open(_FILE) as f:
                _cache[0] = float(f.read().strip() or 0)
        except (OSError, ValueError):
            pass
        _cache[1] = now
    return _cache[0]


if _FILE:
    _time.time = lambda: _real_time() + _offset()
    _time.time_ns = lambda: _real_time_ns() + int(_offset() * 1e9)

    class _ShiftedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def,override]
            return _dt.datetime.fromtimestamp(_time.time(), tz)

        @classmethod
        def utcnow(cls):  # type: ignore[no-untyped-def,override]
            return _dt.datetime.fromtimestamp(_time.time(), _dt.UTC).replace(tzinfo=None)

        @classmethod
        def today(cls):  # type: ignore[no-untyped-def,override]
            return cls.now()

    _dt.datetime = _ShiftedDatetime  # type: ignore[misc]
