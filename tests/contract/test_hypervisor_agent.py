"""Channels and guest-agent calls of the Hypervisor port, over FakeHypervisor and LibvirtHypervisor (test driver).

Where libvirt's test driver has no such call (``guestInfo``, ``agentSetResponseTimeout``) or cannot show an
agent's behaviour (hang, absent, garbage), the libvirt side asserts exactly what the test driver gives, or
the adapter's own rules are shown with the driver's ``getTime`` patched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.hypervisor_world import HOST, OFF, PAUSED, RUNNING, WORLD, both_hypervisors, libvirt_only
from vmq.errors import (
    AgentAnswerInvalid,
    AgentBusy,
    AgentTimeout,
    AgentUnavailable,
    ChannelNotFound,
    DomainNotFound,
    DomainNotRunning,
    DomainOperationFailed,
    HypervisorError,
)
from vmq.hypervisor import FakeHypervisor
from vmq.hypervisor.fake import AgentMode
from vmq.hypervisor.types import AgentAnswer
from vmq.model import AGENT_CHANNEL, RESPONDER_CHANNEL, DomainInfo, DomainStatus
from vmq.ports import Hypervisor
from vmq.sim.testnode import channel_socket_path, stable_uuid, write_node

CHANNELS = {RUNNING: [AGENT_CHANNEL, RESPONDER_CHANNEL], PAUSED: [AGENT_CHANNEL]}
# The test driver's getTime answers this fixed guest time (s) on every running domain.
TEST_DRIVER_GUEST_S = 627319920


def _socket(tmp_path: Path, vm: str, channel: str) -> str:
    return channel_socket_path(str(tmp_path), stable_uuid(vm), channel)


def make_fake(tmp_path: Path) -> Hypervisor:
    fake = FakeHypervisor(
        f"fake://{HOST}", [DomainInfo(name, uuid, status, "unknown") for name, uuid, status in WORLD]
    )
    for vm, channels in CHANNELS.items():
        fake.set_channels(vm, {channel: _socket(tmp_path, vm, channel) for channel in channels})
    return fake


def make_libvirt(tmp_path: Path) -> Hypervisor:
    pytest.importorskip("libvirt")
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD, channels=CHANNELS), call_timeout_s=10.0)


hypervisor = both_hypervisors(make_fake, make_libvirt)


def _is_fake(hypervisor: Hypervisor) -> bool:
    return isinstance(hypervisor, FakeHypervisor)


# -- channels -------------------------------------------------------------------------------------------


def test_list_domains_and_domain_info_report_each_domains_virtio_channels(hypervisor: Hypervisor) -> None:
    listed = {info.name: info.channels for info in hypervisor.list_domains()}
    assert listed == {RUNNING: (AGENT_CHANNEL, RESPONDER_CHANNEL), PAUSED: (AGENT_CHANNEL,), OFF: ()}
    assert hypervisor.domain_info(RUNNING).channels == (AGENT_CHANNEL, RESPONDER_CHANNEL)
    assert hypervisor.domain_info(OFF).channels == ()


def test_channel_socket_gives_the_host_socket_of_a_channel_responder_by_default(
    hypervisor: Hypervisor, tmp_path: Path
) -> None:
    assert hypervisor.channel_socket(RUNNING) == _socket(tmp_path, RUNNING, RESPONDER_CHANNEL)
    assert hypervisor.channel_socket(RUNNING, AGENT_CHANNEL) == _socket(tmp_path, RUNNING, AGENT_CHANNEL)
    assert hypervisor.channel_socket(PAUSED, AGENT_CHANNEL) == _socket(tmp_path, PAUSED, AGENT_CHANNEL)


def test_channel_socket_of_an_absent_channel_raises_channel_not_found_naming_it(hypervisor: Hypervisor) -> None:
    with pytest.raises(ChannelNotFound, match=f"{PAUSED}.*{RESPONDER_CHANNEL}"):
        hypervisor.channel_socket(PAUSED)
    with pytest.raises(ChannelNotFound, match="no virtio channel"):
        hypervisor.channel_socket(OFF, AGENT_CHANNEL)


def test_channel_socket_of_an_unknown_domain_raises_domain_not_found(hypervisor: Hypervisor) -> None:
    with pytest.raises(DomainNotFound, match="no-such-vm"):
        hypervisor.channel_socket("no-such-vm")


# -- agent_ping -----------------------------------------------------------------------------------------


def test_agent_ping_answers_on_a_running_domain_with_guest_time_and_latency(hypervisor: Hypervisor) -> None:
    answer = hypervisor.agent_ping(RUNNING, timeout_s=2.0)
    assert isinstance(answer, AgentAnswer)
    assert 0 <= answer.latency_ms < 1000
    if _is_fake(hypervisor):
        assert abs(answer.guest_time_ms - time.time() * 1000) < 5000  # type: ignore[operator]
        assert answer.latency_ms >= 1.0  # the default latency: qemu-ga's p50, 1.3 ms
    else:
        assert answer.guest_time_ms == TEST_DRIVER_GUEST_S * 1000


@pytest.mark.parametrize("vm", [PAUSED, OFF])
def test_agent_calls_on_a_domain_not_running_raise_domain_not_running(hypervisor: Hypervisor, vm: str) -> None:
    with pytest.raises(DomainNotRunning, match="domain is not running"):
        hypervisor.agent_ping(vm, timeout_s=2.0)
    assert issubclass(DomainNotRunning, DomainOperationFailed)


def test_agent_ping_after_suspend_raises_domain_not_running_and_answers_after_resume(
    hypervisor: Hypervisor,
) -> None:
    hypervisor.suspend(RUNNING)
    with pytest.raises(DomainNotRunning):
        hypervisor.agent_ping(RUNNING, timeout_s=2.0)
    hypervisor.resume(RUNNING)
    assert hypervisor.agent_ping(RUNNING, timeout_s=2.0).guest_time_ms is not None


def test_agent_calls_on_an_unknown_domain_raise_domain_not_found(hypervisor: Hypervisor) -> None:
    for call in (hypervisor.agent_ping, hypervisor.guest_info):
        with pytest.raises(DomainNotFound, match="no-such-vm"):
            call("no-such-vm", 2.0)


def test_a_non_positive_timeout_is_refused(hypervisor: Hypervisor) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        hypervisor.agent_ping(RUNNING, timeout_s=0)


def test_guest_info_reduces_the_agents_answer_or_is_unavailable_on_the_test_driver(hypervisor: Hypervisor) -> None:
    if _is_fake(hypervisor):
        info = hypervisor.guest_info(RUNNING, timeout_s=2.0)
        assert info == {
            "os_id": "debian",
            "os_version_id": "12",
            "hostname": "guest",
            "filesystems": [{"mountpoint": "/", "fstype": "ext4", "used_bytes": 1 << 30, "total_bytes": 8 << 30}],
        }
    else:
        # libvirt 9.0's test driver has no virDomainGetGuestInfo: VIR_ERR_NO_SUPPORT, translated.
        with pytest.raises(AgentUnavailable, match="not supported by the connection driver: virDomainGetGuestInfo"):
            hypervisor.guest_info(RUNNING, timeout_s=2.0)


# -- the fake agent's modes -----------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> FakeHypervisor:
    hv = make_fake(tmp_path)
    assert isinstance(hv, FakeHypervisor)
    return hv


def test_fake_absent_agent_raises_agent_unavailable(fake: FakeHypervisor) -> None:
    fake.set_agent(RUNNING, AgentMode.ABSENT)
    with pytest.raises(AgentUnavailable, match="not connected"):
        fake.agent_ping(RUNNING, 1.0)
    with pytest.raises(AgentUnavailable):
        fake.guest_info(RUNNING, 1.0)


def test_fake_garbage_answers_are_rejected_as_invalid_not_crashes(fake: FakeHypervisor) -> None:
    fake.set_agent(RUNNING, "garbage")
    with pytest.raises(AgentAnswerInvalid, match="seconds"):
        fake.agent_ping(RUNNING, 1.0)
    with pytest.raises(AgentAnswerInvalid, match="not a mapping"):
        fake.guest_info(RUNNING, 1.0)
    fake.set_agent(RUNNING, "answer")
    assert fake.agent_ping(RUNNING, 1.0).guest_time_ms is not None  # nothing left stuck


def test_fake_hung_agent_takes_its_timeout_then_raises_agent_timeout(fake: FakeHypervisor) -> None:
    fake.set_agent(RUNNING, AgentMode.HANG)
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match="no answer within 0.3 s"):
        fake.agent_ping(RUNNING, 0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.3 + 0.5


def test_fake_latency_is_configurable_and_beyond_the_timeout_is_a_timeout(fake: FakeHypervisor) -> None:
    fake.set_agent(RUNNING, latency_s=0.05)
    assert fake.agent_ping(RUNNING, 1.0).latency_ms >= 50
    with pytest.raises(AgentTimeout):
        fake.agent_ping(RUNNING, 0.02)


def test_fake_agent_calls_are_recorded_and_fail_while_the_hypervisor_is_unavailable(fake: FakeHypervisor) -> None:
    from vmq.errors import HypervisorUnavailable

    fake.agent_ping(RUNNING, 1.0)
    fake.set_unavailable()
    with pytest.raises(HypervisorUnavailable):
        fake.agent_ping(RUNNING, 1.0)
    assert fake.calls == [("agent_ping", RUNNING), ("agent_ping", RUNNING)]


def test_fake_set_channels_replaces_the_channels_and_none_means_no_socket(fake: FakeHypervisor) -> None:
    fake.set_channels(OFF, {"com.redhat.spice.0": None})
    assert fake.domain_info(OFF).channels == ("com.redhat.spice.0",)
    with pytest.raises(ChannelNotFound, match="no socket path"):
        fake.channel_socket(OFF, "com.redhat.spice.0")


def test_fake_set_agent_refuses_an_unknown_mode(fake: FakeHypervisor) -> None:
    with pytest.raises(ValueError):
        fake.set_agent(RUNNING, "sulking")


# -- one call in flight, timeouts, isolation (fake hung; libvirt with getTime patched to hang) ------------


@pytest.fixture(params=["fake", "libvirt"])
def hangable(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Hypervisor, Callable[[str], None]]]:
    """A hypervisor and ``hang(vm)``: make that domain's agent hang (getTime blocks until the test ends)."""
    release = threading.Event()
    if request.param == "fake":
        fake = make_fake(tmp_path)
        assert isinstance(fake, FakeHypervisor)
        yield fake, lambda vm: fake.set_agent(vm, AgentMode.HANG)
        fake.close()
        return
    pytest.importorskip("libvirt")
    import libvirt

    hung: set[str] = set()
    original = libvirt.virDomain.getTime

    def get_time(self: Any, flags: int = 0) -> Any:
        if self.name() in hung:
            release.wait(10.0)
        return original(self, flags)

    monkeypatch.setattr(libvirt.virDomain, "getTime", get_time)
    hv = make_libvirt(tmp_path)
    try:
        yield hv, hung.add
    finally:
        release.set()  # let the abandoned libvirt calls return so the test leaves no thread behind
        hv.close()


