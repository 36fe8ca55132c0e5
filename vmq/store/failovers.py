"""Failover state in Redis (issue 18): the domain definitions each host keeps, each dead host's incident, the
once-per-incident claims, and operators' fence confirmations.

A host's definitions live under its own key (``<ns>:host:<H>:defs``, what its inventory read from libvirt);
the incidents, claims and confirmations under ``<ns>:failover:*``, which the host ACL user cannot touch: a host
worker can neither open nor fence an incident, nor confirm one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import redis

from vmq.hypervisor.xmldesc import definition_digest
from vmq.store.client import StorePart, translate_errors
from vmq.store.client import text as _text

#: Claims and confirmations outlive any incident by far, and go away by themselves.
CLAIM_TTL_S = 7 * 24 * 3600


class RedisFailovers(StorePart):
    """Definitions, incidents, claims and confirmations."""

    # ------------------------------------------------------------------ definitions (written by host workers)
    def definition_digests(self, host: str) -> dict[str, str]:
        """VM -> sha256 of the definition ``host`` keeps."""
        with translate_errors("definition digests"):
            raw = self.r.hgetall(self.keys.host_definition_digests(host))
        return {_text(vm): _text(sha) for vm, sha in raw.items()}

    def keep_definitions(self, host: str, definitions: Mapping[str, str], drop: Iterable[str], now_ms: int) -> None:
        """Store ``definitions`` (VM -> XML) for ``host``, with their digests, and forget those in ``drop``."""
        gone = list(drop)
        digests = {vm: definition_digest(xml) for vm, xml in definitions.items()}
        fields = {vm: orjson.dumps({"xml": xml, "sha": digests[vm], "ms": now_ms}) for vm, xml in definitions.items()}
        if not fields and not gone:
            return
        with translate_errors("keep definitions"):
            pipe = self.r.pipeline(transaction=True)
            for key, mapping in ((self.keys.host_definitions(host), fields),
                                 (self.keys.host_definition_digests(host), digests)):
                if mapping:
                    pipe.hset(key, mapping=mapping)
                if gone:
                    pipe.hdel(key, *gone)
            pipe.execute()

    def definitions(self, host: str, vms: list[str]) -> dict[str, dict[str, Any]]:
        """VM -> {xml, sha, ms} as ``host`` kept it (VMs without one are left out)."""
        if not vms:
            return {}
        with translate_errors("definitions"):
            raw = self.r.hmget(self.keys.host_definitions(host), vms)
        out: dict[str, dict[str, Any]] = {}
        for vm, value in zip(vms, raw):
            if value is None:
                continue
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("xml"), str):
                out[vm] = doc
        return out

    # ------------------------------------------------------------------ incidents (monitor only)
    def incident(self, host: str) -> dict[str, str]:
        """The host's latest failover incident (empty: none)."""
        with translate_errors("failover incident"):
            return {_text(a): _text(b) for a, b in self.r.hgetall(self.keys.failover(host)).items()}

    def open_incident(self, host: str, episode: int, fields: Mapping[str, Any]) -> bool:
        """Open the incident of ``host``'s down ``episode`` (its down_since_ms) with ``fields``, unless it is
        open already (two judges: one opens it); True if this call opened it."""
        key = self.keys.failover(host)
        mapping = {"episode": str(episode), **{a: str(b) for a, b in fields.items()}}
        with translate_errors("open failover incident"), self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if _text(pipe.hget(key, "episode") or b"") == str(episode):
                    return False
                pipe.multi()
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def update_incident(self, host: str, episode: int, fields: Mapping[str, Any],
                        expect_state: str | None = None) -> bool:
        """Write ``fields`` into the incident if it is still ``episode`` (and in ``expect_state`` when given);
        True if written."""
        key = self.keys.failover(host)
        with translate_errors("update failover incident"), self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                episode_now, state_now = pipe.hmget(key, ["episode", "state"])
                if _text(episode_now or b"") != str(episode) or (
                        expect_state is not None and _text(state_now or b"") != expect_state):
                    return False
                pipe.multi()
                pipe.hset(key, mapping={a: str(b) for a, b in fields.items()})
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def claim_start(self, vm: str, episode: int, target: str) -> bool:
        """Claim ``vm``'s start elsewhere for incident ``episode`` (once, whoever asks)."""
        with translate_errors("failover claim"):
            return bool(self.r.set(self.keys.failover_claim(vm, episode), target, nx=True, ex=CLAIM_TTL_S))

    def confirm_fenced(self, host: str, episode: int, by: str, now_ms: int) -> None:
        """An operator says ``host`` is powered off, for its down ``episode``."""
        with translate_errors("fence confirmation"):
            self.r.set(self.keys.fence_confirmation(host),
                       orjson.dumps({"episode": episode, "by": by, "ms": now_ms}), ex=CLAIM_TTL_S)

    def fence_confirmation(self, host: str) -> dict[str, Any]:
        """The operator's confirmation for ``host`` (empty: none, or unreadable)."""
        with translate_errors("fence confirmation"):
            raw = self.r.get(self.keys.fence_confirmation(host))
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return {}
        return doc if isinstance(doc, dict) else {}

    # ------------------------------------------------------------------ the host task's claim
    def claim_host_start(self, vm: str, episode: int, claimant: str) -> bool:
        """Taken by the host worker that starts ``vm`` for ``episode``: a redelivered task finds it taken."""
        with translate_errors("failover start claim"):
            return bool(self.r.set(self.keys.failover_start_claim(vm, episode), claimant, nx=True, ex=CLAIM_TTL_S))
