"""The failover of a dead host's VMs (issue 18), monitor side and host side, on fakeredis and a real
redis-server: nothing starts elsewhere unless the host is proven off; once proven, each enabled VM is sent once
per incident, highest priority first, to a host that fits, even with two judges; the host that starts it
re-asserts the world first."""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.contract.test_monitor_store import NAMESPACE, Backend, make_settings
from vmq.config import Settings
from vmq.failover_flow import FailoverFlow, libvirt_fence, run_fence_task
from vmq.host_failover import FailoverStart, start_failed_over
from vmq.housekeeping import sweep_hosts
from vmq.hypervisor.fake import FakeHypervisor
from vmq.keys import Keys
from vmq.model import DomainInfo, DomainStatus, VmState
from vmq.ports import Hypervisor
from vmq.store.redis import RedisStore

ALPHA, BRAVO, CHARLIE = "alpha", "bravo", "charlie"


def xml(vm: str, memory_mib: int = 1024, vcpus: int = 1) -> str:
    return (f"<domain type='test'><name>{vm}</name><uuid>00000000-0000-4000-8000-{abs(hash(vm)) % 10**12:012d}</uuid>"
            f"<memory unit='KiB'>{memory_mib * 1024}</memory><vcpu>{vcpus}</vcpu><os><type>hvm</type></os></domain>")


@dataclass
class Cluster:
    backend: Backend
    store: RedisStore
    settings: Settings
    fences: list[tuple[str, int]] = field(default_factory=list)
    starts: list[FailoverStart] = field(default_factory=list)

    def flow(self, store: RedisStore | None = None) -> FailoverFlow:
        return FailoverFlow(store or self.store, self.settings, lambda h, e: self.fences.append((h, e)),
                            self.starts.append)

    def host(self, host: str, alive: bool = True, cpus: int = 8, memory_mib: int = 16384, lock_ok: int = 1,
             **extra: Any) -> None:
        fields = {"seen_ms": self.store.clock.time_ms(), "cpus": cpus, "memory_mib": memory_mib, "vcpus_used": 0,
                  "memory_used_mib": 0, "lock_ok": lock_ok, **extra}
        self.store.hosts.heartbeat(host, fields, 60_000 if alive else 1)

    def vm(self, vm: str, host: str, failover: str = "yes", priority: int = 0, memory_mib: int = 1024) -> None:
        now = self.store.clock.time_ms()
        self.store.vms.register_vm(vm, now)
        self.store.vms.write_many({vm: {"host": host, "domain_status": "running", "state": VmState.HEALTHY.value,
                                        "intent.failover": failover, "intent.priority": str(priority)}})
        self.store.hosts.store_domains(host, {**{n: "{}" for n in self.store.hosts.domain_names(host)}, vm: "{}"})
        self.store.failovers.keep_definitions(host, {vm: xml(vm, memory_mib)}, [], now)

    def kill(self, host: str) -> None:
        self.store.hosts.heartbeat(host, {"seen_ms": 0}, 1)
        time.sleep(0.01)

    def tick(self, flow: FailoverFlow | None = None) -> list[tuple[str, bool, dict[str, str]]]:
        now = self.store.clock.time_ms()
        overview = sweep_hosts(self.store, now)
        (flow or self.flow()).on_tick(overview, now)
        return overview

    def events(self, kind: str) -> list[dict[str, str]]:
        return [e for _, e in self.store.audit.read() if e.get("type") == kind]

    def confirm(self, host: str) -> None:
        episode = int(self.store.hosts.host_info(host)["down_since_ms"])
        self.store.failovers.confirm_fenced(host, episode, "tester", self.store.clock.time_ms())


def make_cluster(backend: Backend, **settings: Any) -> Cluster:
    store = RedisStore(backend.client(), Keys(NAMESPACE))
    return Cluster(backend, store, make_settings(**{"failover": True, **settings}))


@pytest.fixture
def cluster(backend: Backend) -> Cluster:
    c = make_cluster(backend)
    for host in (ALPHA, BRAVO, CHARLIE):
        c.host(host)
    c.vm("web-1", ALPHA, priority=10)
    c.vm("web-2", ALPHA, priority=50)
    c.vm("db-1", ALPHA, failover="")  # says nothing: VMQ_FAILOVER_DEFAULT (off) applies
    return c


def dead_alpha(c: Cluster) -> None:
    c.kill(ALPHA)
    c.tick()  # host_down, VMs unreachable, the incident opened
    on_alpha = c.store.hosts.vms_on_host(ALPHA)
    assert on_alpha and {rec.state for rec in c.store.vms.records(on_alpha)} == {VmState.UNREACHABLE}


def test_failover_off_leaves_a_dead_hosts_vms_unreachable_and_opens_nothing(backend: Backend) -> None:
    c = make_cluster(backend, failover=False)
    c.host(ALPHA)
    c.host(BRAVO)
    c.vm("web-1", ALPHA)
    dead_alpha(c)
    c.confirm(ALPHA)
    c.tick()
    assert c.store.failovers.incident(ALPHA) == {} and c.starts == [] and c.events("fence_failed") == []


