"""Every Celery queue and task name vmq uses: the wire contract between beat, the workers and the CLI.

Pure strings, no celery/kombu/redis/libvirt: the core, the rim and the CLI spell a route only through here.
Renaming any of them is a wire change (queued messages and running workers of the old name stop matching).
"""

from __future__ import annotations

#: Probe rounds, domain events, notifications and operator restarts (the monitor workers).
MONITOR_QUEUE = "vmq.monitor"
#: Round judging and reply draining (the monitor workers, kept apart from the probe pulse).
TIMEOUT_QUEUE = "vmq.timeouts"
#: Prefix of the per-host queues; see ``host_queue``.
HOST_QUEUE_PREFIX = "host."

# Tasks consumed from MONITOR_QUEUE.
PROBE_TASK = "vmq.monitor.probe_round"
DOMAIN_EVENT_TASK = "vmq.monitor.domain_event"
NOTIFY_TASK = "vmq.monitor.notify"
NOTIFY_EVENTS_TASK = "vmq.monitor.notify_events"
MANUAL_RESTART_TASK = "vmq.monitor.manual_restart"
FENCE_TASK = "vmq.monitor.fence_host"
# Tasks consumed from TIMEOUT_QUEUE.
DRAIN_TASK = "vmq.timeouts.drain_replies"
JUDGE_TASK = "vmq.timeouts.judge_round"
# Tasks consumed from host_queue(host): sent with an explicit queue, the VM's host decides.
RESTART_TASK = "vmq.host.restart_vm"
DOMAIN_OP_TASK = "vmq.host.domain_op"
FAILOVER_START_TASK = "vmq.host.failover_start"

#: Task-name patterns routed to a fixed queue (Celery's ``task_routes``); vmq.host.* carry their queue.
TASK_ROUTES: dict[str, str] = {
    "vmq.monitor.*": MONITOR_QUEUE,
    "vmq.timeouts.*": TIMEOUT_QUEUE,
}


def host_queue(host: str) -> str:
    """Celery queue that only the worker of ``host`` consumes (``host.<name>``)."""
    return f"{HOST_QUEUE_PREFIX}{host}"
