"""The operator CLI against a real redis-server: health checks, hosts, enable/disable, overrides, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vmq.codec import WIRE_VERSION, new_nonce
from vmq.keys import Keys
from vmq.relayed import CoverBatch
from vmq.sim.localcluster import LocalRedis
from vmq.store.redis import RedisStore

pytestmark = pytest.mark.integration


def vmq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(VMQ_REDIS_URL=url, VMQ_NAMESPACE="cli")
    return subprocess.run([sys.executable, "-m", "vmq.cli", *args], capture_output=True, text=True, env=env,
                          timeout=30, check=False)


@pytest.fixture
def store(redis_server: LocalRedis) -> RedisStore:
    return RedisStore.from_url(redis_server.url, Keys("cli"))


def test_check_fails_cleanly_when_redis_is_down() -> None:
    proc = vmq("redis://127.0.0.1:1/0", "check")
    assert proc.returncode == 2
    assert proc.stderr.startswith("vmq: redis unreachable") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_check_monitor_needs_probe_rounds_that_advance(redis_server: LocalRedis, store: RedisStore) -> None:
    proc = vmq(redis_server.url, "check", "--monitor")
    assert proc.returncode == 1 and "no probe round" in proc.stderr
    store.rounds.start_round(new_nonce(), 6000, 64, WIRE_VERSION)
    assert vmq(redis_server.url, "check", "--monitor").returncode == 0


def test_check_host_needs_a_fresh_heartbeat_and_a_reachable_libvirt(redis_server: LocalRedis,
                                                                     store: RedisStore) -> None:
    assert vmq(redis_server.url, "check", "--host", "node1").returncode == 1
    store.hosts.heartbeat("node1", {"queue": "host.node1", "seen_ms": store.clock.time_ms(), "libvirt_ok": 1}, 15_000)
    assert vmq(redis_server.url, "check", "--host", "node1").returncode == 0
    store.hosts.heartbeat("node1", {"seen_ms": store.clock.time_ms(), "libvirt_ok": 0}, 15_000)
    proc = vmq(redis_server.url, "check", "--host", "node1")
    assert proc.returncode == 1 and "degraded" in proc.stderr
    hosts = json.loads(vmq(redis_server.url, "hosts", "--json").stdout)["hosts"]
    assert [(h["name"], h["alive"], h["degraded"], h["queue"]) for h in hosts] == [("node1", True, True,
                                                                                     "host.node1")]


def test_hosts_shows_the_agent_vms_each_host_covers_and_how_far_behind_its_entries_are(
        redis_server: LocalRedis, store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    for vm in ("a-1", "a-2", "a-3"):
        store.vms.register_vm(vm, store.clock.time_ms())
        store.vms.write_many({vm: {"host": "node1", "domain_status": "running", "probe_path_set": "agent"}})
    store.hosts.heartbeat("node1", {"queue": "host.node1", "seen_ms": store.clock.time_ms()}, 15_000)
    store.hosts.heartbeat("node2", {"queue": "host.node2", "seen_ms": store.clock.time_ms()}, 15_000)
    first, _, _ = store.rounds.start_round(new_nonce(), 6000, 64, WIRE_VERSION)
    store.replies.apply_cover_batches([CoverBatch("node1", first, store.clock.time_ms(), first, b"a-1 a-2 a-3 gone",
                                                  b"a-3")])
    for _ in range(2):
        store.rounds.start_round(new_nonce(), 6000, 64, WIRE_VERSION)
    hosts = {h["name"]: h for h in json.loads(vmq(redis_server.url, "hosts", "--json").stdout)["hosts"]}
    assert hosts["node1"]["cover"] == {"round": first, "base": first, "final": True, "covered": 3, "silent": 1,
                                       "pending": 1, "rounds_behind": 2}
    assert hosts["node2"]["cover"] is None
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps its table to the terminal's width
    table = vmq(redis_server.url, "hosts").stdout
    assert "3 (1 silent, 1 pending), 2 behind" in table


def test_disable_and_enable_move_a_vm_out_of_and_back_into_judging(redis_server: LocalRedis,
                                                                    store: RedisStore) -> None:
    store.vms.register_vm("vm-1", store.clock.time_ms())
    assert "unknown -> disabled" in vmq(redis_server.url, "disable", "vm-1").stdout
    assert store.vms.record("vm-1").state == "disabled"
    assert "disabled -> unknown" in vmq(redis_server.url, "enable", "vm-1").stdout
    assert store.vms.record("vm-1").state == "unknown"
    proc = vmq(redis_server.url, "enable", "vm-1")
    assert proc.returncode == 2 and "cannot enable" in proc.stderr
    proc = vmq(redis_server.url, "disable", "no-such-vm")
    assert proc.returncode == 2 and "unknown VM no-such-vm" in proc.stderr


def test_overrides_are_validated_and_stored(redis_server: LocalRedis, store: RedisStore) -> None:
    store.vms.register_vm("vm-1", store.clock.time_ms())
    assert vmq(redis_server.url, "set", "vm-1", "max_restarts=5", "boot_grace_s=120").returncode == 0
    record = store.vms.record("vm-1")
    assert (record.overrides["max_restarts"], record.overrides["boot_grace_s"]) == ("5", "120")
    for bad in ("max_restarts=-1", "max_restarts=x", "no_such_knob=1", "max_restarts"):
        proc = vmq(redis_server.url, "set", "vm-1", bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, bad
    assert vmq(redis_server.url, "set", "vm-1", "max_restarts=").returncode == 0
    assert "max_restarts" not in store.vms.record("vm-1").overrides
