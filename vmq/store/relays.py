"""What host agents write and hear in Redis: batches of relayed answers (``<ns>:relayed``) and the probes.

A batch is one stream entry: ``h`` the host, ``a`` a JSON array of answers, each an object with ``vm`` and
``p`` (the probe path) and, for ``channel``, the guest-signed ``m`` (message) and ``s`` (signature); for
``agent``, ``round``, ``nonce``, ``latency_ms``, ``guest_ms`` and optionally ``info`` (docs/protocol.md). The
entry's stream id is the arrival, in Redis time, of every answer in it. The batch that ends a round carries
``r``, the round the relay finished (every VM asked, answered or timed out), and ``u``, a JSON array of the VMs
it could not ask in that round: only then does the monitor take a relayed VM's silence as evidence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from vmq.errors import StoreUnavailable
from vmq.keys import Keys
from vmq.store.client import StorePart, translate_errors

#: An XADD of more answers than this is split: a batch stays well under Redis' and the monitor's bounds.
MAX_ANSWERS_PER_ENTRY = 2000


class ProbeSubscription:
    """This process's subscription to the probe channel; ``get`` returns the next probe's bytes or None."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._pubsub: Any = client.pubsub(ignore_subscribe_messages=True)
        with translate_errors("SUBSCRIBE probes"):
            self._pubsub.subscribe(channel)

    def get(self, timeout_s: float) -> bytes | None:
        """The next probe published within ``timeout_s``, or None. Raises StoreUnavailable when Redis is gone
        (subscribe again after a back-off)."""
        with translate_errors("read probes"):
            message = self._pubsub.get_message(timeout=timeout_s)
        if message is None or message.get("type") != "message":
            return None
        data = message.get("data")
        return data if isinstance(data, bytes) else str(data).encode()

    def close(self) -> None:
        """Unsubscribe and release the connection; idempotent."""
        try:
            self._pubsub.close()
        except (redis.RedisError, OSError):
            pass


class RedisRelays(StorePart):
    """Host agents' side of the relayed paths: hear probes, append batches of answers."""

    def __init__(self, client: redis.Redis, keys: Keys, maxlen: int = 200_000) -> None:
        super().__init__(client, keys)
        self.maxlen = maxlen

    def subscribe_probes(self) -> ProbeSubscription:
        """A subscription to the probe channel (one per relay loop). Raises StoreUnavailable."""
        return ProbeSubscription(self.r, self.keys.probe_channel)

    def append(self, host: str, answers: Sequence[Mapping[str, Any]], finished_round: int | None = None,
               unasked: Sequence[str] = ()) -> list[str]:
        """XADD ``answers`` as batches of ``host`` (split above MAX_ANSWERS_PER_ENTRY), the last one marking
        ``finished_round`` (with the VMs it could not ask) when given; returns the entry ids. Raises
        StoreUnavailable/StoreError: the caller keeps the answers for its next flush or drops them."""
        if not answers and finished_round is None:
            return []
        chunks = [list(answers[start:start + MAX_ANSWERS_PER_ENTRY])
                  for start in range(0, len(answers), MAX_ANSWERS_PER_ENTRY)] or [[]]
        ids: list[str] = []
        with translate_errors("XADD relayed"):
            pipe = self.r.pipeline(transaction=False)
            for i, chunk in enumerate(chunks):
                fields = {"h": host, "a": json.dumps(chunk, separators=(",", ":"))}
                if finished_round is not None and i == len(chunks) - 1:
                    fields["r"] = str(finished_round)
                    fields["u"] = json.dumps(list(unasked), separators=(",", ":"))
                pipe.xadd(self.keys.relay_stream, fields, maxlen=self.maxlen, approximate=True)
            for entry_id in pipe.execute():
                ids.append(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
        return ids


__all__ = ["MAX_ANSWERS_PER_ENTRY", "ProbeSubscription", "RedisRelays", "StoreUnavailable"]
