"""Per-tick sweeps of standing conditions: hosts that vanish or return, maintenance that ends, guard episodes.

Both are idempotent and cheap when nothing changed (one pipelined read of the host set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vmq import lifecycle
from vmq.model import AuditEvent, VmState
from vmq.policy import REACHABLE
from vmq.ports import Store

log = logging.getLogger(__name__)


def sweep_hosts(store: Store, now_ms: int) -> list[tuple[str, bool, dict[str, str]]]:
    """A host whose heartbeat expired is `host_down` and its VMs `unreachable`; on return, judged afresh.
    Returns the hosts as the sweep left them (name, alive, info with ``down_since_ms``) for the failover."""
    overview = store.hosts.hosts_overview()
    for host, alive, info in overview:
        down_since = int(info.get("down_since_ms") or 0)
        if not alive and not down_since:
            store.hosts.set_host_fields(host, {"down_since_ms": now_ms})
            info["down_since_ms"] = str(now_ms)
            store.audit.append(AuditEvent.HOST_DOWN, "", host, now_ms, reason="host worker heartbeat expired")
            log.error("host=%s down: its VMs are unreachable, nothing will be restarted there", host)
        if not alive:
            reason = f"host {host} is down (worker heartbeat expired)"
            for rec in store.vms.records(store.hosts.vms_on_host(host)):
                if rec.state in REACHABLE:
                    lifecycle.mark_unreachable(store.vms, rec, now_ms, host, reason)
        elif down_since:
            store.hosts.set_host_fields(host, {"down_since_ms": 0})
            info["down_since_ms"] = "0"
            store.audit.append(AuditEvent.HOST_UP, "", host, now_ms, down_for_s=round((now_ms - down_since) / 1000, 3))
            log.warning("host=%s is back: its VMs are judged afresh after their grace", host)
            for rec in store.vms.records(store.hosts.vms_on_host(host)):
                if rec.state is VmState.UNREACHABLE:
                    lifecycle.mark_reachable(store.vms, rec, now_ms, host, f"host {host} is back")
    return overview


def expire_maintenance(store: Store, now_ms: int) -> None:
    """VMs whose maintenance window has passed go back to `unknown` and are judged after their grace. Reads
    only the windows noted as ended (cheap whatever the number of VMs needing attention)."""
    due = store.vms.maintenance_ends_due(now_ms)
    for rec, (vm, until_ms) in zip(store.vms.records([vm for vm, _ in due]), due):
        if rec.state is VmState.MAINTENANCE and rec.maintenance_until_ms == until_ms:
            lifecycle.maintenance_off(store.vms, rec, now_ms, "maintenance window expired")
        store.vms.drop_maintenance_end(vm, until_ms)  # handled, lifted, or replaced by a later window


def note_maintenance_windows(store: Store, renew: Callable[[], bool], chunk: int = 1000) -> bool:
    """Note the end of every timed maintenance window in the records (windows set before they were noted
    as they are set), reading the VMs needing attention ``chunk`` at a time and calling ``renew`` (the
    judge lock's lease) between chunks; False if the lease was lost."""
    attention = sorted(store.vms.attention())
    for start in range(0, len(attention), chunk):
        if not renew():
            return False
        for rec in store.vms.records(attention[start:start + chunk]):
            if rec.state is VmState.MAINTENANCE and rec.maintenance_until_ms > 0:
                store.vms.schedule_maintenance_end(rec.vm, rec.maintenance_until_ms)
    return True


def record_guard_episodes(store: Store, cluster: str, by_host: dict[str, str],
                          silent_by_host: dict[str, int], round_id: int, now_ms: int) -> None:
    """Raise `storm` / `host_suspect` once when an episode starts; `storm_over` when it ends."""
    active = {"cluster": cluster} if cluster else {}
    active.update({f"host:{h}": reason for h, reason in by_host.items()})
    known = store.hosts.guard_episodes()
    started = {name: now_ms for name in active if name not in known}
    for name in started:
        host = name.partition(":")[2]
        store.audit.append(AuditEvent.STORM if name == "cluster" else AuditEvent.HOST_SUSPECT, "", host, now_ms,
                    round=round_id, reason=active[name], silent=silent_by_host)
        log.error("%s: %s", name, active[name])
    store.hosts.set_guard_episodes(started, [])
    end_guard_episodes(store, set(active), now_ms, known)


def end_guard_episodes(store: Store, active: set[str], now_ms: int,
                       known: dict[str, int] | None = None) -> None:
    """Close the guard episodes that are no longer active, with a `storm_over` event each."""
    known = store.hosts.guard_episodes() if known is None else known
    ended = [name for name in known if name not in active]
    for name in ended:
        store.audit.append(AuditEvent.STORM_OVER, "", name.partition(":")[2], now_ms, episode=name,
                    lasted_s=round((now_ms - known[name]) / 1000, 3))
    if ended:
        store.hosts.set_guard_episodes({}, ended)
