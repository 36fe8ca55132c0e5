"""Lifecycle events: ``classify`` and ``event_words`` as tables, and LifecycleListener on libvirt's test
driver (events within 1 s, one shared connection, reconnects, failing callbacks, unreachable hosts)."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.hypervisor_world import HOST, OFF, PAUSED, RUNNING, WORLD, libvirt_only
from vmq.hypervisor.types import METADATA_EVENT, DomainEvent, classify
from vmq.model import DomainStatus
from vmq.sim.testnode import stable_uuid, write_node

REPO_ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = "qemu+tcp://127.0.0.1:1/system"
EVENT_DEADLINE_S = 1.0



# -- classify and event_words ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "detail", "kind"),
    [
        ("stopped", "crashed", "crash"),
        ("stopped", "failed", "crash"),
        ("crashed", "panicked", "crash"),
        ("crashed", "crashloaded", "crash"),
        ("stopped", "destroyed", "operator_stop"),
        ("stopped", "shutdown", "operator_stop"),
        ("stopped", "saved", "operator_stop"),
        ("stopped", "from_snapshot", "operator_stop"),
        ("shutdown", "finished", "operator_stop"),
        ("shutdown", "guest", "operator_stop"),
        ("shutdown", "host", "operator_stop"),
        ("stopped", "migrated", "migrating_away"),
        ("suspended", "migrated", "migrating_away"),
        ("suspended", "postcopy", "migrating_away"),
        ("suspended", "paused", "paused"),
        ("suspended", "ioerror", "paused"),
        ("suspended", "watchdog", "paused"),
        ("suspended", "api_error", "paused"),
        ("suspended", "postcopy_failed", "paused"),
        ("resumed", "unpaused", "resumed"),
        ("resumed", "migrated", "resumed"),
        ("started", "booted", "started"),
        ("started", "migrated", "started"),
        ("started", "wakeup", "started"),
        ("stopped", "unknown", "other"),
        ("defined", "added", "other"),
        ("undefined", "removed", "other"),
        ("pmsuspended", "memory", "other"),
        ("unknown", "unknown", "other"),
    ],
)
def test_classify_says_what_an_event_means_for_vmq(event: str, detail: str, kind: str) -> None:
    assert classify(DomainEvent("vm", stable_uuid("vm"), event, detail)) == kind


@libvirt_only
@pytest.mark.parametrize(
    ("event", "detail", "words"),
    [
        ("VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_DESTROYED", ("stopped", "destroyed")),
        ("VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_FAILED", ("stopped", "failed")),
        ("VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT", ("stopped", "from_snapshot")),
        ("VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_PAUSED", ("suspended", "paused")),
        ("VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR", ("suspended", "api_error")),
        ("VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY", ("suspended", "postcopy")),
        ("VIR_DOMAIN_EVENT_RESUMED", "VIR_DOMAIN_EVENT_RESUMED_UNPAUSED", ("resumed", "unpaused")),
        ("VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_WAKEUP", ("started", "wakeup")),
        ("VIR_DOMAIN_EVENT_SHUTDOWN", "VIR_DOMAIN_EVENT_SHUTDOWN_HOST", ("shutdown", "host")),
        ("VIR_DOMAIN_EVENT_PMSUSPENDED", "VIR_DOMAIN_EVENT_PMSUSPENDED_DISK", ("pmsuspended", "disk")),
        ("VIR_DOMAIN_EVENT_CRASHED", "VIR_DOMAIN_EVENT_CRASHED_PANICKED", ("crashed", "panicked")),
        ("VIR_DOMAIN_EVENT_DEFINED", "VIR_DOMAIN_EVENT_DEFINED_ADDED", ("defined", "added")),
        ("VIR_DOMAIN_EVENT_UNDEFINED", "VIR_DOMAIN_EVENT_UNDEFINED_REMOVED", ("undefined", "removed")),
    ],
)
def test_event_words_name_libvirts_numbers(event: str, detail: str, words: tuple[str, str]) -> None:
    import libvirt

    from vmq.hypervisor.events import event_words

    assert event_words(getattr(libvirt, event), getattr(libvirt, detail)) == words


@libvirt_only
def test_event_words_say_unknown_for_numbers_libvirt_adds_later() -> None:
    import libvirt

    from vmq.hypervisor.events import event_words

    assert event_words(libvirt.VIR_DOMAIN_EVENT_STOPPED, 999) == ("stopped", "unknown")
    assert event_words(999, 0) == ("unknown", "unknown")


def test_importing_the_events_module_does_not_import_libvirt() -> None:
    code = (
        "import sys\n"
        "from vmq.hypervisor.events import DomainEvent, LifecycleListener, classify\n"
        "assert classify(DomainEvent('vm', 'u', 'stopped', 'crashed')) == 'crash'\n"
        "assert 'libvirt' not in sys.modules, 'libvirt imported'\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr


def test_a_listener_refuses_a_backoff_that_does_not_grow_from_a_positive_start() -> None:
    from vmq.hypervisor.events import LifecycleListener

    for backoff in [(0.0, 1.0), (2.0, 1.0)]:
        with pytest.raises(ValueError, match="reconnect_backoff_s"):
            LifecycleListener(UNREACHABLE, lambda event: None, reconnect_backoff_s=backoff)


# -- the listener on the test driver -----------------------------------------------------------------------


class Recorder:
    """Collects events and states from a listener's callbacks, and waits for them."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[float, DomainEvent]] = queue.SimpleQueue()
        self.states: list[bool] = []
        self.state_changed = threading.Condition()

    def on_event(self, event: DomainEvent) -> None:
        self.events.put((time.monotonic(), event))

    def on_state(self, connected: bool) -> None:
        with self.state_changed:
            self.states.append(connected)
            self.state_changed.notify_all()

    def next_event(self, timeout_s: float = EVENT_DEADLINE_S) -> tuple[float, DomainEvent]:
        return self.events.get(timeout=timeout_s)

    def wait_states(self, expected: list[bool], timeout_s: float = 5.0) -> None:
        with self.state_changed:
            assert self.state_changed.wait_for(lambda: self.states[: len(expected)] == expected, timeout_s), (
                self.states
            )