def test_without_a_fence_method_nothing_starts_and_an_operators_confirmation_then_fails_over_once(
        cluster: Cluster) -> None:
    c = cluster
    dead_alpha(c)
    for _ in range(3):
        c.tick()
    assert c.starts == [] and c.fences == []
    assert c.store.failovers.incident(ALPHA)["state"] == "unfenced"
    [failed] = c.events("fence_failed")
    assert "no fence method configured for alpha" in failed["reason"]
    assert len(c.events("failover_held")) == 1

    c.confirm(ALPHA)
    c.tick()  # unfenced -> fenced (operator)
    c.tick()  # planned and sent
    assert [e["method"] for e in c.events("fenced")] == ["operator"]
    assert [(s.vm, s.from_host) for s in c.starts] == [("web-2", ALPHA), ("web-1", ALPHA)]  # priority order
    assert {s.host for s in c.starts} <= {BRAVO, CHARLIE} and c.starts[0].host != c.starts[1].host
    [refused] = c.events("failover_refused")
    assert refused["vm"] == "db-1" and "not enabled" in refused["reason"]
    for _ in range(3):
        c.tick()
    assert len(c.starts) == 2 and len(c.events("failover_started")) == 2
    assert c.store.failovers.incident(ALPHA)["state"] == "done"


def test_two_judges_open_fence_and_send_each_start_exactly_once(cluster: Cluster) -> None:
    c = cluster
    other = c.flow(RedisStore(c.backend.client(), Keys(NAMESPACE)))
    c.kill(ALPHA)
    now = c.store.clock.time_ms()
    overview = sweep_hosts(c.store, now)
    c.confirm(ALPHA)
    mine = c.flow()
    for _ in range(3):
        mine.on_tick(overview, now)
        other.on_tick(overview, now)
    assert sorted(s.vm for s in c.starts) == ["web-1", "web-2"]
    assert len(c.events("fenced")) == 1 and len(c.events("failover_started")) == 2
    # Even a plan run again from scratch (a judge that lost the incident's state) cannot send a VM twice.
    assert not c.store.failovers.claim_start("web-1", int(overview[0][2]["down_since_ms"]), CHARLIE)


def fence_agent(tmp_path: Path, off_exit: int, status_exit: int) -> Path:
    agent = tmp_path / "fence_test"
    agent.write_text(f"#!/bin/sh\ncat >> {tmp_path}/stdin\ngrep -q action=off {tmp_path}/stdin && "
                     f"[ ! -e {tmp_path}/offed ] && touch {tmp_path}/offed && exit {off_exit}\nexit {status_exit}\n")
    agent.chmod(agent.stat().st_mode | stat.S_IXUSR)
    config = tmp_path / "fence.toml"
    config.write_text(f'[hosts.alpha]\nagent = "{agent}"\ntimeout_s = 5\noptions = {{ ip = "10.0.0.11", '
                      'password = "pw-not-in-logs" }\n')
    return config


def test_a_configured_fence_runs_once_and_its_success_fails_the_vms_over(backend: Backend, tmp_path: Path) -> None:
    c = make_cluster(backend, fence_config=str(fence_agent(tmp_path, 0, 2)))
    for host in (ALPHA, BRAVO):
        c.host(host)
    c.vm("web-1", ALPHA)
    dead_alpha(c)
    c.tick()
    assert c.fences == [(ALPHA, int(c.store.hosts.host_info(ALPHA)["down_since_ms"]))]
    assert c.store.failovers.incident(ALPHA)["state"] == "fencing" and c.starts == []
    result = run_fence_task(c.store, c.settings, ALPHA, c.fences[0][1], lambda uri: FakeHypervisor(uri))
    assert result["fenced"] is True and [s["action"] for s in result["steps"]] == ["off", "status"]
    assert run_fence_task(c.store, c.settings, ALPHA, c.fences[0][1], lambda uri: FakeHypervisor(uri))["fenced"] is None
    c.tick()
    assert [(s.vm, s.host) for s in c.starts] == [("web-1", BRAVO)]
    [fenced] = c.events("fenced")
    assert "pw-not-in-logs" not in str(fenced) and "off" in fenced["detail"]


@pytest.mark.parametrize("off_exit,status_exit", [(1, 2), (0, 0)], ids=["off refused", "still on"])
def test_a_fence_that_fails_starts_nothing(backend: Backend, tmp_path: Path, off_exit: int, status_exit: int) -> None:
    c = make_cluster(backend, fence_config=str(fence_agent(tmp_path, off_exit, status_exit)))
    for host in (ALPHA, BRAVO):
        c.host(host)
    c.vm("web-1", ALPHA)
    dead_alpha(c)
    c.tick()
    assert run_fence_task(c.store, c.settings, ALPHA, c.fences[0][1], lambda uri: FakeHypervisor(uri))["fenced"] is False
    for _ in range(3):
        c.tick()
    assert c.starts == [] and c.store.failovers.incident(ALPHA)["state"] == "unfenced"
    assert len(c.events("fence_failed")) == 1 and c.events("failover_started") == []


