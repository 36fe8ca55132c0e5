"""Every hypervisor signal a host reports, judged by the monitor (vmq.monitor.on_domain_event), on fakeredis and a
real redis-server: a guest watchdog that left the guest hung is acted on at once, one QEMU handled itself is
not; a pause on a disk I/O error is flagged and never restarted; the guest agent's (dis)connection is audited,
never a verdict; a panic is a crash. The words come from libvirt's own constants (vmq.hypervisor.events)."""

from __future__ import annotations

import pytest

from tests.contract.test_monitor_store import HOST_A, World
from vmq.hypervisor.types import DomainEvent, classify
from vmq.model import DomainEventKind, VmState


def event(world: World, vm: str, kind: DomainEventKind, event_word: str, detail: str) -> None:
    world.monitor.on_domain_event(vm, HOST_A, kind.value, event_word, detail)


@pytest.mark.parametrize(("words", "kind"), [
    (("watchdog", "none"), DomainEventKind.WATCHDOG), (("watchdog", "reset"), DomainEventKind.WATCHDOG),
    (("io_error", "enospc"), DomainEventKind.IO_ERROR), (("agent", "disconnected"), DomainEventKind.AGENT),
    (("crashed", "panicked"), DomainEventKind.CRASH), (("suspended", "ioerror"), DomainEventKind.PAUSED),
])
def test_the_new_signals_are_classified(words: tuple[str, str], kind: DomainEventKind) -> None:
    assert classify(DomainEvent("web-1", "u", *words)) is kind


@pytest.mark.parametrize("action", ["none", "pause", "injectnmi"])
def test_a_watchdog_that_left_the_guest_hung_restarts_it_at_once_without_waiting_for_t2(world: World,
                                                                                    action: str) -> None:
    world.healthy("web-1")
    event(world, "web-1", DomainEventKind.WATCHDOG, "watchdog", action)
    assert [r.vm for r in world.dispatched] == ["web-1"] and not world.dispatched[-1].crashed  # a reset
    [faulty] = world.events("faulty", vm="web-1")
    assert f"the guest's watchdog fired (action {action})" in faulty["reasons"]


def test_a_watchdog_reset_is_qemus_own_restart_vmq_only_starts_the_grace_over(world: World) -> None:
    world.healthy("web-1")
    before = int(world.record("web-1").get("booted_at_ms", "0"))
    event(world, "web-1", DomainEventKind.WATCHDOG, "watchdog", "reset")
    assert world.dispatched == [] and world.state("web-1") == VmState.HEALTHY.value
    assert int(world.record("web-1")["booted_at_ms"]) > before
    assert world.events("domain_event", vm="web-1")[-1]["detail"] == "reset"


def test_a_pause_on_a_full_disk_is_flagged_and_never_restarted(world: World) -> None:
    world.healthy("web-1")
    event(world, "web-1", DomainEventKind.IO_ERROR, "io_error", "enospc")
    event(world, "web-1", DomainEventKind.PAUSED, "suspended", "ioerror")  # the pause libvirt reports after it
    assert world.record("web-1")["domain_reason"] == "ioerror:enospc"
    for _ in range(3):  # silent for three rounds: flagged every time, restarted never
        world.make_due(world.probe())
        world.monitor.tick()
    assert world.dispatched == [] and world.state("web-1") == VmState.FAULTY.value
    assert "paused on a disk I/O error (ioerror:enospc): a restart frees no disk" in world.record("web-1")["decision"]
    assert world.record("web-1")["decision_action"] == "flag"


def test_the_guest_agent_coming_and_going_is_audited_and_is_never_a_verdict(world: World) -> None:
    world.healthy("web-1")
    event(world, "web-1", DomainEventKind.AGENT, "agent", "disconnected")
    assert world.dispatched == [] and world.state("web-1") == VmState.HEALTHY.value
    [audited] = world.events("domain_event", vm="web-1")
    assert (audited["kind"], audited["detail"]) == ("agent", "disconnected")


def test_a_panic_is_a_crash_judged_at_once(world: World) -> None:
    world.healthy("web-1")
    event(world, "web-1", DomainEventKind.CRASH, "crashed", "panicked")
    assert [r.vm for r in world.dispatched] == ["web-1"] and world.dispatched[-1].crashed


def test_the_listener_reads_watchdog_and_agent_numbers_as_libvirts_words() -> None:
    libvirt = pytest.importorskip("libvirt")
    from vmq.hypervisor.eventwords import constant_word

    assert constant_word("VIR_DOMAIN_EVENT_WATCHDOG_", libvirt.VIR_DOMAIN_EVENT_WATCHDOG_INJECTNMI) == "injectnmi"
    assert constant_word("VIR_DOMAIN_EVENT_WATCHDOG_", libvirt.VIR_DOMAIN_EVENT_WATCHDOG_RESET) == "reset"
    state = libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED
    assert constant_word("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_", state) == "disconnected"
    assert constant_word("VIR_DOMAIN_EVENT_WATCHDOG_", 999) == "unknown"
