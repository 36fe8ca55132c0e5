"""Simulated guests: real responder processes, one per VM, with an honest model of hangs and reboots.

A hang is SIGSTOP of the guest's responder (it stops answering, like a hung kernel). A reboot is
modelled from the audit stream: when a host worker reports it reset/created the VM's domain, the guest's
process is killed, stays down for ``boot_delay_s`` and starts again with a new boot id. The simulator
cannot share libvirt's in-process test driver with the host worker, so the audit stream is its link.

Each guest answers on its probe path (vmq.model.ProbePath, ``redis`` unless ``paths`` says otherwise):

* ``redis``: the responder talks to Redis itself;
* ``channel``: the responder runs with ``transport = "channel"`` on a socket of a ChannelBridge
  (vmq.sim.bridge), which also listens where the domain's XML puts the channel's host socket, as QEMU would;
  hang and reboot are the same SIGSTOP and kill + start;
* ``agent``: no vmq in the guest, no process: the guest is its QEMU guest agent, which a host worker with
  VMQ_SIM_AGENTS_DIR consults through vmq.sim.agents.SimulatedAgents; a hang, a power-off and the boot delay
  leave its "silent" marker, a boot removes it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from vmq.config import responder_url
from vmq.keys import Keys
from vmq.model import AuditEvent, ProbePath
from vmq.operator_views import event_json
from vmq.sim.agents import record_guest_pid, set_agent_silent
from vmq.sim.bridge import ChannelBridge
from vmq.store.redis import connect

log = logging.getLogger(__name__)

RESPONDER_FILE = Path(__file__).parent.parent / "responder.py"  # vmq/responder.py


def responder_argv(config: Path) -> list[str]:
    """The command line of one guest's responder (deploy/systemd/vmq-responder.service runs the same)."""
    return [sys.executable, str(RESPONDER_FILE), "--config", str(config)]


def guest_socket_path(host_socket_path: str) -> str:
    """The socket a ``channel`` guest's responder opens as its virtio port: beside the channel's host socket."""
    return f"{host_socket_path}.guest"


@dataclass
class Guest:
    """One simulated guest: its responder process and what happened to it."""

    vm: str
    secret: str
    boot_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    hung: bool = False
    boots: bool = True  # False: the guest never comes back from a reboot (a broken image)
    path: ProbePath = ProbePath.REDIS
    reboots: int = 0
    events: list[str] = field(default_factory=list)


