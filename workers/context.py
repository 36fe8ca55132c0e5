"""Per-process objects the tasks use (built lazily after fork, from the app's Settings)."""

from __future__ import annotations

import os
import threading
from dataclasses import asdict
from typing import Any

from celery import Celery

from vmq.config import Settings
from vmq.failover_flow import FailoverFlow
from vmq.host_failover import FailoverStart
from vmq.hostagent import HostAgent
from vmq.model import RestartRequest
from vmq.monitor import Monitor
from vmq.ports import Hypervisor
from vmq.routing import FAILOVER_START_TASK, FENCE_TASK, MONITOR_QUEUE, RESTART_TASK, host_queue
from vmq.store.redis import RedisStore

_lock = threading.RLock()  # builders nest (the monitor needs the store)
_cache: dict[tuple[int, str], Any] = {}


def _once(app: Celery, name: str, build: Any) -> Any:
    key = (os.getpid(), name)
    with _lock:
        if key not in _cache:
            _cache[key] = build()
        return _cache[key]


def settings_of(app: Celery) -> Settings:
    """The Settings the app was created with."""
    settings: Settings = app.vmq_settings
    return settings


def store_of(app: Celery) -> RedisStore:
    """This process's RedisStore."""
    s = settings_of(app)
    return _once(app, "store", lambda: RedisStore.from_settings(s))  # type: ignore[no-any-return]


def monitor_of(app: Celery) -> Monitor:
    """This process's Monitor, dispatching restarts into ``host.<name>`` queues."""
    s = settings_of(app)

    def dispatch(request: RestartRequest) -> None:
        # No Celery `expires` (it is checked on the host's clock): the request carries ``expires_ms`` in
        # Redis time and the task checks that (vmq.host_restart.restart_vm; docs/reliability.md, clock faults).
        app.send_task(RESTART_TASK, args=[asdict(request)], queue=host_queue(request.host))

    def request_fence(host: str, episode: int) -> None:
        app.send_task(FENCE_TASK, args=[host, episode], queue=MONITOR_QUEUE)

    def send_start(request: FailoverStart) -> None:
        app.send_task(FAILOVER_START_TASK, args=[asdict(request)], queue=host_queue(request.host))

    def build() -> Monitor:
        store = store_of(app)
        return Monitor(store, s, dispatch, FailoverFlow(store, s, request_fence, send_start))

    return _once(app, "monitor", build)  # type: ignore[no-any-return]


def hypervisor_of(app: Celery) -> Hypervisor:
    """This process's hypervisor connection (one per process: libvirt's test driver lives in-process).

    A host worker that runs a lifecycle listener acts through the listener's connection (installed by
    vmq.hostagent.HostAgent through ``set_hypervisor``), so actions and events see the same libvirt.
    """
    from vmq.hypervisor import open_hypervisor

    s = settings_of(app)
    return _once(app, "hypervisor", lambda: open_hypervisor(s.libvirt_uri))  # type: ignore[no-any-return]


def set_hypervisor(app: Celery, hypervisor: Hypervisor) -> None:
    """Install the hypervisor this process uses (before any task runs); in a simulated host worker wrapped
    as open_hypervisor wraps its own (vmq.hypervisor.with_simulated_agents), so the listener's connection
    answers agent calls as the simulated guests do."""
    from vmq.hypervisor import with_simulated_agents

    hypervisor = with_simulated_agents(hypervisor)
    with _lock:
        _cache[(os.getpid(), "hypervisor")] = hypervisor


def host_agent_of(app: Celery) -> HostAgent | None:
    """This host worker's running HostAgent (set by workers.host at worker_ready), or None."""
    agent: HostAgent | None = getattr(app, "vmq_host_agent", None)
    return agent


def set_host_agent(app: Celery, agent: HostAgent | None) -> None:
    """Install (or clear, with None) the host worker's agent."""
    app.vmq_host_agent = agent
