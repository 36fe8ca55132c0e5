"""Per-VM responder keys in Redis: install, rotate with a grace period, revoke; cached for the hot path."""

from __future__ import annotations

import redis

from vmq.errors import StoreError
from vmq.keys import Keys
from vmq.store.client import StorePart, server_time_us, translate_errors
from vmq.store.client import text as _text


class RedisKeyring(StorePart):
    """Each VM's responder key (``<ns>:secrets``), rotated-out keys in grace, and a version for caching."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__(client, keys)
        self._secrets_cache: tuple[int, dict[str, bytes], dict[str, tuple[bytes, int]]] = (-1, {}, {})

    def secrets(self) -> dict[str, bytes]:
        """VM -> HMAC key, cached until ``secrets:version`` changes."""
        with translate_errors("secrets"):
            version = int(self.r.get(self.keys.secrets_version) or 0)
            if version == self._secrets_cache[0]:
                return self._secrets_cache[1]
            pipe = self.r.pipeline(transaction=True)
            pipe.hgetall(self.keys.secrets)
            pipe.hgetall(self.keys.secrets_previous)
            raw, old = pipe.execute()
        table = {_text(vm): bytes.fromhex(_text(hexkey)) for vm, hexkey in raw.items()}
        previous = {}
        for vm, value in old.items():
            hexkey, _, until = _text(value).partition(":")
            previous[_text(vm)] = (bytes.fromhex(hexkey), int(until or 0))
        self._secrets_cache = (version, table, previous)
        return table

    def previous_secrets(self) -> dict[str, tuple[bytes, int]]:
        """VM -> (rotated-out key, accepted until ms) for keys in their rotation grace (same cache)."""
        self.secrets()
        return self._secrets_cache[2]

    def set_secret(self, vm: str, secret_hex: str) -> None:
        """Install or replace a VM's responder key; workers pick it up on their next batch."""
        with translate_errors("set secret"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self.keys.secrets, vm, secret_hex)
            pipe.incr(self.keys.secrets_version)
            pipe.execute()

    def delete_secret(self, vm: str) -> bool:
        """Remove a VM's key (and a rotated-out one in grace); its replies are refused from then on."""
        with translate_errors("delete secret"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hdel(self.keys.secrets, vm)
            pipe.hdel(self.keys.secrets_previous, vm)
            pipe.incr(self.keys.secrets_version)
            removed, _, _ = pipe.execute()
        return bool(removed)

    def rotate_secret(self, vm: str, new_hex: str, grace_ms: int) -> int:
        """Install ``new_hex`` as VM's key; the old one is still accepted for ``grace_ms`` (0: refused at
        once). Returns the Redis time (ms) the old key stops working. Raises StoreError if VM has no key."""
        now_ms = server_time_us(self.r) // 1000
        until_ms = now_ms + grace_ms
        with translate_errors("rotate secret"):
            old = self.r.hget(self.keys.secrets, vm)
            if old is None:
                raise StoreError(f"{vm} has no key to rotate (use `vmq keys add {vm}`)")
            expired = [name for name, value in self.r.hgetall(self.keys.secrets_previous).items()
                       if int(_text(value).partition(":")[2] or 0) < now_ms]
            pipe = self.r.pipeline(transaction=True)
            if expired:
                pipe.hdel(self.keys.secrets_previous, *expired)
            if grace_ms > 0:
                pipe.hset(self.keys.secrets_previous, vm, f"{_text(old)}:{until_ms}")
            else:
                pipe.hdel(self.keys.secrets_previous, vm)
            pipe.hset(self.keys.secrets, vm, new_hex)
            pipe.incr(self.keys.secrets_version)
            pipe.execute()
        return until_ms

    def monitored_count(self) -> int:
        """How many VMs have a responder key (the storm guard's denominator)."""
        with translate_errors("HLEN secrets"):
            return int(self.r.hlen(self.keys.secrets))
