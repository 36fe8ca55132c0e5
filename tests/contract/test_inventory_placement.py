"""Which host a VM record names when its domain is listed by several hosts, on fakeredis and a real Redis.

Two inventory agents report at the same moment in production. ``_ReportLandsMidSync`` makes the worst
interleaving deterministic: the other host's whole sync runs after this host's sync has read the records and
before it writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.contract.test_monitor_store import HOST_A, HOST_B, World
from vmq.hypervisor.fake import FakeHypervisor
from vmq.inventory import sync_inventory
from vmq.model import AGENT_CHANNEL, RESPONDER_CHANNEL, DomainInfo, DomainStatus, ProbePath
from vmq.store.redis import RedisStore
from vmq.store.vms import RedisVms

TTL_S = 30


class _ReportLandsMidSync(RedisVms):
    """VM records whose first write of a sync is preceded by ``other`` (another host's complete sync)."""

    def __init__(self, world: World, other: Callable[[], object]) -> None:
        super().__init__(world.backend.client(), world.keys)
        self._other: Callable[[], object] | None = other

    def _other_host_reports(self) -> None:
        if self._other is not None:
            other, self._other = self._other, None
            other()

    def write_many(self, updates: Any) -> None:
        self._other_host_reports()
        super().write_many(updates)

    def place_domains(self, *args: Any, **kwargs: Any) -> Any:
        self._other_host_reports()
        return super().place_domains(*args, **kwargs)


def racing_store(world: World, other: Callable[[], object]) -> RedisStore:
    """A store on ``world``'s data whose VM records let ``other`` run just before their first write."""
    store = RedisStore(world.backend.client(), world.keys)
    store.vms = _ReportLandsMidSync(world, other)
    return store


def node(host: str, status: DomainStatus, vm: str = "web-1") -> FakeHypervisor:
    return FakeHypervisor(f"fake://{host}", [DomainInfo(vm, "u-1", status, status.value)])


def placement(world: World, vm: str = "web-1") -> tuple[str, str]:
    record = world.record(vm)
    return record.get("host", ""), record.get("domain_status", "")


def test_a_running_hosts_first_report_landing_inside_a_shut_off_hosts_first_sync_keeps_the_vm(world: World) -> None:
    runs, defined = node(HOST_A, DomainStatus.RUNNING), node(HOST_B, DomainStatus.SHUTOFF)
    racing = racing_store(world, lambda: sync_inventory(world.store, runs, HOST_A, TTL_S))
    sync_inventory(racing, defined, HOST_B, TTL_S)
    assert placement(world) == (HOST_A, "running")
    for _ in range(3):  # the shut-off definition keeps reporting; the running host keeps the VM
        sync_inventory(world.store, defined, HOST_B, TTL_S)
        assert placement(world) == (HOST_A, "running")
        sync_inventory(world.store, runs, HOST_A, TTL_S)
    assert world.events("migrated") == []


def test_a_shut_off_host_reporting_first_then_the_running_host_then_it_again_leaves_the_vm_running(
        world: World) -> None:
    runs, defined = node(HOST_A, DomainStatus.RUNNING), node(HOST_B, DomainStatus.SHUTOFF)
    sync_inventory(world.store, defined, HOST_B, TTL_S)
    assert placement(world) == (HOST_B, "shutoff")  # all vmq knows so far
    sync_inventory(world.store, runs, HOST_A, TTL_S)
    assert placement(world) == (HOST_A, "running")
    for _ in range(3):
        sync_inventory(world.store, defined, HOST_B, TTL_S)
        assert placement(world) == (HOST_A, "running")
    assert world.events("migrated") == []  # a start-up claim by a stale definition is no migration


def test_a_host_whose_domain_vanished_does_not_mark_absent_a_vm_the_other_host_just_took(world: World) -> None:
    sync_inventory(world.store, node(HOST_A, DomainStatus.RUNNING), HOST_A, TTL_S)
    gone = FakeHypervisor(f"fake://{HOST_A}", [])  # migrated away and undefined on A
    arrived = node(HOST_B, DomainStatus.RUNNING)
    racing = racing_store(world, lambda: sync_inventory(world.store, arrived, HOST_B, TTL_S))
    sync_inventory(racing, gone, HOST_A, TTL_S)
    assert placement(world) == (HOST_B, "running")
    assert [e["previous_host"] for e in world.events("migrated")] == [HOST_A]


def test_a_vm_shut_off_on_two_live_hosts_stays_where_it_was_until_its_host_dies(world: World) -> None:
    off_a, off_b = node(HOST_A, DomainStatus.SHUTOFF), node(HOST_B, DomainStatus.SHUTOFF)
    sync_inventory(world.store, off_a, HOST_A, TTL_S)
    for _ in range(3):  # no flapping between two equally stale definitions
        sync_inventory(world.store, off_b, HOST_B, TTL_S)
        assert placement(world) == (HOST_A, "shutoff")
        sync_inventory(world.store, off_a, HOST_A, TTL_S)
        assert placement(world) == (HOST_A, "shutoff")
    world.store.hosts.drop_heartbeat(HOST_A)  # A is gone: B's definition is the one vmq can still see
    sync_inventory(world.store, off_b, HOST_B, TTL_S)
    assert placement(world) == (HOST_B, "shutoff")


def test_a_shut_off_definition_never_takes_a_vm_that_ran_on_a_host_that_went_silent(world: World) -> None:
    """Issue 18's race: the host worker of the host running the VM dies (its heartbeat expires, the host may well
    be running it still) and another host lists a shut-off definition of it: the record stays where the VM ran,
    so the sweep marks it `unreachable` there, never "shut off on the other host"."""
    sync_inventory(world.store, node(HOST_A, DomainStatus.RUNNING), HOST_A, TTL_S)
    world.store.hosts.drop_heartbeat(HOST_A)
    for _ in range(2):
        sync_inventory(world.store, node(HOST_B, DomainStatus.SHUTOFF), HOST_B, TTL_S)
        assert placement(world) == (HOST_A, "running")
    sync_inventory(world.store, node(HOST_B, DomainStatus.RUNNING), HOST_B, TTL_S)  # started there: it moves
    assert placement(world) == (HOST_B, "running")


def test_a_shut_off_definition_takes_over_a_vm_whose_recorded_domain_vanished_from_its_live_host(
        world: World) -> None:
    sync_inventory(world.store, node(HOST_A, DomainStatus.SHUTOFF), HOST_A, TTL_S)
    sync_inventory(world.store, FakeHypervisor(f"fake://{HOST_A}", []), HOST_A, TTL_S)  # undefined on A
    assert placement(world) == (HOST_A, "absent")
    sync_inventory(world.store, node(HOST_B, DomainStatus.SHUTOFF), HOST_B, TTL_S)
    assert placement(world) == (HOST_B, "shutoff")


def copy(host: str, status: DomainStatus, reason: str, vm: str = "web-1") -> FakeHypervisor:
    """``host``'s copy of the domain in ``status`` for ``reason`` (vmq.hypervisor.libvirt's words)."""
    return FakeHypervisor(f"fake://{host}", [DomainInfo(vm, "u-1", status, reason)])


def test_a_live_migration_moves_the_vm_once_when_the_destination_runs(world: World) -> None:
    """libvirt starts the destination's copy paused ("migration") while memory is copied in, then runs it
    ("migrated") and pauses the source's ("migration") before shutting it off ("migrated") or undefining
    it. Every host keeps reporting on its own interval; both copies are active for the whole migration."""
    source, destination = HOST_A, HOST_B
    sync_inventory(world.store, copy(source, DomainStatus.RUNNING, "booted"), source, TTL_S)
    steps = [
        (destination, copy(destination, DomainStatus.PAUSED, "migration")),  # incoming, source still running
        (source, copy(source, DomainStatus.RUNNING, "booted")),
        (destination, copy(destination, DomainStatus.PAUSED, "migration")),
    ]
    for host, hypervisor in steps:
        sync_inventory(world.store, hypervisor, host, TTL_S)
        assert placement(world) == (source, "running")
    sync_inventory(world.store, copy(destination, DomainStatus.RUNNING, "migrated"), destination, TTL_S)
    assert placement(world) == (destination, "running")
    for host, hypervisor in [
        (source, copy(source, DomainStatus.PAUSED, "migration")),  # the source's copy at the switch-over
        (destination, copy(destination, DomainStatus.RUNNING, "migrated")),
        (source, copy(source, DomainStatus.SHUTOFF, "migrated")),
        (source, FakeHypervisor(f"fake://{source}", [])),  # undefined on the source
    ]:
        sync_inventory(world.store, hypervisor, host, TTL_S)
        assert placement(world) == (destination, "running")
    assert [e["previous_host"] for e in world.events("migrated")] == [source]


def test_a_post_copy_migration_moves_the_vm_when_the_destination_runs_and_the_paused_source_does_not_take_it_back(
        world: World) -> None:
    sync_inventory(world.store, copy(HOST_A, DomainStatus.RUNNING, "booted"), HOST_A, TTL_S)
    sync_inventory(world.store, copy(HOST_B, DomainStatus.RUNNING, "postcopy"), HOST_B, TTL_S)
    assert placement(world) == (HOST_B, "running")
    for reason in ("postcopy", "postcopy_failed"):
        sync_inventory(world.store, copy(HOST_A, DomainStatus.PAUSED, reason), HOST_A, TTL_S)
        assert placement(world) == (HOST_B, "running")
    assert len(world.events("migrated")) == 1


def test_an_incoming_migration_copy_takes_the_vm_from_a_host_that_is_gone(world: World) -> None:
    sync_inventory(world.store, copy(HOST_A, DomainStatus.RUNNING, "booted"), HOST_A, TTL_S)
    world.store.hosts.drop_heartbeat(HOST_A)  # the source died mid-migration: the paused copy is all that is left
    sync_inventory(world.store, copy(HOST_B, DomainStatus.PAUSED, "migration"), HOST_B, TTL_S)
    assert placement(world) == (HOST_B, "paused")


def test_a_copy_paused_for_another_reason_still_takes_the_vm_like_any_active_domain(world: World) -> None:
    sync_inventory(world.store, copy(HOST_A, DomainStatus.RUNNING, "booted"), HOST_A, TTL_S)
    sync_inventory(world.store, copy(HOST_B, DomainStatus.PAUSED, "user"), HOST_B, TTL_S)
    assert placement(world) == (HOST_B, "paused")  # active on B: the move is seen, as before


def test_a_source_listing_from_before_the_switch_over_landing_after_the_destinations_leaves_the_vm_there(
        world: World) -> None:
    sync_inventory(world.store, copy(HOST_A, DomainStatus.RUNNING, "booted"), HOST_A, TTL_S)
    switched = copy(HOST_B, DomainStatus.RUNNING, "migrated")
    # A listed its copy running just before the switch-over; B's whole sync lands before A writes.
    racing = racing_store(world, lambda: sync_inventory(world.store, switched, HOST_B, TTL_S))
    sync_inventory(racing, copy(HOST_A, DomainStatus.RUNNING, "booted"), HOST_A, TTL_S)
    assert placement(world) == (HOST_B, "running")
    assert [e["previous_host"] for e in world.events("migrated")] == [HOST_A]  # one move, no move back
    sync_inventory(world.store, copy(HOST_A, DomainStatus.SHUTOFF, "migrated"), HOST_A, TTL_S)  # A's next
    assert placement(world) == (HOST_B, "running")


@pytest.mark.parametrize(("channels", "detect", "expected"), [
    ((AGENT_CHANNEL,), True, ProbePath.AGENT),
    ((AGENT_CHANNEL, RESPONDER_CHANNEL), True, ProbePath.CHANNEL),
    ((), True, ProbePath.REDIS),
    ((AGENT_CHANNEL,), False, ProbePath.REDIS),  # VMQ_PROBE_PATH_DETECT off: only `vmq path` moves a VM
])
def test_the_inventory_records_each_domains_channels_and_the_path_they_allow(
        world: World, channels: tuple[str, ...], detect: bool, expected: ProbePath) -> None:
    host = node(HOST_A, DomainStatus.RUNNING)
    host.set_channels("web-1", dict.fromkeys(channels))
    sync_inventory(world.store, host, HOST_A, TTL_S, detect_paths=detect)
    record = world.store.vms.record("web-1")
    assert (record.probe_path_detected, record.probe_path) == (expected, expected)
    assert world.record("web-1")["channels"] == ",".join(channels)
    world.store.vms.set_fields("web-1", {"probe_path_set": "redis"})  # the operator's choice wins
    sync_inventory(world.store, host, HOST_A, TTL_S, detect_paths=detect)
    assert world.store.vms.record("web-1").probe_path is ProbePath.REDIS


def test_a_detected_path_change_is_audited_and_owes_answers_only_after_the_grace(world: World) -> None:
    host = node(HOST_A, DomainStatus.RUNNING)
    sync_inventory(world.store, host, HOST_A, TTL_S, detect_paths=True)  # no channels yet: redis
    world.store.vms.write_many({"web-1": {"monitored_since_ms": "1"}})
    before = world.store.clock.time_ms()
    host.set_channels("web-1", {AGENT_CHANNEL: None})  # the operator added qemu-ga's channel
    report = sync_inventory(world.store, host, HOST_A, TTL_S, detect_paths=True)
    assert report.path_changed == ["web-1"]
    record = world.store.vms.record("web-1")
    assert record.probe_path is ProbePath.AGENT and record.monitored_since_ms >= before
    [event] = world.events("probe_path")
    assert (event["path"], event["previous"], event["source"]) == ("agent", "redis", "detected")
    assert sync_inventory(world.store, host, HOST_A, TTL_S, detect_paths=True).path_changed == [], "once"
    world.store.vms.set_fields("web-1", {"probe_path_set": "agent"})
    host.set_channels("web-1", {})
    assert sync_inventory(world.store, host, HOST_A, TTL_S, detect_paths=True).path_changed == [], (
        "an operator's choice pins the path: detection does not move it")


# ---------------------------------------------------------------- what a failover needs from each host (issue 18)
def test_the_inventory_keeps_active_domains_definitions_when_they_change_and_reports_capacity(world: World) -> None:
    alpha = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted"),
                                                DomainInfo("web-2", "u-2", DomainStatus.SHUTOFF, "shutdown")])
    report = sync_inventory(world.store, alpha, HOST_A, TTL_S, lock=(True, "virtlockd answers"))
    assert report.definitions_kept == ["web-1"]  # only what runs here can be failed over from here
    kept = world.store.failovers.definitions(HOST_A, ["web-1", "web-2"])
    assert set(kept) == {"web-1"} and "<name>web-1</name>" in kept["web-1"]["xml"]
    info = world.store.hosts.host_info(HOST_A)
    assert (info["cpus"], info["memory_mib"], info["vcpus_used"], info["memory_used_mib"], info["lock_ok"]) == \
        ("16", "65536", "1", "1024", "1")
    assert sync_inventory(world.store, alpha, HOST_A, TTL_S).definitions_kept == []  # unchanged: not rewritten
    assert world.store.hosts.host_info(HOST_A)["lock_ok"] == "0"  # the lock manager's state as last reported

    gone = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo("web-2", "u-2", DomainStatus.SHUTOFF, "shutdown")])
    sync_inventory(world.store, gone, HOST_A, TTL_S)
    assert world.store.failovers.definitions(HOST_A, ["web-1"]) == {}  # undefined here: forgotten


def test_a_definition_with_a_password_in_clear_is_kept_without_it() -> None:
    from vmq.hypervisor.xmldesc import scrub_definition

    xml = "<domain><name>a</name><devices><graphics type='vnc' passwd='hunter2' port='-1'/></devices></domain>"
    assert "hunter2" not in scrub_definition(xml) and "graphics" in scrub_definition(xml)
    assert scrub_definition("<domain><name>a</name></domain>") == "<domain><name>a</name></domain>"
