"""Replies lost before vmq read them: detected from the reply stream's own counters, never guessed.

Guests may only XADD to the reply stream, but Redis' ACLs cannot restrict XADD's arguments: a hostile guest
can pass ``MAXLEN 0`` and trim every reply as it lands, and a monitor stalled longer than the stream holds
(``VMQ_REPLY_STREAM_MAXLEN``) loses replies the same way. Silence caused by lost replies is no evidence of
a hang, so the rounds those replies could have answered are not judged (vmq.monitor).

Detection (Redis 7.0+, whose ``XINFO STREAM`` reports ``entries-added``): trimming removes entries from the
head only, so when the oldest entry left is newer than the cursor (or the stream is empty), every entry ever
added is either read, still in the stream after the cursor, or lost:
``lost = entries-added - read - length``. The count of entries read is kept in the stats hash. Each read of
the stream (vmq.store.replies.read_replies) takes that view together with its entries, in one transaction:
checked only after a whole ingest, a trim between two batches went unseen (the head was behind the cursor
again by then), and at 50,000 VMs rounds were judged without their replies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmq.keys import Keys
from vmq.store.common import text as _text
from vmq.store.common import translate_errors


def _id(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


class EvidenceMixin:
    """The evidence-loss half of RedisStore (needs ``r`` and ``keys``)."""

    r: Any
    keys: Keys

    def account_trimmed(self, info: Mapping[str, Any], read: int, cursor: str) -> int:
        """Count replies trimmed from the stream before they were read, on one consistent view of it
        (``XINFO STREAM`` and the count of entries read, taken with the read: vmq.store.replies.read_replies);
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
                self.r.hset(k.stats, "replies_read", int(added) - int(info["length"]))
                return 0
            lost = int(added) - read - int(info["length"])
            if lost <= 0:
                return 0
            newest = first[0] if first is not None else info["last-generated-id"]
            pipe = self.r.pipeline(transaction=False)
            pipe.hincrby(k.stats, "replies_read", lost)  # counted once
            pipe.hincrby(k.stats, "replies_lost", lost)
            pipe.zadd(k.replies_lost, {"until": _id(newest)[0]}, gt=True)
            pipe.execute()
        return lost

    def evidence_lost_until(self) -> int:
        """Redis ms up to which replies may have been lost unread (0: never)."""
        with translate_errors("ZSCORE lost"):
            value = self.r.zscore(self.keys.replies_lost, "until")
        return int(value or 0)
