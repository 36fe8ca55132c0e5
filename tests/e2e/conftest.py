"""Fixtures of the real-VM test: QEMU that can run a guest, libvirtd on qemu:///system, the cached guest images.

The test needs QEMU, libvirtd and virsh (``./dev install-vm`` installs them and writes the qemu.conf that lets
libvirtd run QEMU without systemd, cgroups or a security driver). When QEMU cannot start a TCG guest at all,
the test is skipped with the reason in words; under CI (``CI=true``) that is a failure instead, because CI
has just installed them and a skip there would hide a broken install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.agent_image import build_agent_kit
from tests.e2e.debian import GuestKit
from tests.e2e.guest_image import build_guest_kit
from tests.e2e.twohosts import TwoHosts, two_hosts_problem

QEMU = "/usr/bin/qemu-system-x86_64"
LIBVIRT_URI = "qemu:///system"
LIBVIRT_SOCKET = Path("/var/run/libvirt/libvirt-sock")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# What libvirtd needs here to run QEMU without systemd (./dev install-vm writes exactly these).
QEMU_CONF_NEEDS = ('user = "root"', 'security_driver = "none"', "cgroup_controllers = []", "namespaces = []")
CACHE_DIR = Path(os.environ.get("VMQ_E2E_CACHE", Path.home() / ".cache" / "vmq-e2e"))


def cannot_run(reason: str) -> None:
    """Skip loudly, or fail under CI, where the install step has just put QEMU and libvirt here."""
    message = f"REAL-VM TEST NOT RUN: {reason} (install with `./dev install-vm`)"
    print(f"\n*** {message} ***", flush=True)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def qemu_problem() -> str | None:
    """Why this machine cannot start a TCG guest, or None: QEMU is started for real with an empty machine."""
    if not os.access(QEMU, os.X_OK):
        return f"{QEMU} is not installed"
    for tool in ("libvirtd", "virsh", "apt-get", "dpkg-deb", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        proc = subprocess.run([QEMU, "-machine", "none", "-accel", "tcg", "-display", "none", "-nodefaults",
                               "-no-user-config", "-qmp", "stdio"],
                              input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                              capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return f"{QEMU} -accel tcg did not answer QMP within 60 s"
    if proc.returncode != 0 or b'"return"' not in proc.stdout:
        return f"{QEMU} -accel tcg cannot start: {proc.stderr.decode(errors='replace').strip()[-500:]}"
    return None


def libvirt_answers() -> bool:
    """Whether libvirtd answers on qemu:///system (its first call takes ~8 s: it probes QEMU once)."""
    proc = subprocess.run(["virsh", "-c", LIBVIRT_URI, "uri"], capture_output=True, timeout=60, check=False)
    return proc.returncode == 0


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    """QEMU can run a TCG guest here, or the test is skipped (failed under CI) with the reason."""
    problem = qemu_problem()
    if problem is not None:
        cannot_run(problem)


@pytest.fixture(scope="session")
def libvirtd(qemu_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A libvirtd serving qemu:///system: the running one, else one started here (stopped at the end)."""
    if LIBVIRT_SOCKET.exists() and libvirt_answers():
        yield LIBVIRT_URI
        return
    conf = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    missing = [line for line in QEMU_CONF_NEEDS if line not in conf]
    if missing:
        cannot_run(f"{QEMU_CONF} lacks {missing}: libvirtd cannot start QEMU without systemd here")
    for directory in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu",
                      "/run/libvirt"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    log = tmp_path_factory.mktemp("libvirtd") / "libvirtd.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(["libvirtd"], stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while not (LIBVIRT_SOCKET.exists() and libvirt_answers()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"libvirtd did not come up on {LIBVIRT_URI}: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield LIBVIRT_URI
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _kit(what: str, build: Callable[[Path], GuestKit]) -> GuestKit:
    started = time.monotonic()
    kit = build(CACHE_DIR)
    took = time.monotonic() - started
    print(f"\n{what} image {kit.cache_key} (kernel {kit.kernel_version}, initramfs "
          f"{kit.initramfs.stat().st_size / 2**20:.1f} MiB): {'built' if kit.built else 'cached'} "
          f"in {took:.1f} s", flush=True)
    return kit


@pytest.fixture(scope="session")
def guest_kit(qemu_ready: None) -> GuestKit:
    """Kernel + base initramfs of the responder guest (redis and channel paths), built on first use, then cached
    in CACHE_DIR."""
    return _kit("responder guest", build_guest_kit)


@pytest.fixture(scope="session")
def agent_kit(qemu_ready: None) -> GuestKit:
    """Kernel + initramfs of the agent guest (only Debian's qemu-guest-agent inside), cached as guest_kit."""
    return _kit("agent guest", build_agent_kit)


@pytest.fixture
def two_hosts(qemu_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    """Hypervisors A and B (tests/e2e/twohosts.py): two more libvirtds, each with its virtlockd, sharing one image
    directory; powered off at the end, even when the test fails. Skipped (failed under CI) where they cannot run."""
    problem = two_hosts_problem()
    if problem is not None:
        cannot_run(problem)
    with TwoHosts(tmp_path_factory.mktemp("twohosts"), CACHE_DIR / "libvirt-cache") as hosts:
        yield hosts
