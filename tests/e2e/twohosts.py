"""Two simulated hypervisors, ``A`` and ``B``, on this machine, sharing one image directory under libvirt's lock
manager: the harness of issue 18's real-VM tests (a failover must never run one disk twice).

**A host** is a libvirtd with its own virtlockd (``lock_manager = "lockd"``) in namespaces made by ``unshare
--mount --pid --fork --mount-proc --uts``; ``nsenter`` puts the daemons into them.

- *mount*: the host's directories bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt and
  /var/log/libvirt (the qemu driver's paths, qemu-lockd.conf and virtlockd's socket are fixed at build time:
  FIELD-NOTES.md); over /var/cache/libvirt one directory shared by both and kept between runs, so QEMU's
  capabilities are probed once. Pid files go to the private /run/libvirt (libvirtd's default,
  /run/libvirtd.pid, is the system libvirtd's), seen outside as ``<host dir>/run`` with the socket
  (``Host.uri``). The system's libvirtd and its files are never touched.
- *pid*: PID 1 is one line of Python that lets the kernel reap QEMU (it daemonizes onto PID 1) and exits at EOF
  on stdin: when the harness closes it, or dies. Killing PID 1 is a **power loss**: the kernel SIGKILLs every
  process of the namespace (QEMU, libvirtd, virtlockd) at once, and PID 1 is gone only after all of them. The
  mount namespace and its mounts die with its last process: nothing outlives the harness, not even a SIGKILLed
  pytest. /proc is the namespace's own, where libvirtd checks QEMU's pid.
- *uts*: hostname ``host-a`` / ``host-b``; ``host_uuid`` differs too.

A host booted again after a power loss has an empty /run/libvirt, as a real host's tmpfs would: the dead QEMU's
status file would otherwise have libvirtd take a stale pid for a live guest.

**Leases**: direct by default (``auto_disk_leases``: virtlockd fcntl-locks the image file itself), indirect
(``file_lockspace_dir``: a lease file named by the SHA-256 of the disk's path, in a directory beside the images)
with ``leases="indirect"``; both refuse alike. Direct is the default because the lock lives on the image, which
is on the shared storage anyway (an indirect lockspace that is not the same shared directory on every host
protects nothing, silently), and the refusal names the disk: ``resource busy: Lockspace resource
'/.../disk.img' is locked`` (indirect: the hash).

**QEMU's own image locking is waived**, so that only virtlockd can refuse. QEMU 7.2 OFD-locks an image it opens
for writing and refuses a second writer (``Failed to get shared "write" lock``), first: libvirt starts QEMU
paused and takes the leases only when it starts the CPUs. ``define_guest`` sets the disk device's ``share-rw``
with libvirt's ``<qemu:override>`` (QEMU namespace, libvirt >= 8.2; taints the domain "custom-device"), as
libvirt itself does for a ``<shareable/>`` raw disk, while the lock manager, reading only ``<disk>``, still
takes an exclusive lease. Not possible: ``file.locking=off`` (libvirt writes the -blockdev JSON, no XML sets
it; ``-set`` in ``<qemu:commandline>`` reaches neither -blockdev nor a JSON -device); ``<shareable/>`` (the
lease turns shared).
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from tests.e2e.agent_image import AGENT_CHANNEL
from tests.e2e.debian import GuestKit
from tests.e2e.realvm import domain_xml

HOST_NAMES = ("A", "B")
PRIVATE_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt"}
# ./dev install-vm's qemu.conf (libvirtd runs QEMU without systemd here), plus the lock manager.
QEMU_CONF = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\nnamespaces = []\n'
             'cgroup_controllers = []\nstdio_handler = "file"\nlock_manager = "lockd"\n')
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DISK_ALIAS = "ua-disk0"  # <qemu:override> names a device by a user alias ("ua-")
START_TIMEOUT_S = 60.0
# PID 1 of a host: children it is left (QEMU) are reaped by the kernel (SIGCHLD ignored); it ends at EOF on stdin.
INIT = "import signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); sys.stdin.buffer.read()"
ET.register_namespace("qemu", QEMU_NS)


class HostError(RuntimeError):
    """A simulated host did not boot, a daemon did not come up, or a process outlived its host."""


@dataclass(frozen=True)
class HostPids:
    """A host's processes, as pids outside its namespace (``os.kill`` takes them); 0 / () when not running."""

    init: int
    libvirtd: int
    virtlockd: int
    qemu: tuple[int, ...]

    def all(self) -> tuple[int, ...]:
        """Every pid that is set."""
        return tuple(pid for pid in (self.init, self.libvirtd, self.virtlockd, *self.qemu) if pid)


