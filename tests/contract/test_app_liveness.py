"""Application liveness (a responder's `[[health]]` check of kind liveness over its failure threshold), judged
as silence is, on fakeredis and a real redis-server: restarted once through its host's queue, under the same
budget and guards; a readiness failure is only reported; VMQ_APP_LIVENESS=flag only flags; a reply that says
unhealthy never heals the VM, the first one that says well again does."""

from __future__ import annotations

from typing import Any

from tests.contract.test_monitor_store import BOOT_ID, SECRET, World, make_settings
from vmq.codec import encode_reply
from vmq.model import VmState
from vmq.monitor import Monitor

FAILING = {"uptime_s": 1.0, "health": {"db": {"status": 1, "age_s": 0.5, "kind": "liveness", "failing": 3}},
           "app_unhealthy": ["db"]}
NOT_READY = {"uptime_s": 1.0, "health": {"warmup": {"status": 1, "age_s": 0.5, "kind": "readiness", "failing": 9}}}


def reply_with(world: World, vm: str, round_id: int, params: dict[str, Any]) -> None:
    message, signature = encode_reply(vm, round_id, world.nonce(round_id), BOOT_ID, round_id, params,
                                      bytes.fromhex(SECRET[vm]))
    world.send({"m": message, "s": signature})


def judged_round(world: World, vm: str, params: dict[str, Any], others: tuple[str, ...] = ("web-2",)) -> Any:
    """One round in which ``vm`` answers with ``params`` and ``others`` as usual; returns the tick that judged
    it."""
    round_id = world.probe()
    reply_with(world, vm, round_id, params)
    for other in others:
        world.reply(other, round_id)
    world.make_due(round_id)
    return world.monitor.tick()


def test_a_liveness_failure_restarts_the_vm_once_through_its_host_and_says_why(world: World) -> None:
    world.healthy("web-1", "web-2")
    report = judged_round(world, "web-1", FAILING)
    assert report.dispatched == ["web-1"] and world.dispatched[-1].host == "node1"
    [faulty] = world.events("faulty", vm="web-1")
    assert faulty["reasons"].startswith('["application unhealthy: liveness check(s) db failed their threshold')
    [noted] = world.events("app_unhealthy", vm="web-1")
    assert noted["checks"] == '["db"]'
    # Its replies still say so while the restart runs: no second restart, no heal.
    report = judged_round(world, "web-1", FAILING)
    assert report.dispatched == [] and world.state("web-1") == VmState.RESTARTING.value
    assert len(world.events("app_unhealthy", vm="web-1")) == 1, "once per episode"


def test_a_readiness_failure_is_reported_and_never_acted_on(world: World) -> None:
    world.healthy("web-1", "web-2")
    for _ in range(3):
        report = judged_round(world, "web-1", NOT_READY)
        assert report.flagged == [] and report.dispatched == []
    assert world.state("web-1") == VmState.HEALTHY.value


def test_flag_only_flags_and_a_reply_saying_unhealthy_does_not_heal_it_but_a_well_one_does(world: World) -> None:
    world.monitor = Monitor(world.store, make_settings(app_liveness="flag"), world.broker.dispatch)
    world.healthy("web-1", "web-2")
    report = judged_round(world, "web-1", FAILING)
    assert report.flagged == ["web-1"] and report.dispatched == []
    assert "flag only here (VMQ_APP_LIVENESS=flag)" in world.record("web-1")["decision"]
    judged_round(world, "web-1", FAILING)
    assert world.state("web-1") == VmState.FAULTY.value, "an unhealthy answer is no recovery"
    report = judged_round(world, "web-1", {"uptime_s": 2.0})
    assert "web-1" in report.healed and world.state("web-1") == VmState.HEALTHY.value
    assert world.store.vms.app_unhealthy() == {}


def test_liveness_failures_of_many_vms_at_once_are_held_by_the_storm_guard(world: World) -> None:
    vms = ["web-1", "web-2", "web-3"]
    world.healthy(*vms)
    round_id = world.probe()
    for vm in vms:
        reply_with(world, vm, round_id, FAILING)
    world.make_due(round_id)
    report = world.monitor.tick()
    assert sorted(report.flagged) == vms and report.dispatched == []
    assert "storm guard: 3 of 3 VMs silent in one round" in world.record("web-1")["decision"]


def test_a_guest_declares_its_own_maintenance_capped_and_never_out_of_failed(world: World) -> None:
    world.monitor = Monitor(world.store, make_settings(guest_maintenance_max_s=600), world.broker.dispatch)
    world.healthy("web-1", "web-2")
    round_id = world.probe()
    reply_with(world, "web-1", round_id, {"uptime_s": 5.0, "maintenance_for_ms": 7_200_000})  # asks for 2 h
    world.reply("web-2", round_id)
    world.tick_after_arrivals()
    record = world.record("web-1")
    assert record["state"] == VmState.MAINTENANCE.value
    [event] = world.events("maintenance", vm="web-1")
    assert event["reason"] == "guest"
    arrival = int(event["time"])
    assert int(record["maintenance_until_ms"]) == arrival + 600_000, "capped at VMQ_GUEST_MAINTENANCE_MAX_S"
    world.make_due(round_id)
    assert world.monitor.tick().flagged == []

    world.store.vms.set_fields("web-2", {"state": VmState.FAILED.value})
    round_id = world.probe()
    reply_with(world, "web-2", round_id, {"maintenance_for_ms": 60_000})
    world.tick_after_arrivals()
    assert world.state("web-2") == VmState.FAILED.value, "a guest cannot leave its quarantine"


def test_guests_cannot_declare_maintenance_where_the_cluster_says_zero(world: World) -> None:
    world.monitor = Monitor(world.store, make_settings(guest_maintenance_max_s=0), world.broker.dispatch)
    world.healthy("web-1")
    round_id = world.probe()
    reply_with(world, "web-1", round_id, {"maintenance_for_ms": 60_000})
    world.tick_after_arrivals()
    assert world.state("web-1") == VmState.HEALTHY.value
