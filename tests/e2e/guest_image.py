"""A minimal real guest for the end-to-end test, built from Debian's packages and cached between runs.

The guest is a Debian kernel plus an initramfs: busybox-static (shell, ``ip``), the kernel's own e1000
module, Debian's Python 3.11 (python3.11-minimal, libpython3.11-minimal, libpython3.11-stdlib and the shared
libraries they load, unpacked with ``dpkg-deb -x`` and pruned), the real ``vmq/responder.py`` installed as
``/usr/local/lib/vmq/vmq_responder.py``, and ``/init`` (below). Nothing is compiled: every package comes
from ``apt-get download``, so the guest's Python is the one a Debian 12 guest has.

Per guest, a second small cpio archive is appended to the shared one (the kernel unpacks concatenated
archives in order): ``/etc/vmq/responder.toml`` (mode 0600, from ``vmq keys add``), so the key never
appears on the kernel command line.

The shared part is cached under ``cache_dir/<key>/`` where the key hashes the exact package files apt
would download (name, version, checksum), the responder's source and this file: a new Debian point
release, a changed responder or a changed ``/init`` builds a new image; anything else reuses it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESPONDER = ROOT / "vmq" / "responder.py"
KERNEL_META = "linux-image-amd64"
USERLAND = ("busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
            "libc6", "libssl3", "zlib1g", "libexpat1", "libffi8", "libuuid1")
PYTHON = "/usr/bin/python3.11"
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"  # QEMU user-mode networking: the host's loopback is 10.0.2.2
# Parts of the stdlib the responder never imports (it needs json, ssl, hashlib, hmac, socket, subprocess,
# threading, logging, argparse, uuid, dataclasses, urllib.parse): dropped to keep the image small.
PRUNE_STDLIB = ("test", "idlelib", "ensurepip", "tkinter", "pydoc_data", "lib2to3", "turtledemo", "distutils",
                "unittest", "config-3.11-x86_64-linux-gnu", "sqlite3", "asyncio", "email", "xml", "xmlrpc",
                "http", "ctypes", "multiprocessing", "concurrent", "curses", "dbm", "wsgiref", "venv",
                "zoneinfo", "site-packages", "lib-dynload/_test*", "lib-dynload/*sqlite*",
                "lib-dynload/_tkinter*", "lib-dynload/_curses*", "lib-dynload/readline*", "lib-dynload/_dbm*",
                "lib-dynload/_ctypes_test*", "lib-dynload/xxlimited*", "lib-dynload/_xxtestfuzz*")
PRUNE_ROOT = ("usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/engines-3", "etc")

# PID 1 of the guest (busybox sh). It brings up the network statically on QEMU's user-mode subnet, runs
# the responder under a restart loop (as systemd's Restart=always would), and obeys one-word commands on
# the second serial port, which the host side exposes as a unix socket: this is how the test makes the
# responder hang inside a running guest without any other channel into it.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
echo "vmq-guest: boot_id $(cat /proc/sys/kernel/random/boot_id)"
insmod /lib/modules/e1000.ko
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ip route add default via {HOST_IP}
responder() {{
  while true; do
    {PYTHON} /usr/local/lib/vmq/vmq_responder.py --config /etc/vmq/responder.toml &
    echo $! > /run/responder.pid
    wait $!
    echo "vmq-guest: responder exited ($?), restarting in 1 s"
    sleep 1
  done
}}
responder &
commands() {{
  stty -F /dev/ttyS1 raw -echo 2>/dev/null
  while read -r command < /dev/ttyS1; do
    case "$command" in
      hang-responder) echo "vmq-guest: SIGSTOP responder $(cat /run/responder.pid)"
                      kill -STOP "$(cat /run/responder.pid)" ;;
      *) echo "vmq-guest: unknown command $command" ;;
    esac
  done
}}
[ -e /dev/ttyS1 ] && commands &
echo "vmq-guest: up"
while true; do sleep 3600; done
"""


class GuestBuildError(RuntimeError):
    """The guest image could not be built (apt, dpkg-deb or a missing file); the message says which step."""


@dataclass(frozen=True)
class GuestKit:
    """The shared parts of every test guest: a kernel and a base initramfs (gzip'd newc cpio)."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    cache_key: str
    built: bool  # False when it came from the cache


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` depends on now (e.g. linux-image-6.1.0-56-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
    if not found:
        raise GuestBuildError(f"apt-cache depends {KERNEL_META} names no kernel package (run apt-get update)")
    return found[0]


def package_uris(packages: list[str]) -> list[str]:
    """apt's exact download lines (URI, file name with version, size, checksum) without downloading."""
    out = _run(["apt-get", "download", "--print-uris", *packages])
    lines = sorted(line for line in out.splitlines() if line.startswith("'"))
    if len(lines) != len(packages):
        raise GuestBuildError(f"apt-get download --print-uris gave {len(lines)} lines for {len(packages)} "
                              f"packages: {out[-1000:]}")
    return lines


