"""Activity sampling: the ``activity`` port method over FakeHypervisor and LibvirtHypervisor (test driver),
``moving`` as a table, and the test-driver node files that give domains a disk and an interface."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.contract.hypervisor_world import HOST, OFF, PAUSED, RUNNING, WORLD, both_hypervisors, libvirt_only
from vmq.errors import DomainNotFound, HypervisorUnavailable
from vmq.hypervisor import ActivitySample, FakeHypervisor, busy, moving
from vmq.hypervisor.types import COUNTERS, device_targets, total
from vmq.model import DomainInfo
from vmq.ports import Hypervisor
from vmq.sim.testnode import interface_target, node_xml, stable_uuid, write_node


def sample(
    cpu: int | None = 0,
    read: int | None = 0,
    write: int | None = 0,
    rx: int | None = 0,
    tx: int | None = 0,
    at_s: float = 0.0,
) -> ActivitySample:
    return ActivitySample(cpu, read, write, rx, tx, at_s)


def make_fake(_tmp_path: Path) -> Hypervisor:
    return FakeHypervisor(
        f"fake://{HOST}", [DomainInfo(name, uuid, status, "unknown") for name, uuid, status in WORLD]
    )


def make_libvirt(tmp_path: Path) -> Hypervisor:
    pytest.importorskip("libvirt")
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(
        write_node(tmp_path / "node.xml", HOST, WORLD, devices=True), call_timeout_s=10.0
    )


hypervisor = both_hypervisors(make_fake, make_libvirt)


# -- moving and the pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (sample(), sample(), []),
        (sample(cpu=10), sample(cpu=11), ["cpu_time_ns"]),
        (sample(cpu=11), sample(cpu=10), []),  # a restarted domain counts from zero again: not movement
        (sample(read=5), sample(read=6, write=1), ["disk_read_bytes", "disk_write_bytes"]),
        (sample(rx=1, tx=1), sample(rx=2, tx=2), ["net_rx_bytes", "net_tx_bytes"]),
        (sample(cpu=None), sample(cpu=99), []),
        (sample(cpu=1), sample(cpu=None), []),
        (sample(None, None, None, None, None), sample(None, None, None, None, None), []),
        (sample(1, 1, 1, 1, 1), sample(2, 2, 2, 2, 2), list(COUNTERS)),
        (sample(at_s=1.0), sample(at_s=2.0), []),  # time passing alone is not activity
    ],
)
def test_moving_names_the_counters_that_grew_and_ignores_unknown_ones(
    before: ActivitySample, after: ActivitySample, expected: list[str]
) -> None:
    assert moving(before, after) == expected


def test_an_activity_sample_is_frozen_and_lists_its_counters_in_field_order() -> None:
    assert COUNTERS == ("cpu_time_ns", "disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes")
    with pytest.raises(AttributeError):
        sample().cpu_time_ns = 1  # type: ignore[misc]


def test_device_targets_reads_disk_and_interface_targets_and_skips_an_empty_cdrom() -> None:
    xml = """<domain><devices>
        <disk type='file' device='disk'><source file='/a.img'/><target dev='vda'/></disk>
        <disk type='file' device='cdrom'><target dev='hdc'/></disk>
        <disk type='network' device='disk'><source protocol='rbd' name='p/x'/><target dev='vdb'/></disk>
        <interface type='bridge'><target dev='tap0'/></interface>
        <interface type='network'/>
    </devices></domain>"""
    assert device_targets(xml, "disk") == ["vda", "vdb"]
    assert device_targets(xml, "interface") == ["tap0"]
    assert device_targets("<domain/>", "disk") == []
    with pytest.raises(ValueError, match="does not parse"):
        device_targets("<domain", "disk")


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], None), ([3], 3), ([3, 4], 7), ([3, None], None), ([3, -1], None)],
)
def test_total_is_all_or_nothing(values: list[int | None], expected: int | None) -> None:
    assert total(values) == expected


# -- the contract ------------------------------------------------------------------------------------------


def test_activity_of_a_running_domain_has_every_counter_and_a_monotonic_timestamp(
    hypervisor: Hypervisor,
) -> None:
    before_s = time.monotonic()
    taken = hypervisor.activity(RUNNING)
    assert before_s <= taken.taken_monotonic_s <= time.monotonic()
    for counter in COUNTERS:
        value = getattr(taken, counter)
        assert isinstance(value, int) and value >= 0, (counter, value)


def test_a_paused_domain_still_reports_its_counters(hypervisor: Hypervisor) -> None:
    taken = hypervisor.activity(PAUSED)
    assert all(getattr(taken, counter) is not None for counter in COUNTERS)


def test_a_shut_off_domain_reports_every_counter_as_unknown_instead_of_raising(
    hypervisor: Hypervisor,
) -> None:
    taken = hypervisor.activity(OFF)
    assert [getattr(taken, counter) for counter in COUNTERS] == [None] * len(COUNTERS)


def test_activity_of_an_unknown_name_raises_domain_not_found(hypervisor: Hypervisor) -> None:
    with pytest.raises(DomainNotFound, match="activity 'no-such-vm'"):
        hypervisor.activity("no-such-vm")


def test_activity_between_a_destroy_and_a_start_follows_the_domain(hypervisor: Hypervisor) -> None:
    hypervisor.destroy(RUNNING)
    assert hypervisor.activity(RUNNING).cpu_time_ns is None
    hypervisor.start(RUNNING)
    assert hypervisor.activity(RUNNING).cpu_time_ns is not None


# -- fake-only ---------------------------------------------------------------------------------------------


def fake() -> FakeHypervisor:
    hv = make_fake(Path())
    assert isinstance(hv, FakeHypervisor)
    return hv


def test_the_fake_starts_every_counter_at_zero_and_advance_moves_them() -> None:
    hv = fake()
    first = hv.activity(RUNNING)
    assert (first.cpu_time_ns, first.disk_read_bytes, first.net_tx_bytes) == (0, 0, 0)
    hv.advance(RUNNING, cpu_ns=5)
    assert moving(first, hv.activity(RUNNING)) == ["cpu_time_ns"]
    second = hv.activity(RUNNING)
    hv.advance(RUNNING, disk_bytes=4096, net_bytes=60)
    third = hv.activity(RUNNING)
    assert moving(second, third) == ["disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes"]
    assert (third.disk_write_bytes, third.net_rx_bytes) == (4096, 60)


def test_the_fake_sets_single_counters_and_keeps_the_others() -> None:
    hv = fake()
    hv.advance(RUNNING, cpu_ns=7, disk_bytes=3)
    hv.set_activity(RUNNING, net_rx_bytes=None, net_tx_bytes=None, disk_write_bytes=100)
    taken = hv.activity(RUNNING)
    assert (taken.cpu_time_ns, taken.disk_read_bytes, taken.disk_write_bytes) == (7, 3, 100)
    assert (taken.net_rx_bytes, taken.net_tx_bytes) == (None, None)
    hv.advance(RUNNING, net_bytes=10)  # a counter the host cannot give stays unknown
    assert hv.activity(RUNNING).net_rx_bytes is None


def test_the_fake_counts_from_zero_after_a_restart_and_keeps_unknown_counters_unknown() -> None:
    hv = fake()
    hv.set_activity(RUNNING, cpu_time_ns=10**9, net_rx_bytes=None)
    hv.destroy(RUNNING)
    hv.start(RUNNING)
    taken = hv.activity(RUNNING)
    assert (taken.cpu_time_ns, taken.net_rx_bytes) == (0, None)


def test_the_fake_helpers_refuse_an_unknown_domain_and_are_not_recorded() -> None:
    hv = fake()
    with pytest.raises(DomainNotFound):
        hv.advance("nope", cpu_ns=1)
    with pytest.raises(DomainNotFound):
        hv.set_activity("nope", cpu_time_ns=1)
    hv.activity(RUNNING)
    assert hv.calls == [("activity", RUNNING)]


def test_the_fake_unavailable_fails_activity() -> None:
    hv = fake()
    hv.set_unavailable(True)
    with pytest.raises(HypervisorUnavailable, match="activity"):
        hv.activity(RUNNING)


# -- libvirt-only ------------------------------------------------------------------------------------------


def real_libvirt_error(domain: Any) -> Exception:
    """A genuine libvirtError (code VIR_ERR_INVALID_ARG), as libvirt raises for an unknown device."""
    import libvirt

    try:
        domain.blockStats("no-such-device")
    except libvirt.libvirtError as exc:
        error: Exception = exc
        return error
    raise AssertionError("blockStats on an unknown device did not fail")


@libvirt_only
def test_on_the_test_driver_disk_and_network_bytes_grow_with_time_but_cpu_time_does_not(
    tmp_path: Path,
) -> None:
    hv = make_libvirt(tmp_path)
    try:
        first = hv.activity(RUNNING)
        time.sleep(0.01)
        second = hv.activity(RUNNING)
    finally:
        hv.close()
    # Measured: the test driver derives byte counters from the clock and reports a constant CPU time.
    assert moving(first, second) == ["disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes"]


@libvirt_only
def test_a_domain_without_disks_or_interfaces_reports_those_counters_as_unknown(tmp_path: Path) -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD), call_timeout_s=10.0)
    try:
        taken = hv.activity(RUNNING)
    finally:
        hv.close()
    assert isinstance(taken.cpu_time_ns, int)
    assert [taken.disk_read_bytes, taken.disk_write_bytes, taken.net_rx_bytes, taken.net_tx_bytes] == [
        None
    ] * 4


@libvirt_only
def test_a_device_libvirt_refuses_makes_its_counters_unknown_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    def refusing_interface_stats(self: Any, path: str) -> Any:
        raise real_libvirt_error(self)

    monkeypatch.setattr(libvirt.virDomain, "interfaceStats", refusing_interface_stats)
    hv = make_libvirt(tmp_path)
    try:
        taken = hv.activity(RUNNING)
    finally:
        hv.close()
    assert (taken.net_rx_bytes, taken.net_tx_bytes) == (None, None)
    assert taken.disk_read_bytes is not None and taken.cpu_time_ns is not None


@libvirt_only
def test_cpu_time_falls_back_to_info_when_get_cpu_stats_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    def failing_cpu_stats(self: Any, total: bool, flags: int = 0) -> Any:
        raise real_libvirt_error(self)

    monkeypatch.setattr(libvirt.virDomain, "getCPUStats", failing_cpu_stats)
    hv = make_libvirt(tmp_path)
    try:
        taken = hv.activity(RUNNING)
    finally:
        hv.close()
    # The test driver's info() reports a clock-derived CPU time, unlike its constant getCPUStats figure.
    assert isinstance(taken.cpu_time_ns, int) and taken.cpu_time_ns > 0


@libvirt_only
def test_cpu_time_of_an_active_domain_comes_from_info_when_the_cgroup_controller_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen on a real QEMU host without cgroups: getCPUStats fails with OPERATION_INVALID ("cgroup CPUACCT
    # controller is not mounted") although the domain runs; that is not "not running".
    import libvirt

    def no_cgroup(self: Any, total: bool, flags: int = 0) -> Any:
        error = libvirt.libvirtError("Requested operation is not valid: cgroup CPUACCT controller is not mounted")
        error.err = (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, error.args[0], 2, None, None,
                     None, 0, 0)
        raise error

    monkeypatch.setattr(libvirt.virDomain, "getCPUStats", no_cgroup)
    hv = make_libvirt(tmp_path)
    try:
        running, stopped = hv.activity(RUNNING), hv.activity(OFF)
    finally:
        hv.close()
    assert isinstance(running.cpu_time_ns, int) and running.cpu_time_ns > 0
    assert stopped.cpu_time_ns is None


@libvirt_only
def test_a_domain_that_vanishes_while_sampled_raises_domain_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    def vanished(self: Any, path: str) -> Any:
        return self.connect().lookupByName("gone-meanwhile")  # a genuine VIR_ERR_NO_DOMAIN

    monkeypatch.setattr(libvirt.virDomain, "blockStats", vanished)
    hv = make_libvirt(tmp_path)
    try:
        with pytest.raises(DomainNotFound, match="activity 'vm-running'"):
            hv.activity(RUNNING)
    finally:
        hv.close()


@libvirt_only
def test_a_hung_sample_raises_unavailable_within_the_call_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    from vmq.hypervisor.libvirt import LibvirtHypervisor

    release = threading.Event()
    original = libvirt.virDomain.getCPUStats

    def hung_cpu_stats(self: Any, total: bool, flags: int = 0) -> Any:
        release.wait(30.0)
        return original(self, total, flags)

    monkeypatch.setattr(libvirt.virDomain, "getCPUStats", hung_cpu_stats)
    hv = LibvirtHypervisor(write_node(tmp_path / "node.xml", HOST, WORLD, devices=True), call_timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(HypervisorUnavailable, match=r"activity 'vm-running'.*no answer within 0\.5 s"):
            hv.activity(RUNNING)
        assert time.monotonic() - started < 1.5
    finally:
        release.set()
        hv.close()


@libvirt_only
def test_an_unreachable_hypervisor_makes_activity_unavailable() -> None:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor("qemu+tcp://127.0.0.1:1/system", call_timeout_s=10.0)
    try:
        with pytest.raises(HypervisorUnavailable, match="cannot connect"):
            hv.activity(RUNNING)
    finally:
        hv.close()


# -- testnode with devices ---------------------------------------------------------------------------------


def test_node_xml_adds_a_disk_and_an_interface_only_when_asked() -> None:
    plain = node_xml(HOST, WORLD)
    assert "<devices>" not in plain
    with_devices = node_xml(HOST, WORLD, devices=True)
    assert with_devices.count("<target dev='vda'/>") == len(WORLD)
    for _, domain_uuid, _ in WORLD:
        assert f'<target dev="{interface_target(domain_uuid)}"/>' in with_devices


def test_interface_targets_fit_a_linux_interface_name_and_differ_per_domain() -> None:
    names = {interface_target(stable_uuid(f"vm-{index}")) for index in range(100)}
    assert len(names) == 100
    assert all(len(name) <= 15 and name.startswith("vmq-") for name in names)


@libvirt_only
def test_the_test_driver_keeps_our_interface_name_but_replaces_a_vnet_one(tmp_path: Path) -> None:
    import libvirt

    uri = write_node(tmp_path / "node.xml", HOST, WORLD, devices=True)
    vnet_uri = "test://" + str(tmp_path / "vnet.xml")
    Path(vnet_uri.removeprefix("test://")).write_text(
        Path(uri.removeprefix("test://")).read_text().replace('dev="vmq-', 'dev="vnet-')
    )
    for node, expected in [(uri, interface_target(stable_uuid(RUNNING))), (vnet_uri, "testnet0")]:
        connection = libvirt.open(node)
        try:
            domain = connection.lookupByName(RUNNING)
            assert device_targets(domain.XMLDesc(0), "interface") == [expected]
            assert len(domain.interfaceStats(expected)) == 8
            assert len(domain.blockStats("vda")) == 5
        finally:
            connection.close()


# -- busy: the evidence a reset waits on (found on a real QEMU guest: idle guests accrue CPU time) ---------
@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (sample(cpu=0), sample(cpu=10**9), []),  # a full core for 1 s: CPU never holds a reset
        (sample(read=0, write=0), sample(read=1000, write=1000), []),  # background noise, below the floor
        (sample(write=0), sample(write=20_000), ["disk_write_bytes"]),
        (sample(read=0), sample(read=16_384), ["disk_read_bytes"]),  # exactly the floor counts
        (sample(rx=0, tx=0), sample(rx=10**6, tx=100), []),  # received bytes arrive whatever the guest does
        (sample(tx=0), sample(tx=50_000), ["net_tx_bytes"]),
        (sample(write=None), sample(write=10**9), []),  # unknown never counts
    ],
    ids=["cpu time alone", "below the floor", "disk writes", "disk reads at the floor", "received bytes alone",
         "network sends", "unknown counter"],
)
def test_busy_counts_only_the_guests_own_io_above_the_floor(
        before: ActivitySample, after: ActivitySample, expected: list[str]) -> None:
    assert busy(before, replace(after, taken_monotonic_s=before.taken_monotonic_s + 1.0), 16_384) == expected


def test_busy_is_a_rate_so_a_short_window_needs_fewer_bytes() -> None:
    a, b = sample(write=0), sample(write=2_000)
    assert busy(a, replace(b, taken_monotonic_s=a.taken_monotonic_s + 0.1), 16_384) == ["disk_write_bytes"]
    assert busy(a, replace(b, taken_monotonic_s=a.taken_monotonic_s + 1.0), 16_384) == []
