"""Host-side state in Redis: registrations and heartbeats, domain listings, guard episodes, kill switch.

A mixin of ``RedisStore`` (it uses the store's client ``r``, ``keys`` and record helpers).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.commands.core import Script

from vmq.keys import Keys
from vmq.model import DomainInfo, DomainStatus, VmState
from vmq.store.common import Record, translate_errors
from vmq.store.common import text as _text


@dataclass(frozen=True)
class HostContext:
    """What the judge needs to know about a host."""

    alive: bool
    degraded: bool
    maintenance_until_ms: int  # 0: none; -1: until lifted
    vm_count: int

    def in_maintenance(self, now_ms: int) -> bool:
        """True while the host's maintenance window lasts."""
        return self.maintenance_until_ms == -1 or self.maintenance_until_ms > now_ms


@dataclass(frozen=True)
class Placement:
    """What one host's listing of a domain did to its VM's record (see vmq/lua/place.lua)."""

    vm: str
    written: bool  # False: the record stays with previous_host, alive and with the domain defined there
    previous_host: str  # the host the record named before ("" for a VM never placed)
    migrated: bool  # the domain is active here after it ran on previous_host
    started: bool  # the domain is active here and was not before: booted_at_ms was set


class HostStateMixin:
    """Host, inventory and guard state; mixed into RedisStore."""

    r: Any
    keys: Keys
    _place: Script  # the registered vmq/lua/place.lua

    def audit(self, event_type: str, vm: str, host: str, now_ms: int, **data: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def attention(self) -> set[str]:  # pragma: no cover - provided by RedisStore
        raise NotImplementedError

    def vm_records(self, vms: Sequence[str]) -> list[Record]:  # pragma: no cover - provided by RedisStore
        raise NotImplementedError

    def current_round(self) -> int:  # pragma: no cover - provided by RedisStore
        raise NotImplementedError

    # ------------------------------------------------------------------ guards
    def host_context(self, hosts: Iterable[str], now_ms: int, fresh_ms: int) -> dict[str, HostContext]:
        """Liveness, libvirt health, maintenance and size of each host, in one round trip.

        A host counts as alive for restarts only if its heartbeat was renewed within ``fresh_ms``: the
        key's TTL (which decides `host_down`) is too slow to stop a restart aimed at a host that just died.
        """
        names = sorted(set(hosts))
        with translate_errors("host context"):
            pipe = self.r.pipeline(transaction=False)
            for host in names:
                pipe.exists(self.keys.host_heartbeat(host))
                pipe.hmget(self.keys.host(host), ["libvirt_ok", "maintenance_until_ms", "seen_ms"])
                pipe.hlen(self.keys.host_domains(host))
            out = pipe.execute()
        result = {}
        for i, host in enumerate(names):
            alive, (libvirt_ok, until, seen), size = out[3 * i], out[3 * i + 1], out[3 * i + 2]
            fresh = bool(alive) and now_ms - int(_text(seen or b"0")) <= fresh_ms
            result[host] = HostContext(fresh, _text(libvirt_ok or b"1") == "0", int(_text(until or b"0")),
                                       int(size))
        return result

    def set_kill_switch(self, seconds: float | None, on: bool = True) -> None:
        """Hold every restart (for ``seconds``, or until lifted), or lift the hold."""
        with translate_errors("kill switch"):
            if on:
                self.r.set(self.keys.restarts_suspended, "1",
                           px=None if seconds is None else int(seconds * 1000))
            else:
                self.r.delete(self.keys.restarts_suspended)

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

    def monitored_count(self) -> int:
        """How many VMs have a responder key (the storm guard's denominator)."""
        with translate_errors("HLEN secrets"):
            return int(self.r.hlen(self.keys.secrets))

    def restarting_by_host(self) -> dict[str, int]:
        """Restarts in flight per host (VMs in `restarting`), read from the small attention set."""
        vms = sorted(self.attention())
        counts: dict[str, int] = {}
        for rec in self.vm_records(vms):
            if rec.get("state") == VmState.RESTARTING.value:
                counts[rec.get("host", "")] = counts.get(rec.get("host", ""), 0) + 1
        return counts

    def guard_episodes(self) -> dict[str, int]:
        """Storm/host guard episodes in progress: name -> since ms."""
        with translate_errors("HGETALL storm"):
            return {_text(a): int(b) for a, b in self.r.hgetall(self.keys.storm).items()}

    def set_guard_episodes(self, start: Mapping[str, int], end: Iterable[str]) -> None:
        """Record guard episodes that begin and end."""
        ended = list(end)
        with translate_errors("storm episodes"):
            pipe = self.r.pipeline(transaction=False)
            if start:
                pipe.hset(self.keys.storm, mapping=dict(start))
            if ended:
                pipe.hdel(self.keys.storm, *ended)
            pipe.execute()

    def set_host_fields(self, host: str, fields: Mapping[str, Any]) -> None:
        """Write fields of a host's registration hash (maintenance, libvirt health, down since)."""
        with translate_errors(f"HSET host {host}"):
            self.r.hset(self.keys.host(host), mapping={a: str(b) for a, b in fields.items()})

    def vms_on_host(self, host: str) -> list[str]:
        """VMs whose record places them on ``host``."""
        names = sorted(self.domain_names(host))
        return [vm for vm, owner in zip(names, self.vm_hosts(names)) if owner == host]

    # ------------------------------------------------------------------ hosts and inventory
    def heartbeat(self, host: str, info: Mapping[str, Any], ttl_ms: int) -> None:
        """Register/refresh a host worker: info hash, membership and a heartbeat key with a TTL."""
        k = self.keys
        with translate_errors("heartbeat"):
            pipe = self.r.pipeline(transaction=False)
            pipe.sadd(k.hosts, host)
            pipe.hset(k.host(host), mapping={a: str(b) for a, b in info.items()})
            pipe.set(k.host_heartbeat(host), "1", px=ttl_ms)
            pipe.execute()

    def drop_heartbeat(self, host: str) -> None:
        """A host worker that stops cleanly says so at once instead of waiting for the TTL."""
        with translate_errors("drop heartbeat"):
            self.r.delete(self.keys.host_heartbeat(host))

    def hosts_overview(self) -> list[tuple[str, bool, Record]]:
        """Every registered host: (name, alive, info)."""
        with translate_errors("hosts"):
            names = sorted(_text(h) for h in self.r.smembers(self.keys.hosts))
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.exists(self.keys.host_heartbeat(name))
                pipe.hgetall(self.keys.host(name))
            out = pipe.execute()
        return [(name, bool(out[2 * i]), {_text(a): _text(b) for a, b in out[2 * i + 1].items()})
                for i, name in enumerate(names)]

    def host_info(self, host: str) -> Record:
        """A host's registration hash."""
        with translate_errors("host info"):
            return {_text(a): _text(b) for a, b in self.r.hgetall(self.keys.host(host)).items()}

    def all_vms(self) -> list[str]:
        """Every known VM id, sorted."""
        with translate_errors("SMEMBERS vms"):
            return sorted(_text(vm) for vm in self.r.smembers(self.keys.vms))

    def register_vm(self, vm: str, now_ms: int) -> bool:
        """Add a VM first seen by a host as `unknown`; False if it was known already."""
        k = self.keys
        with translate_errors("register vm"):
            if not self.r.sadd(k.vms, vm):
                return False
            mark = self.current_round() - 0.5
            pipe = self.r.pipeline(transaction=False)
            pipe.hsetnx(k.vm(vm), "state", VmState.UNKNOWN.value)
            pipe.hsetnx(k.vm(vm), "generation", 0)
            pipe.hsetnx(k.vm(vm), "state_since_ms", now_ms)
            pipe.hset(k.vm(vm), "monitored_since_ms", now_ms)
            pipe.zadd(k.last_round, {vm: mark}, nx=True)
            pipe.sadd(k.attention, vm)
            pipe.execute()
        return True

    def domain_names(self, host: str) -> set[str]:
        """Names in the host's last domain listing."""
        with translate_errors("HKEYS domains"):
            return {_text(n) for n in self.r.hkeys(self.keys.host_domains(host))}

    def store_domains(self, host: str, domains: Mapping[str, str]) -> None:
        """Replace the host's domain listing (name -> JSON)."""
        key = self.keys.host_domains(host)
        with translate_errors("store domains"):
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(key)
            if domains:
                pipe.hset(key, mapping=dict(domains))
            pipe.execute()

    def vm_hosts(self, vms: Sequence[str]) -> list[str]:
        """The host each VM's record names ("" for none)."""
        with translate_errors("placements"):
            pipe = self.r.pipeline(transaction=False)
            for vm in vms:
                pipe.hget(self.keys.vm(vm), "host")
            rows = pipe.execute()
        return [_text(h or b"") for h in rows]

    def place_domains(self, host: str, listed: Sequence[DomainInfo], now_ms: int,
                      active: Collection[DomainStatus], migrating: Collection[str] = (),
                      listed_us: int = 0) -> list[Placement]:
        """Record where each listed domain's VM lives, one atomic compare-and-set per VM, in one round trip.

        ``listed`` is ``host``'s listing; a domain with status ABSENT vanished from it. A domain whose status
        is in ``active`` takes the VM's record, unless it is paused with a reason in ``migrating`` (a live
        migration under way); an inactive or migrating one only if the host the record names is gone
        (heartbeat key expired) or no longer has the domain defined (vmq/lua/place.lua). ``listed_us`` is
        Redis' time (µs) taken before the listing: a listing older than another host's last placement of a VM
        does not move it. Idempotent: the same listing again changes nothing but the reason.
        Raises StoreError/StoreUnavailable.
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

    def write_many(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """Write informational fields of many VM records in one round trip."""
        if not updates:
            return
        with translate_errors("HSET many"):
            pipe = self.r.pipeline(transaction=False)
            for vm, fields in updates.items():
                pipe.hset(self.keys.vm(vm), mapping={a: str(b) for a, b in fields.items()})
            pipe.execute()