def cache_key(uris: list[str]) -> str:
    """Hash of the package files (not their mirror), the responder and this builder."""
    digest = hashlib.sha256()
    for line in uris:
        digest.update(line.split()[1].encode() + b" " + line.split()[-1].encode() + b"\n")
    digest.update(RESPONDER.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ cpio
def _cpio_entry(out: io.BufferedIOBase, name: str, mode: int, data: bytes = b"", ino: int = 0) -> None:
    """One newc ("070701") entry: 110-byte ASCII header, name, data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header + encoded + b"\0" * ((-len(header) - len(encoded)) % 4))
    out.write(data + b"\0" * ((-len(data)) % 4))


def write_cpio(tree: Path | None, extra: dict[str, tuple[int, bytes]], target: Path) -> None:
    """gzip'd newc archive of every file, directory and symlink under ``tree`` plus ``extra`` (path: mode,
    data), owned by root; written to ``target`` atomically."""
    buffer = io.BytesIO()
    ino = 1
    if tree is not None:
        for directory, dirnames, filenames in os.walk(tree):  # a directory's entry precedes its content
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(directory) / name
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    data = os.readlink(path).encode()
                elif stat.S_ISREG(info.st_mode):
                    data = path.read_bytes()
                elif stat.S_ISDIR(info.st_mode):
                    data = b""
                else:
                    continue
                _cpio_entry(buffer, path.relative_to(tree).as_posix(), info.st_mode, data, ino)
                ino += 1
    for name, (mode, data) in sorted(extra.items()):
        _cpio_entry(buffer, name.lstrip("/"), mode, data, ino)
        ino += 1
    _cpio_entry(buffer, "TRAILER!!!", 0)
    partial = target.with_suffix(".partial")
    partial.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0))
    partial.replace(target)


# ------------------------------------------------------------------------------------------ build
def build_guest_kit(cache_dir: Path) -> GuestKit:
    """The kernel and base initramfs for the current Debian packages, from the cache or built now."""
    kernel_pkg = kernel_package()
    uris = package_uris([kernel_pkg, *USERLAND])
    key = cache_key(uris)
    kernel_version = kernel_pkg.removeprefix("linux-image-")
    done = cache_dir / key
    kit = GuestKit(done / "vmlinuz", done / "initramfs.cpio.gz", kernel_version, key, built=False)
    if kit.kernel.exists() and kit.initramfs.exists():
        return kit
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-") as scratch_name:
        scratch = Path(scratch_name)
        debs, root, kernel_tree = scratch / "debs", scratch / "root", scratch / "kernel"
        for directory in (debs, root, kernel_tree):
            directory.mkdir()
        _run(["apt-get", "download", kernel_pkg, *USERLAND], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            target = kernel_tree if deb.name.startswith("linux-image-") else root
            _run(["dpkg-deb", "-x", str(deb), str(target)])
        vmlinuz = kernel_tree / "boot" / f"vmlinuz-{kernel_version}"
        modules = sorted(kernel_tree.glob(f"lib/modules/{kernel_version}/kernel/drivers/net/ethernet/intel/"
                                          "e1000/e1000.ko*"))
        if not vmlinuz.exists() or not modules:
            raise GuestBuildError(f"{kernel_pkg} lacks {vmlinuz.name} or e1000.ko")
        _populate_root(root, modules[0])
        staging = scratch / "out"
        staging.mkdir()
        shutil.copy2(vmlinuz, staging / "vmlinuz")
        write_cpio(root, {}, staging / "initramfs.cpio.gz")
        if done.exists():
            shutil.rmtree(done)
        staging.rename(done)
    for old in cache_dir.iterdir():  # keep only the current image: each is ~80 MB with its kernel
        if old.name != key and old.is_dir() and not old.name.startswith("build-"):
            shutil.rmtree(old, ignore_errors=True)
    return GuestKit(kit.kernel, kit.initramfs, kernel_version, key, built=True)


def _populate_root(root: Path, e1000: Path) -> None:
    """Prune the unpacked packages, add /init, the module and the responder, and check Python imports it."""
    for pattern in PRUNE_ROOT:
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    stdlib = root / "usr/lib/python3.11"
    for pattern in PRUNE_STDLIB:
        for path in stdlib.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for directory in ("proc", "sys", "dev", "tmp", "run", "etc/vmq", "lib/modules", "usr/local/lib/vmq"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    module = root / "lib/modules/e1000.ko"
    if e1000.suffix == ".xz":
        module.write_bytes(_run_bytes(["xz", "-dc", str(e1000)]))
    else:
        shutil.copy2(e1000, module)
    shutil.copy2(RESPONDER, root / "usr/local/lib/vmq/vmq_responder.py")
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    # Run the guest's own Python on its own root (chroot, as root): proves every import resolves with
    # these libraries before any VM boots, and leaves the bytecode in __pycache__ so a TCG boot does not
    # compile the stdlib every time.
    check = ("import sys; sys.path.insert(0, '/usr/local/lib/vmq'); import vmq_responder, ssl, hashlib, uuid; "
             "print(vmq_responder.__version__, ssl.OPENSSL_VERSION)")
    try:
        # A clean environment: PYTHONDONTWRITEBYTECODE from the caller would skip the bytecode.
        _run([shutil.which("chroot") or "/usr/sbin/chroot", str(root), PYTHON, "-c", check], env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except GuestBuildError as exc:
        raise GuestBuildError(f"the guest's Python cannot import the responder: {exc}") from None


def _run_bytes(argv: list[str]) -> bytes:
    proc = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout


def guest_initramfs(kit: GuestKit, responder_toml: str, target: Path) -> Path:
    """The base initramfs with this guest's ``/etc/vmq/responder.toml`` (0600) appended as a second archive."""
    extra = target.with_suffix(".guest.cpio.gz")
    write_cpio(None, {"etc/vmq/responder.toml": (stat.S_IFREG | 0o600, responder_toml.encode())}, extra)
    target.write_bytes(kit.initramfs.read_bytes() + extra.read_bytes())
    extra.unlink()
    return target