def vmq_threads() -> list[str]:
    names = ("vmq-lifecycle", "vmq-libvirt-event-loop")
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(names)]


@pytest.fixture
def node(tmp_path: Path) -> str:
    return write_node(tmp_path / "node.xml", HOST, WORLD)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def listening(node: str, recorder: Recorder) -> Iterator[Any]:
    """A started read-write listener on a fresh test-driver node, with a hypervisor sharing its connection."""
    pytest.importorskip("libvirt")
    from vmq.hypervisor.events import LifecycleListener

    listener = LifecycleListener(node, recorder.on_event, recorder.on_state, read_only=False)
    hypervisor = listener.hypervisor(call_timeout_s=10.0)
    listener.start()
    assert listener.wait_connected(5.0)
    yield listener, hypervisor
    listener.stop()
    hypervisor.close()
    assert vmq_threads() == []


@libvirt_only
@pytest.mark.parametrize(
    ("action", "domain", "words", "kind"),
    [
        ("suspend", RUNNING, ("suspended", "paused"), "paused"),
        ("resume", PAUSED, ("resumed", "unpaused"), "resumed"),
        ("destroy", RUNNING, ("stopped", "destroyed"), "operator_stop"),
        ("start", OFF, ("started", "booted"), "started"),
    ],
)
def test_an_action_through_the_shared_connection_arrives_as_an_event_within_a_second(
    listening: Any, recorder: Recorder, action: str, domain: str, words: tuple[str, str], kind: str
) -> None:
    _listener, hypervisor = listening
    started = time.monotonic()
    getattr(hypervisor, action)(domain)
    arrived, event = recorder.next_event()
    assert event == DomainEvent(domain, stable_uuid(domain), *words)
    assert classify(event) == kind
    assert arrived - started < EVENT_DEADLINE_S