def test_a_hung_agent_times_out_within_the_timeout(hangable: tuple[Hypervisor, Callable[[str], None]]) -> None:
    hv, hang = hangable
    hang(RUNNING)
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        hv.agent_ping(RUNNING, 0.5)
    elapsed = time.monotonic() - started
    print(f"hung agent_ping returned after {elapsed * 1000:.0f} ms (timeout 500 ms)")
    assert 0.45 <= elapsed < 0.5 + 0.5


def test_a_second_call_on_a_domain_with_one_in_flight_fails_fast_as_busy(
    hangable: tuple[Hypervisor, Callable[[str], None]],
) -> None:
    hv, hang = hangable
    hang(RUNNING)
    first = threading.Thread(target=lambda: pytest.raises(AgentTimeout, hv.agent_ping, RUNNING, 1.0))
    first.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(AgentBusy, match="in flight"):
        hv.agent_ping(RUNNING, 1.0)
    with pytest.raises(AgentTimeout):  # AgentBusy is an AgentTimeout: a caller may treat both alike
        hv.guest_info(RUNNING, 1.0)
    assert time.monotonic() - started < 0.1
    first.join()


def test_a_hung_agent_on_one_domain_does_not_delay_another_domains_ping(
    hangable: tuple[Hypervisor, Callable[[str], None]],
) -> None:
    hv, hang = hangable
    hv.start(OFF)
    hang(RUNNING)
    hung = threading.Thread(target=lambda: pytest.raises(AgentTimeout, hv.agent_ping, RUNNING, 1.0))
    hung.start()
    time.sleep(0.1)
    started = time.monotonic()
    answer = hv.agent_ping(OFF, 1.0)
    other_s = time.monotonic() - started
    hung.join()
    print(f"ping of {OFF} while {RUNNING}'s agent hangs: {other_s * 1000:.1f} ms (agent latency "
          f"{answer.latency_ms:.2f} ms)")
    assert other_s < 0.2
    # Lifecycle calls do not wait behind agent calls either.
    assert hv.domain_info(RUNNING).status is DomainStatus.RUNNING


