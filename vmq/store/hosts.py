"""Host-side state in Redis: registrations and heartbeats, domain listings, guard episodes, kill switch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vmq.model import HostContext
from vmq.store.client import StorePart, translate_errors
from vmq.store.client import text as _text

Info = dict[str, str]


class RedisHosts(StorePart):
    """Every registered host: its info hash, heartbeat key, last domain listing and guard episodes."""

    # ------------------------------------------------------------------ guards
    def host_context(self, hosts: Iterable[str], now_ms: int, fresh_ms: int,
                     round_id: int | None = None) -> dict[str, HostContext]:
        """Liveness, libvirt health, maintenance and size of each host, in one round trip.

        A host counts as alive for restarts only if its heartbeat was renewed within ``fresh_ms``: the
        key's TTL (which decides `host_down`) is too slow to stop a restart aimed at a host that just died.
        """
        names = sorted(set(hosts))
        with translate_errors("host context"):
            pipe = self.r.pipeline(transaction=False)
            for host in names:
                pipe.exists(self.keys.host_heartbeat(host))
                pipe.hmget(self.keys.host(host), ["libvirt_ok", "maintenance_until_ms", "seen_ms", "relay_seen_ms"])
                pipe.hlen(self.keys.host_domains(host))
            if names and round_id is not None:
                pipe.zmscore(self.keys.relay_rounds, [self.keys.relay_round_member(host, round_id) for host in names])
            out = pipe.execute()
        finished = out[-1] if names and round_id is not None else [None] * len(names)
        result = {}
        for i, host in enumerate(names):
            alive, (libvirt_ok, until, seen, relay), size = out[3 * i], out[3 * i + 1], out[3 * i + 2]
            fresh = bool(alive) and now_ms - int(_text(seen or b"0")) <= fresh_ms
            result[host] = HostContext(fresh, _text(libvirt_ok or b"1") == "0", int(_text(until or b"0")),
                                       int(size), int(_text(relay or b"0")), finished[i] is not None)
        return result

    def set_kill_switch(self, seconds: float | None, on: bool = True) -> None:
        """Hold every restart (for ``seconds``, or until lifted), or lift the hold."""
        with translate_errors("kill switch"):
            if on:
                self.r.set(self.keys.restarts_suspended, "1",
                           px=None if seconds is None else int(seconds * 1000))
            else:
                self.r.delete(self.keys.restarts_suspended)

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
        with translate_errors("placements"):
            pipe = self.r.pipeline(transaction=False)
            for vm in names:
                pipe.hget(self.keys.vm(vm), "host")
            owners = pipe.execute()
        return [vm for vm, owner in zip(names, owners) if _text(owner or b"") == host]

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

    def hosts_overview(self) -> list[tuple[str, bool, Info]]:
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

    def host_info(self, host: str) -> Info:
        """A host's registration hash."""
        with translate_errors("host info"):
            return {_text(a): _text(b) for a, b in self.r.hgetall(self.keys.host(host)).items()}

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
