"""The ``agent`` guest of the end-to-end test: nothing of vmq inside, no Python, no network; only Debian's QEMU
guest agent, asked by the host through libvirt.

A Debian kernel plus an initramfs of busybox-static, Debian's ``qemu-guest-agent`` (7.2) with the shared
libraries it loads (libc6, libglib2.0-0 for libglib/libgmodule, libpcre2-8-0, libnuma1, liburing2, libudev1),
unpacked with ``dpkg-deb -x`` and pruned, the kernel's virtio console modules, and ``/init``
(tests/e2e/guest_init.py) that finds the port ``org.qemu.guest_agent.0`` by ``/sys/class/virtio-ports/*/name``
and supervises ``qemu-ga -m virtio-serial -p /dev/vportNpM``. Cached under ``cache_dir/agent/<key>/`` as the
responder guest is (tests/e2e/debian.py), sharing its downloaded kernel.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.debian import (
    GuestBuildError,
    GuestKit,
    Kernel,
    cached_kit,
    check_in_chroot,
    install_modules,
    prune,
)
from tests.e2e.guest_init import init_script, wait_for_virtio_port

__all__ = ["AGENT_CHANNEL", "build_agent_kit"]

AGENT_CHANNEL = "org.qemu.guest_agent.0"
USERLAND = ["busybox-static", "qemu-guest-agent", "libc6", "libglib2.0-0", "libpcre2-8-0", "libnuma1", "liburing2",
            "libudev1"]
MODULES = ("virtio_pci", "virtio_console")
QEMU_GA = "/usr/sbin/qemu-ga"
# Everything but the agent's binary and the libraries' .so files.
PRUNE_ROOT = ("usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/gio",
              "usr/lib/x86_64-linux-gnu/glib-2.0", "usr/lib/x86_64-linux-gnu/audit", "usr/libexec", "lib/systemd",
              "usr/lib/systemd", "lib/udev", "usr/lib/udev", "usr/bin/gio*", "usr/bin/gsettings", "etc")
# The agent's freeze hooks and pid file want these; its state dir is /var/run by default.
AGENT_SETUP = "mkdir -p /var /etc/qemu\n[ -e /var/run ] || ln -s /run /var/run\n" + wait_for_virtio_port(AGENT_CHANNEL, "port")
AGENT_COMMAND = f'{QEMU_GA} -m virtio-serial -p "$port"'


def build_agent_kit(cache_dir: Path) -> GuestKit:
    """The kernel and base initramfs of the agent guest for the current Debian packages, cached or built."""
    return cached_kit(cache_dir, "agent", USERLAND, (Path(__file__), Path(__file__).with_name("guest_init.py")),
                      _populate_root)


def _populate_root(root: Path, kernel: Kernel) -> None:
    """Prune the unpacked packages, add /init and the modules, and check that qemu-ga starts on these libraries."""
    prune(root, PRUNE_ROOT)
    for directory in ("proc", "sys", "dev", "tmp", "run", "etc"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    insmods = install_modules(kernel.load_order(MODULES), root)
    init = root / "init"
    init.write_text(init_script("agent", AGENT_COMMAND, insmods, AGENT_SETUP))
    init.chmod(0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    version = check_in_chroot(root, [QEMU_GA, "--version"], "the guest's qemu-ga cannot start")
    if "QEMU Guest Agent" not in version:
        raise GuestBuildError(f"{QEMU_GA} --version said {version!r}")
