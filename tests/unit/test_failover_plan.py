"""The failover plan (vmq.failover.plan_failover) as a table: what starts where, in what order, what is refused
and why, and when the whole incident is held."""

from __future__ import annotations

import pytest

from vmq.failover import Candidate, FailoverPlan, Refusal, Start, Target, plan_failover

DEAD = "alpha"


def vm(name: str, priority: int = 0, memory: int = 1024, vcpus: int = 1, **changes: object) -> Candidate:
    fields: dict[str, object] = {"state": "unreachable", "failover": True, "has_definition": True}
    fields.update(changes)
    return Candidate(name, priority=priority, memory_mib=memory, vcpus=vcpus, **fields)  # type: ignore[arg-type]


def host(name: str, memory: int = 8192, vcpus: int = 8, **changes: object) -> Target:
    return Target(name, alive=bool(changes.pop("alive", True)), free_memory_mib=memory, free_vcpus=vcpus,
                  **changes)  # type: ignore[arg-type]


def plan(candidates: list[Candidate], targets: list[Target], fenced: bool = True, enabled: bool = True,
         total: int = 4, silent: int = 1) -> FailoverPlan:
    return plan_failover(DEAD, fenced, "fence_ipmilan: off" if fenced else "fence_ipmilan off exited 1", enabled,
                         candidates, targets, total, silent)


@pytest.mark.parametrize(("kwargs", "held"), [
    ({"enabled": False}, "failover is off"),
    ({"fenced": False}, "alpha is not proven off: fence_ipmilan off exited 1"),
    ({"total": 4, "silent": 3}, "3 of 4 hosts are silent at once"),
])
def test_the_whole_incident_is_held_without_proof_or_with_most_hosts_silent(kwargs: dict[str, object],
                                                                           held: str) -> None:
    result = plan([vm("web-1")], [host("bravo")], **kwargs)  # type: ignore[arg-type]
    assert held in result.held and result.starts == () and result.refused == ()


def test_highest_priority_first_each_on_the_emptiest_host_that_fits() -> None:
    result = plan([vm("web-1", priority=10, memory=4096), vm("db-1", priority=900, memory=6144),
                   vm("web-2", priority=10, memory=2048)],
                  [host("bravo", memory=8192), host("charlie", memory=6144)])
    assert result.held == ""
    assert result.starts == (Start("db-1", "bravo"), Start("web-1", "charlie"), Start("web-2", "bravo"))


@pytest.mark.parametrize(("candidate", "reason"), [
    (vm("web-1", failover=False), "failover is not enabled for it"),
    (vm("web-1", state="failed"), "its state is failed, not unreachable"),
    (vm("web-1", state="healthy"), "its state is healthy, not unreachable"),
    (vm("web-1", has_definition=False), "vmq keeps no domain definition of it"),
    (vm("web-1", memory=65536), ("no surviving host has 65536 MiB and 1 vCPUs free (most memory free: 8192 MiB on "
                                "bravo; most vCPUs free: 8 on bravo, VMQ_FAILOVER_CPU_OVERCOMMIT)")),
    (vm("web-1", vcpus=16), ("no surviving host has 1024 MiB and 16 vCPUs free (most memory free: 8192 MiB on bravo; "
                            "most vCPUs free: 8 on bravo, VMQ_FAILOVER_CPU_OVERCOMMIT)")),
])
def test_a_vm_is_refused_with_its_reason(candidate: Candidate, reason: str) -> None:
    result = plan([candidate, vm("web-2")], [host("bravo")])
    assert result.refused == (Refusal("web-1", reason),) and result.starts == (Start("web-2", "bravo"),)


def test_only_live_safe_hosts_outside_maintenance_take_vms_and_never_the_dead_one() -> None:
    targets = [host(DEAD, memory=99999), host("bravo", alive=False, memory=99999),
               host("charlie", maintenance=True, memory=99999), host("delta", degraded=True, memory=99999),
               host("echo", failover_safe=False, memory=99999), host("foxtrot", memory=2048)]
    result = plan([vm("web-1", memory=1024), vm("web-2", memory=2048)], targets, total=6)
    assert result.starts == (Start("web-1", "foxtrot"),)
    assert result.refused == (Refusal("web-2", "no surviving host has 2048 MiB and 1 vCPUs free (most memory free: "
                                               "1024 MiB on foxtrot; most vCPUs free: 7 on foxtrot, "
                                               "VMQ_FAILOVER_CPU_OVERCOMMIT) (not failover-safe, lock manager not "
                                               "running: echo)"),)


def test_capacity_is_used_up_as_the_plan_goes() -> None:
    result = plan([vm(f"vm-{i}", memory=3000) for i in range(4)], [host("bravo", memory=6000),
                                                                   host("charlie", memory=3000)])
    assert [s.host for s in result.starts] == ["bravo", "charlie", "bravo"]  # ties: more vCPUs free, then name
    assert [r.vm for r in result.refused] == ["vm-3"]
