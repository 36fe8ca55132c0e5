"""VM records in Redis: the state hash per VM, its compare-and-set transitions with their audit events
(vmq/lua/transition.lua), the per-attempt restart claim (claim.lua), placement by host listings (place.lua),
the restart budget, and the sets that index them (known VMs, VMs needing attention)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import redis

from vmq.keys import Keys
from vmq.model import (
    DomainInfo,
    DomainStatus,
    JudgeContext,
    Placement,
    ProbePath,
    Transition,
    TransitionResult,
    VmPlacement,
    VmRecord,
    VmState,
)
from vmq.policy import can_transition
from vmq.store.client import StorePart, translate_errors
from vmq.store.client import text as _text
from vmq.store.covers import RedisCovers

#: VMs per call of vmq/lua/placements.lua: Redis runs each call alone, ≈ 1 ms per 1,000 VMs.
PLACEMENTS_PER_CALL = 1000


class RedisVms(StorePart):
    """Every VM's record and the structures kept with it; ``events_maxlen`` caps the audit stream."""

    def __init__(self, client: redis.Redis, keys: Keys, events_maxlen: int = 100_000) -> None:
        super().__init__(client, keys)
        self.events_maxlen = events_maxlen
        self._transition = self._script("transition.lua")
        self._claim = self._script("claim.lua")
        self._place = self._script("place.lua")
        self._placements = self._script("placements.lua")
        self.covers = RedisCovers(client, keys)

    # ------------------------------------------------------------------ reading
    def records(self, vms: Sequence[str]) -> list[VmRecord]:
        """The records of ``vms`` (``exists`` False for unknown ones), in one round trip."""
        with translate_errors("HGETALL vms"):
            pipe = self.r.pipeline(transaction=False)
            for vm in vms:
                pipe.hgetall(self.keys.vm(vm))
            rows = pipe.execute()
        return [VmRecord.parse(vm, {_text(a): _text(b) for a, b in row.items()}) for vm, row in zip(vms, rows)]

    def placements(self, vms: Sequence[str]) -> list[VmPlacement]:
        """Each VM's host and probe path (``exists`` False without a record), in one round trip of a few scripts
        (vmq/lua/placements.lua, PLACEMENTS_PER_CALL VMs each): what vouching for every relayed answer needs,
        without reading and parsing whole records (docs/performance.md, "The relayed paths")."""
        flat: list[Any] = []
        with translate_errors("placements"):
            pipe = self.r.pipeline(transaction=False)
            for start in range(0, len(vms), PLACEMENTS_PER_CALL):
                self._placements(keys=[self.keys.vm(vm) for vm in vms[start:start + PLACEMENTS_PER_CALL]],
                                 client=pipe)
            for part in pipe.execute() if vms else []:
                flat += part
        paths = {path.value.encode(): path for path in ProbePath}
        out: list[VmPlacement] = []
        for i, vm in enumerate(vms):
            state, host, path = flat[3 * i:3 * i + 3]
            if state is None and host is None and path is None:
                out.append(VmPlacement(vm, False, "", ProbePath.REDIS))
                continue
            out.append(VmPlacement(vm, True, _text(host or b""), paths.get(path or b"", ProbePath.REDIS)))
        return out

    def record(self, vm: str) -> VmRecord:
        """One VM's record."""
        return self.records([vm])[0]

    def all_vms(self) -> list[str]:
        """Every known VM id, sorted."""
        with translate_errors("SMEMBERS vms"):
            return sorted(_text(vm) for vm in self.r.smembers(self.keys.vms))

    def app_unhealthy(self) -> dict[str, dict[str, Any]]:
        """VMs whose latest reply says their application is unhealthy: vm -> {round, checks, since_ms}."""
        with translate_errors("HGETALL app unhealthy"):
            raw = self.r.hgetall(self.keys.app_unhealthy)
        out: dict[str, dict[str, Any]] = {}
        for vm, value in raw.items():
            try:
                out[_text(vm)] = dict(json.loads(value))
            except (ValueError, TypeError):
                continue
        return out

    def note_app_health(self, unhealthy: Mapping[str, Mapping[str, Any]], healthy: Sequence[str]) -> None:
        """Record VMs whose replies say their application is unhealthy, forget those that say it is well again."""
        with translate_errors("app health"):
            pipe = self.r.pipeline(transaction=False)
            if unhealthy:
                pipe.hset(self.keys.app_unhealthy, mapping={vm: json.dumps(dict(v)) for vm, v in unhealthy.items()})
            if healthy:
                pipe.hdel(self.keys.app_unhealthy, *healthy)
            pipe.execute()

    def attention(self) -> set[str]:
        """VMs whose state is not healthy."""
        with translate_errors("SMEMBERS attention"):
            return {_text(vm) for vm in self.r.smembers(self.keys.attention)}

    def schedule_maintenance_end(self, vm: str, until_ms: int) -> None:
        """Note that ``vm``'s maintenance window ends at ``until_ms`` (one member per window)."""
        with translate_errors("ZADD maintenance ends"):
            self.r.zadd(self.keys.maintenance_ends, {self.keys.maintenance_end_member(vm, until_ms): until_ms})

    def maintenance_ends_due(self, now_ms: int, count: int = 500) -> list[tuple[str, int]]:
        """(vm, until ms) of noted windows that ended by ``now_ms``, oldest first, at most ``count``."""
        with translate_errors("ZRANGEBYSCORE maintenance ends"):
            members = self.r.zrangebyscore(self.keys.maintenance_ends, "-inf", now_ms, start=0, num=count)
        out = []
        for member in members:
            vm, _, until = _text(member).rpartition("|")
            out.append((vm, int(until)))
        return out

    def drop_maintenance_end(self, vm: str, until_ms: int) -> None:
        """Forget one noted window (handled, or no longer the VM's)."""
        with translate_errors("ZREM maintenance ends"):
            self.r.zrem(self.keys.maintenance_ends, self.keys.maintenance_end_member(vm, until_ms))

    def hosts_of(self, vms: Sequence[str]) -> list[str]:
        """The host each VM's record names ("" for none)."""
        with translate_errors("placements"):
            pipe = self.r.pipeline(transaction=False)
            for vm in vms:
                pipe.hget(self.keys.vm(vm), "host")
            rows = pipe.execute()
        return [_text(h or b"") for h in rows]

    def restarting_by_host(self) -> dict[str, int]:
        """Restarts in flight per host (VMs in `restarting`), read from the small attention set."""
        counts: dict[str, int] = {}
        for rec in self.records(sorted(self.attention())):
            if rec.state is VmState.RESTARTING:
                counts[rec.host] = counts.get(rec.host, 0) + 1
        return counts

    def judge_context(self, vms: Sequence[str], window_start_ms: int) -> JudgeContext:
        """For VMs being judged: restarts since ``window_start_ms``, last saved replies, VMs with a key, the
        kill switch, and the latest round each VM's host relay could not ask it, in one round trip."""
        k = self.keys
        with translate_errors("judge context"):
            pipe = self.r.pipeline(transaction=False)
            for vm in vms:
                pipe.zcount(k.vm_restarts(vm), window_start_ms, "+inf")
            pipe.hmget(k.last_reply, list(vms)) if vms else pipe.ping()
            pipe.hmget(k.secrets, list(vms)) if vms else pipe.ping()
            pipe.exists(k.restarts_suspended)
            pipe.zmscore(k.relay_unasked, list(vms)) if vms else pipe.ping()
            out = pipe.execute()
        restarts = [int(x) for x in out[: len(vms)]]
        last_replies = [(_text(x) if x else None) for x in out[len(vms)]] if vms else []
        keyed = {vm for vm, x in zip(vms, out[len(vms) + 1]) if x} if vms else set()
        unasked = [int(x or 0) for x in out[-1]] if vms else []
        return JudgeContext(restarts, last_replies, keyed, bool(out[-2]), unasked)

    # ------------------------------------------------------------------ state machine
    def transition(self, spec: Transition) -> TransitionResult:
        """Atomic compare-and-set of a VM's state plus its audit event.

        Raises ValueError for a transition the state machine (vmq.policy.TRANSITIONS) does not allow.
        """
        with translate_errors(f"transition {spec.vm}"):
            ok, state, gen = self._transition(keys=self._transition_keys(spec), args=self._transition_args(spec))
        return TransitionResult(bool(ok), _text(state), int(gen))

    def transition_many(self, specs: Sequence[Transition]) -> list[TransitionResult]:
        """Several independent transitions in one pipeline (each still atomic on its own)."""
        if not specs:
            return []
        with translate_errors("transition many"):
            pipe = self.r.pipeline(transaction=False)
            for spec in specs:
                self._transition(keys=self._transition_keys(spec), args=self._transition_args(spec), client=pipe)
            rows = pipe.execute()
        return [TransitionResult(bool(ok), _text(state), int(gen)) for ok, state, gen in rows]

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

    def claim_restart(self, vm: str, generation: int, incident: str, claimant: str,
                      hold_ms: int | None = None) -> bool:
        """Take the per-attempt idempotency claim; False if closed, changed or taken. With ``hold_ms`` a reply
        may close the claimed attempt once that long has passed (its worker presumed dead); without, never."""
        hold = [] if hold_ms is None else [hold_ms]
        with translate_errors(f"claim {vm}"):
            return bool(self._claim(keys=[self.keys.vm(vm)], args=[generation, claimant, incident, *hold]))

    def uncount_restart(self, vm: str, generation: int, at_ms: int) -> None:
        """Take back the budget entry of an attempt that never reached a host (same member transition.lua adds)."""
        with translate_errors(f"uncount {vm}"):
            self.r.zrem(self.keys.vm_restarts(vm), f"{generation}:{at_ms}")

    def reset_budget(self, vm: str) -> None:
        """Forget a VM's past restarts (operator clear)."""
        with translate_errors("reset budget"):
            self.r.delete(self.keys.vm_restarts(vm))

    # ------------------------------------------------------------------ other fields
    def set_fields(self, vm: str, fields: Mapping[str, Any]) -> None:
        """Write informational fields of a VM record (never state or generation)."""
        with translate_errors(f"HSET {vm}"):
            self.r.hset(self.keys.vm(vm), mapping={a: str(b) for a, b in fields.items()})

    def write_many(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """Write informational fields of many VM records in one round trip."""
        if not updates:
            return
        with translate_errors("HSET many"):
            pipe = self.r.pipeline(transaction=False)
            for vm, fields in updates.items():
                pipe.hset(self.keys.vm(vm), mapping={a: str(b) for a, b in fields.items()})
            pipe.execute()

    def set_policy_overrides(self, vm: str, fields: Mapping[str, str]) -> None:
        """Set (non-empty value) or remove (empty value) a VM's ``policy.<knob>`` overrides."""
        with translate_errors(f"overrides {vm}"):
            pipe = self.r.pipeline(transaction=True)
            for name, value in fields.items():
                if value:
                    pipe.hset(self.keys.vm(vm), name, value)
                else:
                    pipe.hdel(self.keys.vm(vm), name)
            pipe.execute()

    # ------------------------------------------------------------------ monitoring and placement
    def _monitoring_mark(self) -> float:
        """Just below the latest round: a VM registered now owes an answer from the next round on."""
        with translate_errors("GET round seq"):
            return int(self.r.get(self.keys.round_seq) or 0) - 0.5

    def start_monitoring(self, vm: str, now_ms: int) -> None:
        """(Re)start judging a VM from the next round on, with its grace period counted from now."""
        mark = self._monitoring_mark()
        with translate_errors("start monitoring"):
            pipe = self.r.pipeline(transaction=True)
            self.covers.release([vm], mark, client=pipe)  # out of its host's cover: answers owed from the mark on
            pipe.hset(self.keys.vm(vm), "monitored_since_ms", now_ms)
            pipe.execute()

    def register_vm(self, vm: str, now_ms: int) -> bool:
        """Add a VM first seen by a host as `unknown`; False if it was known already."""
        k = self.keys
        with translate_errors("register vm"):
            if not self.r.sadd(k.vms, vm):
                return False
            mark = self._monitoring_mark()
            pipe = self.r.pipeline(transaction=False)
            pipe.hsetnx(k.vm(vm), "state", VmState.UNKNOWN.value)
            pipe.hsetnx(k.vm(vm), "generation", 0)
            pipe.hsetnx(k.vm(vm), "state_since_ms", now_ms)
            pipe.hset(k.vm(vm), "monitored_since_ms", now_ms)
            pipe.zadd(k.last_round, {vm: mark}, nx=True)
            pipe.sadd(k.attention, vm)
            pipe.execute()
        return True

    def place_domains(self, host: str, listed: Sequence[DomainInfo], now_ms: int,
                      active: Collection[DomainStatus], migrating: Iterable[str] = (),
                      listed_us: int = 0) -> list[Placement]:
        """Record where each listed domain's VM lives, one atomic compare-and-set per VM, in one round trip.

        ``listed`` is ``host``'s listing; a domain with status ABSENT vanished from it. A domain whose status
        is in ``active`` takes the VM's record, unless it is paused with a reason in ``migrating`` (a live
        migration under way); an inactive or migrating one only if the host the record names is gone
        (heartbeat key expired) or no longer has the domain defined (vmq/lua/place.lua). ``listed_us`` is
        Redis' time (µs) taken before the listing: a listing older than another host's last placement of a VM
        does not move it. Idempotent. Raises StoreError/StoreUnavailable.
        """
        if not listed:
            return []
        prefix, suffix = self.keys.host_heartbeat_parts()
        active_list = ",".join(sorted(status.value for status in active))
        migrating_list = ",".join(sorted(migrating))
        with translate_errors(f"place domains of {host}"):
            pipe = self.r.pipeline(transaction=False)
            for info in listed:
                self._place(keys=[self.keys.vm(info.name)],
                            args=[host, info.status.value, info.uuid, info.reason, now_ms, active_list, prefix,
                                  suffix, migrating_list, listed_us], client=pipe)
            rows = pipe.execute()
        return [Placement(info.name, bool(written), _text(previous), bool(migrated), bool(started))
                for info, (written, previous, migrated, started) in zip(listed, rows)]
