"""Host-side use case: register this host and publish its domains, following migrations.

The domain name is the VM id. A VM belongs to the host where its domain is active; a domain that is
defined but shut off here keeps the VM only if no other live host runs it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field

from vmq.keys import host_queue, valid_name
from vmq.model import DomainInfo, DomainStatus
from vmq.ports import Hypervisor
from vmq.store.redis import RedisStore

log = logging.getLogger(__name__)

ACTIVE = frozenset({DomainStatus.RUNNING, DomainStatus.PAUSED, DomainStatus.OTHER})


@dataclass
class SyncReport:
    """What one inventory sync changed."""

    domains: int = 0
    new_vms: list[str] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    skipped_names: list[str] = field(default_factory=list)


def heartbeat(store: RedisStore, host: str, uri: str, ttl_s: float, domains: int) -> None:
    """Refresh this host's registration and heartbeat (liveness by TTL); libvirt answered."""
    if store.host_info(host).get("libvirt_ok") == "0":
        store.audit("host_recovered", "", host, store.time_ms(), reason="libvirt answers again")
    store.heartbeat(host, {"queue": host_queue(host), "libvirt_uri": uri, "hostname": socket.gethostname(),
                           "pid": os.getpid(), "domains": domains, "seen_ms": store.time_ms(),
                           "libvirt_ok": 1, "libvirt_error": ""},
                    int(ttl_s * 1000))


def renew_heartbeat(store: RedisStore, host: str, ttl_s: float) -> None:
    """Between inventory syncs: just say this worker is alive (libvirt health unchanged)."""
    store.heartbeat(host, {"seen_ms": store.time_ms()}, int(ttl_s * 1000))


def mark_degraded(store: RedisStore, host: str, uri: str, ttl_s: float, error: str) -> None:
    """The worker lives but libvirt does not answer: keep the heartbeat, flag the host `degraded` once."""
    if store.host_info(host).get("libvirt_ok") != "0":
        store.audit("host_degraded", "", host, store.time_ms(), reason=error)
    store.heartbeat(host, {"queue": host_queue(host), "libvirt_uri": uri, "libvirt_ok": 0,
                           "libvirt_error": error[:500], "seen_ms": store.time_ms()}, int(ttl_s * 1000))


def sync_inventory(store: RedisStore, hypervisor: Hypervisor, host: str, ttl_s: float) -> SyncReport:
    """List this host's domains and update the inventory; raises HypervisorError if libvirt fails."""
    report = SyncReport()
    domains: list[DomainInfo] = []
    for info in hypervisor.list_domains():
        if valid_name(info.name):
            domains.append(info)
        else:
            report.skipped_names.append(info.name)
    report.domains = len(domains)
    heartbeat(store, host, hypervisor.uri, ttl_s, len(domains))
    previously_listed = store.domain_names(host)
    store.store_domains(host, {d.name: json.dumps({"uuid": d.uuid, "status": d.status.value,
                                                    "reason": d.reason}) for d in domains})
    now_ms = store.time_ms()
    names = [d.name for d in domains]
    placements = store.vm_placements(names)
    hosts_alive = {name: alive for name, alive, _ in store.hosts_overview()}
    updates: dict[str, dict[str, object]] = {}
    for info, (owner, old_status, ran_before) in zip(domains, placements):
        if store.register_vm(info.name, now_ms):
            report.new_vms.append(info.name)
            owner, old_status, ran_before = "", DomainStatus.ABSENT.value, False
        active_here = info.status in ACTIVE
        owner_elsewhere = bool(owner) and owner != host and hosts_alive.get(owner, False) \
            and old_status in {s.value for s in ACTIVE}
        if not active_here and owner_elsewhere:
            continue  # a stale definition left behind by a migration: the VM lives on `owner`
        fields: dict[str, object] = {"host": host, "domain_uuid": info.uuid, "domain_status": info.status.value,
                                     "domain_reason": info.reason}
        # A move of a VM that ran before; a never-started definition claimed first at startup is no migration.
        if owner and owner != host and active_here and ran_before:
            report.migrated.append(info.name)
            store.audit("migrated", info.name, host, now_ms, previous_host=owner)
            log.info("vm=%s migrated %s -> %s", info.name, owner, host)
        was_active = old_status in {s.value for s in ACTIVE}
        if active_here and not was_active:
            fields["booted_at_ms"] = now_ms  # boot grace counts from the first sight of a started domain
            report.started.append(info.name)
        if owner != host or old_status != info.status.value:
            updates[info.name] = fields
        elif info.uuid:
            updates.setdefault(info.name, {"domain_reason": info.reason})
    # VMs recorded on this host whose domain vanished from it.
    vanished = sorted(previously_listed - set(names))
    for vm, (owner, status, _) in zip(vanished, store.vm_placements(vanished)):
        if owner == host and status != DomainStatus.ABSENT.value:
            updates[vm] = {"domain_status": DomainStatus.ABSENT.value, "domain_reason": f"not defined on {host}"}
    store.write_many(updates)
    if report.skipped_names:
        log.warning("host=%s domains with unusable names skipped: %s", host, report.skipped_names)
    return report
