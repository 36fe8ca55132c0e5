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
