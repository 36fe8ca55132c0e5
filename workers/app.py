"""The Celery app: ``celery -A workers.app worker|beat``. JSON only, explicit task names, one router.

Queues: ``vmq.monitor`` (probe rounds), ``vmq.timeouts`` (round judging), ``host.<name>`` (restarts, consumed
only by that host's worker). Settings are read once here, at the entry point.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from beat_schedule import MONITOR_QUEUE, beat_schedule
from vmq.config import Settings, load_settings
from vmq.errors import ConfigError
from vmq.keys import host_queue

TIMEOUT_QUEUE = "vmq.timeouts"
RESTART_TASK = "vmq.host.restart_vm"

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    """Build the Celery app for ``settings``; tasks live in workers.monitor and workers.host."""
    app = Celery("vmq", broker=settings.celery_url, include=["workers.monitor", "workers.host", "workers.metrics"])
    names = [MONITOR_QUEUE, TIMEOUT_QUEUE] + ([host_queue(settings.host_name)] if settings.host_name else [])
    # One direct exchange per queue, named like it: a message for host.node1 can only land in host.node1.
    queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]
    sentinel = {"master_name": settings.redis_sentinel_master} if settings.sentinel_addresses else {}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,  # only operator tasks (vmq.host.domain_op) keep a result
        result_backend=settings.celery_url,
        result_expires=3600,
        task_queues=queues,
        task_default_queue=MONITOR_QUEUE,
        task_create_missing_queues=True,
        task_routes={
            "vmq.monitor.*": {"queue": MONITOR_QUEUE},
            "vmq.timeouts.*": {"queue": TIMEOUT_QUEUE},
            # vmq.host.* tasks carry their queue (host.<name>) at send time: the VM's host decides.
        },
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600, **sentinel},
        result_backend_transport_options=sentinel,
        task_send_sent_event=True,
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

    On a connection error Celery detaches the broken connection's transport first and closes its channel
    after; closing the channel makes kombu's Redis QoS restore the worker's unacknowledged messages, which
    needs the detached transport and raises AttributeError ("'NoneType' object has no attribute
    'hostname'"): "Unrecoverable error", the worker exits. Every monitor worker holds some (the judge tasks
    waiting for their countdown), so every monitor died on every Redis restart
    (tests/integration/test_faults.py). Left in Redis' unacked hash, those messages come back after
    ``visibility_timeout`` like those of a crashed worker; a lost judge task is covered by the next probe.
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
    objects less often. Ingesting a burst of 10,000 replies allocates ~150,000 short-lived containers;
    with the defaults the collector also walked the worker's whole heap several times per round
    (25-30 ms per 10,000 replies measured; ≈ 0 after this; docs/performance.md). Reference cycles are
    still collected, just in fewer, larger passes."""
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