def test_every_agent_error_is_a_hypervisor_error() -> None:
    for cls in (AgentUnavailable, AgentTimeout, AgentBusy, AgentAnswerInvalid, DomainNotRunning, ChannelNotFound):
        assert issubclass(cls, HypervisorError)


# -- libvirt only: the test driver's answers, error translation, response timeout, XML -------------------


@libvirt_only
@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        ("VIR_ERR_AGENT_UNRESPONSIVE", "Guest agent is not responding: QEMU guest agent is not connected",
         AgentUnavailable),
        ("VIR_ERR_AGENT_UNRESPONSIVE", ("Guest agent is not responding: QEMU guest agent is not available due to "
         "an error"), AgentUnavailable),
        ("VIR_ERR_AGENT_UNRESPONSIVE", "Guest agent is not responding: Guest agent not available for now",
         AgentTimeout),
        ("VIR_ERR_ARGUMENT_UNSUPPORTED", "argument unsupported: QEMU guest agent is not configured",
         AgentUnavailable),
        ("VIR_ERR_NO_SUPPORT", "this function is not supported by the connection driver: virDomainGetTime",
         AgentUnavailable),
        ("VIR_ERR_OPERATION_INVALID", "Requested operation is not valid: domain is not running", DomainNotRunning),
    ],
)
def test_libvirt_agent_errors_translate_by_code_and_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, message: str, expected: type[Exception]
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    def failing(self: Any, flags: int = 0) -> Any:
        error = libvirt.libvirtError(message)
        error.err = (getattr(libvirt, code), libvirt.VIR_FROM_QEMU, message, 2, None, None, None, 0, 0)
        raise error

    monkeypatch.setattr(libvirt.virDomain, "getTime", failing)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD))
    try:
        with pytest.raises(expected) as caught:
            hv.agent_ping(RUNNING, 2.0)
        assert type(caught.value) is expected
        assert RUNNING in str(caught.value)
    finally:
        hv.close()


