"""The Redis adapter (this package is the only Redis code); Lua lives in vmq/lua/*.lua.

Errors from redis-py are translated to ``StoreUnavailable``/``StoreError`` at this edge.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.commands.core import Script
from redis.connection import parse_url
from redis.sentinel import Sentinel

from vmq.codec import RoundBook
from vmq.config import Settings
from vmq.keys import Keys
from vmq.model import VmState
from vmq.policy import can_transition
from vmq.store.common import CommandPacker, Record, load_lua, translate_errors
from vmq.store.common import text as _text
from vmq.store.evidence import EvidenceMixin
from vmq.store.hosts import HostContext, HostStateMixin
from vmq.store.metrics import MetricsMixin
from vmq.store.replies import RepliesMixin, raw_client
from vmq.store.secrets import SecretsMixin

log = logging.getLogger(__name__)

__all__ = ["HostContext", "JudgeLease", "Record", "RedisStore", "Transition", "connect", "translate_errors"]


@dataclass(frozen=True)
class Transition:
    """One compare-and-set of a VM's state (see vmq/lua/transition.lua)."""

    vm: str
    from_states: tuple[VmState, ...]
    to_state: VmState
    now_ms: int
    event: Mapping[str, Any]
    fields: Mapping[str, Any] = field(default_factory=dict)
    expected_generation: int | None = None
    count_restart: bool = False
    restart_window_ms: int = 3_600_000


class JudgeLease:
    """The judge lock as one tick holds it: true while held; ``renew`` restarts the lease."""

    def __init__(self, lock: Any, acquired: bool) -> None:
        self._lock = lock
        self.acquired = acquired

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def token(self) -> bytes:
        """This holder's token in the lock key (b"" when not acquired): fences writes (advance_cursor.lua)."""
        token = getattr(self._lock.local, "token", None) if self.acquired else None
        return token if isinstance(token, bytes) else b""

    def renew(self) -> bool:
        """Restart the lease (before each round judged); False once it expired and another judge may hold it."""
        with translate_errors("renew judge lock"):
            try:
                self._lock.reacquire()
            except redis.exceptions.LockError:
                self.acquired = False
        return self.acquired


def connect(url: str, sentinels: Sequence[tuple[str, int]] = (), master: str = "") -> redis.Redis:
    """The one place vmq builds a Redis client: to ``url``, or with ``sentinels`` to the master they name
    ``master`` (``url`` then gives only user, password and db). A Sentinel-managed client asks the sentinels
    again after a disconnect or a READONLY reply, so it follows a failover."""
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 30,
                               "command_packer": CommandPacker()}
    if not sentinels:
        return redis.Redis.from_url(url, **options)
    parsed = parse_url(url)  # type: ignore[no-untyped-call]
    credentials = {name: parsed[name] for name in ("username", "password", "db") if name in parsed}
    sentinel = Sentinel(list(sentinels),  # type: ignore[no-untyped-call]
                        sentinel_kwargs={"socket_timeout": 2, "socket_connect_timeout": 2})
    client: redis.Redis = sentinel.master_for(master, **credentials, **options)  # type: ignore[no-untyped-call]
    return client


