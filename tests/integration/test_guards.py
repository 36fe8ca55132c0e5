"""Issue 3's guards on real parts: redis-server, Celery beat + workers on libvirt test nodes, real guests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest

from tests.integration.conftest import events_of
from vmq.sim.localcluster import LocalCluster
from workers.app import create_app

pytestmark = pytest.mark.integration


def _cli(cluster: LocalCluster, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "vmq.cli", *args], check=True, capture_output=True, text=True,
                          env=cluster.env, timeout=30).stdout


def test_forty_percent_of_vms_silent_at_once_is_a_storm_and_nothing_is_restarted(
        make_cluster: Callable[..., LocalCluster]) -> None:
    placement = {"node1": [f"vm-{i}" for i in range(1, 6)], "node2": [f"vm-{i}" for i in range(6, 11)]}
    cluster = make_cluster(placement)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    for vm in ("vm-1", "vm-2", "vm-6", "vm-7"):  # 4 of 10, 2 per host: more than 30 % of the cluster
        cluster.fleet.hang(vm)
    cluster.wait_for(lambda: bool(events_of(cluster, type="storm")), 15, "storm event")
    time.sleep(3)  # several more rounds under the guard
    assert events_of(cluster, type="restart_dispatched") == []
    faulty = events_of(cluster, type="faulty")
    assert {e["vm"] for e in faulty} == {"vm-1", "vm-2", "vm-6", "vm-7"}
    assert all(any("storm guard" in r for r in e["reasons"]) for e in faulty)
    assert events_of(cluster, type="storm")[0]["reason"].startswith("storm guard: 4 of 10")


def test_a_killed_host_worker_makes_its_host_down_and_its_vms_unreachable_not_restarted(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3", "vm-4"]})
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    cluster.kill_host("node1")  # the host (or its worker) is gone, without a goodbye
    cluster.fleet.hang("vm-1")  # and a guest on it falls silent too
    cluster.wait_for(lambda: bool(events_of(cluster, type="host_down", host="node1")), 20, "host_down")
    cluster.wait_for(lambda: cluster.states()["vm-1"] == "unreachable", 10, "vm-1 unreachable")
    time.sleep(2)
    assert cluster.states()["vm-2"] == "unreachable"
    assert events_of(cluster, type="restart_dispatched") == []
    assert cluster.states()["vm-3"] == cluster.states()["vm-4"] == "healthy"

    # A restart that was already queued for node1 when it died expires there unexecuted.
    app = create_app(cluster.settings)
    stale = {"vm": "vm-2", "host": "node1", "generation": 99, "incident": "vm-2:stale", "round": 1,
             "issued_ms": cluster.store.clock.time_ms()}
    app.send_task("vmq.host.restart_vm", args=[stale], queue="host.node1", expires=1.0)
    time.sleep(2)

    cluster.start_host("node1")  # it comes back: judged afresh, after the grace
    cluster.wait_for(lambda: bool(events_of(cluster, type="host_up", host="node1")), 30, "host_up")
    cluster.wait_for(lambda: cluster.states()["vm-2"] == "healthy", 20, "vm-2 healthy again")
    # Delivered to the returning worker, discarded as expired, never run (not even to skip itself).
    assert "Discarding revoked task: vmq.host.restart_vm" in (cluster.workdir / "host-node1.log").read_text()
    assert events_of(cluster, type="restart_skipped") == []
    assert events_of(cluster, type="restarted") == []
    app.close()


class _Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    _Webhook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_an_exhausted_budget_escalates_to_the_webhook(make_cluster: Callable[..., LocalCluster],
                                                      webhook: str) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]}, VMQ_MAX_RESTARTS="1",
                           VMQ_RECOVERY_TIMEOUT_S="2", VMQ_WEBHOOK_URL=webhook)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    cluster.fleet.break_boot("vm-2")
    cluster.fleet.hang("vm-2")
    cluster.wait_for(lambda: bool(_Webhook.received), 40, "the webhook call")
    note = _Webhook.received[0]
    assert (note["type"], note["vm"], note["host"]) == ("escalated", "vm-2", "node1")
    assert any("budget exhausted" in r for r in note["reasons"])
    assert cluster.states()["vm-2"] == "failed"
    assert len(events_of(cluster, type="escalated", vm="vm-2")) == 1


def test_notifications_by_class_in_alertmanagers_format_fire_and_resolve(
        make_cluster: Callable[..., LocalCluster], webhook: str) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]}, VMQ_WEBHOOK_URL=webhook,
                           VMQ_WEBHOOK_CLASSES="faulty,restarted,recovered", VMQ_WEBHOOK_FORMAT="alertmanager")
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: len(_Webhook.received) >= 3, 40, "three notifications")
    time.sleep(1.5)  # nothing more comes
    alerts = [(a["status"], a["labels"]["alertname"], a["labels"]["vm"], a["labels"]["class"])
              for body in _Webhook.received for a in body["alerts"]]
    assert alerts == [("firing", "VmqFaulty", "vm-1", "faulty"), ("firing", "VmqRestarted", "vm-1", "restarted"),
                      ("resolved", "VmqFaulty", "vm-1", "faulty")]
    assert all(body["version"] == "4" for body in _Webhook.received)
    restarted = _Webhook.received[1]["alerts"][0]["annotations"]["event"]
    assert (restarted["type"], restarted["host"], restarted["action"], restarted["result"]) == (
        "restarted", "node1", "reset", "ok")


def test_maintenance_with_an_expiry_ends_by_itself(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]})
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    assert "maintenance" in _cli(cluster, "maintenance", "vm-1", "--for", "3s")
    cluster.fleet.hang("vm-1")  # silence during maintenance is not judged
    time.sleep(2)
    assert cluster.states()["vm-1"] == "maintenance"
    assert events_of(cluster, type="faulty") == []
    cluster.wait_for(lambda: bool(events_of(cluster, type="maintenance_ended", vm="vm-1")), 10, "expiry")
    assert "maintenance window expired" in events_of(cluster, type="maintenance_ended", vm="vm-1")[0]["reason"]
    explained = _cli(cluster, "explain", "vm-1")
    assert "maintenance_ended" in explained and "vm-1 on node1" in explained


def test_a_crash_reported_by_libvirt_is_restarted_on_its_host_without_waiting_for_t2(
        make_cluster: Callable[..., LocalCluster]) -> None:
    # T2 = 20 s here: a restart within 2 s can only come from the event path.
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]}, VMQ_PROBE_INTERVAL_S="1",
                           VMQ_REPLY_TIMEOUT_S="20")
    cluster.wait_healthy(timeout_s=60)
    app = create_app(cluster.settings)
    t0 = cluster.store.clock.time_ms()
    # What node1's lifecycle listener sends when libvirt reports (stopped, crashed) for vm-1.
    app.send_task("vmq.monitor.domain_event", args=["vm-1", "node1", "crash", "stopped", "crashed"],
                  queue="vmq.monitor")
    cluster.wait_for(lambda: bool(events_of(cluster, type="restarted", vm="vm-1")), 5, "restart from the event")
    restarted = events_of(cluster, type="restarted", vm="vm-1")[0]
    assert restarted["host"] == "node1"
    assert restarted["time_ms"] - t0 <= 2000
    faulty = events_of(cluster, type="faulty", vm="vm-1")[0]
    assert "crashed" in faulty["reasons"][0]
    app.close()


def test_libvirt_events_keep_vmq_off_a_domain_an_operator_paused_or_destroyed(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]})
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    app = create_app(cluster.settings)

    # An operator pauses vm-1 (its guest stops answering, of course): known at once from libvirt's event.
    assert app.send_task("vmq.host.domain_op", args=["vm-1", "suspend"], queue="host.node1").get(timeout=20)["ok"]
    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="domain_event", vm="vm-1", kind="paused")), 3,
                     "the pause event")
    time.sleep(3)  # several rounds past T2
    assert events_of(cluster, type="restart_dispatched") == []
    assert "paused on purpose" in cluster.store.vms.record("vm-1").decision

    # The operator destroys vm-2: shut off on purpose, left alone.
    assert app.send_task("vmq.host.domain_op", args=["vm-2", "destroy"], queue="host.node1").get(timeout=20)["ok"]
    cluster.fleet.hang("vm-2")
    cluster.wait_for(lambda: bool(events_of(cluster, type="domain_event", vm="vm-2", kind="operator_stop")), 3,
                     "the destroy event")
    time.sleep(3)
    assert events_of(cluster, type="restart_dispatched") == []

    # Resumed but still silent: now it is judged, and restarted on its host.
    assert app.send_task("vmq.host.domain_op", args=["vm-1", "resume"], queue="host.node1").get(timeout=20)["ok"]
    cluster.wait_for(lambda: bool(events_of(cluster, type="restarted", vm="vm-1")), 15, "vm-1 restarted")
    assert [e["vm"] for e in events_of(cluster, type="restart_dispatched")] == ["vm-1"]
    app.close()


def test_a_silent_guest_whose_disk_and_network_still_move_is_held_not_reset(
        make_cluster: Callable[..., LocalCluster]) -> None:
    # With a disk and a NIC, the test driver's I/O counters keep moving: a busy guest that stopped answering.
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]}, devices=True,
                           VMQ_ACTIVITY_WINDOW_S="0.5")
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    cluster.fleet.hang("vm-1")
    # Held, and re-judged the next rounds: held again each time.
    cluster.wait_for(lambda: len(events_of(cluster, type="silent_but_active", vm="vm-1")) >= 3, 20, "3 holds")
    assert events_of(cluster, type="restarted") == []
    held = events_of(cluster, type="silent_but_active", vm="vm-1")[0]
    assert held["host"] == "node1" and held["activity"]["moving"]
    # A hold is not an attempt: at most the one being sampled right now is counted, never a pile of them.
    assert int(cluster.store.vms.record("vm-1").attempts) <= 1
    assert cluster.store.client.zcard(cluster.store.keys.vm_restarts("vm-1")) <= 1


def test_the_kill_switch_holds_restarts_until_resumed(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]})
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    assert "suspended" in _cli(cluster, "suspend", "--for", "10m")
    cluster.fleet.hang("vm-2")
    cluster.wait_for(lambda: bool(events_of(cluster, type="faulty", vm="vm-2")), 10, "vm-2 faulty")
    time.sleep(2)
    assert events_of(cluster, type="restart_dispatched") == []
    assert "kill switch" in " ".join(events_of(cluster, type="faulty", vm="vm-2")[0]["reasons"])
    assert "resumed" in _cli(cluster, "resume")
    cluster.wait_for(lambda: bool(events_of(cluster, type="restarted", vm="vm-2")), 10, "vm-2 restarted")
