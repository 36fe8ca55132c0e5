"""Operators' intent in libvirt metadata (vmq.intent), from the host's inventory to the judge, on fakeredis and a
real redis-server: an opted-out VM is never restarted, opt-in mode leaves VMs without metadata alone, knobs from
the metadata apply and `vmq set` wins over them, bad metadata is audited once and the defaults apply."""

from __future__ import annotations

from dataclasses import replace

from tests.contract.test_monitor_store import HOST_A, World, make_settings
from vmq.hypervisor.fake import FakeHypervisor
from vmq.intent import Intent
from vmq.inventory import sync_inventory
from vmq.model import DomainInfo, DomainStatus, VmState
from vmq.monitor import Monitor


def listed(world: World, intents: dict[str, Intent | None]) -> FakeHypervisor:
    """HOST_A's hypervisor with these domains and their metadata, after one inventory pass."""
    fake = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo(vm, f"u-{vm}", DomainStatus.RUNNING, "booted")
                                                for vm in intents])
    for vm, intent in intents.items():
        fake.set_intent(vm, intent)
    sync_inventory(world.store, fake, HOST_A, ttl_s=60)
    return fake


def silent_after_one_answer(world: World, vm: str) -> None:
    """``vm`` answers one judged round, then misses the next one's deadline (judged by the next tick)."""
    first = world.probe()
    world.reply(vm, first)
    world.make_due(first)
    world.monitor.tick()
    assert world.state(vm) == VmState.HEALTHY.value
    world.make_due(world.probe())


def test_a_vm_whose_metadata_says_enroll_no_is_never_restarted(world: World) -> None:
    world.register("web-1")
    world.register("web-2")
    listed(world, {"web-1": Intent(enroll=False), "web-2": None})
    assert world.record("web-1")["intent.enroll"] == "no"
    silent_after_one_answer(world, "web-1")
    world.reply("web-2", world.store.rounds.current_round() - 1)
    report = world.monitor.tick()
    assert report.flagged == [] and world.dispatched == []
    assert world.state("web-1") == VmState.HEALTHY.value
    assert world.record("web-1")["decision"].startswith("not enrolled: its libvirt metadata says")


def test_opt_in_mode_judges_only_vms_whose_metadata_says_yes(world: World) -> None:
    settings = make_settings(enroll="opt-in")
    world.monitor = Monitor(world.store, settings, world.broker.dispatch)
    world.register("web-1")
    world.register("web-2")
    listed(world, {"web-1": Intent(enroll=True), "web-2": None})
    first = world.probe()
    world.reply("web-1", first)
    world.reply("web-2", first)
    world.make_due(first)
    world.monitor.tick()
    world.make_due(world.probe())  # both silent now
    report = world.monitor.tick()
    assert report.dispatched == ["web-1"], "the opted-in VM only"
    assert "the cluster enrols only VMs whose libvirt metadata says" in world.record("web-2")["decision"]


def test_a_knob_from_the_metadata_applies_and_vmq_set_wins_over_it(world: World) -> None:
    world.register("web-1")
    listed(world, {"web-1": Intent(knobs={"max_restarts": "0"})})  # metadata: no restart at all
    silent_after_one_answer(world, "web-1")
    report = world.monitor.tick()
    assert report.dispatched == [] and world.state("web-1") == VmState.FAILED.value
    assert "restart budget exhausted: 0 of 0" in world.record("web-1")["decision"]

    world.register("web-2")
    listed(world, {"web-1": Intent(knobs={"max_restarts": "0"}), "web-2": Intent(knobs={"max_restarts": "0"})})
    world.store.vms.set_policy_overrides("web-2", {"policy.max_restarts": "2"})  # `vmq set web-2 max_restarts=2`
    silent_after_one_answer(world, "web-2")
    assert world.monitor.tick().dispatched == ["web-2"]


def test_bad_metadata_is_audited_once_per_change_and_the_good_values_still_apply(world: World) -> None:
    world.register("web-1")
    bad = Intent(enroll=False, errors=("priority 'high' is not an integer from 0 to 1000",))
    fake = listed(world, {"web-1": bad})
    sync_inventory(world.store, fake, HOST_A, ttl_s=60)  # the same metadata again: no second event
    [event] = world.events("intent", vm="web-1")
    assert "priority 'high'" in event["errors"] and "enroll=no" in event["intent"]
    assert world.record("web-1")["intent.error"].startswith("priority 'high'")
    fake.set_intent("web-1", replace(bad, errors=()))  # fixed: one more event, the error cleared
    sync_inventory(world.store, fake, HOST_A, ttl_s=60)
    assert len(world.events("intent", vm="web-1")) == 2
    assert world.record("web-1").get("intent.error", "") == ""
    assert world.record("web-1")["intent.enroll"] == "no"


def test_removing_the_metadata_clears_the_intent_and_a_domain_xml_not_read_keeps_it(world: World) -> None:
    world.register("web-1")
    fake = listed(world, {"web-1": Intent(enroll=False, priority=7)})
    assert world.store.vms.record("web-1").intent == {"enroll": "no", "priority": "7"}
    fake.set_intent("web-1", None, unreadable=True)
    sync_inventory(world.store, fake, HOST_A, ttl_s=60)
    assert world.store.vms.record("web-1").intent == {"enroll": "no", "priority": "7"}, "kept: nothing was read"
    fake.set_intent("web-1", None)
    sync_inventory(world.store, fake, HOST_A, ttl_s=60)
    assert world.store.vms.record("web-1").intent == {}


def test_where_restarts_compete_under_the_per_host_limit_the_higher_priority_goes_first(world: World) -> None:
    settings = make_settings(max_concurrent_restarts_per_host=1, storm_min_vms=100)  # three silent: no storm here
    world.monitor = Monitor(world.store, settings, world.broker.dispatch)
    for vm in ("web-1", "web-2", "web-3"):
        world.register(vm)
    listed(world, {"web-1": Intent(priority=10), "web-2": None, "web-3": Intent(priority=900)})
    first = world.probe()
    for vm in ("web-1", "web-2", "web-3"):
        world.reply(vm, first)
    world.make_due(first)
    world.monitor.tick()
    world.make_due(world.probe())  # all three silent in the same round
    report = world.monitor.tick()
    assert report.dispatched == ["web-3"], "by name it would have been web-1"
    assert "host node1 already has 1 restarts in flight (limit 1)" in world.record("web-1")["decision"]


def test_the_metadatas_probe_path_is_in_force_unless_vmq_path_chose_one_and_a_change_is_audited(
        world: World) -> None:
    world.register("web-1")
    listed(world, {"web-1": Intent(probe_path="agent")})
    assert world.store.vms.record("web-1").probe_path.value == "agent"
    assert [p.probe_path.value for p in world.store.vms.placements(["web-1"])] == ["agent"], "what hosts vouch by"
    [changed] = world.events("probe_path", vm="web-1")
    assert (changed["path"], changed["previous"], changed["source"]) == ("agent", "redis", "metadata")
    world.store.vms.set_fields("web-1", {"probe_path_set": "channel"})  # `vmq path web-1 channel` wins
    assert world.store.vms.record("web-1").probe_path.value == "channel"
    assert [p.probe_path.value for p in world.store.vms.placements(["web-1"])] == ["channel"]
