"""The /metrics collector over fakeredis: real monitor and restart use cases write the Redis-held counters,
the collector reads them back; Redis down gives ``vmq_up 0``; the Grafana dashboard only asks for what
the collector exposes."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import yaml

from tests.contract.test_monitor_store import redis_server  # noqa: F401 - the real-server fixture
from vmq.codec import encode_reply
from vmq.config import Settings, load_settings
from vmq.host_restart import restart_vm
from vmq.hypervisor.fake import FakeHypervisor
from vmq.keys import Keys
from vmq.metrics import VmqCollector, metrics_registry, serve_metrics
from vmq.model import DomainInfo, DomainStatus, RestartRequest
from vmq.monitor import Monitor
from vmq.routing import host_queue
from vmq.store.redis import RedisStore, connect
from vmq.telemetry import DETECTION_BUCKETS_S, bucket_field, read_histogram

HOST = "node1"
SECRET = {"web-1": "a1" * 32, "web-2": "b2" * 32}
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "vmq-dashboard.json"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "vmq-rules.yml"


class Cluster:
    """A monitor on fakeredis with two keyed VMs on one live host; time is Redis' own clock."""

    def __init__(self, client: redis.Redis | None = None) -> None:
        self.server = fakeredis.FakeServer()
        self.client = client if client is not None else fakeredis.FakeRedis(server=self.server)
        self.keys = Keys("m")
        self.settings: Settings = load_settings({"namespace": "m", "probe_interval_s": 1, "reply_timeout_s": 3,
                                                 "boot_grace_s": 0, "host_heartbeat_interval_s": 20})
        self.store = RedisStore(self.client, self.keys)
        self.dispatched: list[RestartRequest] = []
        self.monitor = Monitor(self.store, self.settings, self.dispatched.append)
        for vm, secret in SECRET.items():
            assert self.store.vms.register_vm(vm, self.store.clock.time_ms())
            self.store.keyring.set_secret(vm, secret)
            self.store.vms.write_many({vm: {"host": HOST, "domain_status": DomainStatus.RUNNING.value}})
        self.store.hosts.heartbeat(HOST, {"queue": host_queue(HOST), "seen_ms": self.store.clock.time_ms()}, 60_000)

    def wait_past(self, ms: int) -> None:
        while self.store.clock.time_ms() <= ms:
            time.sleep(0.002)

    def round(self, answering: tuple[str, ...], forged: tuple[str, ...] = ()) -> int:
        """Probe, let ``answering`` reply (``forged`` with a wrong signature), make the round due and judge
        it; returns the round."""
        round_id, _ = self.monitor.probe()
        nonce = (self.client.hget(self.keys.rounds, round_id) or b"").decode().partition(":")[0]
        for vm in answering + forged:
            message, signature = encode_reply(vm, round_id, nonce, "boot-1", round_id, {"uptime_s": 1.0},
                                              bytes.fromhex(SECRET[vm]))
            self.client.xadd(self.keys.reply_stream, {"m": message, "s": "00" * 32 if vm in forged else signature})
        deadline = self.store.clock.time_ms()
        self.client.zadd(self.keys.rounds_pending, {str(round_id): deadline})
        self.wait_past(deadline)
        self.monitor.tick()
        return round_id


