"""The audit stream in Redis (``<ns>:events``): every transition and decision, for ``vmq events``.

Transitions append their own entry inside vmq/lua/transition.lua; this part appends the events that change
no state and reads the stream back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from vmq.keys import Keys
from vmq.model import AuditEvent
from vmq.store.client import StorePart, translate_errors
from vmq.store.client import text as _text

Entry = dict[str, str]


class RedisAudit(StorePart):
    """Appends to and reads the audit stream, capped near ``events_maxlen`` entries."""

    def __init__(self, client: redis.Redis, keys: Keys, events_maxlen: int = 100_000) -> None:
        super().__init__(client, keys)
        self.events_maxlen = events_maxlen

    def append(self, event_type: AuditEvent, vm: str, host: str, now_ms: int, **data: Any) -> None:
        """Append an event that is not a state transition; values other than str are stored as JSON."""
        entry = {"type": event_type.value, "vm": vm, "host": host, "time": str(now_ms)}
        for name, value in data.items():
            entry[name] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        with translate_errors("XADD events"):
            self.r.xadd(self.keys.events, entry, maxlen=self.events_maxlen, approximate=True)

    def read(self, after: str = "-", count: int = 1000, block_ms: int | None = None) -> list[tuple[str, Entry]]:
        """Entries after ``after`` (exclusive unless "-"), optionally blocking up to ``block_ms`` for new ones."""
        with translate_errors("read events"):
            if block_ms is not None:
                got = self.r.xread({self.keys.events: after if after != "-" else "0-0"}, count=count,
                                   block=block_ms)
                rows = got[0][1] if got else []
            else:
                start = after if after == "-" else f"({after}"
                rows = self.r.xrange(self.keys.events, start, "+", count=count)
        return [(_text(i), {_text(a): _text(b) for a, b in f.items()}) for i, f in rows]

    @contextmanager
    def notifier_lease(self, lease_s: float) -> Iterator[bool]:
        """Hold the notifier's lease while the block runs: True if this run got it, False if another run holds
        it (then it must not read or move the cursor). Released at the end; expires after ``lease_s`` anyway."""
        lock = self.r.lock(self.keys.notify_lock, timeout=lease_s, blocking=False)
        with translate_errors("notifier lease"):
            got = bool(lock.acquire())
        try:
            yield got
        finally:
            if got:
                with contextlib.suppress(redis.exceptions.LockError, redis.RedisError):
                    lock.release()

    def notification_cursor(self) -> str | None:
        """Id of the last audit event the notifier handled; None before its first run."""
        with translate_errors("GET notifier cursor"):
            value = self.r.get(self.keys.notify_cursor)
        return None if value is None else _text(value)

    def set_notification_cursor(self, cursor: str) -> None:
        """Move the notifier's cursor (hold its lease)."""
        with translate_errors("SET notifier cursor"):
            self.r.set(self.keys.notify_cursor, cursor)

    def last_id(self) -> str:
        """Id of the newest audit event ("0-0" when there is none)."""
        with translate_errors("XREVRANGE events"):
            last = self.r.xrevrange(self.keys.events, count=1)
        return _text(last[0][0]) if last else "0-0"
