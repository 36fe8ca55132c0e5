"""`vmq restart` and `vmq keys rotate` through the real command, against a whole local cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.integration.conftest import events_of
from vmq.sim.localcluster import LocalCluster

pytestmark = pytest.mark.integration


def vmq(cluster: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmq.cli", *args], capture_output=True, text=True,
                          env=cluster.env, timeout=timeout, check=False)


def one_clear_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_vmq_restart_resets_a_healthy_vm_on_its_host_and_waits_for_its_answer(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]})
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    old_boot = cluster.fleet.guests["vm-3"].boot_id

    proc = vmq(cluster, "restart", "vm-3", "--json", "--timeout", "40")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    outcome = lines[0]
    assert (outcome["outcome"], outcome["host"], outcome["queue"]) == ("dispatched", "node2", "host.node2")
    assert [e["type"] for e in lines[1:]] == ["restarted", "recovered"]
    restarted, recovered = lines[1:]
    assert (restarted["host"], restarted["action"], restarted["incident"]) == ("node2", "reset",
                                                                              outcome["incident"])
    assert restarted["activity"] is None, "an operator's restart skips the activity check"
    assert recovered["boot_id"] != old_boot
    [requested] = events_of(cluster, type="restart_requested", vm="vm-3")
    assert requested["requested_by"] and requested["manual"] is True
    assert {e["vm"] for e in events_of(cluster, type="restarted")} == {"vm-3"}, "nothing else was touched"


def test_vmq_restart_refusals_and_errors_are_one_line_with_a_non_zero_status(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2"]})
    cluster.wait_healthy(timeout_s=60)

    assert vmq(cluster, "maintenance", "vm-2").returncode == 0
    refused = vmq(cluster, "restart", "vm-2")
    assert refused.returncode == 1
    assert "refused" in refused.stdout and "maintenance" in refused.stdout
    assert events_of(cluster, type="restart_refused", vm="vm-2")

    unknown = vmq(cluster, "restart", "ghost")
    assert unknown.returncode == 2 and one_clear_line(unknown) == "vmq: unknown VM ghost"

    assert vmq(cluster, "suspend").returncode == 0
    held = vmq(cluster, "restart", "vm-1", "--force", "--json")
    assert held.returncode == 1 and "kill switch" in json.loads(held.stdout)["reasons"][0]
    assert not events_of(cluster, type="restart_dispatched")

    down = subprocess.run([sys.executable, "-m", "vmq.cli", "restart", "vm-1"], capture_output=True, text=True,
                          env={**cluster.env, "VMQ_REDIS_URL": "redis://127.0.0.1:1/0"}, timeout=30, check=False)
    assert down.returncode == 2 and one_clear_line(down).startswith("vmq: redis unreachable")


def test_vmq_keys_rotate_keeps_the_guest_healthy_during_the_grace_then_refuses_the_old_key(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster({"node1": ["vm-1", "vm-2", "vm-3"]})
    cluster.wait_healthy(timeout_s=60)

    rotated = vmq(cluster, "keys", "rotate", "vm-1", "--grace", "1h")
    assert rotated.returncode == 0 and 'secret_key = "' in rotated.stdout
    new_key = rotated.stdout.split('secret_key = "')[1].split('"')[0]
    assert new_key != cluster.secrets["vm-1"]
    # The guest still signs with its old key: accepted, counted, and it stays healthy.
    cluster.wait_for(lambda: cluster.store.stats.counters()[0].get("replies_previous_key", 0) >= 3, 20,
                     "three replies under the old key")
    assert cluster.states()["vm-1"] == "healthy"
    assert not cluster.store.stats.counters()[1].get("bad_signature")
    [event] = events_of(cluster, type="key_rotated", vm="vm-1")
    assert new_key not in json.dumps(event) and cluster.secrets["vm-1"] not in json.dumps(event)

    # End the grace at once (vm-1 in maintenance first, so its silence is not judged): refused from now on.
    assert vmq(cluster, "maintenance", "vm-1").returncode == 0
    assert vmq(cluster, "keys", "rotate", "vm-1", "--grace", "0").returncode == 0
    cluster.wait_for(lambda: cluster.store.stats.counters()[1].get("bad_signature", 0) >= 3, 20,
                     "the old key refused")
    assert vmq(cluster, "keys", "rotate", "ghost").returncode == 2
