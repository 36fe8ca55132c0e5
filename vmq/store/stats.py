"""Redis-held counters and histograms behind ``/metrics``, and the one pipelined read a scrape makes.

Totals live in Redis, written by whichever process saw the event, so any monitor worker exposes the same
numbers (``vmq.metrics``).

A histogram is one hash (``Keys.histogram(name)``, buckets in vmq.telemetry): a field per bucket upper bound
holding the count of observations that fell in that bucket alone (not cumulative), ``+Inf`` for the rest,
plus ``sum`` and ``count``. Observations are HINCRBY/HINCRBYFLOAT, so concurrent writers never lose one.

Writes are best effort: a counter that cannot be written is logged and lost, never allowed to change what
vmq does (a verdict, a dispatch or a restart already happened when it is counted).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis

from vmq.model import VmState
from vmq.store.client import StorePart, translate_errors
from vmq.store.client import text as _text
from vmq.telemetry import DETECTION, HISTOGRAMS, RECOVERY, MetricsSnapshot, bucket_field, read_histogram

log = logging.getLogger(__name__)

@contextlib.contextmanager
def _best_effort(what: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        log.warning("metrics: could not %s: %s", what, exc)


class RedisStats(StorePart):
    """Counters (``<ns>:stats``, rejects by reason, restart outcomes) and histograms (detection, recovery)."""

    def incr_stat(self, name: str, amount: int = 1) -> None:
        """Bump one counter in the stats hash."""
        with translate_errors("HINCRBY stats"):
            self.r.hincrby(self.keys.stats, name, amount)

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(stats, rejects by reason)."""
        with translate_errors("counters"):
            stats = self.r.hgetall(self.keys.stats)
            rejects = self.r.hgetall(self.keys.rejects)
        return ({_text(a): int(b) for a, b in stats.items()}, {_text(a): int(b) for a, b in rejects.items()})

    # ------------------------------------------------------------------ writing
    def _observe(self, pipe: Any, name: str, values: Iterable[float]) -> None:
        key, bounds = self.keys.histogram(name), HISTOGRAMS[name]
        for value in values:
            pipe.hincrby(key, bucket_field(value, bounds), 1)
            pipe.hincrbyfloat(key, "sum", value)
            pipe.hincrby(key, "count", 1)

    def record_fault(self, last_valid_ms: int, now_ms: int) -> None:
        """A new incident was opened: count the fault and, if the VM ever answered, observe the time from
        its last valid reply to the verdict (vmq_detection_seconds)."""
        with _best_effort("record fault"):
            pipe = self.r.pipeline(transaction=False)
            pipe.hincrby(self.keys.stats, "faults", 1)
            if last_valid_ms > 0:
                self._observe(pipe, DETECTION, [max(0.0, (now_ms - last_valid_ms) / 1000.0)])
            pipe.execute()

    def record_recoveries(self, seconds: Sequence[float]) -> None:
        """Observe the time to recover of VMs that answered again after an incident (one round trip)."""
        if not seconds:
            return
        with _best_effort("record recoveries"):
            pipe = self.r.pipeline(transaction=False)
            self._observe(pipe, RECOVERY, seconds)
            pipe.execute()

    def count_restart_outcome(self, host: str, action: str, result: str) -> None:
        """Count one finished restart request by host, libvirt action attempted (or "none") and result
        (vmq.telemetry.RESTART_RESULTS)."""
        with _best_effort("count restart"):
            self.r.hincrby(self.keys.restart_outcomes, f"{host}|{action}|{result}", 1)

    # ------------------------------------------------------------------ reading
    def metrics_snapshot(self) -> MetricsSnapshot:
        """The Redis-held values /metrics shows (hosts and the reply backlog aside): O(non-healthy VMs) work.

        Healthy VMs are the known VMs outside the attention set, so only the few others are read.
        Raises StoreUnavailable/StoreError.
        """
        k = self.keys
        with translate_errors("metrics"):
            pipe = self.r.pipeline(transaction=False)
            pipe.get(k.round_seq)
            pipe.hgetall(k.stats)
            pipe.hgetall(k.rejects)
            pipe.hgetall(k.restart_outcomes)
            for name in HISTOGRAMS:
                pipe.hgetall(k.histogram(name))
            pipe.scard(k.vms)
            pipe.sinter(k.attention, k.vms)
            pipe.hkeys(k.storm)
            pipe.exists(k.restarts_suspended)
            out = pipe.execute()
            seq, stats, rejects, restarts = out[:4]
            hists = out[4:4 + len(HISTOGRAMS)]
            known, attention, episodes, suspended = out[4 + len(HISTOGRAMS):]
            others = sorted(_text(vm) for vm in attention)
            pipe = self.r.pipeline(transaction=False)
            for vm in others:
                pipe.hget(k.vm(vm), "state")
            states = pipe.execute() if others else []
        snap = MetricsSnapshot(
            probe_rounds=int(seq or 0),
            stats={_text(a): int(b) for a, b in stats.items()},
            rejects={_text(a): int(b) for a, b in rejects.items()},
            restarts_suspended=bool(suspended),
        )
        for raw_label, count in restarts.items():
            host, _, rest = _text(raw_label).partition("|")
            action, _, result = rest.partition("|")
            snap.restarts[(host, action, result)] = int(count)
        for name, raw in zip(HISTOGRAMS, hists):
            snap.histograms[name] = read_histogram({_text(a): _text(b) for a, b in raw.items()}, HISTOGRAMS[name])
        snap.vms_by_state = dict.fromkeys((s.value for s in VmState), 0)
        for state in states:
            name = _text(state) if state else VmState.UNKNOWN.value
            snap.vms_by_state[name] = snap.vms_by_state.get(name, 0) + 1
        snap.vms_by_state[VmState.HEALTHY.value] += max(0, int(known) - len(others))
        snap.guard_episodes = {"cluster": 0, "host": 0}
        for episode in episodes:
            scope = "cluster" if _text(episode) == "cluster" else "host"
            snap.guard_episodes[scope] += 1
        return snap
