"""Host-side use case: register this host and publish its domains, following migrations.

The domain name is the VM id. A VM belongs to the host where its domain is active; a domain that is
defined but inactive here (shut off, crashed), or paused by a live migration, takes the VM only from a host
that is gone or lost it: a live migration moves the VM once, when the destination's copy runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vmq.host_failover import capacity_fields, keep_definitions
from vmq.intent import Intent
from vmq.keys import valid_name
from vmq.model import AuditEvent, DomainInfo, DomainStatus, ProbePath, detect_probe_path
from vmq.ports import Hypervisor, Store
from vmq.routing import host_queue

log = logging.getLogger(__name__)

ACTIVE = frozenset({DomainStatus.RUNNING, DomainStatus.PAUSED, DomainStatus.OTHER})
#: Reasons (vmq.hypervisor.libvirt's words) of a domain paused by a live migration: the destination's copy
#: while memory is copied in (libvirt starts it paused, reason "migration"), the source's at the switch-over,
#: and the source's during post-copy. Such a copy does not take the VM from a live host that has it.
MIGRATING_PAUSE_REASONS = frozenset({"migration", "postcopy", "postcopy_failed"})


@dataclass
class SyncReport:
    """What one inventory sync changed."""

    domains: int = 0
    new_vms: list[str] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    skipped_names: list[str] = field(default_factory=list)
    path_changed: list[str] = field(default_factory=list)  # VMs whose detected probe path changed their path
    intent_changed: list[str] = field(default_factory=list)  # VMs whose libvirt metadata (vmq.intent) changed
    definitions_kept: list[str] = field(default_factory=list)  # VMs whose definition was kept anew (failover)


def heartbeat(store: Store, host: str, uri: str, ttl_s: float, domains: int,
              extra: Mapping[str, Any] | None = None) -> None:
    """Refresh this host's registration and heartbeat (liveness by TTL); libvirt answered. ``extra``: more
    fields of the registration (capacity and lock manager, vmq.host_failover.capacity_fields)."""
    if store.hosts.host_info(host).get("libvirt_ok") == "0":
        store.audit.append(AuditEvent.HOST_RECOVERED, "", host, store.clock.time_ms(), reason="libvirt answers again")
    store.hosts.heartbeat(host, {"queue": host_queue(host), "libvirt_uri": uri, "hostname": socket.gethostname(),
                           "pid": os.getpid(), "domains": domains, "seen_ms": store.clock.time_ms(),
                           "libvirt_ok": 1, "libvirt_error": "", **(extra or {})},
                    int(ttl_s * 1000))


def renew_heartbeat(store: Store, host: str, ttl_s: float) -> None:
    """Between inventory syncs: just say this worker is alive (libvirt health unchanged)."""
    store.hosts.heartbeat(host, {"seen_ms": store.clock.time_ms()}, int(ttl_s * 1000))


def mark_degraded(store: Store, host: str, uri: str, ttl_s: float, error: str) -> None:
    """The worker lives but libvirt does not answer: keep the heartbeat, flag the host `degraded` once."""
    if store.hosts.host_info(host).get("libvirt_ok") != "0":
        store.audit.append(AuditEvent.HOST_DEGRADED, "", host, store.clock.time_ms(), reason=error)
    store.hosts.heartbeat(host, {"queue": host_queue(host), "libvirt_uri": uri, "libvirt_ok": 0,
                           "libvirt_error": error[:500], "seen_ms": store.clock.time_ms()}, int(ttl_s * 1000))


def _note_changes(store: Store, host: str, fields: dict[str, dict[str, str]], intents: dict[str, Intent],
                  now_ms: int, report: SyncReport) -> None:
    """VMs whose probe path changes with this pass's detection or libvirt metadata (no `vmq path` pins it): audited, and
    owing answers on the new path only from the next round, after the boot grace (as `vmq path` does), so the
    switch is never read as silence. VMs whose libvirt metadata (vmq.intent) changed, or does not read: audited
    once per change, with what was refused."""
    for rec in store.vms.records(sorted(fields)):
        intent = intents.get(rec.vm)  # None: its XML was not read, the intent stored stays
        new = intent.record_fields() if intent is not None else {}
        said = {name[7:]: value for name, value in new.items() if value} if intent is not None else rec.intent
        # The record as this pass leaves it: its path in force is VmRecord.probe_path's, as everywhere.
        after = replace(rec, probe_path_detected=ProbePath(fields[rec.vm]["probe_path_detected"]), intent=said)
        if after.probe_path is not rec.probe_path:
            store.audit.append(AuditEvent.PROBE_PATH, rec.vm, host, now_ms, path=after.probe_path.value,
                               previous=rec.probe_path.value,
                               source="metadata" if said.get("probe_path") else "detected")
            store.vms.start_monitoring(rec.vm, now_ms)
            report.path_changed.append(rec.vm)
        if intent is not None and said != rec.intent:
            store.audit.append(AuditEvent.INTENT, rec.vm, host, now_ms, intent=intent.summary(),
                               errors=list(intent.errors))
            if intent.errors:
                log.warning("vm=%s libvirt metadata partly refused (defaults apply): %s", rec.vm,
                            "; ".join(intent.errors))
            report.intent_changed.append(rec.vm)
            fields[rec.vm].update(new)  # only on a change: records of VMs without metadata get no empty fields


def sync_inventory(store: Store, hypervisor: Hypervisor, host: str, ttl_s: float,
                   detect_paths: bool = False, lock: tuple[bool, str] = (False, "not checked")) -> SyncReport:
    """List this host's domains and update the inventory; raises HypervisorError if libvirt fails.

    Each VM this host holds gets its domain's virtio channels recorded and, with ``detect_paths``
    (VMQ_PROBE_PATH_DETECT), the probe path they allow (vmq.model.detect_probe_path); without it the detected
    path stays ``redis`` and only an operator's ``vmq path`` moves a VM to a relayed path.

    Every host lists the domains defined on it, so a VM defined on several hosts is reported by each of them,
    at any moment: its record is placed atomically per VM (the store's place_domains), and a domain that is
    only defined here never takes the VM from the live host its record names while that host has it defined.
    """
    report = SyncReport()
    domains: list[DomainInfo] = []
    listed_us = store.clock.time_us()  # before listing: the listing shows libvirt no older than this
    for info in hypervisor.list_domains():
        if valid_name(info.name):
            domains.append(info)
        else:
            report.skipped_names.append(info.name)
    report.domains = len(domains)
    heartbeat(store, host, hypervisor.uri, ttl_s, len(domains), capacity_fields(hypervisor, lock))
    previously_listed = store.hosts.domain_names(host)
    store.hosts.store_domains(host, {d.name: json.dumps({"uuid": d.uuid, "status": d.status.value,
                                                    "reason": d.reason}) for d in domains})
    now_ms = store.clock.time_ms()
    names = [d.name for d in domains]
    report.new_vms = [name for name in names if store.vms.register_vm(name, now_ms)]
    # VMs listed here before whose domain vanished from this host: absent, if the record still says here.
    vanished = [DomainInfo(vm, "", DomainStatus.ABSENT, f"not defined on {host}")
                for vm in sorted(previously_listed - set(names))]
    by_name = {d.name: d for d in domains}
    paths: dict[str, dict[str, str]] = {}
    intents: dict[str, Intent] = {}
    active_here: list[str] = []
    for placed in store.vms.place_domains(host, domains + vanished, now_ms, ACTIVE, MIGRATING_PAUSE_REASONS,
                                          listed_us):
        listed = by_name.get(placed.vm)
        if placed.written and listed is not None:
            detected = detect_probe_path(listed.channels) if detect_paths else ProbePath.REDIS
            paths[placed.vm] = {"channels": ",".join(listed.channels), "probe_path_detected": detected.value}
            if listed.intent is not None:
                intents[placed.vm] = listed.intent
            if listed.status in ACTIVE:
                active_here.append(placed.vm)
        if placed.migrated:
            report.migrated.append(placed.vm)
            store.audit.append(AuditEvent.MIGRATED, placed.vm, host, now_ms, previous_host=placed.previous_host)
            log.info("vm=%s migrated %s -> %s", placed.vm, placed.previous_host, host)
        if placed.started:
            report.started.append(placed.vm)
    _note_changes(store, host, paths, intents, now_ms, report)
    store.vms.write_many(paths)
    report.definitions_kept = keep_definitions(store, hypervisor, host, active_here, set(names), now_ms)
    if report.skipped_names:
        log.warning("host=%s domains with unusable names skipped: %s", host, report.skipped_names)
    return report
