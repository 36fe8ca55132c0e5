"""The Celery app: ``celery -A workers.app worker|beat``. JSON only, explicit task names, one router.

Queue and task names come from vmq.routing; the connection settings from vmq.taskclient.celery_conf (shared
with the CLI). Settings are read once here, at the entry point.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from beat_schedule import beat_schedule
from vmq.config import Settings, load_settings
from vmq.errors import ConfigError
from vmq.routing import MONITOR_QUEUE, TASK_ROUTES, TIMEOUT_QUEUE, host_queue
from vmq.taskclient import celery_conf

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    """Build the Celery app for ``settings``; tasks live in workers.monitor and workers.host."""
    app = Celery("vmq", include=["workers.monitor", "workers.host", "workers.metrics"])
    names = [MONITOR_QUEUE, TIMEOUT_QUEUE] + ([host_queue(settings.host_name)] if settings.host_name else [])
    # One direct exchange per queue, named like it: a message for host.node1 can only land in host.node1.
    queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]
    app.conf.update(
        celery_conf(settings),  # broker and result backend (Sentinel options), JSON only, task-sent events
        task_ignore_result=True,  # only operator tasks (domain_op, manual_restart) keep a result
        result_expires=3600,
        task_queues=queues,
        task_default_queue=MONITOR_QUEUE,
        task_create_missing_queues=True,
        # vmq.host.* tasks carry their queue (host.<name>) at send time: the VM's host decides.
        task_routes={pattern: {"queue": queue} for pattern, queue in TASK_ROUTES.items()},
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        beat_schedule=beat_schedule(settings),
        beat_scheduler="workers.schedules:SteadyScheduler",  # keeps probing when beat's clock jumps back
        timezone="UTC",
        enable_utc=True,
    )
    app.vmq_settings = settings  # read by tasks through self.app, never through a global
    logging.getLogger("vmq").setLevel(settings.log_level)  # VMQ_LOG_LEVEL: vmq's own loggers
    return app


def _keep_workers_alive_when_the_broker_drops() -> None:
    """Work around Celery 5.7 killing a worker when its Redis connection drops (a Redis restart or outage).

    kombu's Redis QoS restores unacknowledged messages on a transport Celery has already detached and raises
    AttributeError, which Celery treats as unrecoverable: every monitor worker exited on every Redis restart
    (docs/reliability.md, "Redis restarted mid-run"). Left in Redis' unacked hash, those messages come back
    after ``visibility_timeout`` like a crashed worker's.
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "vmq_tolerant", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return original(self, client)
        except AttributeError:
            if self.channel.connection.client is not None:
                raise
            log.warning("broker connection lost: %d unacknowledged message(s) left for redelivery after the "
                        "visibility timeout", len(self._delivered))
            return None

    restore_unacked.vmq_tolerant = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked


_keep_workers_alive_when_the_broker_drops()

#: Cyclic GC for worker processes: a full collection no sooner than after this many net container
#: allocations (Python's default is 700). See ``tune_gc``.
GC_THRESHOLDS = (50_000, 50, 100)


@signals.worker_ready.connect
@signals.worker_process_init.connect
def tune_gc(**_: Any) -> None:
    """Move everything loaded at start-up out of the collector's sight (``gc.freeze``) and collect young
    objects less often: a burst of replies allocates many short-lived containers, and the default
    thresholds made the collector walk the whole heap several times per round (docs/performance.md).
    Reference cycles are still collected, in fewer, larger passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _app_from_environment() -> Celery:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"vmq: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return create_app(settings)


app = _app_from_environment()
