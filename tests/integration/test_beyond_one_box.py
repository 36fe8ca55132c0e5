"""Beyond one box, on real processes: two timeout workers share the judging exactly once and one survives
the other's SIGKILL; a second beat changes neither the round rate nor anyone's health."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import events_of
from vmq.sim.localcluster import LocalCluster

pytestmark = pytest.mark.integration

T1, T2 = 0.5, 1.5
BOUND_MS = (T1 + T2 + 1.0) * 1000
PLACEMENT = {"node1": ["vm-1", "vm-2", "vm-3"], "node2": ["vm-4", "vm-5", "vm-6"]}
# Celery logs each task's return value: a probe or judge task whose tick judged rounds names them.
JUDGED = re.compile(r"vmq\.(?:monitor\.probe_round|timeouts\.judge_round)\[[^\]]+\] succeeded in \S+: "
                    r"\{[^{}]*'judged_rounds': \[(\d[^\]]*)\]")


def rounds_judged_by(cluster: LocalCluster, worker: str) -> set[int]:
    text = (cluster.workdir / f"{worker}.log").read_text()
    return {int(r) for found in JUDGED.findall(text) for r in found.split(",")}


def incident_of(cluster: LocalCluster, vm: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(faulty events, restart_dispatched events) of ``vm``, once it has recovered."""
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm=vm)), 30, f"{vm} recovered")
    return events_of(cluster, type="faulty", vm=vm), events_of(cluster, type="restart_dispatched", vm=vm)


def test_two_timeout_workers_judge_each_incident_once_and_one_carries_on_when_the_other_is_killed(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(PLACEMENT, monitors=2)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None

    cluster.fleet.hang("vm-1")
    faulty, dispatched = incident_of(cluster, "vm-1")
    assert len(faulty) == 1 and len(dispatched) == 1
    assert dispatched[0]["incident"] == faulty[0]["incident"]
    # Both workers really judged: each names rounds in its own log, and no round was judged by both.
    cluster.wait_for(lambda: bool(rounds_judged_by(cluster, "monitor"))
                     and bool(rounds_judged_by(cluster, "monitor-2")), 20, "both workers judged a round")
    assert not rounds_judged_by(cluster, "monitor") & rounds_judged_by(cluster, "monitor-2")

    # SIGKILL one of them mid-run: the other detects the next hang in time, and restarts it once.
    cluster.kill("monitor")
    t_fault = cluster.store.clock.time_ms()
    cluster.fleet.hang("vm-4")
    faulty, dispatched = incident_of(cluster, "vm-4")
    assert len(faulty) == 1 and len(dispatched) == 1
    assert int(str(faulty[0]["time_ms"])) - t_fault <= BOUND_MS, \
        f"detected {int(str(faulty[0]['time_ms'])) - t_fault} ms after the hang"
    assert {e["vm"] for e in events_of(cluster, type="faulty")} == {"vm-1", "vm-4"}


def test_a_second_beat_keeps_one_round_per_interval_and_faults_nobody(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(PLACEMENT, beats=2)
    cluster.wait_healthy(timeout_s=60)
    first_round = cluster.store.rounds.current_round()
    duplicates_before = cluster.store.stats.counters()[0].get("rounds_duplicate", 0)
    seconds = 10.0
    time.sleep(seconds)
    rounds = cluster.store.rounds.current_round() - first_round
    refused = cluster.store.stats.counters()[0].get("rounds_duplicate", 0) - duplicates_before
    expected = seconds / T1  # 20 with one beat; 40 if both beats' rounds went out
    assert 0.7 * expected <= rounds <= 1.25 * expected, f"{rounds} rounds in {seconds:g} s"
    assert refused >= 0.5 * expected, f"only {refused} probes refused: was the second beat sending?"
    for beat in ("beat", "beat-2"):
        sent = (cluster.workdir / f"{beat}.log").read_text().count("Sending due task vmq-probe-round")
        assert sent >= 0.7 * expected, f"{beat} sent {sent} probes"
    assert events_of(cluster, type="faulty") == []
    assert set(cluster.states().values()) == {"healthy"}
