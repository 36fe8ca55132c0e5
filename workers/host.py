"""Host-worker tasks (consumed only from ``host.<name>``) and the inventory agent every host worker runs.

Start one per hypervisor, in-process pool so the task and the agent share one libvirt connection:
``VMQ_HOST_NAME=node1 VMQ_LIBVIRT_URI=qemu:///system celery -A workers.app worker -Q host.node1 -P threads -c 2``
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import worker_ready, worker_shutdown

from vmq.errors import HypervisorError, StoreError, VmqError
from vmq.inventory import mark_degraded, renew_heartbeat, sync_inventory
from vmq.keys import host_queue
from vmq.restart import operate_domain
from vmq.restart import restart_vm as restart_use_case
from workers.context import hypervisor_of, settings_of, store_of

log = logging.getLogger(__name__)


@shared_task(bind=True, name="vmq.host.restart_vm", acks_late=True, reject_on_worker_lost=True,
             ignore_result=True, max_retries=3)
def restart_vm(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Restart one VM on this host for one attempt of one incident (idempotent; expires with its verdict)."""
    settings = settings_of(self.app)
    host = settings.require_host()
    if request.get("host") != host:
        log.error("restart for vm=%s addressed to host %s reached %s: refused", request.get("vm"),
                  request.get("host"), host)
        return {"acted": False, "result": "misrouted"}
    try:
        outcome = restart_use_case(store_of(self.app), hypervisor_of(self.app), host, str(request["vm"]),
                                   int(request["generation"]), str(request["incident"]),
                                   claimant=f"{host}:{os.getpid()}:{self.request.id}",
                                   hard=bool(request.get("hard", False)))
    except StoreError as exc:
        raise self.retry(exc=exc, countdown=1.0) from exc
    return asdict(outcome)


@shared_task(bind=True, name="vmq.host.domain_op", ignore_result=False)
def domain_op(self: Task, vm: str, operation: str) -> dict[str, Any]:
    """Operator lifecycle action (start/destroy/suspend/resume) on a domain of this host, then resync."""
    settings = settings_of(self.app)
    host = settings.require_host()
    try:
        status = operate_domain(store_of(self.app), hypervisor_of(self.app), host, vm, operation)
    except (ValueError, HypervisorError) as exc:
        return {"ok": False, "vm": vm, "host": host, "error": str(exc)}
    if _agent is not None:
        _agent.sync_once()  # the inventory follows at once, not at the next period
    return {"ok": True, "vm": vm, "host": host, "domain_status": status}


class InventoryAgent(threading.Thread):
    """Keeps this host registered (heartbeat with a TTL) and its domain list current."""

    def __init__(self, app: Celery) -> None:
        super().__init__(name="vmq-inventory", daemon=True)
        self.app = app
        self.stop_event = threading.Event()

    def sync_once(self) -> None:
        """One heartbeat + inventory sync; the heartbeat is only renewed while libvirt answers."""
        settings = settings_of(self.app)
        report = sync_inventory(store_of(self.app), hypervisor_of(self.app), settings.require_host(),
                                settings.host_heartbeat_ttl_s)
        if report.new_vms or report.migrated:
            log.info("host=%s inventory: %d domains, new=%s migrated=%s", settings.host_name, report.domains,
                     report.new_vms, report.migrated)

    def run(self) -> None:
        settings = settings_of(self.app)
        period = min(settings.host_heartbeat_interval_s, settings.host_heartbeat_ttl_s / 3)
        next_sync = 0.0
        while not self.stop_event.is_set():
            try:
                if time.monotonic() >= next_sync:
                    self.sync_once()  # lists domains and renews the heartbeat
                    next_sync = time.monotonic() + settings.inventory_interval_s
                else:
                    renew_heartbeat(store_of(self.app), settings.require_host(), settings.host_heartbeat_ttl_s)
            except HypervisorError as exc:
                # Alive but blind: the host is `degraded`; its VMs are flagged, never restarted on silence.
                log.error("host=%s libvirt unavailable (degraded): %s", settings.host_name, exc)
                mark_degraded(store_of(self.app), settings.require_host(), settings.libvirt_uri,
                              settings.host_heartbeat_ttl_s, str(exc))
            except VmqError as exc:
                log.error("host=%s inventory sync failed: %s", settings.host_name, exc)
            except Exception:  # the agent must outlive any single failure
                log.exception("host=%s inventory agent error", settings.host_name)
            self.stop_event.wait(period)


_agent: InventoryAgent | None = None


@worker_ready.connect
def _start_agent(sender: Any = None, **_: Any) -> None:
    """A worker with VMQ_HOST_NAME is a host worker: register it and start its agent."""
    global _agent
    app: Celery = sender.app
    settings = settings_of(app)
    if not settings.host_name:
        return
    consumed = {q.name for q in sender.task_consumer.queues} if sender.task_consumer else set()
    if host_queue(settings.host_name) not in consumed:
        log.error("host worker %s does not consume %s (consumes %s): restarts for its VMs will wait",
                  settings.host_name, host_queue(settings.host_name), sorted(consumed))
    _agent = InventoryAgent(app)
    _agent.start()


@worker_shutdown.connect
def _stop_agent(sender: Any = None, **_: Any) -> None:
    """Say goodbye at once instead of letting the heartbeat expire."""
    if _agent is None:
        return
    _agent.stop_event.set()
    settings = settings_of(_agent.app)
    try:
        store_of(_agent.app).drop_heartbeat(settings.require_host())
    except VmqError as exc:
        log.warning("could not drop heartbeat: %s", exc)
