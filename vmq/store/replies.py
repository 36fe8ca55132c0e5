"""The reply log in Redis: the reply stream read as Redis sends it, what was verified, and replies lost unread.

Entries are read without redis-py's per-entry conversion (vmq.codec.ReplyVerifier takes them as they come);
one batch is written back in one pipelined round trip, then the cursor moves, fenced by the judge lock.

Lost replies (a guest's ``XADD ... MAXLEN 0``, a monitor slower than the stream's length) are counted from
the stream's own counters (Redis 7.0+, ``XINFO STREAM`` ``entries-added``), never guessed: trimming removes
entries from the head only, so when the oldest entry left is newer than the cursor (or the stream is empty),
``lost = entries-added - read - length``. docs/reliability.md has why the view is taken with each read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from vmq.codec import RawEntry, stream_id_ms
from vmq.keys import Keys
from vmq.model import WIRE_VERSION_RELAYED
from vmq.relayed import MAX_AGENT_DOC_BYTES, AgentBatch, AgentBatchResult, CoverBatch
from vmq.store.client import StorePart, raw_client, translate_errors
from vmq.store.client import text as _text
from vmq.store.covers import RedisCovers

#: Rounds of relay marks kept behind the newest ones written (each a member per host).
RELAY_ROUNDS_KEPT = 256


def _id(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class AnswerStream:
    """One stream of answers the monitor reads: its key, its cursor's key and its counters' names."""

    stream: str
    cursor: str
    read_field: str  # entries read (with entries-added, tells what was trimmed unread)
    valid_field: str  # valid answers recorded


def guest_replies(keys: Keys) -> AnswerStream:
    """The stream guests on the ``redis`` path XADD their signed replies to."""
    return AnswerStream(keys.reply_stream, keys.reply_cursor, "replies_read", "replies_valid")


def relayed_batches(keys: Keys) -> AnswerStream:
    """The stream host agents XADD their batches of relayed answers to (``channel``/``agent`` paths)."""
    return AnswerStream(keys.relay_stream, keys.relay_cursor, "relayed_read", "relayed_valid")


class RedisReplies(StorePart):
    """One answer stream (``source``: the guests' replies by default), its cursor, each VM's last answered
    round and arrival (shared by every stream), and lost-answer accounting."""

    def __init__(self, client: redis.Redis, keys: Keys, source: AnswerStream | None = None) -> None:
        super().__init__(client, keys)
        self.source = source or guest_replies(keys)
        self._raw = raw_client(client)
        self._advance_cursor = self._script("advance_cursor.lua")
        self._relay_apply = self._script("relay_apply.lua")
        self.covers = RedisCovers(client, keys)

    def read_replies(self, after_id: str, up_to_ms: int, count: int) -> tuple[list[RawEntry], int]:
        """Reply-stream entries after ``after_id`` that arrived at or before ``up_to_ms``, as Redis sends
        them: (id, [field, value, ...]); and how many replies after ``after_id`` were trimmed before this read
        (recorded, see ``account_trimmed``). Both come from one MULTI/EXEC, so no trim can fall between them."""
        start = f"({after_id}" if after_id != "0-0" else "-"
        with translate_errors("XRANGE replies"):
            pipe = self._raw.pipeline(transaction=True)
            self._queue_stream_view(pipe)
            pipe.xrange(self.source.stream, start, str(up_to_ms), count=count)
            info, read, entries = pipe.execute(raise_on_error=False)
            _raise_any(entries)
            view = _stream_view(info, read)
        if view is None:
            return [], 0  # nothing added yet, nothing lost
        return list(entries), self.account_trimmed(view[0], view[1], after_id)

    def reply_backlog(self) -> tuple[int | None, float]:
        """How far the monitors are behind the reply stream: (replies not read yet, age in s of the oldest).

        Unread is ``entries-added - replies read`` (None before Redis 7.0); the age is Redis' clock minus the
        arrival of the first entry after the cursor (docs/metrics.md: VmqMonitorBehind). Read at scrape time."""
        with translate_errors("reply backlog"):
            pipe = self.r.pipeline(transaction=True)  # one view: the count read and the stream's counters
            pipe.time()
            pipe.get(self.source.cursor)
            self._queue_stream_view(pipe)
            now, cursor, info, read = pipe.execute(raise_on_error=False)
            _raise_any(now, cursor)
            view = _stream_view(info, read)
            if view is None:
                return 0, 0.0  # no reply added yet
            added = view[0].get("entries-added")
            unread = None if added is None else max(0, int(added) - view[1])
            start = f"({_text(cursor)}" if cursor and _text(cursor) != "0-0" else "-"
            first = self.r.xrange(self.source.stream, start, "+", count=1)
        if not first:
            return unread, 0.0
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        return unread, max(0.0, (now_ms - stream_id_ms(first[0][0])) / 1000.0)

    def _queue_stream_view(self, pipe: Any) -> None:
        """Queue the stream's counters (XINFO STREAM) and the count of entries read: see ``_stream_view``."""
        pipe.xinfo_stream(self.source.stream)
        pipe.hget(self.keys.stats, self.source.read_field)

    def entries_added(self) -> int | None:
        """Answers ever added to this stream (``XINFO STREAM`` ``entries-added``; 0 before the first, None before
        Redis 7.0)."""
        with translate_errors("XINFO replies"):
            try:
                info = self.r.xinfo_stream(self.source.stream)
            except redis.ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return 0
                raise
        added = info.get("entries-added")
        return None if added is None else int(added)

    def reply_cursor(self) -> str:
        """Id of the last reply-stream entry ingested ("0-0" before the first)."""
        with translate_errors("GET cursor"):
            value = self.r.get(self.source.cursor)
        return _text(value) if value else "0-0"

    def last_rounds(self, vms: Sequence[str]) -> list[float | None]:
        """Each VM's highest answered round (or registration mark); a covered VM's is its host's applied round."""
        return self.answer_rounds(vms)[0]

    def answer_rounds(self, vms: Sequence[str]) -> tuple[list[float | None], list[str]]:
        """``last_rounds``, and which of ``vms`` are covered by their host (vmq.store.covers)."""
        if not vms:
            return [], []
        with translate_errors("ZMSCORE last round"):
            rounds: list[float | None] = list(self.r.zmscore(self.keys.last_round, vms))
        covered = self.covers.resolve(vms, rounds)
        if covered:
            rounds = [float(covered[vm][0]) if vm in covered else r for vm, r in zip(vms, rounds, strict=True)]
        return rounds, sorted(covered)

    def release_covered(self, vms: Sequence[str]) -> None:
        """Take covered VMs that answered on another path out of their host's cover (vmq.store.covers)."""
        if vms:
            self.covers.release(vms)

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
        finished: Mapping[str, int] | None = None,
        unasked: Mapping[str, int] | None = None,
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
                pipe.hincrby(k.stats, self.source.valid_field, valid_count)
            if finished:  # relayed batches: the rounds each host's relay finished, the VMs it could not ask
                pipe.zadd(k.relay_rounds, dict(finished))
                pipe.zremrangebyscore(k.relay_rounds, "-inf", f"({min(finished.values()) - RELAY_ROUNDS_KEPT}")
            if unasked:
                pipe.zadd(k.relay_unasked, dict(unasked), gt=True)
            if len(pipe):
                pipe.execute()
            advanced = self._advance_cursor(keys=[k.judge_lock, self.source.cursor, k.stats],
                                            args=[lock_token, cursor, read, self.source.read_field])
        return bool(advanced)



    def apply_agent_batches(self, batches: Sequence[AgentBatch]) -> AgentBatchResult:
        """Record hosts' compact agent batches (round and nonce already checked) in one script call
        (vmq/lua/relay_apply.lua): each named VM vouched for by its record, its liveness recorded when the round
        is newer than its last, its state parameters saved when the batch carries them. Idempotent."""
        if not batches:
            return AgentBatchResult()
        k = self.keys
        args: list[Any] = [k.vm_prefix, WIRE_VERSION_RELAYED, MAX_AGENT_DOC_BYTES]
        for batch in batches:
            args += [batch.host, batch.round, batch.arrival_ms, batch.names, batch.params]
        with translate_errors("apply agent batches"):
            out = self._relay_apply(keys=[k.last_round, k.last_seen, k.last_reply, k.attention], args=args)
        accepted, stale, refused, healing = out
        result = AgentBatchResult(accepted=int(accepted), stale=int(stale))
        for i in range(0, len(refused), 3):
            result.rejects[_text(refused[i])] = (int(refused[i + 1]), _text(refused[i + 2]))
        for i in range(0, len(healing), 3):
            result.healing.append((_text(healing[i]), int(healing[i + 1]), int(healing[i + 2])))
        return result

    def apply_cover_batches(self, batches: Sequence[CoverBatch]) -> AgentBatchResult:
        """Apply hosts' cover entries (vmq.store.covers.RedisCovers.apply)."""
        return self.covers.apply(batches)

    def covered_late(self, round_id: int) -> dict[str, int]:
        """Covered VMs silent for ``round_id`` because their host's entry for it was not applied, with the round
        their host last vouched for (vmq.store.covers.RedisCovers.late)."""
        return self.covers.late(round_id)

    def cover_states(self, hosts: Sequence[str]) -> dict[str, dict[str, int | bool]]:
        """Each host's cover as ``vmq hosts`` shows it (vmq.store.covers.RedisCovers.host_states)."""
        return self.covers.host_states(hosts)

    def silent_since(self, round_id: int) -> list[str]:
        """VMs with no valid reply to ``round_id`` or later."""
        with translate_errors("silent VMs"):
            return [_text(vm) for vm in self.r.zrangebyscore(self.keys.last_round, "-inf", f"({round_id}")]

    def answered_count(self, round_id: int) -> int:
        """How many VMs have a valid answer to ``round_id`` or later, on any path."""
        with translate_errors("answered VMs"):
            return int(self.r.zcount(self.keys.last_round, round_id, "+inf"))

    def last_seen_many(self, vms: Sequence[str]) -> list[float | None]:
        """Arrival ms of each VM's latest valid reply (a covered VM's: its host's latest applied entry)."""
        if not vms:
            return []
        with translate_errors("ZMSCORE last seen"):
            pipe = self.r.pipeline(transaction=False)
            pipe.zmscore(self.keys.last_seen, vms)
            pipe.zmscore(self.keys.last_round, vms)
            seen, rounds = pipe.execute()
        covered = self.covers.resolve(vms, rounds)
        if not covered:
            return list(seen)
        return [max(float(covered[vm][1]), s or 0.0) if vm in covered else s for vm, s in zip(vms, seen, strict=True)]

    def account_trimmed(self, info: Mapping[str, Any], read: int, cursor: str) -> int:
        """Count replies trimmed from the stream before they were read, on one consistent view of it
        (``XINFO STREAM`` and the count of entries read, taken with the read);
        when some were, raise ``lost_until`` to the newest instant they can have arrived. Returns the count."""
        k = self.keys
        added = info.get("entries-added")
        if added is None:
            return 0  # Redis < 7.0 does not say; documented in docs/reliability.md
        first = info.get("first-entry")
        if first is not None and _id(first[0]) <= _id(cursor):
            return 0  # the head still holds read entries: nothing unread was trimmed
        with translate_errors("record lost replies"):
            if added < read:  # the stream was deleted and made again: start counting afresh
                self.r.hset(k.stats, self.source.read_field, int(added) - int(info["length"]))
                return 0
            lost = int(added) - read - int(info["length"])
            if lost <= 0:
                return 0
            newest = first[0] if first is not None else info["last-generated-id"]
            pipe = self.r.pipeline(transaction=False)
            pipe.hincrby(k.stats, self.source.read_field, lost)  # counted once
            pipe.hincrby(k.stats, "replies_lost", lost)
            pipe.zadd(k.replies_lost, {"until": _id(newest)[0]}, gt=True)
            pipe.execute()
        return lost

    def evidence_lost_until(self) -> int:
        """Redis ms up to which replies may have been lost unread (0: never)."""
        with translate_errors("ZSCORE lost"):
            value = self.r.zscore(self.keys.replies_lost, "until")
        return int(value or 0)


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
