"""Host-side use cases of a failover (issue 18): what a host reports so that a failover can choose it, the
definitions it keeps of the domains it runs, and the start of a dead host's VM here.

The monitor decides (vmq.failover_flow); this module only reports and carries out, and re-asserts the world
before it starts anything: the old host still down, the VM's record still naming it, the definition the one
the monitor chose, nothing running here already.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmq.errors import DomainNotFound, HypervisorError, LockRefused
from vmq.hypervisor.xmldesc import definition_digest
from vmq.model import AuditEvent, DomainStatus
from vmq.ports import Hypervisor, Store

__all__ = ["FailoverStart", "capacity_fields", "keep_definitions", "lock_manager_state", "start_failed_over"]

log = logging.getLogger(__name__)

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
_LOCK_LINE = re.compile(r'^\s*lock_manager\s*=\s*"([^"]*)"', re.MULTILINE)
_ACTIVE = frozenset({DomainStatus.RUNNING, DomainStatus.PAUSED, DomainStatus.OTHER})


def lock_manager_state(setting: str, uri: str, socket_path: str, qemu_conf: Path = QEMU_CONF) -> tuple[bool, str]:
    """(failover-safe, words): this host's libvirt uses virtlockd (``setting`` lockd, or auto and qemu.conf says
    so for a local qemu:///system) and virtlockd answers on ``socket_path``. A virtlockd that died alone lets a
    disk start twice (FIELD-NOTES), so configured is not enough: it must answer."""
    manager = setting
    if setting == "auto":
        if not uri.startswith("qemu:///system"):
            return False, f"lock manager unknown for {uri} (set VMQ_LOCK_MANAGER)"
        try:
            found = _LOCK_LINE.search(qemu_conf.read_text(errors="replace"))
        except OSError as exc:
            return False, f"lock manager unknown: {qemu_conf} unreadable ({exc.strerror})"
        manager = found.group(1) if found else "none"
    if manager != "lockd":
        return False, f"no lock manager (lock_manager = {manager!r}): a disk could start twice"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(socket_path)
    except OSError as exc:
        return False, f"virtlockd does not answer on {socket_path} ({exc.strerror or exc})"
    return True, "virtlockd answers"


def capacity_fields(hypervisor: Hypervisor, lock: tuple[bool, str]) -> dict[str, Any]:
    """The heartbeat fields a failover plan reads: CPUs, memory, what active domains hold, lock manager."""
    cap = hypervisor.capacity()
    return {"cpus": cap.cpus, "memory_mib": cap.memory_mib, "vcpus_used": cap.vcpus_used,
            "memory_used_mib": cap.memory_used_mib, "lock_ok": 1 if lock[0] else 0, "lock_state": lock[1][:200]}


def keep_definitions(store: Store, hypervisor: Hypervisor, host: str, active_here: Iterable[str],
                     listed: set[str], now_ms: int) -> list[str]:
    """Keep the definition of every domain active here whose record is this host's, when it changed; forget
    those no longer defined here. Returns the VMs whose definition was written."""
    kept = store.failovers.definition_digests(host)
    changed: dict[str, str] = {}
    for vm in active_here:
        try:
            xml = hypervisor.definition(vm)
        except DomainNotFound:
            continue  # undefined since the listing
        if kept.get(vm) != definition_digest(xml):
            changed[vm] = xml
    store.failovers.keep_definitions(host, changed, [vm for vm in kept if vm not in listed], now_ms)
    return sorted(changed)


@dataclass(frozen=True)
class FailoverStart:
    """What the monitor asks a host to start: ``vm`` of dead ``from_host`` for incident ``episode``, from the
    definition with digest ``sha``; ``down_since_ms`` dates the host's loss (for the audit's timings)."""

    vm: str
    from_host: str
    host: str
    episode: int
    sha: str
    priority: int = 0

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> FailoverStart:
        """Parse the task's argument; raises KeyError/ValueError/TypeError on a malformed one."""
        return cls(str(raw["vm"]), str(raw["from_host"]), str(raw["host"]), int(raw["episode"]), str(raw["sha"]),
                   int(raw.get("priority", 0)))


def start_failed_over(store: Store, hypervisor: Hypervisor, host: str, request: FailoverStart,
                      claimant: str) -> dict[str, Any]:
    """Start ``request.vm`` here from the definition its dead host kept; audits ``failover_done`` or
    ``failover_failed`` (or nothing, for a redelivered task); returns the outcome."""
    vm, now_ms = request.vm, store.clock.time_ms()

    def failed(reason: str, **data: Any) -> dict[str, Any]:
        store.audit.append(AuditEvent.FAILOVER_FAILED, vm, host, store.clock.time_ms(), from_host=request.from_host,
                           episode=request.episode, reason=reason, **data)
        store.stats.incr_stat("failover_failed")
        log.error("vm=%s failover from %s to %s failed: %s", vm, request.from_host, host, reason)
        return {"started": False, "vm": vm, "host": host, "reason": reason}

    if request.host != host:
        return failed(f"addressed to {request.host}, reached {host}")
    try:
        if hypervisor.domain_info(vm).status in _ACTIVE:
            return {"started": False, "vm": vm, "host": host, "reason": "already active here"}
    except DomainNotFound:
        pass
    if not store.failovers.claim_host_start(vm, request.episode, claimant):
        return {"started": False, "vm": vm, "host": host, "reason": "another delivery of this start ran"}
    alive = {name for name, is_alive, _info in store.hosts.hosts_overview() if is_alive}
    if request.from_host in alive:
        return failed(f"{request.from_host} is back: it may run {vm}; nothing started")
    record = store.vms.record(vm)
    if record.host not in (request.from_host, host):
        return failed(f"its record now names {record.host or 'no host'}, not {request.from_host}")
    kept = store.failovers.definitions(request.from_host, [vm]).get(vm)
    if kept is None or kept.get("sha") != request.sha:
        return failed("the definition the monitor chose is no longer the one kept")
    try:
        hypervisor.define_and_start(str(kept["xml"]))
    except LockRefused as exc:
        return failed(f"the lock manager refused: a disk of {vm} is leased elsewhere ({exc})", lock_refused=True)
    except HypervisorError as exc:
        return failed(f"libvirt could not start it: {exc}")
    done_ms = store.clock.time_ms()
    store.audit.append(AuditEvent.FAILOVER_DONE, vm, host, done_ms, from_host=request.from_host,
                       episode=request.episode, start_s=round((done_ms - now_ms) / 1000, 3),
                       since_host_down_s=round((done_ms - request.episode) / 1000, 3))
    store.stats.incr_stat("failover_done")
    log.warning("vm=%s failed over from %s: started on %s", vm, request.from_host, host)
    return {"started": True, "vm": vm, "host": host, "from_host": request.from_host}
