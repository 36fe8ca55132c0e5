"""Failover of a dead host's VMs (issue 18) on real parts: a real redis-server, real Celery beat and workers (two
judges), libvirt's test driver per host, simulated guests, and Debian's real fence agent (fence_dummy, whose
file-backed power state stands for the host's BMC).

The rule checked everywhere: nothing starts elsewhere unless the dead host is proven off, and then exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import events_of
from tests.integration.test_fencing import FENCE_INSTALL
from tests.unit.test_deploy_files import tool_or_skip
from vmq.intent import intent_xml
from vmq.sim.localcluster import LocalCluster

FAILOVER = {"VMQ_FAILOVER": "true",
            # libvirt's test driver has no lock manager; the lock rule is proven by the contract tests and the
            # two-libvirtd real-VM test
            "VMQ_FAILOVER_REQUIRE_LOCKS": "false"}
PLACEMENT = {"node1": ["web-1", "web-2"], "node2": ["vm-3"], "node3": ["vm-4"]}
def placement() -> dict[str, list[str]]:
    """A fresh copy (lose_power edits the cluster's)."""
    return {host: list(vms) for host, vms in PLACEMENT.items()}


METADATA = {"web-1": intent_xml(priority=10, failover=True)}  # web-2 says nothing: VMQ_FAILOVER_DEFAULT (off)


def fence_config(tmp_path: Path, *, fail: bool = False) -> str:
    """node1's fence device: fence_dummy, its power state in a file (``fail``: a device that never powers off)."""
    agent = tool_or_skip("fence_dummy", install=FENCE_INSTALL)
    power = tmp_path / "node1-power"
    power.write_text("on")  # as fence_dummy writes it (no line break)
    options = f'status_file = "{power}"' + (', type = "fail", power_timeout = "1"' if fail else "")
    path = tmp_path / "fence.toml"
    path.write_text(f'[hosts.node1]\nagent = "{agent}"\ntimeout_s = 20\noptions = {{ {options} }}\n')
    return str(path)


def lose_power(cluster: LocalCluster, host: str) -> None:
    """The host loses power: its worker dies without a goodbye, its guests stop answering, and when it comes
    back its domains are shut off (its node file lists them so from now on)."""
    cluster.kill_host(host)
    assert cluster.fleet is not None
    for vm in cluster.spec.placement.pop(host):
        cluster.fleet.power_off(vm)
        cluster.spec.standby.setdefault(host, []).append(vm)


def at(event: dict[str, object]) -> float:
    """When the event was written, Redis time in s (its stream id)."""
    return int(str(event["id"]).split("-")[0]) / 1000


def test_a_fenced_dead_hosts_enabled_vm_answers_on_another_host_exactly_once_with_two_judges(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(placement(), metadata=METADATA, monitors=2, VMQ_FENCE_CONFIG=fence_config(tmp_path),
                           **FAILOVER)
    cluster.wait_healthy(timeout_s=60)
    lost = cluster.store.clock.time_ms() / 1000
    lose_power(cluster, "node1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="failover_done", vm="web-1")), 40, "web-1 failed over")
    cluster.wait_for(lambda: cluster.states()["web-1"] == "healthy", 20, "web-1 answering on its new host")
    answering = cluster.store.clock.time_ms() / 1000
    [down] = events_of(cluster, type="host_down", host="node1")
    [fenced] = events_of(cluster, type="fenced", host="node1")
    [started] = events_of(cluster, type="failover_started", vm="web-1")
    [done] = events_of(cluster, type="failover_done", vm="web-1")
    new_host = str(done["host"])
    assert new_host in ("node2", "node3") and started["host"] == new_host and done["from_host"] == "node1"
    assert cluster.store.vms.record("web-1").host == new_host
    assert (tmp_path / "node1-power").read_text().strip() == "off", "fenced through the agent: its BMC says off"
    assert "fence_dummy" in str(fenced["method"])
    [refused] = events_of(cluster, type="failover_refused", vm="web-2")
    assert "not enabled" in str(refused["reason"])
    assert cluster.states()["web-2"] == "unreachable"
    assert events_of(cluster, type="restart_dispatched", vm="web-1") == []
    print(f"\nfailover: power lost -> host_down {at(down) - lost:.2f} s -> fenced {at(fenced) - lost:.2f} s -> "
          f"start sent {at(started) - lost:.2f} s -> started on {new_host} {at(done) - lost:.2f} s -> answering "
          f"{answering - lost:.2f} s (heartbeat TTL 6 s)")
    assert at(done) - lost <= 6 + 5 + float(fenced.get("since_host_down_s") or 0) + 5

    # The old host returns with its definitions shut off: the record stays where web-1 runs, nothing flaps.
    cluster.start_host("node1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="host_up", host="node1")), 30, "node1 back")
    time.sleep(4)
    assert cluster.store.vms.record("web-1").host == new_host and cluster.states()["web-1"] == "healthy"
    assert len(events_of(cluster, type="migrated", vm="web-1")) == 1
    assert len(events_of(cluster, type="failover_started")) == 1 and len(events_of(cluster, type="failover_done")) == 1
    assert events_of(cluster, type="restart_dispatched", vm="web-1") == []


def test_a_fence_that_fails_starts_nothing_until_an_operator_confirms_the_host_off(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(placement(), metadata=METADATA, VMQ_FENCE_CONFIG=fence_config(tmp_path, fail=True),
                           **FAILOVER)
    cluster.wait_healthy(timeout_s=60)
    lose_power(cluster, "node1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="fence_failed", host="node1")), 40, "the fence failed")
    time.sleep(3)
    assert events_of(cluster, type="failover_started") == [] and cluster.states()["web-1"] == "unreachable"
    hosts = json.loads(subprocess.run([sys.executable, "-m", "vmq.cli", "hosts", "--json"], capture_output=True,
                                      text=True, env=cluster.env, check=True).stdout)["hosts"]
    [node1] = [row for row in hosts if row["name"] == "node1"]
    assert node1["failover"].startswith("failover: not proven off") and "fence_dummy off exited" in node1["failover"]
    status = json.loads(subprocess.run([sys.executable, "-m", "vmq.cli", "status", "--json"], capture_output=True,
                                       text=True, env=cluster.env, check=True).stdout)
    assert [h["failover"] for h in status["hosts"] if h["name"] == "node1"] == [node1["failover"]]
    assert [v["failover"] for v in status["vms"] if v["id"] in ("web-1", "web-2")] == [True, False]
    explained = subprocess.run([sys.executable, "-m", "vmq.cli", "explain", "web-1"], capture_output=True, text=True,
                               env=cluster.env, check=True).stdout
    assert "failover: enabled for it (metadata failover=yes" in explained
    assert "its host node1: failover: not proven off" in explained

    confirmed = subprocess.run([sys.executable, "-m", "vmq.cli", "hosts", "fence-confirm", "node1", "--yes",
                                "--by", "ops-on-call"], capture_output=True, text=True, env=cluster.env, check=True)
    assert "node1 confirmed off by ops-on-call" in confirmed.stdout
    cluster.wait_for(lambda: cluster.states()["web-1"] == "healthy" and cluster.store.vms.record("web-1").host != "node1",
                     30, "web-1 failed over after the confirmation")
    [fenced] = events_of(cluster, type="fenced", host="node1")
    assert fenced["method"] == "operator" and "ops-on-call" in str(fenced["detail"])
    assert len(events_of(cluster, type="failover_done", vm="web-1")) == 1


def test_a_partitioned_host_whose_fence_cannot_prove_it_off_keeps_its_vms_and_nothing_starts_twice(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    """node1 is alive but cut off from Redis (its worker frozen: no heartbeat); its guests still run and answer.
    Its fence agent cannot reach the BMC (fails): cut off is not off, nothing of node1 starts elsewhere."""
    cluster = make_cluster(placement(), metadata=METADATA, VMQ_FENCE_CONFIG=fence_config(tmp_path, fail=True),
                           **FAILOVER)
    cluster.wait_healthy(timeout_s=60)
    worker = cluster.processes["host-node1"]
    os.killpg(worker.pid, signal.SIGSTOP)  # the partition: alive, silent to Redis
    try:
        cluster.wait_for(lambda: bool(events_of(cluster, type="fence_failed", host="node1")), 40, "fence failed")
        time.sleep(3)
        assert events_of(cluster, type="failover_started") == [] and events_of(cluster, type="failover_done") == []
        assert cluster.store.vms.record("web-1").host == "node1"
        assert all(cluster.store.vms.record("web-1").host == "node1" for _ in range(3))
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    cluster.wait_for(lambda: bool(events_of(cluster, type="host_up", host="node1")), 30, "node1 reconnected")
    cluster.wait_for(lambda: cluster.states()["web-1"] == "healthy", 30, "web-1 judged on node1 again")
    assert events_of(cluster, type="failover_started") == []
