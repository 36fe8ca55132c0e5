"""Prometheus ``/metrics`` of the monitor worker, read from Redis at scrape time.

vmq runs several monitor and host worker processes, so nothing is counted in this process: the counters
and histograms live in Redis (``vmq.store.metrics``) and a scrape reads them through the store in a few
pipelined round trips. Any monitor worker therefore shows the same cluster-wide numbers. When Redis does
not answer, the scrape still succeeds with ``vmq_up 0`` and nothing else. See docs/metrics.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from vmq.config import Settings
from vmq.errors import VmqError
from vmq.model import RejectReason
from vmq.ports import Store
from vmq.telemetry import DETECTION, RECOVERY, MetricsSnapshot

log = logging.getLogger(__name__)

HOST_STATES = ("up", "late", "degraded", "maintenance", "down")


def hosts_by_state(store: Store, fresh_ms: int) -> dict[str, int]:
    """Registered hosts counted as `vmq hosts` shows them: down, late, degraded, maintenance or up."""
    now_ms = store.clock.time_ms()
    overview = store.hosts.hosts_overview()
    context = store.hosts.host_context([name for name, _, _ in overview], now_ms, fresh_ms)
    counts = dict.fromkeys(HOST_STATES, 0)
    for name, alive, _ in overview:
        ctx = context[name]
        state = ("down" if not alive else "late" if not ctx.alive else "degraded" if ctx.degraded
                 else "maintenance" if ctx.in_maintenance(now_ms) else "up")
        counts[state] += 1
    return counts


class VmqCollector(Collector):
    """A custom collector: every scrape reads the cluster's counters from Redis; never raises."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self._capacity = settings.reply_stream_maxlen
        self._host_fresh_ms = settings.host_fresh_ms

    def describe(self) -> list[Metric]:
        """Nothing to describe up front (so registering never touches Redis)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """All vmq metric families, or only ``vmq_up 0`` (and the scrape time) when Redis fails."""
        started = time.monotonic()
        try:
            snap = self.store.stats.metrics_snapshot()
            snap.replies_unread, snap.oldest_unread_s = self.store.replies.reply_backlog()
            hosts = hosts_by_state(self.store, self._host_fresh_ms)
        except VmqError as exc:
            log.warning("metrics scrape: redis unavailable: %s", exc)
            yield _gauge("vmq_up", "1 when the monitor could read vmq's state from Redis for this scrape.", 0)
            yield _gauge("vmq_scrape_duration_seconds", "Time this scrape spent reading Redis.",
                         time.monotonic() - started)
            return
        yield _gauge("vmq_up", "1 when the monitor could read vmq's state from Redis for this scrape.", 1)
        yield from _families(snap, hosts)
        yield from _backlog(snap, self._capacity)
        yield _gauge("vmq_scrape_duration_seconds", "Time this scrape spent reading Redis.",
                     time.monotonic() - started)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _backlog(snap: MetricsSnapshot, capacity: int) -> Iterator[Metric]:
    """The monitors' lag behind the reply stream: a warning before replies are trimmed unread (and lost)."""
    if snap.replies_unread is not None:
        yield _gauge("vmq_replies_unread", "Replies in the stream that no monitor has read yet; past "
                     "vmq_reply_stream_capacity they are trimmed unread and rounds go unjudged.", snap.replies_unread)
    yield _gauge("vmq_reply_stream_capacity", "Replies the stream keeps (VMQ_REPLY_STREAM_MAXLEN).", capacity)
    yield _gauge("vmq_oldest_unread_reply_seconds", "Age of the oldest reply no monitor has read yet (0 when all "
                 "are read); under T1 while the monitors keep up.", snap.oldest_unread_s)


