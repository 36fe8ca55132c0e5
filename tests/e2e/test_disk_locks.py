"""Proof on real VMs that libvirt's lock manager keeps one disk from running on two hypervisors at once, which
issue 18's failover relies on: hosts A and B (tests/e2e/twohosts.py), each a libvirtd with its own virtlockd, one
shared image directory, direct leases, QEMU's own image locking waived so that only virtlockd can refuse.

The agent guest (tests/e2e/agent_image.py: a kernel and an initramfs, no network) gets one raw disk from the
shared directory and is defined alike on both hosts. Printed: how long a start and a refusal take, and the time
from A's power loss to the guest running (and booted) on B.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import TypeVar

import pytest

from tests.e2e.debian import GuestKit
from tests.e2e.twohosts import (
    HOST_NAMES,
    Host,
    TwoHosts,
    console_log,
    create_disk,
    define_guest,
    domain_state,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

VM = "vmq-e2e-locked"
GUEST_UP = "vmq-guest: up"  # printed by the guest's /init once its agent runs (tests/e2e/guest_init.py)
BOOT_TIMEOUT_S = 90  # one TCG guest boots in ~10-15 s here
T = TypeVar("T")


def lock_refused(result: CompletedProcess[str], disk: Path) -> bool:
    """Whether virsh failed because a virtlockd holds ``disk``'s lease: virtlockd's own words (QEMU's lock would
    say 'Failed to get "write" lock')."""
    return result.returncode != 0 and f"resource busy: Lockspace resource '{disk}' is locked" in result.stderr


def timed(action: Callable[[], T]) -> tuple[T, float]:
    """``action``'s result and how long it took, in seconds."""
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def boots(host: Host) -> int:
    """How many times the guest has finished booting on ``host`` (its console log is appended to)."""
    log = console_log(host, VM)
    return log.read_text(errors="replace").count(GUEST_UP) if log.exists() else 0


def wait_for_boot(host: Host, boots_before: int) -> None:
    """Wait until the guest on ``host`` has finished one more boot than ``boots_before``."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while boots(host) <= boots_before:
        assert time.monotonic() < deadline, f"{VM} did not boot on host {host.name} within {BOOT_TIMEOUT_S} s"
        time.sleep(0.1)


@pytest.fixture
def disk(two_hosts: TwoHosts, agent_kit: GuestKit) -> Path:
    """The guest's raw disk in the shared image directory; the guest defined on both hosts."""
    path = create_disk(two_hosts.image_dir / f"{VM}.img")
    for name in HOST_NAMES:
        define_guest(two_hosts[name], VM, path, agent_kit)
    return path


def test_a_disk_running_on_one_host_is_refused_on_the_other_until_that_host_loses_power_and_then_on_it(
        two_hosts: TwoHosts, disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_hosts["A"], two_hosts["B"]
    timings: dict[str, float] = {}

    # A runs the guest, booted.
    started = time.monotonic()
    _, timings["A: virsh start"] = timed(lambda: a.virsh("start", VM))
    wait_for_boot(a, 0)
    timings["A: guest booted, from its start"] = time.monotonic() - started
    guest_on_a = two_hosts.pids("A").qemu
    assert len(guest_on_a) == 1 and domain_state(a, VM) == "running"

    # B's start of the same disk is refused by the lock manager; A's guest runs on, undisturbed.
    refused, timings["B: start refused after"] = timed(lambda: b.virsh_result("start", VM))
    assert lock_refused(refused, disk), refused.stderr
    assert domain_state(b, VM) == "shut off" and not two_hosts.pids("B").qemu
    assert domain_state(a, VM) == "running" and two_hosts.pids("A").qemu == guest_on_a

    # A loses power (its QEMU, libvirtd and virtlockd SIGKILLed at once); B then starts the guest.
    before = two_hosts.pids("A")
    assert before.libvirtd and before.virtlockd and before.qemu == guest_on_a
    boots_on_b = boots(b)
    power_lost = time.monotonic()
    killed = two_hosts.power_loss("A")
    timings["A: all of it dead after"] = time.monotonic() - power_lost
    assert killed == before and not two_hosts.pids("A").all()
    b.virsh("start", VM)
    timings["B: running, from A's power loss"] = time.monotonic() - power_lost
    assert domain_state(b, VM) == "running" and len(two_hosts.pids("B").qemu) == 1
    wait_for_boot(b, boots_on_b)
    timings["B: guest booted, from A's power loss"] = time.monotonic() - power_lost

    # A comes back (empty /run/libvirt, virtlockd and libvirtd afresh): a forced start of the disk there is refused.
    back, timings["A: back (virtlockd, libvirtd) in"] = timed(lambda: two_hosts.restart_libvirtd("A"))
    assert back.libvirtd and back.virtlockd and not back.qemu and domain_state(a, VM) == "shut off"
    refused, timings["A: forced start refused after"] = timed(lambda: a.virsh_result("start", "--force-boot", VM))
    assert lock_refused(refused, disk), refused.stderr
    assert domain_state(a, VM) == "shut off" and domain_state(b, VM) == "running"

    with capsys.disabled():
        print(f"\ndisk locks across two hosts (direct leases on {disk.name}, TCG guest):", flush=True)
        for what, seconds in timings.items():
            print(f"  {what}: {seconds:.2f} s", flush=True)
        print(f"  A's power loss killed {killed}", flush=True)


def test_a_paused_guest_or_a_dead_virtlockd_leaves_its_disk_unguarded(
        two_hosts: TwoHosts, disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The gaps a failover must know of (FIELD-NOTES.md): libvirt releases a guest's leases while it is paused,
    and virtlockd's locks die with virtlockd while its guests run on; a new virtlockd does not take them back."""
    a, b = two_hosts["A"], two_hosts["B"]
    a.virsh("start", VM)
    refused = b.virsh_result("start", VM)
    assert lock_refused(refused, disk), refused.stderr

    # Paused on A: B starts the disk (two QEMUs hold it open: QEMU's lock is out of the way); A cannot resume.
    a.virsh("suspend", VM)
    b.virsh("start", VM)
    assert domain_state(a, VM) == "paused" and domain_state(b, VM) == "running"
    resumed = a.virsh_result("resume", VM)
    assert lock_refused(resumed, disk), resumed.stderr
    assert domain_state(a, VM) == "paused"
    a.virsh("destroy", VM)

    # B's virtlockd killed while the guest runs there: A starts the disk too, two guests on one disk.
    guest_on_b = two_hosts.pids("B").qemu
    virtlockd = b.kill_daemon("virtlockd")
    assert domain_state(b, VM) == "running" and two_hosts.pids("B").qemu == guest_on_b
    a.virsh("start", VM)
    assert domain_state(a, VM) == "running" and domain_state(b, VM) == "running"

    # A new virtlockd on B holds nothing for B's running guest: A, stopped, starts the disk once more.
    restarted = two_hosts.restart_libvirtd("B")
    assert restarted.virtlockd not in (0, virtlockd) and restarted.qemu == guest_on_b
    a.virsh("destroy", VM)
    a.virsh("start", VM)
    assert domain_state(a, VM) == "running" and domain_state(b, VM) == "running"
    with capsys.disabled():
        print(f"\nunguarded disk: a paused guest's lease was taken by the other host; with B's virtlockd "
              f"{virtlockd} killed (and after its restart) A ran {disk.name} beside B's guest {guest_on_b}",
              flush=True)
