"""Serve Prometheus ``/metrics`` from the monitor worker (the worker consuming ``vmq.monitor``).

Started once, in the worker's main process, when ``VMQ_METRICS_PORT`` > 0. Host workers do not serve.
The numbers come from Redis at scrape time (vmq.metrics), so several monitor workers show the same
totals; a second one on the same node finds the port taken, logs a warning and carries on monitoring.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from vmq.routing import MONITOR_QUEUE
from vmq.store.redis import RedisStore
from workers.context import settings_of

log = logging.getLogger(__name__)

_server: Any = None


@worker_ready.connect
def _start_metrics(sender: Any = None, **_: Any) -> None:
    """A worker that consumes vmq.monitor serves /metrics on VMQ_METRICS_ADDR:VMQ_METRICS_PORT."""
    global _server
    app: Celery = sender.app
    settings = settings_of(app)
    consumed = {q.name for q in sender.task_consumer.queues} if sender.task_consumer else set()
    if settings.metrics_port <= 0 or MONITOR_QUEUE not in consumed:
        return
    from vmq.metrics import serve_metrics  # only monitor workers need prometheus_client

    store = RedisStore.from_settings(settings)
    try:
        _server = serve_metrics(store, settings)
    except OSError as exc:  # monitoring must not stop because metrics cannot be served
        log.warning("metrics: cannot listen on %s:%s (%s): carrying on without /metrics",
                    settings.metrics_addr, settings.metrics_port, exc)


@worker_shutdown.connect
def _stop_metrics(sender: Any = None, **_: Any) -> None:
    """Close the /metrics listener."""
    global _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
