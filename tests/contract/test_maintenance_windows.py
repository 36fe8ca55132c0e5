"""Timed maintenance windows end by themselves, found through their noted ends (not by reading every VM that
needs attention), including windows set before ends were noted. On fakeredis and a real redis-server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tests.contract.test_monitor_store import World
from vmq import lifecycle
from vmq.model import VmRecord, VmState
from vmq.monitor import Monitor


def in_maintenance(world: World, vm: str, for_ms: int) -> int:
    world.register(vm)
    until = world.store.clock.time_ms() + for_ms
    assert lifecycle.maintenance_on(world.store.vms, world.store.vms.record(vm), world.store.clock.time_ms(),
                                    until).applied
    return until


def test_a_timed_window_ends_by_itself_and_its_noted_end_is_dropped(world: World) -> None:
    until = in_maintenance(world, "web-1", 50)
    assert world.store.vms.maintenance_ends_due(until) == [("web-1", until)]
    world.monitor.tick()
    assert world.state("web-1") == VmState.MAINTENANCE.value, "not before its end"
    world.wait_past(until)
    world.monitor.tick()
    assert world.state("web-1") == VmState.UNKNOWN.value
    [ended] = world.events("maintenance_ended", "web-1")
    assert ended["reason"] == "maintenance window expired"
    assert world.store.vms.maintenance_ends_due(until + 10_000) == []


def test_a_window_lifted_early_or_replaced_is_not_ended_twice(world: World) -> None:
    first = in_maintenance(world, "web-1", 30)
    lifecycle.maintenance_off(world.store.vms, world.store.vms.record("web-1"), world.store.clock.time_ms())
    second = world.store.clock.time_ms() + 60_000  # a new, longer window
    assert lifecycle.maintenance_on(world.store.vms, world.store.vms.record("web-1"),
                                    world.store.clock.time_ms(), second).applied
    world.wait_past(first)
    world.monitor.tick()
    assert world.state("web-1") == VmState.MAINTENANCE.value, "the first window's end does not end the second"
    assert len(world.events("maintenance_ended", "web-1")) == 1  # the operator's lift only
    assert world.store.vms.maintenance_ends_due(second) == [("web-1", second)]


def test_a_window_set_before_ends_were_noted_is_found_once_per_monitor_process(world: World) -> None:
    world.register("web-1")
    until = world.store.clock.time_ms() + 20
    # as an older vmq left it: the state and the window in the record, no noted end
    world.store.vms.write_many({"web-1": {"state": VmState.MAINTENANCE.value, "maintenance_until_ms": until}})
    world.client.sadd(world.keys.attention, "web-1")
    world.wait_past(until)
    Monitor(world.store, world.settings, world.broker.dispatch).tick()
    assert world.state("web-1") == VmState.UNKNOWN.value


class CountingVms:
    """The store's VM records, counting how many records each read asks for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: list[int] = []

    def records(self, vms: Sequence[str]) -> list[VmRecord]:
        self.reads.append(len(vms))
        return self.inner.records(vms)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_tick_reads_no_records_for_maintenance_however_many_vms_need_attention(world: World) -> None:
    pipe = world.client.pipeline(transaction=False)
    for i in range(2500):  # a cold start: every VM unknown, all of them needing attention
        pipe.hset(world.keys.vm(f"vm-{i}"), mapping={"state": "unknown", "generation": 0})
        pipe.sadd(world.keys.attention, f"vm-{i}")
    pipe.execute()
    counting = CountingVms(world.store.vms)
    world.store.vms = counting  # type: ignore[misc]
    monitor = Monitor(world.store, world.settings, world.broker.dispatch)
    monitor.tick()
    assert counting.reads and max(counting.reads) <= 1000, "the one-time noting pass reads in chunks"
    counting.reads.clear()
    monitor.tick()
    assert sum(counting.reads) == 0, f"a later tick read {counting.reads} records"
