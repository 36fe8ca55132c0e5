"""The pieces of the real-VM test that are not fixtures: vmq's processes as a Stack, the test guests' domain XML,
virsh, and the guests' console and command port."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.test_stack import LocalService
from vmq.keys import Keys
from vmq.model import ProbePath
from vmq.operator_views import event_json
from vmq.relayed import RelayedAnswers
from vmq.store.redis import RedisStore

LIBVIRT_URI = "qemu:///system"


@dataclass(frozen=True)
class Guest:
    """One test guest: its probe path, the service inside that answers (or hangs), its console and command port."""

    vm: str
    path: ProbePath
    service: str  # "responder" or "agent": the word the guest's /init takes in ``hang-<service>``
    console: Path
    command_socket: Path

    def boot_ids(self) -> list[str]:
        """Boot ids the guest kernel printed on its serial console, one per boot, oldest first."""
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return re.findall(r"vmq-guest: boot_id ([0-9a-f-]{36})", text)


def domain_xml(name: str, kernel: Path, initrd: Path, workdir: Path, network: bool, channels: tuple[str, ...] = (),
               memory_mib: int = 192) -> str:
    """A TCG guest (KVM does not work on these machines): kernel + initramfs (unpacked in RAM), with ``network``
    a user-mode NIC (the host's loopback is 10.0.2.2 for the guest), the virtio-serial ``channels`` (libvirt
    picks their host sockets: the relay reads them from the live XML), the console in a file and a command
    port as a socket."""
    nic = "<interface type='user'><model type='e1000'/></interface>" if network else ""
    virtio = "".join(f"\n    <channel type='unix'><source mode='bind'/><target type='virtio' name='{channel}'/>"
                     "</channel>" for channel in channels)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {nic}
    <serial type='file'><source path='{workdir / (name + ".console.log")}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{workdir / (name + ".cmd.sock")}'/><target port='1'/></serial>{virtio}
    <memballoon model='none'/>
  </devices>
</domain>"""


def virsh(*args: str) -> str:
    """virsh on qemu:///system; asserts it succeeded."""
    proc = subprocess.run(["virsh", "-c", LIBVIRT_URI, *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def remove_domain(name: str) -> None:
    """Destroy and undefine ``name`` if it exists (left over from an interrupted run)."""
    for args in (("destroy", name), ("undefine", name)):
        subprocess.run(["virsh", "-c", LIBVIRT_URI, *args], capture_output=True, timeout=60, check=False)


def qemu_pid(vm: str) -> int:
    """The pid of ``vm``'s QEMU process, from libvirt's pid file."""
    return int(Path(f"/var/run/libvirt/qemu/{vm}.pid").read_text().strip())


def send_guest_command(guest: Guest, command: str, confirmation: str, now_ms: Callable[[], int]) -> int:
    """Write a command line to the guest's second serial port and hold the socket open until the console shows
    ``confirmation`` once more (QEMU drops what the guest's UART has not taken when the socket closes); retried.
    Returns ``now_ms()`` taken just before the line that worked was written: the fault's time, an upper bound
    on when it took effect."""
    def count() -> int:
        return guest.console.read_text(errors="replace").count(confirmation)

    before = count()
    for _ in range(5):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(guest.command_socket))
            sent_ms = now_ms()
            sock.sendall(command.encode() + b"\n")
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                if count() > before:
                    return sent_ms
                time.sleep(0.02)
    raise AssertionError(f"{guest.vm} never confirmed {command!r}")


class Stack:
    """Redis (the compose ACL), beat, the monitor and node1's host worker on qemu:///system, as processes."""

    def __init__(self, services: dict[str, LocalService], variables: dict[str, str]) -> None:
        self.services, self.variables = services, variables
        self.env = services["monitor"].env
        self.store = RedisStore.from_url(self.env["VMQ_REDIS_URL"], Keys(variables["VMQ_NAMESPACE"]))

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll ``condition`` until it gives something truthy; fail if a service died or time ran out."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            for service in self.services.values():
                if service.process is not None and service.process.poll() is not None:
                    raise AssertionError(f"{service.name} exited: {service.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:g} s; logs in "
                                     f"{next(iter(self.services.values())).log.parent}")
            time.sleep(0.1)

    def events(self, vm: str, since_ms: int = 0, *types: str) -> list[dict[str, Any]]:
        """Audit events of ``vm`` (all VMs when empty) from ``since_ms`` on, of ``types`` (all when none)."""
        found = [event_json(entry_id, fields) for entry_id, fields in self.store.audit.read(count=1_000_000)]
        return [e for e in found if (not vm or e.get("vm") == vm) and event_ms(e) >= since_ms
                and (not types or e.get("type") in types)]

    def last_reply(self, vm: str) -> dict[str, Any]:
        """The VM's latest verified reply message (redis and channel paths), {} if none."""
        raw = self.store.client.hget(self.store.keys.last_reply, vm)
        return json.loads(raw) if raw else {}

    def relayed_answers(self, vm: str, since_ms: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """(arrival ms, answer) of every answer the host's relay wrote for ``vm`` to ``<ns>:relayed``."""
        found = []
        entries: list[tuple[Any, dict[Any, Any]]] = self.store.client.xrange(  # type: ignore[assignment]
            self.store.keys.relay_stream)  # from the start: cover entries need their host's full listing
        reader = RelayedAnswers()
        for entry_id, fields in entries:
            arrival_ms = int(_text(entry_id).split("-")[0])
            for answer in reader.answers((entry_id, fields)):  # compact and cover entries expanded
                if answer.get("vm") == vm and arrival_ms >= since_ms:
                    found.append((arrival_ms, answer))
        return found

    def vmq(self, *args: str) -> str:
        """The ``vmq`` command with the services' environment; asserts it succeeded."""
        proc = subprocess.run(["vmq", *args], env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def event_ms(event: dict[str, Any]) -> int:
    """When an audit event was written (its stream id, Redis time, ms)."""
    return int(event["id"].split("-")[0])


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (as vmq.relay_answers.LatencyWindow computes it)."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]
