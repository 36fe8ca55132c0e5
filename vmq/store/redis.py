"""vmq's whole state in one Redis, as the composition of one part per structure (vmq.ports has their shapes).

This package is the only Redis code; errors from redis-py become ``StoreUnavailable``/``StoreError`` here.
"""

from __future__ import annotations

import redis

from vmq.config import Settings
from vmq.keys import Keys
from vmq.store.audit import RedisAudit
from vmq.store.client import connect
from vmq.store.failovers import RedisFailovers
from vmq.store.hosts import RedisHosts
from vmq.store.relays import RedisRelays
from vmq.store.replies import RedisReplies, relayed_batches
from vmq.store.rounds import JudgeLease, RedisClock, RedisRounds
from vmq.store.secrets import RedisKeyring
from vmq.store.stats import RedisStats
from vmq.store.vms import RedisVms

__all__ = ["JudgeLease", "RedisStore", "connect"]


class RedisStore:
    """Every part of vmq's state, built on one client; safe to share between threads of one process."""

    def __init__(self, client: redis.Redis, keys: Keys, events_maxlen: int = 100_000) -> None:
        self.client = client
        self.keys = keys
        self.clock = RedisClock(client)
        self.rounds = RedisRounds(client, keys)
        self.replies = RedisReplies(client, keys)
        self.relayed = RedisReplies(client, keys, relayed_batches(keys))
        self.vms = RedisVms(client, keys, events_maxlen)
        self.hosts = RedisHosts(client, keys)
        self.keyring = RedisKeyring(client, keys)
        self.stats = RedisStats(client, keys)
        self.audit = RedisAudit(client, keys, events_maxlen)
        self.relays = RedisRelays(client, keys)
        self.failovers = RedisFailovers(client, keys)

    @classmethod
    def from_url(cls, url: str, keys: Keys, events_maxlen: int = 100_000) -> RedisStore:
        """Connect lazily to ``url`` (redis://, rediss:// or unix://)."""
        return cls(connect(url), keys, events_maxlen)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """Connect lazily as ``settings`` say: VMQ_REDIS_URL, or its master through VMQ_REDIS_SENTINELS."""
        client = connect(settings.redis_url, settings.sentinel_addresses, settings.redis_sentinel_master)
        return cls(client, settings.keys, settings.events_maxlen)
