"""vmq.hostagent: which lifecycle events a host reports, and the muting of its own actions' events
(pure: a fake clock, a recording report_event, no Celery, no libvirt)."""

from __future__ import annotations

import pytest

from vmq.config import load_settings
from vmq.errors import StoreUnavailable
from vmq.hostagent import OWN_EVENTS_S, HostAgent, OwnActions
from vmq.hypervisor.fake import FakeHypervisor
from vmq.hypervisor.types import DomainEvent
from vmq.model import REPORTED_EVENT_KINDS, DomainEventKind


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _agent(clock: Clock, reported: list[tuple[str, ...]], store: object = None) -> HostAgent:
    def report(vm: str, host: str, kind: str, event: str, detail: str) -> None:
        reported.append((vm, host, kind, event, detail))

    return HostAgent(load_settings({"host_name": "node1"}), lambda: store,  # type: ignore[arg-type,return-value]
                     lambda: FakeHypervisor(), report, clock=clock)


def test_events_of_a_vm_being_acted_on_are_muted_during_the_action_and_for_a_while_after() -> None:
    clock = Clock()
    own = OwnActions(clock)
    assert not own.is_own("web-1")
    with own.acting("web-1"):
        clock.now += 600  # a slow restart
        assert own.is_own("web-1") and not own.is_own("web-2")
    clock.now += OWN_EVENTS_S - 0.1
    assert own.is_own("web-1")
    clock.now += 0.2
    assert not own.is_own("web-1")


def test_an_action_that_fails_still_mutes_its_late_events_and_then_stops_muting() -> None:
    clock = Clock()
    own = OwnActions(clock)
    with pytest.raises(RuntimeError), own.acting("web-1"):
        raise RuntimeError("libvirt said no")
    assert own.is_own("web-1")
    clock.now += OWN_EVENTS_S + 0.1
    assert not own.is_own("web-1")


def test_an_action_that_never_ends_stops_muting_after_the_hold() -> None:
    clock = Clock()
    own = OwnActions(clock, hold_s=3600.0)
    with own.acting("web-1"):
        clock.now += 3600.1
        assert not own.is_own("web-1")


def test_the_host_reports_every_kind_but_other() -> None:
    assert REPORTED_EVENT_KINDS == set(DomainEventKind) - {DomainEventKind.OTHER}
    assert {kind.value for kind in REPORTED_EVENT_KINDS} == {
        "crash", "operator_stop", "migrating_away", "paused", "resumed", "started", "watchdog", "io_error", "agent"}


@pytest.mark.parametrize(("event", "detail", "reported"), [
    ("stopped", "crashed", "crash"),
    ("stopped", "destroyed", "operator_stop"),
    ("suspended", "migrated", "migrating_away"),
    ("suspended", "paused", "paused"),
    ("resumed", "unpaused", "resumed"),
    ("started", "booted", "started"),
    ("watchdog", "none", "watchdog"),
    ("io_error", "enospc", "io_error"),
    ("agent", "connected", "agent"),
    ("defined", "added", None),
    ("undefined", "removed", None),
    ("pmsuspended", "memory", None),
])
def test_a_lifecycle_event_is_reported_with_its_kind_as_a_plain_string_unless_it_is_noise(
        event: str, detail: str, reported: str | None) -> None:
    sent: list[tuple[str, ...]] = []
    agent = _agent(Clock(), sent)
    agent.on_event(DomainEvent("web-1", "uuid", event, detail))
    assert sent == ([] if reported is None else [("web-1", "node1", reported, event, detail)])
    assert all(type(kind) is str for _, _, kind, _, _ in sent)  # JSON on the wire, audit fields


def test_events_caused_by_the_hosts_own_restart_are_not_reported_but_later_ones_are() -> None:
    clock = Clock()
    sent: list[tuple[str, ...]] = []
    agent = _agent(clock, sent)
    crash = DomainEvent("web-1", "uuid", "stopped", "crashed")
    with agent.acting("web-1"):
        agent.on_event(DomainEvent("web-1", "uuid", "stopped", "destroyed"))
        agent.on_event(DomainEvent("web-2", "uuid", "stopped", "crashed"))  # another VM: reported
    agent.on_event(DomainEvent("web-1", "uuid", "started", "booted"))  # libvirt a little late: still ours
    assert [s[0] for s in sent] == ["web-2"]
    clock.now += OWN_EVENTS_S + 1
    agent.on_event(crash)
    assert sent[-1] == ("web-1", "node1", "crash", "stopped", "crashed")


class _DownPart:
    """One part of a store whose Redis is gone: every call raises."""

    def __getattr__(self, name: str) -> object:
        def fail(*_: object, **__: object) -> None:
            raise StoreUnavailable("redis is down")
        return fail


class _DownStore:
    """A store whose Redis is gone: every part's every call raises."""

    def __getattr__(self, name: str) -> object:
        return _DownPart()


def test_a_failed_step_never_raises_and_says_the_sync_is_still_due() -> None:
    agent = _agent(Clock(), [], store=_DownStore())
    assert agent.step(sync_due=True) is False
    assert agent.step(sync_due=False) is False


def test_stop_without_redis_does_not_raise() -> None:
    agent = _agent(Clock(), [], store=_DownStore())
    agent.stop()
    assert agent.stop_event.is_set()
