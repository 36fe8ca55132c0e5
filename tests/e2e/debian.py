"""What every test guest image is made of: Debian packages (downloaded once, kept), a kernel's modules in load
order, a gzip'd newc cpio writer and the cache that keeps a built image until its inputs change.

Nothing is compiled: packages come from ``apt-get download`` and are unpacked with ``dpkg-deb -x``. The .deb
files are kept in ``<cache>/debs/`` by apt's own file name (package, version, architecture), so the kernel is
downloaded once for every kind of guest and again only when Debian publishes a new one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

KERNEL_META = "linux-image-amd64"


class GuestBuildError(RuntimeError):
    """A guest image could not be built (apt, dpkg-deb or a missing file); the message says which step."""


@dataclass(frozen=True)
class GuestKit:
    """The shared parts of one kind of test guest: a kernel and a base initramfs (gzip'd newc cpio)."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    cache_key: str
    built: bool  # False when it came from the cache


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a build step; its stdout, or GuestBuildError with the end of its stderr."""
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


def run_bytes(argv: list[str]) -> bytes:
    """Run a build step whose stdout is binary."""
    proc = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout


# ------------------------------------------------------------------------------------------ packages
def kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` depends on now (e.g. linux-image-6.1.0-56-amd64)."""
    out = run(["apt-cache", "depends", KERNEL_META])
    found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
    if not found:
        raise GuestBuildError(f"apt-cache depends {KERNEL_META} names no kernel package (run apt-get update)")
    return found[0]


def package_uris(packages: Iterable[str]) -> list[str]:
    """apt's exact download lines (URI, file name with version, size, checksum) without downloading."""
    packages = list(packages)
    out = run(["apt-get", "download", "--print-uris", *packages])
    lines = sorted(line for line in out.splitlines() if line.startswith("'"))
    if len(lines) != len(packages):
        raise GuestBuildError(f"apt-get download --print-uris gave {len(lines)} lines for {len(packages)} "
                              f"packages: {out[-1000:]}")
    return lines


def cache_key(uris: list[str], *sources: Path) -> str:
    """Hash of the package files (not their mirror) and of the source files that shape the image."""
    digest = hashlib.sha256()
    for line in uris:
        digest.update(line.split()[1].encode() + b" " + line.split()[-1].encode() + b"\n")
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def fetch_debs(cache_dir: Path, uris: list[str]) -> list[Path]:
    """The .deb files named by ``uris``, downloaded into ``<cache_dir>/debs`` unless already there; older
    versions of the same packages there are removed."""
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    names = [line.split()[1] for line in uris]
    missing = [name.split("_")[0] for name in names if not (debs / name).exists()]
    if missing:
        with tempfile.TemporaryDirectory(dir=debs, prefix="download-") as partial:
            run(["apt-get", "download", *missing], cwd=Path(partial))
            for deb in Path(partial).glob("*.deb"):
                deb.replace(debs / deb.name)
    wanted = {name.split("_")[0]: name for name in names}
    for old in debs.glob("*.deb"):
        if wanted.get(old.name.split("_")[0], old.name) != old.name:
            old.unlink()
    found = [debs / name for name in names]
    absent = [path.name for path in found if not path.exists()]
    if absent:
        raise GuestBuildError(f"apt-get download did not leave {absent} (file names differ from --print-uris?)")
    return found


def unpack(debs: Iterable[Path], target: Path) -> None:
    """``dpkg-deb -x`` each package into ``target``."""
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(target)])


def prune(root: Path, patterns: Iterable[str]) -> None:
    """Remove what the globs ``patterns`` (relative to ``root``) match: files, links or whole trees."""
    for pattern in patterns:
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ------------------------------------------------------------------------------------------ kernel
#: Every kernel module a test guest loads: the e1000 NIC; the virtio-serial port (virtio_pci brings the bus).
KERNEL_MODULES = ("e1000", "virtio_pci", "virtio_console")


@dataclass(frozen=True)
class Kernel:
    """Debian's kernel reduced to what the test guests need, shared by every kind of guest: ``vmlinuz``, and in
    ``modules/`` the KERNEL_MODULES with their dependencies (uncompressed), ``depends.json`` naming them."""

    version: str
    directory: Path

    @property
    def vmlinuz(self) -> Path:
        """The kernel image."""
        return self.directory / "vmlinuz"

    def load_order(self, wanted: Iterable[str]) -> list[Path]:
        """The module files ``wanted`` (names such as "virtio_console") need, dependencies first."""
        depends: dict[str, list[str]] = json.loads((self.directory / "depends.json").read_text())
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in order:
                for dependency in depends[name]:
                    visit(dependency)
                order.append(name)

        for name in wanted:
            visit(name)
        return [self.directory / "modules" / f"{name}.ko" for name in order]


def _module_name(path: Path) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", path.name).replace("-", "_")


