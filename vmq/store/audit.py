"""The audit stream in Redis (``<ns>:events``): every transition and decision, for ``vmq events``.

Transitions append their own entry inside vmq/lua/transition.lua; this part appends the events that change
no state and reads the stream back.
"""

from __future__ import annotations

import json
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