def samples(collector: VmqCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of one collection."""
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    yield made
    made.client.close()


def test_a_fault_a_restart_and_a_recovery_show_in_the_collected_metrics(cluster: Cluster) -> None:
    cluster.round(("web-1", "web-2"))  # both healthy
    cluster.round(("web-2",))  # web-1 silent: faulty, restart dispatched
    assert [r.vm for r in cluster.dispatched] == ["web-1"]
    request = cluster.dispatched[0]
    hypervisor = FakeHypervisor(f"fake://{HOST}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    assert restart_vm(cluster.store, hypervisor, HOST, "web-1", request.generation, request.incident, "w1").acted
    # The same request delivered again is a no-op, counted as skipped.
    assert not restart_vm(cluster.store, hypervisor, HOST, "web-1", request.generation, request.incident, "w2").acted
    cluster.round(("web-1", "web-2"))  # web-1 answers again: recovered
    cluster.round(("web-1",), forged=("web-2",))  # a forged reply for web-2 is rejected: web-2 is silent

    got = samples(VmqCollector(cluster.store, cluster.settings))
    assert got[("vmq_up", ())] == 1
    assert got[("vmq_probe_rounds_total", ())] == 4
    assert got[("vmq_replies_total", (("result", "valid"),))] == 6
    assert got[("vmq_replies_total", (("result", "bad_signature"),))] == 1
    assert got[("vmq_replies_total", (("result", "replayed"),))] == 0, "every known reason is exposed, even at 0"
    assert got[("vmq_faults_total", ())] == 2  # web-1, then web-2 after the forged reply
    assert got[("vmq_restarts_dispatched_total", ())] == 2
    assert got[("vmq_restarts_total", (("action", "reset"), ("host", HOST), ("result", "ok")))] == 1
    assert got[("vmq_restarts_total", (("action", "none"), ("host", HOST), ("result", "skipped")))] == 1
    assert got[("vmq_detection_seconds_count", ())] == 2
    detection_sum = got[("vmq_detection_seconds_sum", ())]
    assert 0 < detection_sum < 10, "each detection is one probe round plus a few ms here"
    assert got[("vmq_detection_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("vmq_recovery_seconds_count", ())] == 1
    assert 0 <= got[("vmq_recovery_seconds_sum", ())] < 10
    assert got[("vmq_vms", (("state", "healthy"),))] == 1
    assert got[("vmq_vms", (("state", "restarting"),))] == 1
    assert got[("vmq_vms", (("state", "unknown"),))] == 0
    assert got[("vmq_hosts", (("state", "up"),))] == 1
    assert got[("vmq_hosts", (("state", "down"),))] == 0
    assert got[("vmq_storm_holds_total", ())] == 0
    assert got[("vmq_restarts_suspended", ())] == 0


def test_restarts_held_by_the_storm_guard_are_counted(cluster: Cluster) -> None:
    cluster.settings = load_settings({**cluster.settings.model_dump(), "storm_fraction": 0.5, "storm_min_vms": 2})
    cluster.monitor = Monitor(cluster.store, cluster.settings, cluster.dispatched.append)
    cluster.round(("web-1", "web-2"))
    cluster.round(())  # both silent in one round: 2 of 2 > 50 %, held
    got = samples(VmqCollector(cluster.store, cluster.settings))
    assert cluster.dispatched == []
    assert got[("vmq_storm_holds_total", ())] == 2
    assert got[("vmq_guard_episodes", (("scope", "cluster"),))] == 1
    assert got[("vmq_vms", (("state", "faulty"),))] == 2


def test_redis_down_gives_vmq_up_0_and_no_exception(cluster: Cluster) -> None:
    cluster.round(("web-1", "web-2"))
    cluster.server.connected = False
    got = samples(VmqCollector(cluster.store, cluster.settings))
    assert got[("vmq_up", ())] == 0
    assert {name for name, _ in got} == {"vmq_up", "vmq_scrape_duration_seconds"}


def test_an_observation_lands_in_the_smallest_bucket_that_holds_it_and_buckets_read_back_cumulative() -> None:
    assert bucket_field(2.0, DETECTION_BUCKETS_S) == "2.0"
    assert bucket_field(2.01, DETECTION_BUCKETS_S) == "2.5"
    assert bucket_field(1e6, DETECTION_BUCKETS_S) == "+Inf"
    data = read_histogram({"2.0": "1", "2.5": "2", "+Inf": "1", "sum": "1e6", "count": "4"}, DETECTION_BUCKETS_S)
    cumulative = dict(data.buckets)
    assert (cumulative["1.5"], cumulative["2.0"], cumulative["2.5"], cumulative["180.0"], cumulative["+Inf"]) == (
        0, 1, 3, 3, 4)
    assert (data.sum, data.count) == (1e6, 4)


def test_serve_metrics_answers_on_http(cluster: Cluster) -> None:
    settings = load_settings({**cluster.settings.model_dump(), "metrics_port": 0, "metrics_addr": "127.0.0.1"})
    server = serve_metrics(cluster.store, settings)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "vmq_up 1.0" in body
    assert 'vmq_vms{state="unknown"} 2.0' in body
    assert "python_gc" not in body, "a registry of its own: only vmq's metrics"


def _dashboard_metric_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                names |= set(re.findall(r"\bvmq_[a-z_]+", value))
            else:
                names |= _dashboard_metric_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= _dashboard_metric_names(item)
    return names


def test_every_metric_the_grafana_dashboard_and_the_alert_rules_query_is_one_the_collector_exposes(cluster: Cluster) -> None:
    cluster.round(("web-1", "web-2"))
    cluster.round(("web-2",))
    request = cluster.dispatched[0]
    hypervisor = FakeHypervisor(f"fake://{HOST}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    restart_vm(cluster.store, hypervisor, HOST, "web-1", request.generation, request.incident, "w1")
    exposed = {name for name, _ in samples(VmqCollector(cluster.store, cluster.settings))}
    dashboard = json.loads(DASHBOARD.read_text())
    used = _dashboard_metric_names(dashboard)
    assert len(used) >= 8, f"the dashboard queries too little: {sorted(used)}"
    assert used - exposed == set(), f"dashboard queries metrics the collector does not expose: {used - exposed}"
    alerting = _dashboard_metric_names(yaml.safe_load(RULES.read_text()))
    assert len(alerting) >= 8 and alerting - exposed == set(), f"alert rules on unknown metrics: {alerting - exposed}"
    assert metrics_registry(cluster.store, cluster.settings).get_sample_value("vmq_up") == 1


def _worker(queues: list[str], **settings: Any) -> Any:
    """A stand-in for the Celery consumer `worker_ready` passes: its app and the queues it consumes."""
    from types import SimpleNamespace

    from workers.app import create_app

    app = create_app(load_settings({"redis_url": "redis://127.0.0.1:1/0", **settings}))
    return SimpleNamespace(app=app, task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues]))


def test_the_monitor_worker_serves_metrics_once_ready_and_a_host_worker_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmq.sim.localcluster import free_port
    from workers import metrics as worker_metrics

    monkeypatch.setattr(worker_metrics, "_server", None)
    port = free_port()
    worker_metrics._start_metrics(_worker(["host.node1"], host_name="node1", metrics_port=port,
                                          metrics_addr="127.0.0.1"))
    assert worker_metrics._server is None
    worker_metrics._start_metrics(_worker(["vmq.monitor", "vmq.timeouts"], metrics_port=port,
                                          metrics_addr="127.0.0.1"))
    assert worker_metrics._server is not None and worker_metrics._server.server_port == port
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "vmq_up 0.0" in body, "no Redis on port 1: the scrape says so instead of failing"
    finally:
        worker_metrics._stop_metrics()


def test_a_taken_metrics_port_is_a_warning_not_a_dead_monitor(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from workers import metrics as worker_metrics

    monkeypatch.setattr(worker_metrics, "_server", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker_metrics._start_metrics(_worker(["vmq.monitor"], metrics_port=port, metrics_addr="127.0.0.1"))
    assert worker_metrics._server is None
    assert any("cannot listen" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_metrics_port_0_disables_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import metrics as worker_metrics

    monkeypatch.setattr(worker_metrics, "_server", None)
    worker_metrics._start_metrics(_worker(["vmq.monitor"], metrics_port=0))
    assert worker_metrics._server is None


def test_replies_under_a_rotated_out_key_are_exported_beside_the_valid_ones() -> None:
    cluster = Cluster()
    cluster.round(("web-1", "web-2"))
    cluster.store.keyring.rotate_secret("web-1", "e5" * 32, grace_ms=60_000)  # web-1 still signs with its old key
    cluster.round(("web-1", "web-2"))
    got = samples(VmqCollector(cluster.store, cluster.settings))
    assert got[("vmq_replies_previous_key_total", ())] == 1
    assert got[("vmq_replies_total", (("result", "valid"),))] == 4
    assert got[("vmq_replies_total", (("result", "bad_signature"),))] == 0


@pytest.mark.parametrize("backend", ["fakeredis", "redis"])
def test_the_monitors_lag_behind_the_reply_stream_is_exported_and_clears_once_they_read_it(
        backend: str, request: pytest.FixtureRequest) -> None:
    client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    if backend == "redis":
        client = connect(f"redis://127.0.0.1:{request.getfixturevalue('redis_server')}/0")
        client.flushall()
    cluster = Cluster(client)
    collector = VmqCollector(cluster.store, cluster.settings)

    def lag() -> tuple[float, float, float]:
        got = samples(collector)
        return (got[("vmq_replies_unread", ())], got[("vmq_oldest_unread_reply_seconds", ())],
                got[("vmq_reply_stream_capacity", ())])

    assert lag() == (0, 0, cluster.settings.reply_stream_maxlen)  # no stream yet
    cluster.round(("web-1", "web-2"))
    assert lag()[:2] == (0, 0)
    round_id, _ = cluster.monitor.probe()  # replies land and no monitor reads them (a monitor behind)
    nonce = (cluster.client.hget(cluster.keys.rounds, round_id) or b"").decode().partition(":")[0]
    for vm, secret in SECRET.items():
        message, signature = encode_reply(vm, round_id, nonce, "boot-1", round_id, {}, bytes.fromhex(secret))
        cluster.client.xadd(cluster.keys.reply_stream, {"m": message, "s": signature})
    time.sleep(0.2)
    unread, oldest_s, _ = lag()
    assert unread == 2
    assert 0.2 <= oldest_s < 5
    cluster.monitor.tick()  # reads them
    assert lag()[:2] == (0, 0)
    cluster.client.close()