@libvirt_only
def test_libvirt_garbage_from_get_time_is_rejected_as_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    monkeypatch.setattr(libvirt.virDomain, "getTime", lambda self, flags=0: [b"\x00", None])
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD))
    try:
        with pytest.raises(AgentAnswerInvalid, match="not a mapping"):
            hv.agent_ping(RUNNING, 2.0)
    finally:
        hv.close()


@libvirt_only
def test_libvirt_sets_the_agent_response_timeout_once_per_domain_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    set_to: list[tuple[str, int]] = []

    def record(self: Any, timeout: int, flags: int = 0) -> int:
        set_to.append((self.name(), timeout))
        return 0

    monkeypatch.setattr(libvirt.virDomain, "agentSetResponseTimeout", record)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD))
    try:
        for timeout_s in (2.5, 2.5, 2.9, 0.4, 0.4):
            hv.agent_ping(RUNNING, timeout_s)
        hv.close()  # a new connection sets it again
        hv.agent_ping(RUNNING, 2.0)
    finally:
        hv.close()
    # Whole seconds at or below the timeout (at least 1): 2 for 2.5 and 2.9, 1 for 0.4.
    assert set_to == [(RUNNING, 2), (RUNNING, 1), (RUNNING, 2)]


@libvirt_only
def test_libvirt_test_driver_has_no_agent_response_timeout_and_the_ping_still_answers(tmp_path: Path) -> None:
    import libvirt

    connection = libvirt.open(write_node(tmp_path / "node.xml", HOST, WORLD))
    try:
        with pytest.raises(libvirt.libvirtError) as caught:
            connection.lookupByName(RUNNING).agentSetResponseTimeout(1, 0)
        assert caught.value.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT
    finally:
        connection.close()


