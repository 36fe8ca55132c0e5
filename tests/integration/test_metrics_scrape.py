"""/metrics of the real monitor worker, scraped over HTTP after a real fault, restart and recovery."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import events_of
from vmq.sim.localcluster import LocalCluster, free_port

pytestmark = pytest.mark.integration

T1, T2 = 0.5, 1.5

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return body, samples


def answers(port: int) -> bool:
    try:
        return scrape(port)[1].get(("vmq_up", ())) == 1
    except (urllib.error.URLError, ConnectionError):
        return False


def test_metrics_after_a_hang_a_restart_and_a_recovery_count_exactly_that(
        make_cluster: Callable[..., LocalCluster]) -> None:
    port = free_port()
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3", "vm-4"]},
                           VMQ_METRICS_PORT=str(port), VMQ_METRICS_ADDR="127.0.0.1")
    cluster.wait_for(lambda: answers(port), 30, f"/metrics answering on port {port}")
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None

    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-1")), 30, "vm-1 recovered")
    cluster.wait_for(lambda: set(cluster.states().values()) == {"healthy"}, 10, "all healthy")
    body, got = scrape(port)
    print("\n".join(line for line in body.splitlines() if not line.startswith("#")))

    assert got[("vmq_up", ())] == 1
    assert 0 < got[("vmq_probe_rounds_total", ())] <= cluster.store.rounds.current_round()
    assert got[("vmq_replies_total", (("result", "valid"),))] > 0
    assert got[("vmq_replies_total", (("result", "bad_signature"),))] == 0

    [faulty] = events_of(cluster, type="faulty", vm="vm-1")
    detected_s = (faulty["time_ms"] - faulty["evidence"]["last_valid_ms"]) / 1000
    assert got[("vmq_faults_total", ())] == 1
    assert got[("vmq_detection_seconds_count", ())] == 1
    assert got[("vmq_detection_seconds_sum", ())] == pytest.approx(detected_s, abs=0.002)
    assert T2 <= got[("vmq_detection_seconds_sum", ())] <= T1 + T2 + 1.0, "one probe interval + T2 + judge slack"

    assert got[("vmq_restarts_dispatched_total", ())] == 1
    assert got[("vmq_restarts_total", (("action", "reset"), ("host", "node1"), ("result", "ok")))] == 1
    assert [k for k in got if k[0] == "vmq_restarts_total"] == [
        ("vmq_restarts_total", (("action", "reset"), ("host", "node1"), ("result", "ok")))], "nothing else"

    recovered = events_of(cluster, type="recovered", vm="vm-1")[0]
    assert got[("vmq_recovery_seconds_count", ())] == 1
    assert got[("vmq_recovery_seconds_sum", ())] == pytest.approx(recovered["recovered_after_s"], abs=0.002)
    assert got[("vmq_recovery_seconds_bucket", (("le", "+Inf"),))] == 1

    assert got[("vmq_vms", (("state", "healthy"),))] == 4
    assert sum(v for (name, _), v in got.items() if name == "vmq_vms") == 4
    assert got[("vmq_hosts", (("state", "up"),))] == 2
    assert got[("vmq_hosts", (("state", "down"),))] == 0
    assert got[("vmq_storm_holds_total", ())] == 0
