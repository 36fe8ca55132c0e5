"""The responder guest of the end-to-end test (the ``redis`` and ``channel`` paths), built from Debian's packages
and cached between runs (vmq's part of the guest; the shared machinery is tests/e2e/debian.py).

The guest is a Debian kernel plus an initramfs: busybox-static (shell, ``ip``), the kernel's own e1000 and virtio
console modules, Debian's Python 3.11 (python3.11-minimal, libpython3.11-minimal, libpython3.11-stdlib and the
shared libraries they load, unpacked with ``dpkg-deb -x`` and pruned), the real ``vmq/responder.py`` installed as
``/usr/local/lib/vmq/vmq_responder.py``, and ``/init`` (tests/e2e/guest_init.py) supervising the responder. Nothing
is compiled: every package comes from ``apt-get download``, so the guest's Python is the one a Debian 12 guest has.

One image serves both paths: a guest with a network card (``redis``) brings it up on QEMU's user-mode subnet; a
guest without one (``channel``) has only its virtio-serial port, which the responder finds by name. Which path
the responder takes is in its config: per guest, a second small cpio archive is appended to the shared one (the
kernel unpacks concatenated archives in order) holding ``/etc/vmq/responder.toml`` (mode 0600, from
``vmq keys add``), so the key never appears on the kernel command line.

The image is cached under ``cache_dir/responder/<key>/`` (tests.e2e.debian.cached_kit): the key hashes the exact
package files apt would download, the responder's source and these builders.
"""

from __future__ import annotations

import stat
from pathlib import Path

from tests.e2e.debian import (
    GuestBuildError,
    GuestKit,
    Kernel,
    cached_kit,
    check_in_chroot,
    install_modules,
    prune,
    write_cpio,
)
from tests.e2e.guest_init import init_script

__all__ = ["GUEST_IP", "HOST_IP", "GuestBuildError", "GuestKit", "build_guest_kit", "guest_initramfs"]

ROOT = Path(__file__).resolve().parents[2]
RESPONDER = ROOT / "vmq" / "responder.py"
USERLAND = ["busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
            "libc6", "libssl3", "zlib1g", "libexpat1", "libffi8", "libuuid1"]
PYTHON = "/usr/bin/python3.11"
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"  # QEMU user-mode networking: the host's loopback is 10.0.2.2
# The NIC of a redis guest; the virtio-serial port of a channel guest (virtio_pci brings the bus).
MODULES = ("e1000", "virtio_pci", "virtio_console")
# Parts of the stdlib the responder never imports (it needs json, ssl, hashlib, hmac, socket, subprocess,
# threading, logging, argparse, uuid, dataclasses, urllib.parse): dropped to keep the image small.
PRUNE_STDLIB = ("test", "idlelib", "ensurepip", "tkinter", "pydoc_data", "lib2to3", "turtledemo", "distutils",
                "unittest", "config-3.11-x86_64-linux-gnu", "sqlite3", "asyncio", "email", "xml", "xmlrpc",
                "http", "ctypes", "multiprocessing", "concurrent", "curses", "dbm", "wsgiref", "venv",
                "zoneinfo", "site-packages", "lib-dynload/_test*", "lib-dynload/*sqlite*",
                "lib-dynload/_tkinter*", "lib-dynload/_curses*", "lib-dynload/readline*", "lib-dynload/_dbm*",
                "lib-dynload/_ctypes_test*", "lib-dynload/xxlimited*", "lib-dynload/_xxtestfuzz*")
PRUNE_ROOT = ("usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/engines-3", "etc")
# With a network card (a redis guest), a static address on QEMU's user-mode subnet; without one, nothing.
NETWORK_SETUP = f"""ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add {GUEST_IP}/24 dev eth0
  ip route add default via {HOST_IP}
fi"""
RESPONDER_COMMAND = f"{PYTHON} /usr/local/lib/vmq/vmq_responder.py --config /etc/vmq/responder.toml"


def build_guest_kit(cache_dir: Path) -> GuestKit:
    """The kernel and base initramfs of the responder guest for the current Debian packages, cached or built."""
    return cached_kit(cache_dir, "responder", USERLAND, (RESPONDER, Path(__file__),
                                                         Path(__file__).with_name("guest_init.py")), _populate_root)


def _populate_root(root: Path, kernel: Kernel) -> None:
    """Prune the unpacked packages, add /init, the modules and the responder, and check Python imports it."""
    prune(root, PRUNE_ROOT)
    prune(root / "usr/lib/python3.11", PRUNE_STDLIB)
    for directory in ("proc", "sys", "dev", "tmp", "run", "etc/vmq", "usr/local/lib/vmq"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    insmods = install_modules(kernel.load_order(MODULES), root)
    (root / "usr/local/lib/vmq/vmq_responder.py").write_bytes(RESPONDER.read_bytes())
    init = root / "init"
    init.write_text(init_script("responder", RESPONDER_COMMAND, insmods, NETWORK_SETUP))
    init.chmod(0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    # The guest's own Python on its own root: every import resolves with these libraries before any VM boots,
    # and the bytecode left in __pycache__ spares a TCG boot compiling the stdlib every time. (A clean
    # environment: PYTHONDONTWRITEBYTECODE from the caller would skip the bytecode.)
    check = ("import sys; sys.path.insert(0, '/usr/local/lib/vmq'); import vmq_responder, ssl, hashlib, uuid; "
             "print(vmq_responder.__version__, ssl.OPENSSL_VERSION)")
    check_in_chroot(root, [PYTHON, "-c", check], "the guest's Python cannot import the responder")


def guest_initramfs(kit: GuestKit, responder_toml: str, target: Path) -> Path:
    """The base initramfs with this guest's ``/etc/vmq/responder.toml`` (0600) appended as a second archive."""
    extra = target.with_suffix(".guest.cpio.gz")
    write_cpio(None, {"etc/vmq/responder.toml": (stat.S_IFREG | 0o600, responder_toml.encode())}, extra)
    target.write_bytes(kit.initramfs.read_bytes() + extra.read_bytes())
    extra.unlink()
    return target