@libvirt_only
def test_vmq_metadata_set_live_arrives_as_a_metadata_event_and_shows_in_the_next_listing(
    listening: Any, recorder: Recorder
) -> None:
    import libvirt

    from vmq.intent import NAMESPACE, Intent

    listener, hypervisor = listening
    # what `virsh metadata DOMAIN --uri NAMESPACE --key vmq --set '<intent>...</intent>'` does
    listener.connection.lookupByName(RUNNING).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<intent><enroll>yes</enroll><priority>9</priority></intent>", "vmq",
        NAMESPACE, 0)
    _arrived, event = recorder.next_event()
    assert event == DomainEvent(RUNNING, stable_uuid(RUNNING), METADATA_EVENT, NAMESPACE)
    assert classify(event) == "other", "not a lifecycle kind: the host worker reads it as 'inventory now'"
    [info] = [i for i in hypervisor.list_domains() if i.name == RUNNING]
    assert info.intent == Intent(enroll=True, priority=9)


@libvirt_only
def test_a_sequence_of_actions_arrives_in_order(listening: Any, recorder: Recorder) -> None:
    _listener, hypervisor = listening
    for action in ("suspend", "resume", "destroy", "start"):
        getattr(hypervisor, action)(RUNNING)
    kinds = [classify(recorder.next_event()[1]) for _ in range(4)]
    assert kinds == ["paused", "resumed", "operator_stop", "started"]
    assert recorder.states == [True]


@libvirt_only
def test_a_reset_emits_no_event_on_the_test_driver(listening: Any, recorder: Recorder) -> None:
    _listener, hypervisor = listening
    hypervisor.reset(RUNNING)
    hypervisor.suspend(RUNNING)  # a marker: the next event must be this one
    assert recorder.next_event()[1].event == "suspended"


@libvirt_only
def test_the_raw_connection_can_be_lent_to_a_hypervisor_by_hand(listening: Any, recorder: Recorder) -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    listener, _hypervisor = listening
    by_hand = LibvirtHypervisor(listener.uri, call_timeout_s=10.0, connection=listener.connection)
    try:
        by_hand.suspend(RUNNING)
        assert recorder.next_event()[1].event == "suspended"
    finally:
        by_hand.close()
    assert listener.connection.isAlive()  # closing a borrower never closes the lent connection


@libvirt_only
def test_a_hypervisor_with_its_own_connection_is_another_world_on_the_test_driver(
    listening: Any, recorder: Recorder
) -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    listener, shared = listening
    own = LibvirtHypervisor(listener.uri, call_timeout_s=10.0)
    try:
        own.suspend(RUNNING)
        with pytest.raises(queue.Empty):
            recorder.next_event(timeout_s=0.3)
        assert shared.domain_info(RUNNING).status is DomainStatus.RUNNING
    finally:
        own.close()


@libvirt_only
def test_a_failing_callback_is_logged_and_later_events_still_arrive(
    node: str, caplog: pytest.LogCaptureFixture
) -> None:
    from vmq.hypervisor.events import LifecycleListener

    seen: queue.SimpleQueue[DomainEvent] = queue.SimpleQueue()

    def fragile(event: DomainEvent) -> None:
        seen.put(event)
        if event.event == "suspended":
            raise RuntimeError("callback bug")

    def broken_state(_connected: bool) -> None:
        raise RuntimeError("state callback bug")

    listener = LifecycleListener(node, fragile, broken_state, read_only=False)
    hypervisor = listener.hypervisor(call_timeout_s=10.0)
    listener.start()
    try:
        assert listener.wait_connected(5.0)
        hypervisor.suspend(RUNNING)
        hypervisor.resume(RUNNING)
        assert seen.get(timeout=EVENT_DEADLINE_S).event == "suspended"
        assert seen.get(timeout=EVENT_DEADLINE_S).event == "resumed"
    finally:
        listener.stop()
        hypervisor.close()
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("on_event failed vm=vm-running event=suspended/paused" in message for message in messages)
    assert any("on_state(True) failed" in message for message in messages)


