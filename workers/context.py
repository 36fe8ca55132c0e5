"""Per-process objects the tasks use (built lazily after fork, from the app's Settings)."""

from __future__ import annotations

import os
import threading
from dataclasses import asdict
from typing import Any

from celery import Celery

from vmq.config import Settings
from vmq.keys import host_queue
from vmq.model import RestartRequest
from vmq.monitor import Monitor
from vmq.ports import Hypervisor
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
        # No Celery `expires`: Celery checks it on the receiving worker's clock, so a host whose clock ran
        # ahead of Redis by more than VMQ_RESTART_TASK_EXPIRES_S discarded every restart (and a monitor
        # behind did the same with a relative one). The request carries its expiry in Redis time
        # (``expires_ms``), and the task checks it against Redis' clock (vmq.restart.restart_vm;
        # tests/integration/test_faults.py, the clock tests).
        app.send_task("vmq.host.restart_vm", args=[asdict(request)], queue=host_queue(request.host))

    def notify(payload: dict[str, object]) -> None:
        if s.webhook_url:
            app.send_task("vmq.monitor.notify", args=[payload], queue="vmq.monitor")

    return _once(app, "monitor", lambda: Monitor(store_of(app), s, dispatch, notify))  # type: ignore[no-any-return]


def hypervisor_of(app: Celery) -> Hypervisor:
    """This process's hypervisor connection (one per process: libvirt's test driver lives in-process).

    A host worker that runs a lifecycle listener acts through the listener's connection (see
    workers.host.start_listener), so actions and events see the same libvirt.
    """
    from vmq.hypervisor import open_hypervisor

    s = settings_of(app)
    return _once(app, "hypervisor", lambda: open_hypervisor(s.libvirt_uri))  # type: ignore[no-any-return]


def set_hypervisor(app: Celery, hypervisor: Hypervisor) -> None:
    """Install the hypervisor this process uses (before any task runs)."""
    with _lock:
        _cache[(os.getpid(), "hypervisor")] = hypervisor
