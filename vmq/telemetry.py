"""What /metrics reports, as values (pure): the histograms' buckets, folding a stored histogram, and the
snapshot one scrape reads from the store."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: Seconds from a VM's last valid reply to its `faulty` verdict: about T1 + T2 (+ the judge's lateness);
#: the bounds cover T2 from 1 to 60 s.
DETECTION_BUCKETS_S: tuple[float, ...] = (0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180)
#: Seconds from the `faulty` verdict (incident opened) to the first valid reply after it: restart + boot + T1.
RECOVERY_BUCKETS_S: tuple[float, ...] = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800)

DETECTION = "detection"
RECOVERY = "recovery"
HISTOGRAMS: dict[str, tuple[float, ...]] = {DETECTION: DETECTION_BUCKETS_S, RECOVERY: RECOVERY_BUCKETS_S}

#: Result words of a finished restart request (label ``result`` of vmq_restarts_total).
RESTART_RESULTS = ("ok", "failed", "misrouted", "silent_but_active", "left_alone", "skipped")



def bucket_field(value: float, bounds: Sequence[float]) -> str:
    """The bucket field ``value`` is counted in: the smallest bound >= value, else "+Inf"."""
    for bound in bounds:
        if value <= bound:
            return _bound_text(bound)
    return "+Inf"


def _bound_text(bound: float) -> str:
    return repr(float(bound))


@dataclass(frozen=True)
class HistogramData:
    """A histogram as read back: cumulative (upper bound text, count) pairs ending with +Inf, sum, count."""

    buckets: list[tuple[str, float]]
    sum: float
    count: float


@dataclass
class MetricsSnapshot:
    """Every value ``/metrics`` exposes, read in a few pipelined round trips."""

    probe_rounds: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    restarts: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (host, action, result) -> n
    histograms: dict[str, HistogramData] = field(default_factory=dict)
    vms_by_state: dict[str, int] = field(default_factory=dict)
    guard_episodes: dict[str, int] = field(default_factory=dict)  # "cluster" / "host" -> active episodes
    restarts_suspended: bool = False
    replies_unread: int | None = None  # None: Redis < 7.0 does not count the entries added to a stream
    oldest_unread_s: float = 0.0  # age of the oldest reply no monitor has read yet (Redis time)


def read_histogram(raw: Mapping[str, str], bounds: Sequence[float]) -> HistogramData:
    """Fold a stored histogram hash into cumulative buckets over ``bounds`` (fields of old bounds are
    counted in the first current bucket that covers them)."""
    per_bucket = [0.0] * (len(bounds) + 1)
    for name, value in raw.items():
        if name in ("sum", "count"):
            continue
        try:
            upper = float(name)
        except ValueError:
            continue
        index = next((i for i, bound in enumerate(bounds) if upper <= bound), len(bounds))
        per_bucket[index] += float(value)
    cumulative: list[tuple[str, float]] = []
    running = 0.0
    for i, bound in enumerate((*bounds, math.inf)):
        running += per_bucket[i]
        cumulative.append(("+Inf" if bound == math.inf else _bound_text(bound), running))
    return HistogramData(cumulative, float(raw.get("sum") or 0), float(raw.get("count") or 0))
