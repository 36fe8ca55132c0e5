"""Host-worker tasks (consumed only from ``host.<name>``) and the wiring of this host's vmq.hostagent.HostAgent.

Start one per hypervisor, in-process pool so the tasks and the agent share one libvirt connection:
``VMQ_HOST_NAME=node1 VMQ_LIBVIRT_URI=qemu:///system celery -A workers.app worker -Q host.node1 -P threads -c 2``
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import worker_ready, worker_shutdown

from vmq.errors import HypervisorError, StoreError
from vmq.host_failover import FailoverStart, start_failed_over
from vmq.host_restart import ActivityCheck, operate_domain
from vmq.host_restart import restart_vm as restart_use_case
from vmq.hostagent import HostAgent
from vmq.routing import (
    DOMAIN_EVENT_TASK,
    DOMAIN_OP_TASK,
    FAILOVER_START_TASK,
    MONITOR_QUEUE,
    RESTART_TASK,
    host_queue,
)
from workers.context import (
    host_agent_of,
    hypervisor_of,
    set_host_agent,
    set_hypervisor,
    settings_of,
    store_of,
)

log = logging.getLogger(__name__)


@shared_task(bind=True, name=RESTART_TASK, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True, max_retries=3)
def restart_vm(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Restart one VM on this host for one attempt of one incident (idempotent; expires with its verdict)."""
    settings = settings_of(self.app)
    host = settings.require_host()
    if request.get("host") != host:
        log.error("restart for vm=%s addressed to host %s reached %s: refused", request.get("vm"),
                  request.get("host"), host)
        return {"acted": False, "result": "misrouted"}
    vm = str(request["vm"])
    agent = host_agent_of(self.app)
    # The VM's lifecycle events during (and just after) the restart are ours: not reported to the monitor.
    with agent.acting(vm) if agent is not None else contextlib.nullcontext():
        try:
            outcome = restart_use_case(store_of(self.app), hypervisor_of(self.app), host, vm,
                                       int(request["generation"]), str(request["incident"]),
                                       claimant=f"{host}:{os.getpid()}:{self.request.id}",
                                       hard=bool(request.get("hard", False)),
                                       crashed=bool(request.get("crashed", False)),
                                       manual=bool(request.get("manual", False)),
                                       expires_ms=int(request.get("expires_ms") or 0),
                                       claim_hold_s=settings.restart_timeout_s,
                                       activity=ActivityCheck(settings.activity_window_s,
                                                              settings.activity_blocks_reset,
                                                              settings.activity_min_bytes_per_s))
        except StoreError as exc:
            raise self.retry(exc=exc, countdown=1.0) from exc
    return asdict(outcome)


@shared_task(bind=True, name=DOMAIN_OP_TASK, ignore_result=False)
def domain_op(self: Task, vm: str, operation: str) -> dict[str, Any]:
    """Operator lifecycle action (start/destroy/suspend/resume) on a domain of this host, then resync."""
    settings = settings_of(self.app)
    host = settings.require_host()
    try:
        status = operate_domain(store_of(self.app), hypervisor_of(self.app), host, vm, operation)
    except (ValueError, HypervisorError) as exc:
        return {"ok": False, "vm": vm, "host": host, "error": str(exc)}
    agent = host_agent_of(self.app)
    if agent is not None:
        agent.sync_once()  # the inventory follows at once, not at the next period
    return {"ok": True, "vm": vm, "host": host, "domain_status": status}


@shared_task(bind=True, name=FAILOVER_START_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def failover_start(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Start a dead host's VM here from the definition it kept (once per incident), then list at once so its
    record follows here; its guest's first answer judges it here again."""
    settings = settings_of(self.app)
    host = settings.require_host()
    try:
        wanted = FailoverStart.from_wire(request)
    except (KeyError, TypeError, ValueError) as exc:
        log.error("failover start refused, malformed request %r: %s", request, exc)
        return {"started": False, "reason": f"malformed request: {exc}"}
    agent = host_agent_of(self.app)
    with agent.acting(wanted.vm) if agent is not None else contextlib.nullcontext():
        outcome = start_failed_over(store_of(self.app), hypervisor_of(self.app), host, wanted,
                                    claimant=f"{host}:{os.getpid()}:{self.request.id}")
    if outcome.get("started") and agent is not None:
        agent.sync_once()
    return outcome


def build_agent(app: Celery) -> HostAgent:
    """This host's agent, reporting lifecycle events to the monitor's queue and lending the listener's
    connection to the tasks."""

    def report_event(vm: str, host: str, kind: str, event: str, detail: str) -> None:
        app.send_task(DOMAIN_EVENT_TASK, args=[vm, host, kind, event, detail], queue=MONITOR_QUEUE)

    return HostAgent(settings_of(app), lambda: store_of(app), lambda: hypervisor_of(app), report_event,
                     install_hypervisor=lambda hypervisor: set_hypervisor(app, hypervisor))


@worker_ready.connect
def _start_agent(sender: Any = None, **_: Any) -> None:
    """A worker with VMQ_HOST_NAME is a host worker: register it and start its agent."""
    app: Celery = sender.app
    settings = settings_of(app)
    if not settings.host_name:
        return
    consumed = {q.name for q in sender.task_consumer.queues} if sender.task_consumer else set()
    if host_queue(settings.host_name) not in consumed:
        log.error("host worker %s does not consume %s (consumes %s): restarts for its VMs will wait",
                  settings.host_name, host_queue(settings.host_name), sorted(consumed))
    agent = build_agent(app)
    set_host_agent(app, agent)
    agent.start()


@worker_shutdown.connect
def _stop_agent(sender: Any = None, **_: Any) -> None:
    """Stop the agent and say goodbye at once instead of letting the heartbeat expire."""
    app: Celery | None = getattr(sender, "app", None)
    agent = host_agent_of(app) if app is not None else None
    if agent is not None:
        agent.stop()
