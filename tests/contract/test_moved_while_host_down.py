"""Issue 18's defect, on fakeredis and a real redis-server: a VM started on another host while its own host's
worker is dead must be judged where its record now places it. Before: it stayed `unreachable` for ever (valid
replies did not heal it, `vmq clear` refused it, its hangs were never detected)."""

from __future__ import annotations

from tests.contract.test_monitor_store import HOST_A, HOST_B, World
from vmq import lifecycle
from vmq.model import VmState


def unreachable_then_moved(world: World) -> None:
    """web-1 answered on HOST_A; HOST_A's worker died (web-1 unreachable); an operator started it on HOST_B,
    whose listing moved the record there."""
    world.healthy("web-1", "web-2")
    rec = world.store.vms.record("web-1")
    assert lifecycle.mark_unreachable(world.store.vms, rec, world.store.clock.time_ms(), HOST_A,
                                      f"host {HOST_A} is down").applied
    world.heartbeat(HOST_B)
    world.store.vms.write_many({"web-1": {"host": HOST_B}})


def test_a_vm_that_answers_on_a_live_host_is_judged_there_again_and_its_hang_restarted_there(world: World) -> None:
    unreachable_then_moved(world)
    first = world.probe()
    world.reply("web-1", first)
    world.reply("web-2", first)
    world.tick_after_arrivals()
    assert world.state("web-1") == VmState.UNKNOWN.value
    [event] = world.events("reachable", vm="web-1")
    assert "answers on node2, which is up" in event["reason"]
    world.make_due(first)
    world.monitor.tick()
    second = world.probe()
    world.reply("web-1", second)
    world.reply("web-2", second)
    world.make_due(second)
    world.monitor.tick()
    assert world.state("web-1") == VmState.HEALTHY.value
    third = world.probe()  # web-1 hangs on node2
    world.reply("web-2", third)
    world.make_due(third)
    report = world.monitor.tick()
    assert report.dispatched == ["web-1"] and world.dispatched[-1].host == HOST_B


def test_a_vm_whose_record_still_names_the_down_host_stays_unreachable(world: World) -> None:
    world.healthy("web-1", "web-2")
    rec = world.store.vms.record("web-1")
    lifecycle.mark_unreachable(world.store.vms, rec, world.store.clock.time_ms(), HOST_A, "down")
    world.store.hosts.heartbeat(HOST_A, {"seen_ms": 0}, 1)  # expired
    world.wait_past(world.store.clock.time_ms() + 5)
    round_id = world.probe()
    world.reply("web-1", round_id)  # answers (a partition: its host's worker is cut off, not its guest)
    world.tick_after_arrivals()
    assert world.state("web-1") == VmState.UNREACHABLE.value
