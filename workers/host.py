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
from vmq.restart import ActivityCheck, operate_domain
from vmq.restart import restart_vm as restart_use_case
from workers.context import hypervisor_of, set_hypervisor, settings_of, store_of

log = logging.getLogger(__name__)


#: VMs this process is acting on right now -> until (monotonic s): their events are our own doing.
_acting: dict[str, float] = {}
_OWN_EVENTS_S = 5.0


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
    _acting[str(request["vm"])] = time.monotonic() + 3600
    try:
        outcome = restart_use_case(store_of(self.app), hypervisor_of(self.app), host, str(request["vm"]),
                                   int(request["generation"]), str(request["incident"]),
                                   claimant=f"{host}:{os.getpid()}:{self.request.id}",
                                   hard=bool(request.get("hard", False)),
                                   crashed=bool(request.get("crashed", False)),
                                   manual=bool(request.get("manual", False)),
                                   expires_ms=int(request.get("expires_ms") or 0),
                                   claim_hold_s=settings.restart_timeout_s,
                                   activity=ActivityCheck(settings.activity_window_s, settings.activity_blocks_reset,
                                                          settings.activity_min_bytes_per_s))
    except StoreError as exc:
        raise self.retry(exc=exc, countdown=1.0) from exc
    finally:
        _acting[str(request["vm"])] = time.monotonic() + _OWN_EVENTS_S
    return asdict(outcome)


#: Event kinds the monitor needs to hear about (the rest is noise: defined, undefined, ...).
REPORTED = {"crash", "operator_stop", "migrating_away", "paused", "resumed", "started"}


def start_listener(app: Celery) -> Any:
    """Listen to this host's libvirt lifecycle events; report them to the monitor; act through its connection.

    Returns the listener, or None when libvirt cannot deliver events here (the inventory still polls).
    """
    from vmq.hypervisor.events import LifecycleListener, classify

    settings = settings_of(app)
    host = settings.require_host()

    def on_event(event: Any) -> None:
        kind = classify(event)
        if kind not in REPORTED or _acting.get(event.name, 0.0) > time.monotonic():
            return
        log.info("host=%s vm=%s libvirt event %s/%s -> %s", host, event.name, event.event, event.detail, kind)
        app.send_task("vmq.monitor.domain_event", args=[event.name, host, kind, event.event, event.detail],
                      queue="vmq.monitor")

    def on_state(connected: bool) -> None:
        log.log(logging.INFO if connected else logging.ERROR, "host=%s libvirt event connection %s", host,
                "up" if connected else "lost")

    try:
        listener = LifecycleListener(settings.libvirt_uri, on_event, on_state, read_only=False)
        set_hypervisor(app, listener.hypervisor())
        listener.start()
        listener.wait_connected(10)
    except Exception:  # events are an accelerator; the inventory and silence judging work without them
        log.exception("host=%s libvirt lifecycle events unavailable", host)
        return None
    return listener


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
        self.listener: Any = None

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
    _agent.listener = start_listener(app)
    _agent.start()


@worker_shutdown.connect
def _stop_agent(sender: Any = None, **_: Any) -> None:
    """Say goodbye at once instead of letting the heartbeat expire."""
    if _agent is None:
        return
    _agent.stop_event.set()
    if _agent.listener is not None:
        _agent.listener.stop()
    settings = settings_of(_agent.app)
    try:
        store_of(_agent.app).hosts.drop_heartbeat(settings.require_host())
    except VmqError as exc:
        log.warning("could not drop heartbeat: %s", exc)
