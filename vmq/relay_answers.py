"""The pure parts of the host's probe relay (vmq.relay): the answers it emits, the outbox that batches them,
its counters and its rate-limited logging. No I/O, time passed in.

An answer is one JSON object of a relayed batch (docs/protocol.md, "Relayed answers"):

    agent:   {"vm", "p": "agent", "round", "nonce", "latency_ms", "guest_ms"[, "info"]}
    channel: {"vm", "p": "channel", "m": <the guest-signed message>, "s": <its hex signature>}
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Answer", "LatencyWindow", "OncePer", "Outbox", "RelayStats", "agent_answer", "channel_answer",
           "channel_reply_check"]

#: One answer as written in a batch (JSON-able).
Answer = dict[str, Any]


def agent_answer(vm: str, round_id: int, nonce: str, latency_ms: float, guest_ms: int | None,
                 info: Mapping[str, object] | None = None) -> Answer:
    """The answer of ``vm``'s guest agent to round ``round_id`` (latency in ms, rounded to µs; guest wall
    clock in ms since the epoch, None when the agent gave none); ``info`` the reduced guest info, if asked."""
    answer: Answer = {"vm": vm, "p": "agent", "round": round_id, "nonce": nonce,
                      "latency_ms": round(latency_ms, 3), "guest_ms": guest_ms}
    if info is not None:
        answer["info"] = dict(info)
    return answer


def channel_answer(vm: str, message: bytes, signature: bytes) -> Answer:
    """The answer carrying one signed reply line read from ``vm``'s channel, untouched (verified centrally)."""
    return {"vm": vm, "p": "channel", "m": message.decode("utf-8"), "s": signature.decode("ascii")}


def channel_reply_check(vm: str, message: bytes) -> tuple[str | None, int | None]:
    """Cheap check of a channel reply before relaying it: ``(reject reason or None, its round or None)``.

    ``malformed`` when the message is not a JSON object with a string ``vm``; ``wrong_vm`` when that ``vm`` is
    not the VM whose socket it came in on (a guest must not answer for another). Signature, nonce and the rest
    are verified centrally, as for replies that came through Redis."""
    try:
        body = json.loads(message)
    except ValueError:
        return "malformed", None
    if not isinstance(body, dict) or not isinstance(body.get("vm"), str):
        return "malformed", None
    if body["vm"] != vm:
        return "wrong_vm", None
    round_id = body.get("round")
    return None, round_id if isinstance(round_id, int) and not isinstance(round_id, bool) else None


class OncePer:
    """Says yes to a key at most once per ``period_s`` (rate-limited logging); ``now`` in seconds."""

    def __init__(self, period_s: float, max_keys: int = 10_000) -> None:
        self.period_s = period_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable, now: float) -> bool:
        """True if ``key`` was not let through in the last ``period_s`` (and remember ``now`` for it)."""
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            return False
        if len(self._last) >= self.max_keys:  # forget keys whose period is over: the map stays bounded
            self._last = {k: t for k, t in self._last.items() if now - t < self.period_s}
        self._last[key] = now
        return True


@dataclass
class Outbox:
    """Answers gathered and not yet written, each with the time (s) it became ready.

    ``due`` says when to flush: something is waiting and the oldest has waited ``flush_interval_s``, or
    the caller knows the round is complete. A failed flush puts the batch back; answers older than
    ``max_age_s`` are then dropped (a stale batch is worse than none: its arrival time would lie)."""

    flush_interval_s: float = 0.05
    max_age_s: float = 2.0
    _items: list[tuple[float, Answer]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, answer: Answer, ready_s: float) -> None:
        """Queue one answer that became ready at ``ready_s``."""
        self._items.append((ready_s, answer))

    def due(self, now: float, round_complete: bool = False) -> bool:
        """True when a flush is due now."""
        if not self._items:
            return False
        return round_complete or now - self._items[0][0] >= self.flush_interval_s

    def take(self) -> list[tuple[float, Answer]]:
        """Everything queued, oldest first; the outbox is empty afterwards."""
        items, self._items = self._items, []
        return items

    def put_back(self, items: list[tuple[float, Answer]], now: float) -> int:
        """Requeue a batch whose write failed, ahead of newer answers, dropping those older than
        ``max_age_s``; returns how many were dropped."""
        kept = [item for item in items if now - item[0] < self.max_age_s]
        self._items = kept + self._items
        return len(items) - len(kept)


class LatencyWindow:
    """The last ``size`` samples (ms) of something, for percentiles."""

    def __init__(self, size: int = 2000) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value_ms: float) -> None:
        """Record one sample."""
        self._samples.append(value_ms)

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, fraction: float) -> float | None:
        """The nearest-rank percentile (``fraction`` in 0..1) of the window, None when it is empty."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]


@dataclass
class RelayStats:
    """What the relay did since it started: cumulative counters, batch sizes and latency windows.

    ``counts`` keys: ``probes``, ``probe_invalid``, ``probe_duplicate``, ``answers_agent``,
    ``answers_channel``, ``agent_calls``, ``info``, ``dropped_stale``, ``flush_failed``,
    ``subscribe_failed``, ``inventory_failed``, ``heartbeat_failed``; ``drops`` by reason: ``agent_busy``,
    ``agent_timeout``, ``agent_unavailable``, ``agent_invalid``, ``not_running``, ``hypervisor_error``,
    ``agent_late``, ``malformed``, ``oversized``, ``wrong_vm``, ``no_socket``."""

    counts: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)
    flushes: int = 0
    batch_sizes: LatencyWindow = field(default_factory=LatencyWindow)  # answers per flush
    largest_batch: int = 0
    agent_latency_ms: LatencyWindow = field(default_factory=LatencyWindow)
    flush_delay_ms: LatencyWindow = field(default_factory=LatencyWindow)  # ready -> written

    def flushed(self, size: int, delays_ms: list[float]) -> None:
        """Record one successful flush of ``size`` answers that waited ``delays_ms`` each."""
        self.flushes += 1
        self.batch_sizes.add(size)
        self.largest_batch = max(self.largest_batch, size)
        for delay in delays_ms:
            self.flush_delay_ms.add(delay)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy: counters, drops, flushes and the p50/p99 of batch size, agent latency, delay."""
        def pair(window: LatencyWindow) -> dict[str, float | None]:
            return {"p50": window.percentile(0.5), "p99": window.percentile(0.99)}

        return {"counts": dict(self.counts), "drops": dict(self.drops), "flushes": self.flushes,
                "largest_batch": self.largest_batch, "batch_size": pair(self.batch_sizes),
                "agent_latency_ms": pair(self.agent_latency_ms), "flush_delay_ms": pair(self.flush_delay_ms)}

    def summary(self) -> str:
        """One log line of the snapshot."""
        snap = self.snapshot()

        def fmt(values: Mapping[str, float | None]) -> str:
            return "/".join("-" if v is None else f"{v:.1f}" for v in values.values())

        drops = ",".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "none"
        counts = self.counts
        return (f"probes={counts['probes']} answers agent={counts['answers_agent']} "
                f"channel={counts['answers_channel']} flushes={self.flushes} "
                f"batch_p50/p99={fmt(snap['batch_size'])} agent_ms_p50/p99={fmt(snap['agent_latency_ms'])} "
                f"flush_delay_ms_p50/p99={fmt(snap['flush_delay_ms'])} drops {drops}")

