"""What host agents write and hear in Redis: batches of relayed answers (``<ns>:relayed``) and the probes.

A batch is one stream entry: ``h`` the host, ``a`` a JSON array of ``channel`` answers, each an object with
``vm``, ``p`` (the probe path), the guest-signed ``m`` (message) and ``s`` (signature); ``agent`` answers are
compact, one round per entry: ``q`` the round, ``n`` its nonce, ``k`` the VMs that answered (space-separated),
``s`` the state parameters of those whose guest info was asked (docs/protocol.md). The entry's stream id is the arrival, in Redis time, of every answer in it. The batch that ends a round carries
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
               unasked: Sequence[str] = (), cover: Mapping[str, str] | None = None) -> list[str]:
        """XADD ``answers`` as batches of ``host``: agent answers compact, one entry per round (``q``, ``n``,
        ``k``, ``s``: see ``compact_agent_fields``), the others in ``a``; split above MAX_ANSWERS_PER_ENTRY; the
        last entry marks ``finished_round`` (with the VMs it could not ask) when given; ``cover``, a round's cover
        entry (vmq.relay_cover.cover_fields), is that last entry (without ``finished_round``: a partial one). Returns the entry ids.
        Raises StoreUnavailable/StoreError: the caller keeps the answers for its next flush or drops them."""
        if not answers and finished_round is None and cover is None:
            return []
        entries = batch_entries(host, answers)
        if cover is not None:
            entries.append({"h": host, **cover})  # its own entry: a compact entry has its own q/n/s
        elif finished_round is not None and not entries:
            entries.append({"h": host, "a": "[]"})
        if finished_round is not None:
            entries[-1]["r"] = str(finished_round)
            entries[-1]["u"] = json.dumps(list(unasked), separators=(",", ":"))
        ids: list[str] = []
        with translate_errors("XADD relayed"):
            pipe = self.r.pipeline(transaction=False)
            for fields in entries:
                pipe.xadd(self.keys.relay_stream, fields, maxlen=self.maxlen, approximate=True)
            for entry_id in pipe.execute():
                ids.append(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
        return ids


def batch_entries(host: str, answers: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The stream entries ``answers`` are written as (docs/protocol.md, "Relayed answers"): the non-agent
    answers in ``a`` (JSON array), the agent answers compact, grouped by round; at most MAX_ANSWERS_PER_ENTRY
    answers per entry."""
    others = [a for a in answers if a.get("p") != "agent"]
    by_round: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for answer in answers:
        if answer.get("p") == "agent":
            by_round.setdefault((int(answer["round"]), str(answer["nonce"])), []).append(answer)
    entries = [{"h": host, "a": json.dumps(others[start:start + MAX_ANSWERS_PER_ENTRY], separators=(",", ":"))}
               for start in range(0, len(others), MAX_ANSWERS_PER_ENTRY)]
    for (round_id, nonce), group in sorted(by_round.items()):
        for start in range(0, len(group), MAX_ANSWERS_PER_ENTRY):
            entries.append({"h": host, **compact_agent_fields(round_id, nonce, group[start:start + MAX_ANSWERS_PER_ENTRY])})
    return entries


def compact_agent_fields(round_id: int, nonce: str, answers: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One round's agent answers as a compact entry's fields: ``q`` the round, ``n`` its nonce, ``k`` the VMs
    separated by spaces, ``s`` (when any answer carries guest info) a JSON object vm -> state parameters
    (latency, guest clock, info) of those answers. The others' parameters stay on the host (its relay stats):
    the monitor needs their liveness each round, their parameters only now and then."""
    fields = {"q": str(round_id), "n": nonce, "k": " ".join(str(a["vm"]) for a in answers)}
    params = {str(a["vm"]): {name: a[name] for name in ("latency_ms", "guest_ms", "info") if name in a}
              for a in answers if "info" in a}
    if params:
        fields["s"] = json.dumps(params, separators=(",", ":"))
    return fields


__all__ = ["MAX_ANSWERS_PER_ENTRY", "ProbeSubscription", "RedisRelays", "StoreUnavailable", "batch_entries",
           "compact_agent_fields"]
