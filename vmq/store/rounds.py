"""Probe rounds in Redis: numbering and publishing (vmq/lua/start_round.lua), deadlines, and the judge lock."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from vmq.codec import RoundBook
from vmq.keys import Keys
from vmq.store.client import StorePart, server_time_us, translate_errors
from vmq.store.client import text as _text


class RedisClock:
    """Redis' own clock: the one clock every deadline and arrival in vmq is measured in."""

    def __init__(self, client: redis.Redis) -> None:
        self.r: Any = client

    def time_ms(self) -> int:
        """Redis server time in ms."""
        return server_time_us(self.r) // 1000

    def time_us(self) -> int:
        """Redis server time in µs (orders two hosts' listings taken within the same ms)."""
        return server_time_us(self.r)


class JudgeLease:
    """The judge lock as one tick holds it: true while held; ``renew`` restarts the lease."""

    def __init__(self, lock: Any, acquired: bool) -> None:
        self._lock = lock
        self.acquired = acquired

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def token(self) -> bytes:
        """This holder's token in the lock key (b"" when not acquired): fences writes (advance_cursor.lua)."""
        token = getattr(self._lock.local, "token", None) if self.acquired else None
        return token if isinstance(token, bytes) else b""

    def renew(self) -> bool:
        """Restart the lease; False once it expired and another judge may hold it."""
        with translate_errors("renew judge lock"):
            try:
                self._lock.reacquire()
            except redis.exceptions.LockError:
                self.acquired = False
        return self.acquired


class RedisRounds(StorePart):
    """Round numbers, nonces, send times and deadlines (``<ns>:round:seq``, ``rounds``, ``rounds:pending``)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__(client, keys)
        self._start_round = self._script("start_round.lua")

    def start_round(self, nonce: str, reply_timeout_ms: int, rounds_kept: int, wire_version: int,
                    min_gap_ms: int = 0) -> tuple[int, int, bool]:
        """Number, record and publish one probe round, in one round trip: (round, sent_ms, True).

        With ``min_gap_ms`` > 0 a round is refused when the latest one went out less than that long ago by
        Redis' clock (a second beat's duplicate): nothing is sent, ``rounds_duplicate`` is counted and the
        latest round is returned as (round, sent_ms, False).
        """
        k = self.keys
        with translate_errors("start_round"):
            round_id, sent_ms, started = self._start_round(
                keys=[k.round_seq, k.rounds, k.rounds_pending, k.probe_channel, k.stats],
                args=[nonce, reply_timeout_ms, rounds_kept, wire_version, min_gap_ms],
            )
        return int(round_id), int(sent_ms), bool(started)

    def current_round(self) -> int:
        """The latest round number sent (0 before the first)."""
        with translate_errors("GET round seq"):
            value = self.r.get(self.keys.round_seq)
        return int(value or 0)

    def due_rounds(self, now_ms: int) -> list[tuple[int, int]]:
        """Pending rounds whose deadline is strictly before ``now_ms``, oldest first: (round, deadline_ms)."""
        with translate_errors("due rounds"):
            rows = self.r.zrangebyscore(self.keys.rounds_pending, "-inf", f"({now_ms}", withscores=True)
        return [(int(member), int(score)) for member, score in rows]

    def next_deadline(self) -> int | None:
        """Earliest deadline among rounds not yet judged."""
        with translate_errors("next deadline"):
            rows = self.r.zrange(self.keys.rounds_pending, 0, 0, withscores=True)
        return int(rows[0][1]) if rows else None

    def finish_round(self, round_id: int) -> None:
        """Mark a round judged."""
        with translate_errors("finish round"):
            self.r.zrem(self.keys.rounds_pending, round_id)

    def round_book(self) -> RoundBook:
        """Nonces and send times of the recent rounds."""
        with translate_errors("HGETALL rounds"):
            raw = self.r.hgetall(self.keys.rounds)
        book: dict[int, tuple[str, int]] = {}
        for key, value in raw.items():
            nonce, _, sent = _text(value).partition(":")
            book[int(key)] = (nonce, int(sent))
        return RoundBook(book)

    def round_sent_times(self) -> dict[int, int]:
        """Send time (Redis ms) of each remembered recent round."""
        with translate_errors("HGETALL rounds"):
            raw = self.r.hgetall(self.keys.rounds)
        return {int(key): int(_text(value).partition(":")[2]) for key, value in raw.items()}

    def round_sent_ms(self, round_id: int) -> int | None:
        """When ``round_id`` was sent, if still remembered."""
        with translate_errors("HGET round"):
            value = self.r.hget(self.keys.rounds, round_id)
        return int(_text(value).partition(":")[2]) if value else None

    @contextlib.contextmanager
    def judge_lock(self, lease_s: float, wait_s: float) -> Iterator[JudgeLease]:
        """Serialise ingestion and judging across timeout workers; yields a lease that is false if the lock
        was not acquired within ``wait_s``. A holder that dies frees it after ``lease_s``."""
        lock = self.r.lock(self.keys.judge_lock, timeout=lease_s, blocking_timeout=wait_s)
        with translate_errors("judge lock"):
            lease = JudgeLease(lock, bool(lock.acquire()))
        try:
            yield lease
        finally:
            if lease:
                with contextlib.suppress(redis.RedisError):
                    lock.release()
