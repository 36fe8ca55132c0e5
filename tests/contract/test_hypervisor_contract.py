"""One contract for the Hypervisor port, run over FakeHypervisor and LibvirtHypervisor (test driver)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.contract.hypervisor_world import HOST, OFF, PAUSED, RUNNING, WORLD, both_hypervisors, libvirt_only
from vmq.errors import (
    DomainNotFound,
    DomainOperationFailed,
    HypervisorError,
    HypervisorUnavailable,
)
from vmq.hypervisor import FakeHypervisor, open_hypervisor
from vmq.intent import NO_INTENT, Intent, intent_xml
from vmq.model import DomainInfo, DomainStatus
from vmq.ports import Hypervisor
from vmq.sim.testnode import node_xml, stable_uuid, write_node

REPO_ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ["reset", "resume", "start", "suspend", "destroy"]


def make_fake(_tmp_path: Path) -> Hypervisor:
    # The test driver starts every domain with reason 0 ("unknown"); the twin does the same.
    return FakeHypervisor(
        f"fake://{HOST}", [DomainInfo(name, uuid, status, "unknown") for name, uuid, status in WORLD]
    )


def make_libvirt(tmp_path: Path) -> Hypervisor:
    pytest.importorskip("libvirt")
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD), call_timeout_s=10.0)


hypervisor = both_hypervisors(make_fake, make_libvirt)


# -- the contract -------------------------------------------------------------------------------------


def test_list_domains_returns_every_defined_domain_with_uuid_and_status(hypervisor: Hypervisor) -> None:
    listed = [(info.name, info.uuid, info.status) for info in hypervisor.list_domains()]
    assert listed == sorted(WORLD)


def test_domain_info_reports_one_domain(hypervisor: Hypervisor) -> None:
    info = hypervisor.domain_info(PAUSED)
    assert info == DomainInfo(PAUSED, stable_uuid(PAUSED), DomainStatus.PAUSED, "unknown", intent=NO_INTENT)


def test_reset_keeps_a_running_domain_running(hypervisor: Hypervisor) -> None:
    hypervisor.reset(RUNNING)
    assert hypervisor.domain_info(RUNNING).status is DomainStatus.RUNNING


def test_reset_on_a_shut_off_domain_raises_operation_failed_naming_domain_and_operation(
    hypervisor: Hypervisor,
) -> None:
    with pytest.raises(DomainOperationFailed) as caught:
        hypervisor.reset(OFF)
    assert "reset" in str(caught.value)
    assert OFF in str(caught.value)
    assert hypervisor.domain_info(OFF).status is DomainStatus.SHUTOFF


def test_suspend_pauses_a_running_domain_for_reason_user(hypervisor: Hypervisor) -> None:
    hypervisor.suspend(RUNNING)
    assert hypervisor.domain_info(RUNNING).status is DomainStatus.PAUSED
    assert hypervisor.domain_info(RUNNING).reason == "user"


def test_suspend_on_a_paused_domain_raises_operation_failed(hypervisor: Hypervisor) -> None:
    with pytest.raises(DomainOperationFailed):
        hypervisor.suspend(PAUSED)


def test_resume_runs_a_paused_domain_for_reason_unpaused(hypervisor: Hypervisor) -> None:
    hypervisor.resume(PAUSED)
    info = hypervisor.domain_info(PAUSED)
    assert (info.status, info.reason) == (DomainStatus.RUNNING, "unpaused")


def test_resume_on_a_running_domain_raises_operation_failed(hypervisor: Hypervisor) -> None:
    # libvirt reports this as VIR_ERR_INTERNAL_ERROR on a live connection: a refusal, not an outage.
    with pytest.raises(DomainOperationFailed, match="resume"):
        hypervisor.resume(RUNNING)


def test_destroy_shuts_a_domain_off_as_destroyed_not_crashed(hypervisor: Hypervisor) -> None:
    hypervisor.destroy(RUNNING)
    info = hypervisor.domain_info(RUNNING)
    assert (info.status, info.reason) == (DomainStatus.SHUTOFF, "destroyed")


def test_destroy_on_a_shut_off_domain_raises_operation_failed(hypervisor: Hypervisor) -> None:
    with pytest.raises(DomainOperationFailed):
        hypervisor.destroy(OFF)


def test_start_boots_a_shut_off_domain_for_reason_booted(hypervisor: Hypervisor) -> None:
    hypervisor.start(OFF)
    info = hypervisor.domain_info(OFF)
    assert (info.status, info.reason) == (DomainStatus.RUNNING, "booted")


def test_start_on_a_running_domain_raises_operation_failed(hypervisor: Hypervisor) -> None:
    with pytest.raises(DomainOperationFailed):
        hypervisor.start(RUNNING)


def test_reset_on_a_paused_domain_is_allowed_and_keeps_it_paused(hypervisor: Hypervisor) -> None:
    # Measured on the test driver: reset needs an *active* domain, not a running one.
    hypervisor.reset(PAUSED)
    assert hypervisor.domain_info(PAUSED).status is DomainStatus.PAUSED


def test_a_full_restart_cycle_destroy_then_start_runs_again(hypervisor: Hypervisor) -> None:
    hypervisor.destroy(RUNNING)
    hypervisor.start(RUNNING)
    assert hypervisor.domain_info(RUNNING).status is DomainStatus.RUNNING


@pytest.mark.parametrize("operation", ["domain_info", *OPERATIONS])
def test_an_unknown_name_raises_domain_not_found(hypervisor: Hypervisor, operation: str) -> None:
    with pytest.raises(DomainNotFound, match="no-such-vm"):
        getattr(hypervisor, operation)("no-such-vm")


def test_every_error_is_a_hypervisor_error(hypervisor: Hypervisor) -> None:
    for call in (lambda: hypervisor.reset(OFF), lambda: hypervisor.domain_info("nope")):
        with pytest.raises(HypervisorError):
            call()


def test_close_is_idempotent_and_the_hypervisor_reconnects_on_next_use(hypervisor: Hypervisor) -> None:
    hypervisor.close()
    hypervisor.close()
    assert len(hypervisor.list_domains()) == len(WORLD)
    hypervisor.close()


def test_concurrent_calls_from_many_threads_all_succeed(hypervisor: Hypervisor) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                assert hypervisor.domain_info(RUNNING).status is DomainStatus.RUNNING
                assert len(hypervisor.list_domains()) == len(WORLD)
        except BaseException as exc:  # noqa: BLE001 - collected and re-checked in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# -- fake-only helpers --------------------------------------------------------------------------------


def test_fake_crash_marks_a_domain_crashed_and_start_recovers_it(tmp_path: Path) -> None:
    fake = make_fake(tmp_path)
    assert isinstance(fake, FakeHypervisor)
    fake.crash(RUNNING)
    assert fake.domain_info(RUNNING) == DomainInfo(
        RUNNING, stable_uuid(RUNNING), DomainStatus.CRASHED, "crashed", intent=NO_INTENT
    )
    fake.start(RUNNING)
    assert fake.domain_info(RUNNING).status is DomainStatus.RUNNING


def test_fake_unavailable_fails_every_call_and_records_calls(tmp_path: Path) -> None:
    fake = make_fake(tmp_path)
    assert isinstance(fake, FakeHypervisor)
    fake.set_unavailable(True)
    with pytest.raises(HypervisorUnavailable):
        fake.list_domains()
    with pytest.raises(HypervisorUnavailable):
        fake.reset(RUNNING)
    fake.close()
    fake.set_unavailable(False)
    fake.reset(RUNNING)
    assert fake.calls == [("list_domains", ""), ("reset", RUNNING), ("close", ""), ("reset", RUNNING)]


def test_open_hypervisor_returns_the_fake_for_fake_uris() -> None:
    hv = open_hypervisor("fake://host-b")
    assert isinstance(hv, FakeHypervisor)
    assert hv.uri == "fake://host-b"


# -- libvirt-only ----------------------------------------------------------------------------------------



def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_importing_vmq_hypervisor_does_not_import_libvirt() -> None:
    code = (
        "import sys, vmq.hypervisor\n"
        "vmq.hypervisor.open_hypervisor('fake://x').list_domains()\n"
        "assert 'libvirt' not in sys.modules, 'libvirt imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr


@libvirt_only
def test_open_hypervisor_returns_libvirt_for_other_uris_without_connecting() -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    hv = open_hypervisor("qemu+tcp://127.0.0.1:1/system", call_timeout_s=3.0)
    assert isinstance(hv, LibvirtHypervisor)
    assert hv.call_timeout_s == 3.0
    hv.close()


@libvirt_only
def test_an_unreachable_uri_raises_unavailable_with_a_clear_message_and_no_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor("qemu+tcp://127.0.0.1:1/system", call_timeout_s=10.0)
    with pytest.raises(HypervisorUnavailable) as caught:
        hv.list_domains()
    hv.close()
    message = str(caught.value)
    assert "cannot connect to qemu+tcp://127.0.0.1:1/system" in message
    assert "Connection refused" in message
    assert type(caught.value.__cause__).__name__ == "libvirtError"
    assert capfd.readouterr().err == ""


@libvirt_only
def test_a_missing_node_file_raises_unavailable_naming_the_file(capfd: pytest.CaptureFixture[str]) -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor("test:///nonexistent/file.xml")
    with pytest.raises(HypervisorUnavailable, match="/nonexistent/file.xml"):
        hv.domain_info(RUNNING)
    hv.close()
    # libvirt's own "libvirt: ... error : ..." lines are silenced; libxml2 still prints one
    # "I/O warning : failed to load external entity" line by itself, which no libvirt API can mute.
    assert "libvirt:" not in capfd.readouterr().err


@libvirt_only
def test_a_hung_call_raises_unavailable_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    release = threading.Event()
    original_reset = libvirt.virDomain.reset

    def hung_reset(self: Any, flags: int = 0) -> int:
        release.wait(30.0)
        return int(original_reset(self, flags))

    monkeypatch.setattr(libvirt.virDomain, "reset", hung_reset)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD), call_timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(HypervisorUnavailable, match=r"reset 'vm-running'.*no answer within 0\.5 s"):
            hv.reset(RUNNING)
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 1.5
        # The stuck worker is abandoned, not waited for: other calls still get through.
        assert hv.domain_info(RUNNING).status is DomainStatus.RUNNING
    finally:
        release.set()  # let the abandoned worker thread finish so the test leaves no thread behind
        hv.close()


@libvirt_only
def test_a_dead_connection_is_reopened_on_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    opened: list[str] = []
    original_open = libvirt.open

    def counting_open(uri: str) -> Any:
        opened.append(uri)
        return original_open(uri)

    monkeypatch.setattr(libvirt, "open", counting_open)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD))
    try:
        hv.list_domains()
        hv.list_domains()
        assert len(opened) == 1
        monkeypatch.setattr(libvirt.virConnect, "isAlive", lambda self: 0)
        hv.list_domains()
        assert len(opened) == 2
    finally:
        hv.close()


@libvirt_only
def test_an_error_on_a_dead_connection_is_unavailable_not_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD))
    monkeypatch.setattr(libvirt.virConnect, "isAlive", lambda self: 0)
    try:
        with pytest.raises(HypervisorUnavailable, match="resume 'vm-running'"):
            hv.resume(RUNNING)  # VIR_ERR_INTERNAL_ERROR, but the connection is gone
    finally:
        hv.close()


@libvirt_only
@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_BOOTED", (DomainStatus.RUNNING, "booted")),
        ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_UNPAUSED", (DomainStatus.RUNNING, "unpaused")),
        ("VIR_DOMAIN_PAUSED", "VIR_DOMAIN_PAUSED_USER", (DomainStatus.PAUSED, "user")),
        ("VIR_DOMAIN_PAUSED", "VIR_DOMAIN_PAUSED_IOERROR", (DomainStatus.PAUSED, "ioerror")),
        ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_CRASHED", (DomainStatus.CRASHED, "crashed")),
        ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_DESTROYED", (DomainStatus.SHUTOFF, "destroyed")),
        ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_SHUTDOWN", (DomainStatus.SHUTOFF, "shutdown")),
        ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_UNKNOWN", (DomainStatus.SHUTOFF, "unknown")),
        ("VIR_DOMAIN_CRASHED", "VIR_DOMAIN_CRASHED_PANICKED", (DomainStatus.CRASHED, "panicked")),
        ("VIR_DOMAIN_SHUTDOWN", "VIR_DOMAIN_SHUTDOWN_USER", (DomainStatus.OTHER, "user")),
        ("VIR_DOMAIN_BLOCKED", "VIR_DOMAIN_BLOCKED_UNKNOWN", (DomainStatus.OTHER, "unknown")),
        ("VIR_DOMAIN_PMSUSPENDED", "VIR_DOMAIN_PMSUSPENDED_UNKNOWN", (DomainStatus.OTHER, "unknown")),
        ("VIR_DOMAIN_NOSTATE", "VIR_DOMAIN_NOSTATE_UNKNOWN", (DomainStatus.OTHER, "unknown")),
    ],
)
def test_libvirt_states_map_to_domain_status_and_reason_words(
    state: str, reason: str, expected: tuple[DomainStatus, str]
) -> None:
    import libvirt

    from vmq.hypervisor.states import domain_status

    assert domain_status(getattr(libvirt, state), getattr(libvirt, reason)) == expected


@libvirt_only
def test_an_unknown_reason_number_maps_to_unknown() -> None:
    import libvirt

    from vmq.hypervisor.states import domain_status

    assert domain_status(libvirt.VIR_DOMAIN_RUNNING, 999) == (DomainStatus.RUNNING, "unknown")
    assert domain_status(999, 0) == (DomainStatus.OTHER, "unknown")


# -- testnode ---------------------------------------------------------------------------------------------


@libvirt_only
def test_a_generated_node_file_opens_in_libvirt_with_the_given_names_uuids_and_states(tmp_path: Path) -> None:
    import libvirt

    world = [
        ("web-1", stable_uuid("web-1"), DomainStatus.RUNNING),
        ("db & <cache>", stable_uuid("db & <cache>"), DomainStatus.PAUSED),
        ("batch-7", stable_uuid("batch-7"), DomainStatus.SHUTOFF),
    ]
    uri = write_node(tmp_path / "node.xml", "host <x> -- y", world)
    assert uri == f"test://{tmp_path / 'node.xml'}"
    assert uri.startswith("test:///")
    connection = libvirt.open(uri)
    try:
        seen = {d.name(): (d.UUIDString(), d.state()[0]) for d in connection.listAllDomains(0)}
    finally:
        connection.close()
    expected_state = {
        DomainStatus.RUNNING: libvirt.VIR_DOMAIN_RUNNING,
        DomainStatus.PAUSED: libvirt.VIR_DOMAIN_PAUSED,
        DomainStatus.SHUTOFF: libvirt.VIR_DOMAIN_SHUTOFF,
    }
    assert seen == {name: (uuid, expected_state[status]) for name, uuid, status in world}


@pytest.mark.parametrize("status", [DomainStatus.CRASHED, DomainStatus.OTHER, DomainStatus.ABSENT])
def test_node_xml_refuses_states_the_test_driver_cannot_start_in(status: DomainStatus) -> None:
    with pytest.raises(ValueError, match=status.value):
        node_xml(HOST, [("vm", stable_uuid("vm"), status)])


def test_node_xml_refuses_a_duplicate_name() -> None:
    entry = ("vm", stable_uuid("vm"), DomainStatus.RUNNING)
    with pytest.raises(ValueError, match="twice"):
        node_xml(HOST, [entry, entry])


def test_stable_uuid_identifies_the_vm_wherever_it_runs() -> None:
    assert stable_uuid("vm-1") == stable_uuid("vm-1")
    assert stable_uuid("vm-1") != stable_uuid("vm-2")
    assert uuid.UUID(stable_uuid("vm-1")).version == 5


# -- operators' intent in libvirt metadata (vmq.intent) ----------------------------------------------


UNKNOWN_KNOB = ("unknown knob 'nonsense' (known: backoff_base_s, backoff_max_s, boot_grace_s, ladder_rungs, "
                "max_concurrent_restarts_per_host, max_restarts, recovery_timeout_s, restart_timeout_s, "
                "restart_window_s)")


def test_a_domains_vmq_metadata_is_read_with_its_listing_on_the_test_driver_and_the_fake(tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    said = intent_xml(enroll=False, priority=250, knobs={"max_restarts": 5, "nonsense": 1})
    real = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD, metadata={RUNNING: said}),
                             call_timeout_s=10.0)
    fake = make_fake(tmp_path)
    assert isinstance(fake, FakeHypervisor)
    expected = Intent(enroll=False, priority=250, knobs={"max_restarts": "5"},
                      errors=(UNKNOWN_KNOB,))
    fake.set_intent(RUNNING, expected)
    for hypervisor in (real, fake):
        by_name = {info.name: info for info in hypervisor.list_domains()}
        assert by_name[RUNNING].intent == expected, hypervisor
        assert by_name[PAUSED].intent == NO_INTENT, "no metadata: read, nothing said"