@libvirt_only
@pytest.mark.parametrize("xml", ["", "<domain><devices><channel>", "not xml at all <channel"])
def test_libvirt_listing_survives_a_domain_xml_that_does_not_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xml: str
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    monkeypatch.setattr(libvirt.virDomain, "XMLDesc", lambda self, flags=0: xml)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD, channels=CHANNELS))
    try:
        assert [(info.name, info.channels) for info in hv.list_domains()] == [(OFF, ()), (PAUSED, ()), (RUNNING, ())]
        with pytest.raises(ChannelNotFound, match="does not parse"):
            hv.channel_socket(RUNNING)
    finally:
        hv.close()


@libvirt_only
def test_libvirt_listing_survives_an_unreadable_domain_xml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    def refused(self: Any, flags: int = 0) -> str:
        error = libvirt.libvirtError("internal error: no XML today")
        error.err = (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, "no XML today", 2, None, None, None, 0, 0)
        raise error

    monkeypatch.setattr(libvirt.virDomain, "XMLDesc", refused)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD, channels=CHANNELS))
    try:
        assert {info.name: info.channels for info in hv.list_domains()} == {RUNNING: (), PAUSED: (), OFF: ()}
    finally:
        hv.close()


@libvirt_only
def test_libvirt_test_driver_keeps_non_virtio_and_socketless_channels_out(tmp_path: Path) -> None:
    """A node file with other channel kinds: only virtio targets are listed; a socketless one has no path."""
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    path = tmp_path / "node.xml"
    write_node(path, HOST, WORLD, channels={RUNNING: [AGENT_CHANNEL]})
    extra = (
        "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"
        "<channel type='pty'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>"
        "<channel type='unix'><target type='virtio' name='org.other.0'/></channel>"
    )
    text = path.read_text(encoding="utf-8").replace("    </devices>", extra + "</devices>", 1)
    path.write_text(text, encoding="utf-8")
    hv = LibvirtHypervisor(f"test://{path}")
    try:
        assert hv.domain_info(RUNNING).channels == (AGENT_CHANNEL, "com.redhat.spice.0", "org.other.0")
        with pytest.raises(ChannelNotFound, match="not a unix socket"):
            hv.channel_socket(RUNNING, "com.redhat.spice.0")
        with pytest.raises(ChannelNotFound, match="no socket path"):
            hv.channel_socket(RUNNING, "org.other.0")
    finally:
        hv.close()