@libvirt_only
def test_a_read_only_listener_hears_events_but_lends_no_connection(node: str, recorder: Recorder) -> None:
    import libvirt

    from vmq.hypervisor.events import LifecycleListener

    listener = LifecycleListener(node, recorder.on_event, recorder.on_state)
    with pytest.raises(ValueError, match="read_only=False"):
        listener.hypervisor()
    listener.start()
    try:
        assert listener.wait_connected(5.0)
        with pytest.raises(libvirt.libvirtError, match="read only"):
            listener.connection.lookupByName(RUNNING).suspend()
    finally:
        listener.stop()
    assert recorder.states == [True]


@libvirt_only
def test_start_and_stop_are_idempotent_and_a_listener_can_start_again(node: str, recorder: Recorder) -> None:
    from vmq.hypervisor.events import LifecycleListener

    listener = LifecycleListener(node, recorder.on_event, recorder.on_state, read_only=False)
    listener.stop()  # never started: nothing to do
    for _ in range(2):
        listener.start()
        listener.start()
        assert listener.wait_connected(5.0)
        listener.stop()
        listener.stop()
        assert listener.connection is None
        assert vmq_threads() == []
    assert recorder.states == [True, True]  # a deliberate stop is not reported as a loss


@libvirt_only
def test_the_default_event_implementation_is_registered_once_per_process(
    node: str, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor import events

    calls: list[int] = []
    original = libvirt.virEventRegisterDefaultImpl

    def counting() -> Any:
        calls.append(1)
        return original()

    monkeypatch.setattr(libvirt, "virEventRegisterDefaultImpl", counting)
    first = events.LifecycleListener(node, recorder.on_event)
    second = events.LifecycleListener(node, recorder.on_event)
    for listener in (first, second, first):
        listener.start()
        assert listener.wait_connected(5.0)
    first.stop()
    assert vmq_threads() != []  # the second listener still needs the loop
    second.stop()
    assert vmq_threads() == []
    first.start()
    first.stop()
    assert len(calls) <= 1  # zero if an earlier test in this process registered it already


@libvirt_only
def test_a_lost_connection_is_reported_reopened_and_handed_to_the_borrowing_hypervisor(
    node: str, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor import events

    monkeypatch.setattr(events, "_ALIVE_CHECK_S", 0.05)
    listener = events.LifecycleListener(
        node, recorder.on_event, recorder.on_state, read_only=False, reconnect_backoff_s=(0.05, 0.2)
    )
    hypervisor = listener.hypervisor(call_timeout_s=10.0)
    listener.start()
    try:
        assert listener.wait_connected(5.0)
        first = listener.connection
        original_is_alive = libvirt.virConnect.isAlive

        def first_one_dies(self: Any) -> int:
            return 0 if self is first else int(original_is_alive(self))

        monkeypatch.setattr(libvirt.virConnect, "isAlive", first_one_dies)
        recorder.wait_states([True, False, True])
        assert listener.wait_connected(5.0) and listener.connection is not first
        hypervisor.suspend(RUNNING)  # through the new connection, so its event reaches the listener
        assert recorder.next_event()[1] == DomainEvent(RUNNING, stable_uuid(RUNNING), "suspended", "paused")
    finally:
        listener.stop()
        hypervisor.close()


@libvirt_only
def test_an_unreachable_host_is_reported_once_retried_with_backoff_and_stop_is_prompt(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor.events import LifecycleListener

    attempts: list[float] = []
    original = libvirt.openReadOnly

    def counting_open(uri: str) -> Any:
        attempts.append(time.monotonic())
        return original(uri)

    monkeypatch.setattr(libvirt, "openReadOnly", counting_open)
    listener = LifecycleListener(
        UNREACHABLE, recorder.on_event, recorder.on_state, reconnect_backoff_s=(0.05, 0.2)
    )
    listener.start()
    try:
        recorder.wait_states([False])
        deadline = time.monotonic() + 5.0
        while len(attempts) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not listener.wait_connected(0.0)
    finally:
        started = time.monotonic()
        listener.stop()
        stop_s = time.monotonic() - started
    assert len(attempts) >= 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.05 and gaps[2] >= 0.19  # 0.05, 0.1, 0.2 (the cap), 0.2, ...
    assert recorder.states == [False]  # reported once, not on every retry
    assert stop_s < 2.0
    assert vmq_threads() == []