def test_more_than_half_of_the_hosts_silent_holds_even_a_fenced_host(cluster: Cluster) -> None:
    c = cluster
    c.kill(BRAVO)
    dead_alpha(c)
    c.confirm(ALPHA)
    for _ in range(3):
        c.tick()
    assert c.starts == []
    held = [e["reason"] for e in c.events("failover_held") if e["host"] == ALPHA]
    assert "alpha is not proven off" in held[0]  # before the operator's confirmation
    assert len(held) == 2 and "2 of 3 hosts are silent at once" in held[1]  # once, however many ticks
    c.host(BRAVO)  # bravo is back: the cluster is whole enough again
    c.tick()
    assert sorted(s.vm for s in c.starts) == ["web-1", "web-2"] and {s.host for s in c.starts} == {BRAVO, CHARLIE}


def test_hosts_without_a_lock_manager_or_room_are_not_chosen(backend: Backend) -> None:
    c = make_cluster(backend)
    c.host(ALPHA)
    c.host(BRAVO, lock_ok=0)  # virtlockd not running: a wrong fence could start a disk twice there
    c.host(CHARLIE, memory_mib=3000)
    c.vm("big", ALPHA, memory_mib=4096, priority=9)
    c.vm("small", ALPHA, memory_mib=1024)
    dead_alpha(c)
    c.confirm(ALPHA)
    c.tick()
    c.tick()
    assert [(s.vm, s.host) for s in c.starts] == [("small", CHARLIE)]
    [refused] = c.events("failover_refused")
    assert refused["vm"] == "big" and "not failover-safe" in refused["reason"] and "bravo" in refused["reason"]


# ---------------------------------------------------------------- the host's side
def started_on_bravo(c: Cluster, hypervisor: Hypervisor, vm: str = "web-1") -> dict[str, Any]:
    episode = int(c.store.hosts.host_info(ALPHA)["down_since_ms"])
    sha = c.store.failovers.definitions(ALPHA, [vm])[vm]["sha"]
    return start_failed_over(c.store, hypervisor, BRAVO, FailoverStart(vm, ALPHA, BRAVO, episode, sha), "t1")


def test_the_chosen_host_starts_it_from_the_kept_definition_once(cluster: Cluster) -> None:
    c = cluster
    dead_alpha(c)
    bravo = FakeHypervisor("fake://bravo")
    assert started_on_bravo(c, bravo)["started"] is True
    assert bravo.domain_info("web-1").status is DomainStatus.RUNNING
    assert bravo.definition("web-1") == c.store.failovers.definitions(ALPHA, ["web-1"])["web-1"]["xml"]
    [done] = c.events("failover_done")
    assert done["vm"] == "web-1" and done["host"] == BRAVO and done["from_host"] == ALPHA
    again = started_on_bravo(c, bravo)  # a redelivered task
    assert again == {"started": False, "vm": "web-1", "host": BRAVO, "reason": "already active here"}
    assert len(c.events("failover_done")) == 1


def test_the_host_refuses_when_the_old_host_is_back_or_the_lock_manager_says_no(cluster: Cluster) -> None:
    c = cluster
    dead_alpha(c)
    bravo = FakeHypervisor("fake://bravo")
    bravo.locked_disks.add("web-2")
    refused = started_on_bravo(c, bravo, "web-2")
    assert refused["started"] is False and "lock manager refused" in refused["reason"]
    [failed] = c.events("failover_failed")
    assert failed["vm"] == "web-2" and failed["lock_refused"] == "true"
    c.host(ALPHA)  # alpha's worker is back before the start ran: it may still run web-1
    back = started_on_bravo(c, bravo)
    assert back["started"] is False and "alpha is back" in back["reason"]
    assert [d.name for d in bravo.list_domains()] == []


def test_the_host_refuses_a_definition_other_than_the_one_chosen(cluster: Cluster) -> None:
    c = cluster
    dead_alpha(c)
    episode = int(c.store.hosts.host_info(ALPHA)["down_since_ms"])
    out = start_failed_over(c.store, FakeHypervisor(), BRAVO, FailoverStart("web-1", ALPHA, BRAVO, episode, "0" * 64),
                            "t1")
    assert out["started"] is False and "no longer the one kept" in out["reason"]


def test_a_libvirt_fence_destroys_the_dead_hosts_domains_and_proves_them_off() -> None:
    alpha = FakeHypervisor("fake://alpha", [DomainInfo("web-1", "u1", DomainStatus.RUNNING, "booted"),
                                            DomainInfo("web-2", "u2", DomainStatus.PAUSED, "user"),
                                            DomainInfo("web-3", "u3", DomainStatus.SHUTOFF, "destroyed")])
    result = libvirt_fence(alpha, ["web-1", "web-2", "web-3"])
    assert result.fenced and {d.status for d in alpha.list_domains()} == {DomainStatus.SHUTOFF}
    assert libvirt_fence(FakeHypervisor("fake://alpha"), ["web-1"]).fenced  # not defined there: not running there
    alpha.set_unavailable(True)
    down = libvirt_fence(alpha, ["web-1"])
    assert not down.fenced and "unavailable" in down.reason
