"""Operators' intent in libvirt metadata on the whole stack (real redis-server, Celery beat, monitor and host
workers on libvirt test nodes whose domains carry vmq metadata, real responders): in opt-in mode a VM without
metadata hangs and is never restarted, an opted-in one is restarted through its host's queue and recovers, and
`vmq explain` says why each was or was not acted on and where the values came from."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import events_of
from vmq.intent import intent_xml
from vmq.sim.localcluster import LocalCluster

pytestmark = pytest.mark.integration


def explain(cluster: LocalCluster, vm: str) -> str:
    return subprocess.run([sys.executable, "-m", "vmq.cli", "explain", vm], check=True, capture_output=True,
                          text=True, env=cluster.env, timeout=30).stdout


def test_opt_in_by_metadata_restarts_only_the_enrolled_vm_and_explain_says_why(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        {"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]}, VMQ_ENROLL="opt-in",
        metadata={"vm-1": intent_xml(enroll=True, priority=500, knobs={"max_restarts": 2}),
                  "vm-3": intent_xml(enroll=True)})
    cluster.wait_healthy(timeout_s=60)
    cluster.wait_for(lambda: cluster.store.vms.record("vm-1").intent.get("enroll") == "yes", 10,
                     "vm-1's metadata in its record")
    assert cluster.fleet is not None

    cluster.fleet.hang("vm-2")  # no metadata: not enrolled in opt-in mode
    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-1")), 30, "vm-1 recovered")
    time.sleep(2.0)  # vm-2 has been silent for well over T1 + T2 (0.5 + 1.5 s) by now

    assert [e["queue"] for e in events_of(cluster, type="restart_dispatched", vm="vm-1")] == ["host.node1"]
    assert events_of(cluster, type="faulty", vm="vm-2") == []
    assert events_of(cluster, type="restart_dispatched", vm="vm-2") == []
    record = cluster.store.vms.record("vm-2")
    assert record.state.value == "healthy" and record.decision.startswith("not enrolled: the cluster enrols only")

    status = json.loads(subprocess.run([sys.executable, "-m", "vmq.cli", "status", "--json"], check=True,
                                       capture_output=True, text=True, env=cluster.env, timeout=30).stdout)
    rows = {v["id"]: (v["enrolled"], v["priority"]) for v in status["vms"]}
    assert rows == {"vm-1": (True, 500), "vm-2": (False, 0), "vm-3": (True, 0)}

    said = explain(cluster, "vm-1")
    assert "enrolment: enrolled (VMQ_ENROLL=opt-in, metadata enroll=yes)" in said
    assert "priority: 500 (libvirt metadata)" in said and "knob max_restarts=2 (libvirt metadata)" in said
    assert "libvirt metadata: enroll=yes priority=500 max_restarts=2" in said, "the intent event, audited"
    assert "enrolment: not enrolled: the cluster enrols only VMs whose libvirt metadata says" in explain(
        cluster, "vm-2")


def test_a_real_responders_failing_liveness_check_restarts_its_vm_once_and_a_readiness_one_never(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    broken, not_ready = tmp_path / "app-broken", tmp_path / "not-ready"
    check = f"{sys.executable} -c 'import os, sys; sys.exit(os.path.exists(sys.argv[1]))'"
    cluster = make_cluster(
        {"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]},
        guest_config={
            "vm-1": f'[[health]]\nname = "app"\ncommand = "{check} {broken}"\ninterval_s = 0.3\nkind = "liveness"\n'
                    f"failure_threshold = 2\n",
            "vm-2": f'[[health]]\nname = "warmup"\ncommand = "{check} {not_ready}"\ninterval_s = 0.3\n'})
    cluster.wait_healthy(timeout_s=60)
    not_ready.touch()  # readiness only: reported, never acted on
    broken.touch()  # the application of vm-1 stops being live; its guest still answers every probe
    cluster.wait_for(lambda: bool(events_of(cluster, type="restart_dispatched", vm="vm-1")), 20,
                     "vm-1 restarted for its application")
    broken.unlink()  # the reset "fixed" the application
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-1")), 30, "vm-1 recovered")
    time.sleep(2.0)

    [faulty] = events_of(cluster, type="faulty", vm="vm-1")
    assert faulty["reasons"][0].startswith("application unhealthy: liveness check(s) app failed")
    assert faulty["evidence"]["app_unhealthy"]["checks"] == ["app"]
    assert [e["queue"] for e in events_of(cluster, type="restart_dispatched", vm="vm-1")] == ["host.node1"]
    assert [(e["host"], e["result"]) for e in events_of(cluster, type="restarted", vm="vm-1")] == [("node1", "ok")]
    assert len(events_of(cluster, type="app_unhealthy", vm="vm-1")) == 1
    assert events_of(cluster, type="faulty", vm="vm-2") == [] and cluster.states()["vm-2"] == "healthy"
    last = cluster.store.vms.records(["vm-2"])[0]
    assert last.state.value == "healthy"


def test_priority_from_metadata_orders_restarts_competing_for_the_per_host_limit(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        {"node1": ["vm-1", "vm-2", "vm-3", "vm-4"], "node2": ["vm-5", "vm-6", "vm-7", "vm-8"]},
        VMQ_MAX_CONCURRENT_RESTARTS_PER_HOST="1",
        metadata={"vm-1": intent_xml(priority=10), "vm-2": intent_xml(priority=900)})
    cluster.wait_healthy(timeout_s=60)
    cluster.wait_for(lambda: cluster.store.vms.record("vm-2").intent.get("priority") == "900", 10, "priorities read")
    assert cluster.fleet is not None
    cluster.fleet.hang("vm-1")  # by name vm-1 would go first; both fall silent in the same round
    cluster.fleet.hang("vm-2")
    cluster.wait_for(lambda: len(events_of(cluster, type="restart_dispatched")) == 2, 40, "both restarted in turn")
    first, second = events_of(cluster, type="restart_dispatched")
    assert (first["vm"], second["vm"]) == ("vm-2", "vm-1"), "the higher priority took the one free slot"
    [held] = [e for e in events_of(cluster, type="faulty", vm="vm-1")]
    assert "already has 1 restarts in flight (limit 1)" in " ".join(held["reasons"])
