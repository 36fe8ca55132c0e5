"""The reply half of RedisStore: read the reply stream as Redis sends it, record what was verified.

The hot path of the monitor (every reply, every round): entries are read without redis-py's per-entry
conversion to tuples and dicts (vmq.codec.ReplyVerifier takes them as they come), and one batch is written
back in one pipelined round trip of multi-member commands, then the cursor moves, fenced by the judge lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from vmq.codec import RawEntry, stream_id_ms
from vmq.keys import Keys
from vmq.store.common import text as _text
from vmq.store.common import translate_errors


def raw_client(client: redis.Redis) -> Any:
    """A client on ``client``'s connection pool (so it follows the same server, TLS and Sentinel) whose
    XRANGE returns Redis' reply as is: [[id, [field, value, ...]], ...]."""
    raw = redis.Redis(connection_pool=client.connection_pool)
    raw.set_response_callback("XRANGE", lambda response, **_: response)
    return raw


class RepliesMixin:
    """Reply-stream reads and the per-batch write (needs ``r``, ``_raw``, ``_advance_cursor`` and ``keys``)."""

    r: Any
    _raw: Any
    _advance_cursor: Any  # the registered vmq/lua/advance_cursor.lua
    keys: Keys
    account_trimmed: Callable[[Mapping[str, Any], int, str], int]  # vmq.store.evidence.EvidenceMixin

    def read_replies(self, after_id: str, up_to_ms: int, count: int) -> tuple[list[RawEntry], int]:
        """Reply-stream entries after ``after_id`` that arrived at or before ``up_to_ms``, as Redis sends
        them: (id, [field, value, ...]); and how many replies after ``after_id`` were trimmed before this read
        (recorded, see vmq.store.evidence). Both come from one MULTI/EXEC, so no trim can fall between them."""
        start = f"({after_id}" if after_id != "0-0" else "-"
        with translate_errors("XRANGE replies"):
            pipe = self._raw.pipeline(transaction=True)
            self._queue_stream_view(pipe)
            pipe.xrange(self.keys.reply_stream, start, str(up_to_ms), count=count)
            info, read, entries = pipe.execute(raise_on_error=False)
            _raise_any(entries)
            view = _stream_view(info, read)
        if view is None:
            return [], 0  # nothing added yet, nothing lost
        return list(entries), self.account_trimmed(view[0], view[1], after_id)

    def reply_backlog(self) -> tuple[int | None, float]:
        """How far the monitors are behind the reply stream: (replies not read yet, age in s of the oldest).

        Unread is ``entries-added - replies read`` (vmq.store.evidence; None before Redis 7.0); the age is
        Redis' clock minus the arrival of the first entry after the cursor. Drains run half a T1 into each
        round, so a healthy monitor stays under T1; replies are lost once unread passes the stream's
        ``VMQ_REPLY_STREAM_MAXLEN`` (docs/metrics.md: the VmqMonitorBehind alert). Read at scrape time only."""
        k = self.keys
        with translate_errors("reply backlog"):
            pipe = self.r.pipeline(transaction=True)  # one view: the count read and the stream's counters
            pipe.time()
            pipe.get(k.reply_cursor)
            self._queue_stream_view(pipe)
            now, cursor, info, read = pipe.execute(raise_on_error=False)
            _raise_any(now, cursor)
            view = _stream_view(info, read)
            if view is None:
                return 0, 0.0  # no reply added yet
            added = view[0].get("entries-added")
            unread = None if added is None else max(0, int(added) - view[1])
            start = f"({_text(cursor)}" if cursor and _text(cursor) != "0-0" else "-"
            first = self.r.xrange(k.reply_stream, start, "+", count=1)
        if not first:
            return unread, 0.0
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        return unread, max(0.0, (now_ms - stream_id_ms(first[0][0])) / 1000.0)

    def _queue_stream_view(self, pipe: Any) -> None:
        """Queue the stream's counters (XINFO STREAM) and the count of entries read: see ``_stream_view``."""
        pipe.xinfo_stream(self.keys.reply_stream)
        pipe.hget(self.keys.stats, "replies_read")

    def reply_cursor(self) -> str:
        """Id of the last reply-stream entry ingested ("0-0" before the first)."""
        with translate_errors("GET cursor"):
            value = self.r.get(self.keys.reply_cursor)
        return _text(value) if value else "0-0"

    def last_rounds(self, vms: Sequence[str]) -> list[float | None]:
        """Each VM's highest answered round (or registration mark), for replay detection."""
        if not vms:
            return []
        with translate_errors("ZMSCORE last round"):
            return list(self.r.zmscore(self.keys.last_round, vms))

    def record_replies(
        self,
        rounds: Mapping[str, int],
        arrivals: Mapping[str, int],
        payloads: Mapping[str, bytes],
        rejects: Mapping[str, int],
        valid_count: int,
        cursor: str,
        read: int = 0,
        lock_token: bytes = b"",
    ) -> bool:
        """Store one ingested batch: liveness (ZADD GT), the latest replies due to be saved (``payloads``,
        see vmq.ingest.LatestReplies) and counters in one pipeline, then the cursor and the count of entries
        read, fenced by the judge lock (vmq/lua/advance_cursor.lua) when ``lock_token`` is given. Returns
        False when the fence refused: the caller's lease ran out and it must stop reading. What it wrote
        before the fence is harmless twice (ZADD GT never goes back; counters are statistics)."""
        k = self.keys
        with translate_errors("record replies"):
            pipe = self.r.pipeline(transaction=False)
            if rounds:
                pipe.zadd(k.last_round, rounds, gt=True)  # redis-py reads the mappings: no copies
                pipe.zadd(k.last_seen, arrivals, gt=True)
            if payloads:
                pipe.hset(k.last_reply, mapping=payloads)
            for reason, count in rejects.items():
                pipe.hincrby(k.rejects, reason, count)
            if valid_count:
                pipe.hincrby(k.stats, "replies_valid", valid_count)
            if len(pipe):
                pipe.execute()
            advanced = self._advance_cursor(keys=[k.judge_lock, k.reply_cursor, k.stats],
                                            args=[lock_token, cursor, read])
        return bool(advanced)


def _raise_any(*results: Any) -> None:
    """Raise the first error among a pipeline's results (executed with ``raise_on_error=False``)."""
    for result in results:
        if isinstance(result, Exception):
            raise result


def _stream_view(info: Any, read: Any) -> tuple[Mapping[str, Any], int] | None:
    """(XINFO STREAM, entries read) from the results ``_queue_stream_view`` queued; None when no reply was
    ever added (the stream does not exist yet)."""
    _raise_any(read)
    if isinstance(info, Exception):
        if "no such key" in str(info).lower():
            return None
        raise info
    return info, int(read or 0)