def _families(snap: MetricsSnapshot, hosts: dict[str, int]) -> Iterator[Metric]:
    vms = GaugeMetricFamily("vmq_vms", "VMs known to vmq by health state.", labels=["state"])
    for state, count in sorted(snap.vms_by_state.items()):
        vms.add_metric([state], count)
    yield vms

    yield CounterMetricFamily("vmq_probe_rounds", "Probe rounds broadcast to the guests.", value=snap.probe_rounds)

    replies = CounterMetricFamily("vmq_replies", "Guest replies ingested: valid, or rejected by reason.",
                                  labels=["result"])
    replies.add_metric(["valid"], snap.stats.get("replies_valid", 0))
    for reason in sorted({r.value for r in RejectReason} | set(snap.rejects)):
        replies.add_metric([reason], snap.rejects.get(reason, 0))
    yield replies
    yield CounterMetricFamily("vmq_replies_lost", "Replies trimmed from the stream before vmq read them (a "
                              "MAXLEN-0 guest or a stalled monitor); the rounds they may have answered are not "
                              "judged.", value=snap.stats.get("replies_lost", 0))
    yield CounterMetricFamily("vmq_relayed_answers", "Valid answers relayed by the VMs' hosts (channel and agent "
                              "paths; their rejects are counted in vmq_replies by reason).",
                              value=snap.stats.get("relayed_valid", 0))
    yield CounterMetricFamily("vmq_replies_previous_key", "Valid replies still signed with a rotated-out key "
                              "(inside its grace period; also counted as valid).",
                              value=snap.stats.get("replies_previous_key", 0))

    yield CounterMetricFamily("vmq_faults", "Incidents opened: VMs declared faulty (silence or crash).",
                              value=snap.stats.get("faults", 0))
    yield CounterMetricFamily("vmq_restarts_dispatched", "Restart tasks sent to host queues.",
                              value=snap.stats.get("restarts_dispatched", 0))

    restarts = CounterMetricFamily("vmq_restarts", "Restart requests finished by a host worker, by host, "
                                   "the action taken (none when nothing was done) and the result.",
                                   labels=["host", "action", "result"])
    for (host, action, result), count in sorted(snap.restarts.items()):
        restarts.add_metric([host, action, result], count)
    yield restarts

    failover = CounterMetricFamily("vmq_failover", "Failover of dead hosts' VMs, by step: hosts fenced or not "
                                   "(fence_failed), incidents held, VMs started elsewhere, done, failed, refused.",
                                   labels=["step"])
    for step in ("fenced", "fence_failed", "held", "started", "done", "failed", "refused"):
        failover.add_metric([step], snap.stats.get(f"failover_{step}", 0))
    yield failover

    yield CounterMetricFamily("vmq_storm_holds", "Restarts held by the storm or host-suspect guard "
                              "(one per VM per judged round).", value=snap.stats.get("storm_holds", 0))

    for name, key, documentation in (
        ("vmq_detection_seconds", DETECTION, "Time from a VM's last valid reply to its faulty verdict."),
        ("vmq_recovery_seconds", RECOVERY, "Time from a faulty verdict to the VM's first valid reply after it."),
    ):
        data = snap.histograms[key]
        yield HistogramMetricFamily(name, documentation, buckets=data.buckets, sum_value=data.sum)

    host_gauge = GaugeMetricFamily("vmq_hosts", "Registered hosts by state (as `vmq hosts` shows them).",
                                   labels=["state"])
    for state in HOST_STATES:
        host_gauge.add_metric([state], hosts.get(state, 0))
    yield host_gauge

    guards = GaugeMetricFamily("vmq_guard_episodes", "Storm (cluster) and host-suspect (host) guard episodes "
                               "in progress.", labels=["scope"])
    for scope, count in sorted(snap.guard_episodes.items()):
        guards.add_metric([scope], count)
    yield guards

    yield _gauge("vmq_restarts_suspended", "1 while the kill switch holds every restart.",
                 1 if snap.restarts_suspended else 0)


def metrics_registry(store: Store, settings: Settings) -> CollectorRegistry:
    """A registry of its own holding only the vmq collector (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VmqCollector(store, settings))
    return registry


def serve_metrics(store: Store, settings: Settings) -> Any:
    """Serve /metrics on ``VMQ_METRICS_ADDR:VMQ_METRICS_PORT`` from a daemon thread; returns the server
    (``server.shutdown()`` stops it). Raises OSError when the port cannot be bound."""
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_addr,
                                        registry=metrics_registry(store, settings))
    log.info("metrics on http://%s:%s/metrics", settings.metrics_addr, settings.metrics_port)
    return server
