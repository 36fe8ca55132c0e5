"""Monitor tasks: one probe round per beat tick, one judge per round at its deadline. Thin by design."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import Task, shared_task

from vmq.failover_flow import run_fence_task
from vmq.notifications import due_notifications, parse_classes
from vmq.notify import NotifyError, post_json
from vmq.routing import (
    DOMAIN_EVENT_TASK,
    DRAIN_TASK,
    FENCE_TASK,
    JUDGE_TASK,
    MANUAL_RESTART_TASK,
    MONITOR_QUEUE,
    NOTIFY_EVENTS_TASK,
    NOTIFY_TASK,
    PROBE_TASK,
)
from workers.context import monitor_of, settings_of, store_of

log = logging.getLogger(__name__)

# judge_round and drain_replies run twice per T1 and send no task events (send_events=False): in Flower they
# would push the restart tasks out of its history, and cost broker publishes every round (docs/performance.md).

#: Judges run this long after the deadline so every reply stamped at the deadline's millisecond is in.
JUDGE_SLACK_S = 0.02
#: Replies are drained this far (x T1) into each round: after the burst of answers, well before a deadline.
DRAIN_AT = 0.5


@shared_task(bind=True, name=PROBE_TASK, ignore_result=True)
def probe_round(self: Task) -> dict[str, Any]:
    """Broadcast a new probe round, judge what is due, and schedule the round's judge at its deadline.

    A round refused as another beat's duplicate (see Monitor.probe_from_beat) does nothing at all.
    """
    settings = settings_of(self.app)
    monitor = monitor_of(self.app)
    started = monitor.probe_from_beat()
    if started is None:
        return {"round": None, "duplicate": True}
    round_id, sent_ms, report = started
    judge_round.apply_async(args=[round_id], countdown=settings.reply_timeout_s + JUDGE_SLACK_S)
    if monitor.drain_due():  # a burst of guests' replies to verify early (not with relayed VMs only)
        drain_replies.apply_async(countdown=settings.probe_interval_s * DRAIN_AT)
    return {"round": round_id, "sent_ms": sent_ms, "judged_rounds": report.judged_rounds}


@shared_task(bind=True, name=DRAIN_TASK, ignore_result=True, send_events=False)
def drain_replies(self: Task) -> dict[str, Any]:
    """Ingest the replies to the round sent half a T1 ago (and judge anything due): the burst is verified
    while nothing waits for it, so the judge at a deadline has only the last few replies left to read."""
    return asdict(monitor_of(self.app).tick())


@shared_task(bind=True, name=JUDGE_TASK, ignore_result=True, send_events=False)
def judge_round(self: Task, round_id: int) -> dict[str, Any]:
    """Judge every due round (this one included, however late); re-queue if it ran before its deadline."""
    report = monitor_of(self.app).tick()
    if round_id not in report.judged_rounds and not report.locked_out:
        store = store_of(self.app)
        sent = store.rounds.round_sent_ms(round_id)
        deadline = None if sent is None else sent + int(settings_of(self.app).reply_timeout_s * 1000)
        pending = {r for r, _ in store.rounds.due_rounds(2**62)}
        if deadline is not None and round_id in pending:
            wait_s = max(0.0, (deadline - store.clock.time_ms()) / 1000.0) + JUDGE_SLACK_S
            judge_round.apply_async(args=[round_id], countdown=wait_s)  # our clock ran ahead of Redis'
    return asdict(report)


@shared_task(bind=True, name=FENCE_TASK, ignore_result=True)
def fence_host(self: Task, host: str, episode: int) -> dict[str, Any]:
    """Prove a dead host off before anything of it starts elsewhere (its fence agent, or its libvirtd); the
    next tick plans the failover. Runs off the judge's path: an agent may take its whole timeout."""
    from vmq.hypervisor import open_hypervisor

    result = run_fence_task(store_of(self.app), settings_of(self.app), host, int(episode), open_hypervisor)
    if result.get("fenced"):
        monitor_of(self.app).tick()  # plan and send the starts now, not at the next round's tick
    return result


@shared_task(bind=True, name=DOMAIN_EVENT_TASK, ignore_result=True)
def domain_event(self: Task, vm: str, host: str, kind: str, event: str, detail: str) -> dict[str, Any]:
    """A host's libvirt reported a lifecycle event: record it, and judge a crash at once (no wait for T2)."""
    report = monitor_of(self.app).on_domain_event(vm, host, kind, event, detail)
    return asdict(report)


@shared_task(bind=True, name=NOTIFY_TASK, ignore_result=True, autoretry_for=(NotifyError,),
             retry_backoff=2, retry_backoff_max=300, retry_jitter=True, max_retries=12)
def notify(self: Task, payload: dict[str, Any]) -> int:
    """POST one notification to VMQ_WEBHOOK_URL, retried with exponential back-off; never runs in the judge."""
    url = settings_of(self.app).webhook_url
    if not url:
        return 0
    return post_json(url, payload)


@shared_task(bind=True, name=NOTIFY_EVENTS_TASK, ignore_result=True)
def notify_events(self: Task) -> int:
    """Queue one retried POST per audit event of a subscribed class since the last run (vmq.notifications);
    returns how many. Beat runs it every second when VMQ_WEBHOOK_URL is set."""
    settings = settings_of(self.app)
    if not settings.webhook_url:
        return 0
    due = due_notifications(store_of(self.app).audit, parse_classes(settings.webhook_classes),
                            settings.webhook_format)
    for body in due or []:
        notify.apply_async(args=[body], queue=MONITOR_QUEUE)
    return len(due or [])


@shared_task(bind=True, name=MANUAL_RESTART_TASK, ignore_result=False)
def manual_restart(self: Task, vm: str, force: bool = False, requested_by: str = "") -> dict[str, Any]:
    """An operator's `vmq restart VM [--force]`: decided and dispatched like any restart (vmq.operator_restart)."""
    from vmq.operator_restart import manual_restart as manual_use_case

    return asdict(manual_use_case(monitor_of(self.app), vm, force, requested_by))
