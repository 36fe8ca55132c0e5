"""The CLI's way to Celery: send a task by name to a queue, and wait for its result, without the workers' app.

Celery is imported inside the functions, so a `vmq` command that sends nothing never loads it. The
connection settings come from ``celery_conf``, which workers.app uses too: one place decides the broker,
the result backend, Sentinel's transport options and the serializers (JSON only, never pickle).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmq.config import Settings
from vmq.errors import TaskTimeout

__all__ = ["call_task", "celery_conf", "send_task"]

#: Seconds an unacknowledged message stays with its consumer before Redis hands it to another.
VISIBILITY_TIMEOUT_S = 3600


def celery_conf(settings: Settings) -> dict[str, Any]:
    """Celery settings every vmq producer and worker shares: broker and result backend (Redis, or Sentinel
    with its master name), JSON serialization only, and a ``task-sent`` event for each task sent."""
    sentinel = {"master_name": settings.redis_sentinel_master} if settings.sentinel_addresses else {}
    return {
        "broker_url": settings.celery_url,
        "result_backend": settings.celery_url,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S, **sentinel},
        "result_backend_transport_options": sentinel,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_send_sent_event": True,
    }


def _client(settings: Settings) -> Any:
    """A producer-only Celery app. A queue named at send time is declared as the workers declare theirs
    (workers.app): a direct exchange named like the queue, routing key = queue name (Celery's default)."""
    from celery import Celery

    app = Celery("vmq-client", set_as_current=False)
    app.conf.update(celery_conf(settings))
    return app


def send_task(settings: Settings, name: str, args: Sequence[Any], queue: str,
              expires_s: float | None = None) -> str:
    """Send task ``name`` with ``args`` to ``queue``; returns the task id. Broker errors propagate as
    Celery/kombu raise them. ``expires_s``: a worker that takes it later discards it."""
    app = _client(settings)
    try:
        return str(app.send_task(name, args=list(args), queue=queue, expires=expires_s).id)
    finally:
        app.close()


def call_task(settings: Settings, name: str, args: Sequence[Any], queue: str, timeout_s: float,
              expires_s: float | None = None) -> Any:
    """Send task ``name`` to ``queue`` and return its result (the task must keep results).

    Raises TaskTimeout when no result came within ``timeout_s``; the task's own exception if it failed;
    broker or backend errors as Celery raises them.
    """
    from celery.exceptions import TimeoutError as CeleryTimeout

    app = _client(settings)
    try:
        pending = app.send_task(name, args=list(args), queue=queue, expires=expires_s)
        return pending.get(timeout=timeout_s, propagate=True)
    except CeleryTimeout:
        raise TaskTimeout(f"no result for {name} within {timeout_s:g} s") from None
    finally:
        app.close()