class GuestFleet:
    """Runs one real responder process per VM (none for an ``agent`` VM) and reboots them when the audit
    stream says so.

    ``paths``: VM -> probe path (default redis); ``channel_sockets``: a ``channel`` VM -> the host socket path
    its domain's XML names; ``agents_dir``: where ``agent`` VMs' markers live (VMQ_SIM_AGENTS_DIR of the host
    workers). Raises ValueError when a ``channel`` or ``agent`` VM lacks what it needs.
    """

    def __init__(self, redis_url: str, keys: Keys, secrets: dict[str, str], workdir: Path,
                 boot_delay_s: float = 2.0, watch_url: str | None = None,
                 sentinels: Sequence[tuple[str, int]] = (), sentinel_master: str = "vmq",
                 paths: Mapping[str, ProbePath] | None = None, channel_sockets: Mapping[str, str] | None = None,
                 agents_dir: Path | None = None, extra_config: Mapping[str, str] | None = None) -> None:
        self.redis_url = redis_url  # what the responders use (in a stack: the `guest` ACL user)
        self.extra_config = dict(extra_config or {})  # VM -> TOML appended to its responder's file ([[health]])
        self.watch_url = watch_url or redis_url  # reads the audit stream, which guests may not
        self.sentinels, self.sentinel_master = list(sentinels), sentinel_master  # both sides follow a failover
        self.keys = keys
        self.workdir = workdir
        self.boot_delay_s = boot_delay_s
        paths = paths or {}
        self.guests = {vm: Guest(vm, secret, path=ProbePath(paths.get(vm, ProbePath.REDIS)))
                       for vm, secret in secrets.items()}
        self.agents_dir = agents_dir
        self.bridges: dict[str, ChannelBridge] = {}
        self._channel_sockets = dict(channel_sockets or {})
        for guest in self.guests.values():
            if guest.path is ProbePath.CHANNEL and guest.vm not in self._channel_sockets:
                raise ValueError(f"{guest.vm}: a channel guest needs its channel's host socket path")
            if guest.path is ProbePath.AGENT and agents_dir is None:
                raise ValueError(f"{guest.vm}: an agent guest needs agents_dir")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.restarted: list[tuple[str, str]] = []  # (vm, host) of every restart the fleet saw

    def _config(self, guest: Guest) -> Path:
        path = self.workdir / f"responder-{guest.vm}.toml"
        if guest.path is ProbePath.CHANNEL:  # no Redis URL, no credentials: only the port and the VM's key
            port = guest_socket_path(self._channel_sockets[guest.vm])
            path.write_text(
                f'vm_id = "{guest.vm}"\nsecret_key = "{guest.secret}"\nnamespace = "{self.keys.namespace}"\n'
                f'log_level = "WARNING"\ntransport = "channel"\nchannel_path = {json.dumps(port)}\n'
                + self.extra_config.get(guest.vm, ""))
            path.chmod(0o600)
            return path
        url, tls_ca_file = responder_url(self.redis_url)
        path.write_text(
            f'vm_id = "{guest.vm}"\nredis_url = "{url}"\nsecret_key = "{guest.secret}"\n'
            f'namespace = "{self.keys.namespace}"\nlog_level = "WARNING"\n'
            + (f"tls_ca_file = {json.dumps(tls_ca_file)}\n" if tls_ca_file else "")
            + (f"sentinels = {json.dumps([f'{h}:{p}' for h, p in self.sentinels])}\n"
               f"sentinel_master = {json.dumps(self.sentinel_master)}\n" if self.sentinels else "")
            + self.extra_config.get(guest.vm, "")
        )
        path.chmod(0o600)
        return path

    def boot(self, vm: str) -> None:
        """Start (or start again) a guest's responder with a fresh boot id."""
        guest = self.guests[vm]
        guest.boot_id = str(uuid.uuid4())
        if guest.path is ProbePath.AGENT:
            assert self.agents_dir is not None
            set_agent_silent(self.agents_dir, vm, False)  # the guest agent is up again
            guest.hung = False
            return
        # The guest's config file is the whole truth: no VMQ_* of ours may leak into it, but its boot id.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
        env["VMQ_BOOT_ID"] = guest.boot_id
        log_file = open(self.workdir / f"responder-{vm}.log", "ab")  # noqa: SIM115 - owned by the child
        guest.process = subprocess.Popen(
            responder_argv(self._config(guest)),
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        if self.agents_dir is not None:  # the simulated host's reset kills this process at once
            record_guest_pid(self.agents_dir, vm, guest.process.pid)
        guest.hung = False

    def start(self) -> None:
        """Bind the channel guests' bridges, boot every guest and start following the audit stream."""
        for guest in self.guests.values():
            if guest.path is ProbePath.CHANNEL:
                host_socket = self._channel_sockets[guest.vm]
                self.bridges[guest.vm] = ChannelBridge(host_socket, guest_socket_path(host_socket)).start()
        for vm in self.guests:
            self.boot(vm)
        self._watcher = threading.Thread(target=self._watch, name="guest-fleet", daemon=True)
        self._watcher.start()

    def hang(self, vm: str) -> None:
        """Inject a fault: the guest stops answering (its responder is frozen with SIGSTOP; an agent guest's
        agent goes silent)."""
        guest = self.guests[vm]
        if guest.path is ProbePath.AGENT:
            assert self.agents_dir is not None
            set_agent_silent(self.agents_dir, vm, True)
            guest.hung = True
            return
        assert guest.process is not None
        guest.process.send_signal(signal.SIGSTOP)
        guest.hung = True

    def power_off(self, vm: str) -> None:
        """The guest's host lost power: it stops answering (until a start elsewhere boots it again)."""
        guest = self.guests[vm]
        with self._lock:
            self._power_off(guest)

    def break_boot(self, vm: str) -> None:
        """From now on this guest stays silent after every reboot (for budget tests)."""
        self.guests[vm].boots = False

    def _power_off(self, guest: Guest) -> None:
        if guest.path is ProbePath.AGENT:
            assert self.agents_dir is not None
            set_agent_silent(self.agents_dir, guest.vm, True)  # silent until boot() (boot delay, broken image)
            return
        proc = guest.process
        if proc is None or proc.poll() is not None:
            return
        proc.kill()  # SIGKILL reaches a stopped process too; a SIGCONT first would let it answer once more
        proc.wait(timeout=10)

    def _reboot_later(self, vm: str) -> None:
        guest = self.guests[vm]
        with self._lock:
            self._power_off(guest)
            guest.reboots += 1
        if not self._stop.wait(self.boot_delay_s) and guest.boots:
            with self._lock:
                self.boot(vm)

    def _watch(self) -> None:
        client: Any = connect(self.watch_url, self.sentinels, self.sentinel_master)
        last = "$"
        while not self._stop.is_set():
            try:
                got = client.xread({self.keys.events: last}, block=200, count=100)
            except redis.RedisError:
                if self._stop.wait(0.5):
                    break
                continue
            for _, entries in got or []:
                for entry_id, raw in entries:
                    last = entry_id.decode()
                    event = event_json(last, {k.decode(): v.decode() for k, v in raw.items()})
                    vm = event.get("vm", "")
                    # A restart, or a start elsewhere after its host died: a fresh boot either way.
                    if event.get("type") in (AuditEvent.RESTARTED, AuditEvent.FAILOVER_DONE) and vm in self.guests:
                        self.restarted.append((vm, event.get("host", "")))
                        threading.Thread(target=self._reboot_later, args=(vm,), daemon=True).start()
        client.close()

    def stop(self) -> None:
        """Stop following and power every guest off."""
        self._stop.set()
        with self._lock:
            for guest in self.guests.values():
                self._power_off(guest)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        for bridge in self.bridges.values():
            bridge.stop()
