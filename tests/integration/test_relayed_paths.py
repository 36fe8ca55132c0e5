"""The three probe paths in one cluster of real processes (redis-server, beat, monitor, host workers on libvirt's
test driver, real responders): a hang on each path is detected and restarted once on the VM's own host, the
other VMs untouched; a host agent that stops (its worker frozen) leaves its relayed VMs unjudged, never faulty.

Channel guests run the real responder over a simulated virtio-serial port (vmq.sim.bridge); agent guests are
simulated guest agents inside the host worker (vmq.sim.agents) that fall silent on a hang, as a hung qemu-ga.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.conftest import FAST, events_of
from vmq.model import ProbePath
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis

pytestmark = pytest.mark.integration

PLACEMENT = {"node1": ["vm-1", "vm-2", "vm-3"], "node2": ["vm-4", "vm-5", "vm-6"]}
PATHS = {"vm-1": ProbePath.REDIS, "vm-2": ProbePath.CHANNEL, "vm-3": ProbePath.AGENT,
         "vm-4": ProbePath.REDIS, "vm-5": ProbePath.CHANNEL, "vm-6": ProbePath.AGENT}


@pytest.fixture
def mixed(tmp_path: Path, redis_server: LocalRedis) -> Callable[..., LocalCluster]:
    started: list[LocalCluster] = []

    def build(**env: str) -> LocalCluster:
        spec = ClusterSpec(placement=PLACEMENT, env={**FAST, **env}, boot_delay_s=1.0, paths=dict(PATHS))
        cluster = LocalCluster(tmp_path / "cluster", redis_server.url, spec)
        started.append(cluster)
        cluster.start()
        return cluster

    yield build  # type: ignore[misc]
    for cluster in started:
        cluster.stop()


@pytest.mark.parametrize("hung", ["vm-2", "vm-3"], ids=["channel", "agent"])
def test_a_hang_on_a_relayed_path_is_detected_and_restarted_once_on_its_host_and_nothing_else(
        mixed: Callable[..., LocalCluster], hung: str) -> None:
    cluster = mixed()
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    records = cluster.store.vms.records(sorted(PATHS))
    assert {rec.vm: rec.probe_path for rec in records} == PATHS
    cluster.fleet.hang(hung)
    hung_s = time.time()
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm=hung)), 40, f"{hung} recovered")
    [faulty] = events_of(cluster, type="faulty", vm=hung)
    [restarted] = events_of(cluster, type="restarted", vm=hung)
    assert restarted["host"] == "node1" and restarted["action"] == "reset"
    assert {e["vm"] for e in events_of(cluster, type="restart_dispatched")} == {hung}, "nothing else restarted"
    assert {e["vm"] for e in events_of(cluster, type="faulty")} == {hung}, "nothing else flagged"
    print(f"\n{PATHS[hung].value} hang: faulty {datetime.fromisoformat(faulty['time']).timestamp() - hung_s:.2f} s after the hang")
    relayed = int(cluster.store.stats.counters()[0].get("relayed_valid", 0))
    assert relayed > 0, "relayed answers were counted"


def test_a_frozen_host_agent_leaves_its_relayed_vms_unjudged_and_restarts_nothing(
        mixed: Callable[..., LocalCluster]) -> None:
    cluster = mixed()
    cluster.wait_healthy(timeout_s=60)
    worker = cluster.processes["host-node1"]
    os.kill(worker.pid, signal.SIGSTOP)  # its relay, heartbeat and inventory all stop
    try:
        time.sleep(3 * 1.5 + 1)  # three T2 of silence from node1's relay
        decisions = {rec.vm: rec.decision for rec in cluster.store.vms.records(["vm-2", "vm-3"])}
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert events_of(cluster, type="restart_dispatched") == [], "no restart for a frozen host agent"
    assert events_of(cluster, type="faulty") == [], "a silent relay is no evidence against its VMs"
    for vm, decision in decisions.items():
        assert "did not report this round finished" in decision or "heartbeat is late" in decision, (vm, decision)
    cluster.wait_healthy(timeout_s=30)