class RedisStore(RepliesMixin, SecretsMixin, HostStateMixin, MetricsMixin, EvidenceMixin):
    """All state of vmq in one Redis; safe to share between threads of one process."""

    def __init__(self, client: redis.Redis, keys: Keys, events_maxlen: int = 100_000) -> None:
        # redis-py types every reply as `Awaitable | Any`; the parsing below is where the shapes are checked.
        self.r: Any = client
        self.keys = keys
        self.events_maxlen = events_maxlen
        self._start_round: Script = client.register_script(load_lua("start_round.lua"))
        self._transition: Script = client.register_script(load_lua("transition.lua"))
        self._claim: Script = client.register_script(load_lua("claim.lua"))
        self._advance_cursor: Script = client.register_script(load_lua("advance_cursor.lua"))
        self._place: Script = client.register_script(load_lua("place.lua"))
        self._secrets_cache: tuple[int, dict[str, bytes], dict[str, tuple[bytes, int]]] = (-1, {}, {})
        self._raw = raw_client(client)

    @classmethod
    def from_url(cls, url: str, keys: Keys, events_maxlen: int = 100_000) -> RedisStore:
        """Connect lazily to ``url`` (redis://, rediss:// or unix://)."""
        return cls(connect(url), keys, events_maxlen)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """Connect lazily as ``settings`` say: VMQ_REDIS_URL, or its master through VMQ_REDIS_SENTINELS."""
        client = connect(settings.redis_url, settings.sentinel_addresses, settings.redis_sentinel_master)
        return cls(client, settings.keys, settings.events_maxlen)

    # ------------------------------------------------------------------ time and rounds
    def time_ms(self) -> int:
        """Redis server time in ms: the one clock every deadline and arrival is measured in."""
        return self.time_us() // 1000

    def time_us(self) -> int:
        """Redis server time in µs (orders two hosts' listings taken within the same ms)."""
        with translate_errors("TIME"):
            seconds, micros = self.r.time()
        return int(seconds) * 1_000_000 + int(micros)

    def start_round(self, nonce: str, reply_timeout_ms: int, rounds_kept: int, wire_version: int,
                    min_gap_ms: int = 0) -> tuple[int, int, bool]:
        """Number, record and publish one probe round, in one round trip: (round, sent_ms, True).

        With ``min_gap_ms`` > 0 a round is refused when the latest one went out less than that long ago by
        Redis' clock (a second beat's duplicate): nothing is sent, ``rounds_duplicate`` is counted and the
        latest round is returned as (round, sent_ms, False).
        """
        k = self.keys
        with translate_errors("start_round"):
            round_id, sent_ms, started = self._start_round(
                keys=[k.round_seq, k.rounds, k.rounds_pending, k.probe_channel, k.stats],
                args=[nonce, reply_timeout_ms, rounds_kept, wire_version, min_gap_ms],
            )
        return int(round_id), int(sent_ms), bool(started)

    def current_round(self) -> int:
        """The latest round number sent (0 before the first)."""
        with translate_errors("GET round seq"):
            value = self.r.get(self.keys.round_seq)
        return int(value or 0)

    def due_rounds(self, now_ms: int) -> list[tuple[int, int]]:
        """Pending rounds whose deadline is strictly before ``now_ms``, oldest first: (round, deadline_ms)."""
        with translate_errors("due rounds"):
            rows = self.r.zrangebyscore(self.keys.rounds_pending, "-inf", f"({now_ms}", withscores=True)
        return [(int(member), int(score)) for member, score in rows]

    def next_deadline(self) -> int | None:
        """Earliest deadline among rounds not yet judged."""
        with translate_errors("next deadline"):
            rows = self.r.zrange(self.keys.rounds_pending, 0, 0, withscores=True)
        return int(rows[0][1]) if rows else None

    def finish_round(self, round_id: int) -> None:
        """Mark a round judged."""
        with translate_errors("finish round"):
            self.r.zrem(self.keys.rounds_pending, round_id)

    def round_book(self) -> RoundBook:
        """Nonces and send times of the recent rounds."""
        with translate_errors("HGETALL rounds"):
            raw = self.r.hgetall(self.keys.rounds)
        book: dict[int, tuple[str, int]] = {}
        for key, value in raw.items():
            nonce, _, sent = _text(value).partition(":")
            book[int(key)] = (nonce, int(sent))
        return RoundBook(book)

    def round_sent_times(self) -> dict[int, int]:
        """Send time (Redis ms) of each remembered recent round."""
        with translate_errors("HGETALL rounds"):
            raw = self.r.hgetall(self.keys.rounds)
        return {int(key): int(_text(value).partition(":")[2]) for key, value in raw.items()}

    def round_sent_ms(self, round_id: int) -> int | None:
        """When ``round_id`` was sent, if still remembered."""
        with translate_errors("HGET round"):
            value = self.r.hget(self.keys.rounds, round_id)
        return int(_text(value).partition(":")[2]) if value else None

    @contextlib.contextmanager
    def judge_lock(self, lease_s: float, wait_s: float) -> Iterator[JudgeLease]:
        """Serialise ingestion and judging across timeout workers; yields a lease that is false if the lock
        was not acquired within ``wait_s``. A holder that dies frees it after ``lease_s``."""
        lock = self.r.lock(self.keys.judge_lock, timeout=lease_s, blocking_timeout=wait_s)
        with translate_errors("judge lock"):
            lease = JudgeLease(lock, bool(lock.acquire()))
        try:
            yield lease
        finally:
            if lease:
                with contextlib.suppress(redis.RedisError):
                    lock.release()

    # ------------------------------------------------------------------ liveness
    def silent_since(self, round_id: int) -> list[str]:
        """VMs with no valid reply to ``round_id`` or later."""
        with translate_errors("silent VMs"):
            return [_text(vm) for vm in self.r.zrangebyscore(self.keys.last_round, "-inf", f"({round_id}")]

    def attention(self) -> set[str]:
        """VMs whose state is not healthy."""
        with translate_errors("SMEMBERS attention"):
            return {_text(vm) for vm in self.r.smembers(self.keys.attention)}

    # ------------------------------------------------------------------ VM records
    def vm_records(self, vms: Sequence[str]) -> list[Record]:
        """The state hashes of ``vms`` (empty dict for unknown ones)."""
        with translate_errors("HGETALL vms"):
            pipe = self.r.pipeline(transaction=False)
            for vm in vms:
                pipe.hgetall(self.keys.vm(vm))
            rows = pipe.execute()
        return [{_text(a): _text(b) for a, b in row.items()} for row in rows]

    def vm_record(self, vm: str) -> Record:
        """One VM's state hash."""
        return self.vm_records([vm])[0]

    def judge_context(self, vms: Sequence[str], window_start_ms: int) -> tuple[
        list[int], list[str | None], set[str], bool
    ]:
        """For VMs being judged: restarts in window, last replies, VMs with a key, kill switch (host context
        comes from ``host_context``)."""
        k = self.keys
        with translate_errors("judge context"):
            pipe = self.r.pipeline(transaction=False)
            for vm in vms:
                pipe.zcount(k.vm_restarts(vm), window_start_ms, "+inf")
            pipe.hmget(k.last_reply, list(vms)) if vms else pipe.ping()
            pipe.hmget(k.secrets, list(vms)) if vms else pipe.ping()
            pipe.exists(k.restarts_suspended)
            out = pipe.execute()
        restarts = [int(x) for x in out[: len(vms)]]
        last_replies = [(_text(x) if x else None) for x in out[len(vms)]] if vms else []
        keyed = {vm for vm, x in zip(vms, out[len(vms) + 1]) if x} if vms else set()
        return restarts, last_replies, keyed, bool(out[-1])

    def transition(
        self,
        vm: str,
        from_states: Iterable[VmState],
        to_state: VmState,
        now_ms: int,
        event: Mapping[str, Any],
        fields: Mapping[str, Any] | None = None,
        expected_generation: int | None = None,
        count_restart: bool = False,
        restart_window_ms: int = 3_600_000,
    ) -> tuple[bool, str, int]:
        """Atomic compare-and-set of a VM's state plus its audit event: (applied, previous_state, generation).

        Raises ValueError for a transition the state machine (vmq.policy.TRANSITIONS) does not allow.
        """
        spec = Transition(vm, tuple(from_states), to_state, now_ms, event, fields or {}, expected_generation,
                          count_restart, restart_window_ms)
        with translate_errors(f"transition {vm}"):
            ok, state, gen = self._transition(keys=self._transition_keys(spec), args=self._transition_args(spec))
        return bool(ok), _text(state), int(gen)

    def transition_many(self, specs: Sequence[Transition]) -> list[tuple[bool, str, int]]:
        """Several independent transitions in one pipeline (each still atomic on its own)."""
        if not specs:
            return []
        with translate_errors("transition many"):
            pipe = self.r.pipeline(transaction=False)
            for spec in specs:
                self._transition(keys=self._transition_keys(spec), args=self._transition_args(spec), client=pipe)
            rows = pipe.execute()
        return [(bool(ok), _text(state), int(gen)) for ok, state, gen in rows]

    def _transition_keys(self, spec: Transition) -> list[str]:
        k = self.keys
        return [k.vm(spec.vm), k.events, k.attention, k.vm_restarts(spec.vm)]

    def _transition_args(self, spec: Transition) -> list[Any]:
        illegal = [s.value for s in spec.from_states if not can_transition(s, spec.to_state)]
        if illegal:
            raise ValueError(f"state machine forbids {illegal} -> {spec.to_state.value}")
        field_args: list[str] = []
        for name, value in spec.fields.items():
            field_args += [name, str(value)]
        event_args: list[str] = []
        for name, value in {"vm": spec.vm, "time": spec.now_ms, **spec.event}.items():
            event_args += [name, value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))]
        return [spec.vm, ",".join(s.value for s in spec.from_states), spec.to_state.value, spec.now_ms,
                "" if spec.expected_generation is None else spec.expected_generation,
                "1" if spec.count_restart else "0", self.events_maxlen, spec.restart_window_ms,
                len(field_args) // 2, *field_args, *event_args]

    def uncount_restart(self, vm: str, generation: int, at_ms: int) -> None:
        """Take back the budget entry of an attempt that never reached a host (same member transition.lua adds)."""
        with translate_errors(f"uncount {vm}"):
            self.r.zrem(self.keys.vm_restarts(vm), f"{generation}:{at_ms}")

    def claim_restart(self, vm: str, generation: int, incident: str, claimant: str,
                      hold_ms: int | None = None) -> bool:
        """Take the per-attempt idempotency claim; False if closed, changed or taken. With ``hold_ms`` a reply
        may close the claimed attempt once that long has passed (its worker presumed dead); without, never."""
        hold = [] if hold_ms is None else [hold_ms]
        with translate_errors(f"claim {vm}"):
            return bool(self._claim(keys=[self.keys.vm(vm)], args=[generation, claimant, incident, *hold]))

    def set_fields(self, vm: str, fields: Mapping[str, Any]) -> None:
        """Write informational fields of a VM record (never state or generation)."""
        with translate_errors(f"HSET {vm}"):
            self.r.hset(self.keys.vm(vm), mapping={a: str(b) for a, b in fields.items()})

    def audit(self, event_type: str, vm: str, host: str, now_ms: int, **data: Any) -> None:
        """Append an event that is not a state transition (skipped actions, migrations, inventory)."""
        entry = {"type": event_type, "vm": vm, "host": host, "time": str(now_ms)}
        for name, value in data.items():
            entry[name] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        with translate_errors("XADD events"):
            self.r.xadd(self.keys.events, entry, maxlen=self.events_maxlen, approximate=True)

    def incr_stat(self, name: str, amount: int = 1) -> None:
        """Bump one counter in the stats hash."""
        with translate_errors("HINCRBY stats"):
            self.r.hincrby(self.keys.stats, name, amount)

    def start_monitoring(self, vm: str, now_ms: int) -> None:
        """(Re)start judging a VM from the next round on, with its grace period counted from now."""
        mark = self.current_round() - 0.5
        with translate_errors("start monitoring"):
            pipe = self.r.pipeline(transaction=True)
            pipe.zadd(self.keys.last_round, {vm: mark})
            pipe.hset(self.keys.vm(vm), "monitored_since_ms", now_ms)
            pipe.execute()

    def reset_budget(self, vm: str) -> None:
        """Forget a VM's past restarts (operator clear)."""
        with translate_errors("reset budget"):
            self.r.delete(self.keys.vm_restarts(vm))

    # ------------------------------------------------------------------ reading for operators
    def events(self, after: str = "-", count: int = 1000, block_ms: int | None = None) -> list[tuple[str, Record]]:
        """Audit entries after ``after`` (exclusive unless "-"), optionally blocking for new ones."""
        with translate_errors("read events"):
            if block_ms is not None:
                got = self.r.xread({self.keys.events: after if after != "-" else "0-0"}, count=count,
                                   block=block_ms)
                rows = got[0][1] if got else []
            else:
                start = after if after == "-" else f"({after}"
                rows = self.r.xrange(self.keys.events, start, "+", count=count)
        return [(_text(i), {_text(a): _text(b) for a, b in f.items()}) for i, f in rows]

    def last_seen_many(self, vms: Sequence[str]) -> list[float | None]:
        """Arrival ms of each VM's latest valid reply."""
        if not vms:
            return []
        with translate_errors("ZMSCORE last seen"):
            return list(self.r.zmscore(self.keys.last_seen, vms))

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(stats, rejects by reason)."""
        with translate_errors("counters"):
            stats = self.r.hgetall(self.keys.stats)
            rejects = self.r.hgetall(self.keys.rejects)
        return ({_text(a): int(b) for a, b in stats.items()}, {_text(a): int(b) for a, b in rejects.items()})
