"""Per-tick sweeps of standing conditions: hosts that vanish or return, maintenance that ends, guard episodes.

Both are idempotent and cheap when nothing changed (one pipelined read of the host set).
"""

from __future__ import annotations

import logging

from vmq.model import VmState
from vmq.policy import REACHABLE
from vmq.store.redis import RedisStore

log = logging.getLogger(__name__)


def sweep_hosts(store: RedisStore, now_ms: int) -> None:
    """A host whose heartbeat expired is `host_down` and its VMs `unreachable`; on return, judged afresh."""
    for host, alive, info in store.hosts_overview():
        down_since = int(info.get("down_since_ms") or 0)
        if not alive and not down_since:
            store.set_host_fields(host, {"down_since_ms": now_ms})
            store.audit("host_down", "", host, now_ms, reason="host worker heartbeat expired")
            log.error("host=%s down: its VMs are unreachable, nothing will be restarted there", host)
        if not alive:
            _move(store, host, now_ms, REACHABLE, VmState.UNREACHABLE, "unreachable",
                  f"host {host} is down (worker heartbeat expired)")
        elif down_since:
            store.set_host_fields(host, {"down_since_ms": 0})
            store.audit("host_up", "", host, now_ms, down_for_s=round((now_ms - down_since) / 1000, 3))
            log.warning("host=%s is back: its VMs are judged afresh after their grace", host)
            for vm in _move(store, host, now_ms, frozenset({VmState.UNREACHABLE}), VmState.UNKNOWN,
                            "reachable", f"host {host} is back"):
                store.start_monitoring(vm, now_ms)


def _move(store: RedisStore, host: str, now_ms: int, sources: frozenset[VmState], target: VmState,
          event_type: str, reason: str) -> list[str]:
    vms = store.vms_on_host(host)
    moved = []
    for vm, rec in zip(vms, store.vm_records(vms)):
        state = VmState(rec.get("state", VmState.UNKNOWN.value))
        if state not in sources:
            continue
        ok, _, _ = store.transition(vm, [state], target, now_ms, {"type": event_type, "host": host,
                                                                  "reason": reason},
                                    fields={"decision": reason}, expected_generation=int(rec.get("generation") or 0))
        if ok:
            moved.append(vm)
    return moved


def expire_maintenance(store: RedisStore, now_ms: int) -> None:
    """VMs whose maintenance window has passed go back to `unknown` and are judged after their grace."""
    vms = sorted(store.attention())
    for vm, rec in zip(vms, store.vm_records(vms)):
        until = int(rec.get("maintenance_until_ms") or 0)
        if rec.get("state") != VmState.MAINTENANCE.value or until <= 0 or until > now_ms:
            continue
        ok, _, _ = store.transition(vm, [VmState.MAINTENANCE], VmState.UNKNOWN, now_ms,
                                    {"type": "maintenance_ended", "host": rec.get("host", ""),
                                     "reason": "maintenance window expired"},
                                    fields={"maintenance_until_ms": 0},
                                    expected_generation=int(rec.get("generation") or 0))
        if ok:
            store.start_monitoring(vm, now_ms)


def record_guard_episodes(store: RedisStore, cluster: str, by_host: dict[str, str],
                          silent_by_host: dict[str, int], round_id: int, now_ms: int) -> None:
    """Raise `storm` / `host_suspect` once when an episode starts; `storm_over` when it ends."""
    active = {"cluster": cluster} if cluster else {}
    active.update({f"host:{h}": reason for h, reason in by_host.items()})
    known = store.guard_episodes()
    started = {name: now_ms for name in active if name not in known}
    for name in started:
        host = name.partition(":")[2]
        store.audit("storm" if name == "cluster" else "host_suspect", "", host, now_ms,
                    round=round_id, reason=active[name], silent=silent_by_host)
        log.error("%s: %s", name, active[name])
    store.set_guard_episodes(started, [])
    end_guard_episodes(store, set(active), now_ms, known)


def end_guard_episodes(store: RedisStore, active: set[str], now_ms: int,
                       known: dict[str, int] | None = None) -> None:
    """Close the guard episodes that are no longer active, with a `storm_over` event each."""
    known = store.guard_episodes() if known is None else known
    ended = [name for name in known if name not in active]
    for name in ended:
        store.audit("storm_over", "", name.partition(":")[2], now_ms, episode=name,
                    lasted_s=round((now_ms - known[name]) / 1000, 3))
    if ended:
        store.set_guard_episodes({}, ended)