class Host:
    """One simulated hypervisor (module docstring); ``root`` keeps its directories and logs across boots."""

    def __init__(self, name: str, root: Path, cache_dir: Path, lockspace_dir: Path | None) -> None:
        self.name, self.root, self.cache_dir, self.lockspace_dir = name, root, cache_dir, lockspace_dir
        self.uri = f"qemu+unix:///system?socket={root / 'run' / 'libvirt-sock'}"
        self._unshare: subprocess.Popen[bytes] | None = None
        self._init = 0
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}  # their nsenter processes

    def is_on(self) -> bool:
        """Whether the host's PID 1 runs."""
        return self._unshare is not None and self._unshare.poll() is None

    def boot(self) -> None:
        """Power on: new namespaces, an empty /run/libvirt, then virtlockd and libvirtd; returns once libvirtd
        answers. HostError (with the log's end) when something did not come up or the host was on."""
        if self.is_on():
            raise HostError(f"host {self.name} is on already")
        shutil.rmtree(self.root / "run", ignore_errors=True)
        for sub in PRIVATE_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        mounts = [*((self.root / sub, target) for sub, target in PRIVATE_DIRS.items()),
                  (self.cache_dir, "/var/cache/libvirt")]
        script = " && ".join([*(f"mkdir -p {target} && mount --bind {shlex.quote(str(source))} {target}"
                                for source, target in mounts),
                              f"hostname host-{self.name.lower()}", "echo ready",
                              f"exec {shlex.quote(sys.executable)} -c {shlex.quote(INIT)}"])
        with open(self.root / "boot.log", "ab") as log:
            self._unshare = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child",
                 "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        assert self._unshare.stdout is not None
        with self._unshare.stdout:
            if self._unshare.stdout.readline() != b"ready\n":
                raise HostError(f"host {self.name} did not boot: {_tail(self.root / 'boot.log')}")
        self._init = _child(self._unshare.pid)
        if not self._init:
            raise HostError(f"host {self.name}: no PID 1 under unshare {self._unshare.pid}")
        self.start_daemons()

    def _write_config(self) -> None:
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(f'host_uuid = "{uuid.uuid5(uuid.NAMESPACE_URL, self.uri)}"\n')
        (etc / "qemu.conf").write_text(QEMU_CONF)
        lockspace = f'file_lockspace_dir = "{self.lockspace_dir}"\n' if self.lockspace_dir else ""
        (etc / "qemu-lockd.conf").write_text(f"auto_disk_leases = 1\nrequire_lease_for_disks = 1\n{lockspace}")

    def start_daemons(self) -> None:
        """Start virtlockd, then libvirtd, where not running (booting the host when it is off); returns once
        libvirtd answers. Idempotent."""
        if not self.is_on():
            self.boot()
            return
        pids = self.pids()
        if not pids.virtlockd:
            self._spawn("virtlockd", lambda: _accepts(self.root / "run" / "virtlockd-sock"))
        if not pids.libvirtd:
            self._spawn("libvirtd", lambda: self.virsh_result("uri").returncode == 0)

    def _spawn(self, daemon: str, ready: Callable[[], bool]) -> None:
        if daemon in self._daemons:
            self._daemons[daemon].wait(timeout=30)  # the nsenter of the one that died
        log = self.root / f"{daemon}.log"
        with open(log, "ab") as log_file:
            self._daemons[daemon] = process = subprocess.Popen(
                ["nsenter", "--target", str(self._init), "--mount", "--pid", "--uts", "--",
                 daemon, "--pid-file", f"/run/libvirt/{daemon}.pid"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise HostError(f"{daemon} of host {self.name} did not come up: {_tail(log)}")
            time.sleep(0.1)

    def pids(self) -> HostPids:
        """PID 1, libvirtd and virtlockd (the children of their nsenter) and every QEMU of the host (found by its
        pid namespace)."""
        pid_ns, qemu = "", []
        if self.is_on():
            with suppress(OSError):
                pid_ns = os.readlink(f"/proc/{self._init}/ns/pid")
        if not pid_ns:
            return HostPids(0, 0, 0, ())
        daemons = {name: _child(process.pid) for name, process in self._daemons.items() if process.poll() is None}
        for entry in Path("/proc").iterdir():
            try:
                if (entry.name.isdigit() and os.readlink(entry / "ns" / "pid") == pid_ns
                        and os.readlink(entry / "exe").endswith("/qemu-system-x86_64")):
                    qemu.append(int(entry.name))
            except OSError:  # gone meanwhile, or a zombie: not running
                continue
        return HostPids(self._init, daemons.get("libvirtd", 0), daemons.get("virtlockd", 0), tuple(sorted(qemu)))

    def power_loss(self) -> HostPids:
        """SIGKILL the host's PID 1, which kills its QEMUs, libvirtd and virtlockd at once; returns what it killed
        once all of it is gone (its locks with it). Nothing when the host is off."""
        killed = self.pids()
        if self._unshare is not None:
            if killed.init:  # never a stale pid: unshare still runs, so PID 1 has not been reaped
                with suppress(ProcessLookupError):
                    os.kill(killed.init, signal.SIGKILL)
            else:
                self._unshare.kill()  # --kill-child: PID 1 (if any) goes with it
            self._unshare.wait(timeout=30)  # unshare exits after PID 1, which exits after its whole namespace
            for process in self._daemons.values():
                process.wait(timeout=30)
        self._unshare, self._init = None, 0
        self._daemons.clear()
        return killed

    def kill_daemon(self, daemon: Literal["libvirtd", "virtlockd"]) -> int:
        """SIGKILL only ``daemon``, the guests running on; its pid, once it is gone."""
        pid: int = getattr(self.pids(), daemon)
        if not pid:
            raise HostError(f"{daemon} of host {self.name} is not running")
        os.kill(pid, signal.SIGKILL)
        self._daemons[daemon].wait(timeout=30)
        return pid

    def virsh_result(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``virsh -c <this host> args``, whatever its outcome."""
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=60,
                              check=False)

    def virsh(self, *args: str) -> str:
        """``virsh -c <this host> args``: its stdout; AssertionError with virsh's stderr when it failed."""
        result = self.virsh_result(*args)
        if result.returncode != 0:
            raise AssertionError(f"host {self.name}: virsh {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout


class TwoHosts:
    """Hosts A and B, booted on entry (A first: it warms the capabilities cache), powered off on exit, after a
    failure too; ``image_dir`` at one path for both. ``hosts["A"]`` is a Host (its ``uri``, ``kill_daemon``...)."""

    def __init__(self, root: Path, cache_dir: Path, leases: Literal["direct", "indirect"] = "direct") -> None:
        self.image_dir = root / "images"
        lockspace_dir = root / "lockspace" if leases == "indirect" else None
        for directory in (self.image_dir, lockspace_dir):
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)
        self.hosts = {name: Host(name, root / name, cache_dir, lockspace_dir) for name in HOST_NAMES}

    def __enter__(self) -> Self:
        try:
            for host in self.hosts.values():
                host.boot()
                host.virsh("capabilities")  # probes QEMU into a cold cache (~2-8 s), ~0.05 s warm
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Power every host off; HostError if one could not be or any of their processes survived. Idempotent."""
        killed: list[int] = []
        failures = []
        for host in self.hosts.values():
            try:
                killed.extend(host.power_loss().all())
            except (subprocess.TimeoutExpired, OSError) as error:  # the other host is powered off still
                failures.append(f"host {host.name}: {error!r}")
        failures += [f"pid {pid} survived its host's power-off" for pid in killed if _alive(pid)]
        if failures:
            raise HostError("; ".join(failures))

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def virsh(self, name: str, *args: str) -> str:
        """virsh on host ``name``: its stdout (AssertionError when it failed)."""
        return self.hosts[name].virsh(*args)

    def pids(self, name: str) -> HostPids:
        """Host ``name``'s PID 1, libvirtd, virtlockd and QEMU pids."""
        return self.hosts[name].pids()

    def power_loss(self, name: str) -> HostPids:
        """Host ``name`` loses power (Host.power_loss): what was killed, once it is all gone."""
        return self.hosts[name].power_loss()

    def restart_libvirtd(self, name: str) -> HostPids:
        """Start host ``name``'s virtlockd and libvirtd again, booting it after a power loss; its pids."""
        self.hosts[name].start_daemons()
        return self.hosts[name].pids()


def create_disk(path: Path, size_mib: int = 16) -> Path:
    """A sparse raw image at ``path`` (the test guests never write it: its lease is what matters)."""
    with open(path, "wb") as image:
        image.truncate(size_mib * 2**20)
    return path


def console_log(host: Host, name: str) -> Path:
    """Guest ``name``'s serial console on ``host`` (QEMU appends to it at every start)."""
    return host.root / "guests" / f"{name}.console.log"


def define_guest(host: Host, name: str, disk_path: Path, kit: GuestKit, memory_mib: int = 128,
                 channels: tuple[str, ...] = (AGENT_CHANNEL,)) -> str:
    """Define guest ``name`` on ``host`` and return its XML: ``kit``'s kernel and initramfs (realvm.domain_xml,
    console in ``console_log(host, name)``), ``disk_path`` as raw virtio disk under an exclusive lease with QEMU's
    own lock waived (module docstring), a UUID derived from ``name``: each host defines the same VM."""
    workdir = console_log(host, name).parent
    workdir.mkdir(parents=True, exist_ok=True)
    domain = ET.fromstring(domain_xml(name, kit.kernel, kit.initramfs, workdir, network=False, channels=channels,
                                      memory_mib=memory_mib))
    ET.SubElement(domain, "uuid").text = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmq-e2e-guest:{name}"))
    devices = domain.find("devices")
    assert devices is not None
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=str(disk_path))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    ET.SubElement(disk, "alias", name=DISK_ALIAS)
    device = ET.SubElement(ET.SubElement(domain, f"{{{QEMU_NS}}}override"), f"{{{QEMU_NS}}}device", alias=DISK_ALIAS)
    ET.SubElement(ET.SubElement(device, f"{{{QEMU_NS}}}frontend"), f"{{{QEMU_NS}}}property", name="share-rw",
                  type="bool", value="true")
    xml = ET.tostring(domain, encoding="unicode")
    (workdir / f"{name}.xml").write_text(xml)
    host.virsh("define", str(workdir / f"{name}.xml"))
    return xml


def domain_state(host: Host, name: str) -> str:
    """virsh's words for guest ``name``'s state on ``host``: "running", "paused", "shut off", ..."""
    return host.virsh("domstate", name).strip()


def two_hosts_problem() -> str | None:
    """Why TwoHosts cannot run here, or None: not root, a tool, libvirt's lockd plugin or /proc's children files
    missing, no namespaces."""
    if os.geteuid() != 0:
        return "two simulated hypervisors need root (namespaces, bind mounts)"
    for tool in ("unshare", "nsenter", "mount", "libvirtd", "virtlockd", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not glob.glob("/usr/lib/*/libvirt/lock-driver/lockd.so"):
        return "libvirt's lockd lock-manager plugin is not installed"
    if not Path(f"/proc/self/task/{os.getpid()}/children").exists():
        return "this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--uts", "true"],
                           capture_output=True, text=True, timeout=30, check=False)
    return f"cannot make mount/pid/uts namespaces: {probe.stderr.strip()}" if probe.returncode else None


def _child(pid: int) -> int:
    """The child of ``pid`` (unshare's or nsenter's, in the host's pid namespace), 0 if it has none (any more)."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    except (OSError, IndexError):
        return 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: its files and locks are released)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"
