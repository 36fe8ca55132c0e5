"""Integration fixtures: a real redis-server per test and whole local clusters of real Celery processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmq.operator_views import event_json
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A private redis-server on a free loopback port."""
    server = LocalRedis(tmp_path / "redis").start()
    yield server
    server.stop()


FAST = {
    "VMQ_NAMESPACE": "it",
    "VMQ_PROBE_INTERVAL_S": "0.5",
    "VMQ_REPLY_TIMEOUT_S": "1.5",
    "VMQ_BOOT_GRACE_S": "1",
    "VMQ_RECOVERY_TIMEOUT_S": "10",
    "VMQ_INVENTORY_INTERVAL_S": "1",
    "VMQ_HOST_HEARTBEAT_TTL_S": "6",
    "VMQ_HOST_HEARTBEAT_INTERVAL_S": "0.3",  # 3 missed renewals (0.9 s) must be shorter than T2
}


@pytest.fixture
def make_cluster(tmp_path: Path, redis_server: LocalRedis) -> Iterator[Callable[..., LocalCluster]]:
    """Build and start a LocalCluster; every process is stopped at teardown."""
    started: list[LocalCluster] = []

    def build(placement: dict[str, list[str]], standby: dict[str, list[str]] | None = None,
              devices: bool = False, monitors: int = 1, beats: int = 1, metadata: dict[str, str] | None = None,
              guest_config: dict[str, str] | None = None, **env: str) -> LocalCluster:
        spec = ClusterSpec(placement=placement, standby=standby or {}, env={**FAST, **env}, boot_delay_s=1.0,
                           devices=devices, monitors=monitors, beats=beats, metadata=metadata or {},
                           guest_config=guest_config or {})
        cluster = LocalCluster(tmp_path / "cluster", redis_server.url, spec)
        started.append(cluster)
        cluster.start()
        return cluster

    yield build
    for cluster in started:
        cluster.stop()


def events_of(cluster: LocalCluster, **match: str) -> list[dict[str, Any]]:
    """All audit events whose fields equal ``match``."""
    out = []
    for entry_id, fields in cluster.store.audit.read(count=1_000_000):
        event = event_json(entry_id, fields)
        if all(event.get(k) == v for k, v in match.items()):
            out.append(event)
    return out
