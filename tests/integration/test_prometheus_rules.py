"""A real Prometheus (Debian's, unpacked by ./dev install) scrapes a running local cluster's monitor worker with
vmq's own rules file, loaded as it is: the target is up, the vmq series are there, every rule evaluates, nothing
fires on a healthy cluster, and `VmqVmFailed` fires (severity page) once a hung VM is quarantined."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_files import PROMETHEUS_INSTALL, ROOT, tool_or_skip
from vmq.sim.localcluster import LocalCluster, free_port

pytestmark = pytest.mark.integration

RULES = ROOT / "deploy" / "prometheus" / "vmq-rules.yml"


class Prometheus:
    """One prometheus process on loopback, scraping ``target`` every second with vmq's rules."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": "vmq", "static_configs": [{"targets": [target]}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [tool_or_skip("prometheus", install=PROMETHEUS_INSTALL), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait(self, what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None, f"prometheus exited: {self.proc.returncode}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def make_prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        started.append(Prometheus(workdir, target))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


def firing(prometheus: Prometheus) -> dict[str, dict[str, Any]]:
    return {a["labels"]["alertname"]: a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"}


def test_a_real_prometheus_loads_the_rules_scrapes_the_monitor_and_pages_when_a_vm_is_quarantined(
        make_cluster: Callable[..., LocalCluster], make_prometheus: Callable[[str], Prometheus]) -> None:
    port = free_port()
    cluster = make_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]}, VMQ_METRICS_PORT=str(port),
                           VMQ_METRICS_ADDR="127.0.0.1", VMQ_MAX_RESTARTS="0")  # the first fault quarantines
    cluster.wait_healthy(timeout_s=60)
    prometheus = make_prometheus(f"127.0.0.1:{port}")

    prometheus.wait("the monitor's target up", lambda: any(
        t["health"] == "up" for t in prometheus.api("targets")["activeTargets"]))
    prometheus.wait("vmq_up == 1", lambda: [r["value"][1] for r in prometheus.query("vmq_up")] == ["1"])
    names = {r["metric"]["__name__"] for r in prometheus.query('{__name__=~"vmq_.+"}')}
    assert len(names) >= 15, sorted(names)
    assert {"vmq_vms", "vmq_hosts", "vmq_probe_rounds_total", "vmq_replies_total"} <= names

    def rules_evaluated() -> bool:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return len(rules) == 12 and all(r["health"] == "ok" and r["lastEvaluation"][:4] != "0001" for r in rules)

    prometheus.wait("all 12 rules evaluated without error", rules_evaluated)
    assert firing(prometheus) == {}, "a healthy cluster raises nothing"

    assert cluster.fleet is not None
    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: cluster.states().get("vm-1") == "failed", 30, "vm-1 quarantined (budget 0)")
    prometheus.wait("VmqVmFailed firing", lambda: "VmqVmFailed" in firing(prometheus), timeout_s=30)
    alert = firing(prometheus)["VmqVmFailed"]
    assert alert["labels"]["severity"] == "page"
    assert "restart budget" in alert["annotations"]["summary"]
    assert set(firing(prometheus)) == {"VmqVmFailed"}, "nothing else: hosts up, Redis read, rounds going"