def kernel_parts(cache_dir: Path, kernel_deb: Path, version: str) -> Kernel:
    """The Kernel of ``kernel_deb``, from ``<cache_dir>/kernel/`` or unpacked now (once for every kind of guest).

    Dependencies come from each module's own ``depends=`` (its .modinfo): Debian's kernel package ships no
    ``modules.dep`` (its install script makes it) and this machine may have no ``depmod``."""
    kernel_dir = cache_dir / "kernel"
    target = kernel_dir / f"{kernel_deb.stem}-{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]}"
    if (target / "depends.json").exists():
        return Kernel(version, target)
    kernel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kernel_dir, prefix="build-") as scratch_name:
        scratch = Path(scratch_name)
        tree, staging = scratch / "tree", scratch / "out"
        (staging / "modules").mkdir(parents=True)
        unpack([kernel_deb], tree)
        vmlinuz = tree / "boot" / f"vmlinuz-{version}"
        if not vmlinuz.exists():
            raise GuestBuildError(f"{kernel_deb.name} lacks {vmlinuz.name}")
        shutil.copy2(vmlinuz, staging / "vmlinuz")
        files = {_module_name(path): path for path in (tree / "lib" / "modules" / version).rglob("*.ko*")}
        depends: dict[str, list[str]] = {}
        pending = list(KERNEL_MODULES)
        while pending:
            name = pending.pop()
            if name in depends:
                continue
            if name not in files:
                raise GuestBuildError(f"kernel {version} has no module {name}")
            path = files[name]
            data = run_bytes(["xz", "-dc", str(path)]) if path.suffix == ".xz" else path.read_bytes()
            (staging / "modules" / f"{name}.ko").write_bytes(data)
            found = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
            depends[name] = [dep for dep in (found.group(1).decode().split(",") if found else []) if dep]
            pending.extend(depends[name])
        (staging / "depends.json").write_text(json.dumps(depends, sort_keys=True))
        staging.rename(target)
    for old in kernel_dir.iterdir():  # keep only the current kernel
        if old != target and not old.name.startswith("build-"):
            shutil.rmtree(old, ignore_errors=True)
    return Kernel(version, target)


def install_modules(modules: list[Path], root: Path) -> str:
    """Copy ``modules`` (from Kernel.load_order) to ``root/lib/modules/``; the shell lines that insmod them."""
    target = root / "lib" / "modules"
    target.mkdir(parents=True, exist_ok=True)
    for module in modules:
        shutil.copy2(module, target / module.name)
    return "\n".join(f"insmod /lib/modules/{module.name}" for module in modules)


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


# ------------------------------------------------------------------------------------------ the cache
def cached_kit(cache_dir: Path, kind: str, packages: list[str], sources: tuple[Path, ...],
               populate: Callable[[Path, Kernel], None]) -> GuestKit:
    """The kit of one kind of guest: Debian's current kernel plus an initramfs of ``packages``, from
    ``<cache_dir>/<kind>/<key>/`` or built now.

    ``populate(root, kernel)`` turns the unpacked packages in ``root`` into the guest's root (prune, add /init,
    modules from ``kernel``, check it runs). The key hashes the exact package files apt would download and
    ``sources``: a new Debian point release or a changed builder makes a new image; anything else reuses it.
    Only the current image of each kind is kept."""
    kernel_pkg = kernel_package()
    uris = package_uris([kernel_pkg, *packages])
    key = cache_key(uris, Path(__file__), *sources)
    kernel_version = kernel_pkg.removeprefix("linux-image-")
    kind_dir = cache_dir / kind
    done = kind_dir / key
    kit = GuestKit(done / "vmlinuz", done / "initramfs.cpio.gz", kernel_version, key, built=False)
    if kit.kernel.exists() and kit.initramfs.exists():
        return kit
    debs = fetch_debs(cache_dir, uris)
    [kernel_deb] = [deb for deb in debs if deb.name.startswith(f"{kernel_pkg}_")]
    kernel = kernel_parts(cache_dir, kernel_deb, kernel_version)
    kind_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kind_dir, prefix="build-") as scratch_name:
        scratch = Path(scratch_name)
        root, staging = scratch / "root", scratch / "out"
        for directory in (root, staging):
            directory.mkdir()
        unpack([deb for deb in debs if deb != kernel_deb], root)
        populate(root, kernel)
        shutil.copy2(kernel.vmlinuz, staging / "vmlinuz")
        write_cpio(root, {}, staging / "initramfs.cpio.gz")
        if done.exists():
            shutil.rmtree(done)
        staging.rename(done)
    for old in kind_dir.iterdir():  # keep only the current image of this kind
        if old.name != key and old.is_dir() and not old.name.startswith("build-"):
            shutil.rmtree(old, ignore_errors=True)
    for old in cache_dir.iterdir():  # images of the cache's older layout (<cache_dir>/<key>/)
        if re.fullmatch(r"[0-9a-f]{16}", old.name) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return GuestKit(kit.kernel, kit.initramfs, kernel_version, key, built=True)


def check_in_chroot(root: Path, argv: list[str], what: str) -> str:
    """Run ``argv`` inside ``root`` (chroot, as root, clean environment): proves the guest's binaries find every
    library they need before any VM boots."""
    try:
        return run([shutil.which("chroot") or "/usr/sbin/chroot", str(root), *argv],
                   env={"PATH": "/usr/sbin:/usr/bin:/bin", "LANG": "C.UTF-8"})
    except GuestBuildError as exc:
        raise GuestBuildError(f"{what}: {exc}") from None
