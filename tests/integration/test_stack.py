"""The compose stack without Docker: every service of docker-compose.yml started from its own command line.

Docker cannot run on these machines, so this test reads docker-compose.yml and starts, as local processes,
Redis through the stack's own entrypoint (the rendered ACL file, AOF on) and then every other service's
``command`` with that service's ``environment`` (the ``demo`` profile's guests included). Only what must
differ outside a container is substituted, mechanically, and the test asserts that nothing else does:

- the Redis address ``redis:6379`` -> ``127.0.0.1:<free port>``; each published container port -> a free port;
- every volume's container path -> its host directory (bind mounts: the repository's files; named volumes
  and an image's working directory: a temporary directory);
- Redis alone gets ``--bind 127.0.0.1`` added (a container has its own network; this machine does not).

It then runs each service's own health check until it passes, and checks that the services talk to each
other: probe rounds advance (beat -> monitor), every example host's heartbeat is fresh, the guests' VMs
turn healthy on the host that lists their domain, Flower refuses anonymous requests and, with its basic
auth, lists the workers and the per-host queues, and (once vmq/metrics.py exists) /metrics answers. No
service may meet an ACL denial on the way.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from vmq.keys import Keys
from vmq.sim.localcluster import free_port
from vmq.store.redis import RedisStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
IMAGE_WORKDIR = {"redis": "/data"}  # the official redis image's WORKDIR; ours (Dockerfile) is /var/lib/vmq
VMQ_WORKDIR = "/var/lib/vmq"
LOCAL_ONLY_ARGS = {"redis": ["--bind", "127.0.0.1"]}
EXAMPLE_HOSTS = ("node1", "node2")
VMS_PER_HOST = 3

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


# ------------------------------------------------------------------------------------------- the file
def interpolate(text: str, env: dict[str, str]) -> str:
    """docker-compose's variable substitution: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME:?error}."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("bare")
        name, operator, argument = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?(.*)", expression,
                                                re.DOTALL).groups()  # type: ignore[union-attr]
        value = env.get(name)
        missing = value is None or (value == "" and operator and operator.startswith(":"))
        if operator and operator.endswith("?") and missing:
            raise KeyError(f"{name}: {argument}")
        if operator and operator.endswith("-") and missing:
            return argument
        return value or ""

    return _VARIABLE.sub(one, text)


def compose_services() -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml, YAML anchors and merge keys resolved (as docker-compose does)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(document["services"])


def env_example_names() -> list[str]:
    """The variables .env.example tells an operator to set."""
    return [line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
            if line and not line.startswith("#")]


# ------------------------------------------------------------------------------------ substitutions
@dataclass
class Localizer:
    """The container -> this-machine substitutions of one service, applied to every string it has."""

    rules: list[tuple[str, str]] = field(default_factory=list)

    def localize(self, text: str) -> str:
        for container, local in self.rules:
            text = text.replace(container, local)
        return text

    def delocalize(self, text: str) -> str:
        for container, local in reversed(self.rules):
            text = text.replace(local, container)
        return text


def localizer_for(name: str, service: dict[str, Any], redis_port: int, ports: dict[str, int],
                  tmp: Path) -> Localizer:
    """Ports first (on the container's strings), then paths: a free port number cannot hit a tmp path."""
    rules: list[tuple[str, str]] = [("redis:6379", f"127.0.0.1:{redis_port}")]
    for mapping in service.get("ports", []):
        container_port = str(mapping).rsplit(":", 1)[-1]
        rules.append((container_port, str(ports[container_port])))
    mounted: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):  # a bind mount: the repository's own files
            local = (ROOT / source).resolve()
        else:  # a named volume: an empty directory at first
            local = tmp / "volumes" / source
            local.mkdir(parents=True, exist_ok=True)
        mounted[target] = str(local)
    workdir = IMAGE_WORKDIR.get(name, VMQ_WORKDIR)
    if workdir not in mounted:  # the container's own filesystem: a private directory here
        mounted[workdir] = str(tmp / "containers" / name)
        Path(mounted[workdir]).mkdir(parents=True, exist_ok=True)
    rules += sorted(mounted.items(), key=lambda item: -len(item[0]))  # longest container path first
    return Localizer(rules)


@dataclass
class LocalService:
    """One compose service as a process here."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    health: list[str]
    log: Path
    ports: dict[str, int]  # container port -> the port it has here
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log_file:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def check_health(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.health, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM the process group (Celery's warm shutdown; the guests power off), then SIGKILL."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass


def redis7_server() -> str | None:
    """A redis-server >= 7 (the compose file's image is 7.0 and its ACL uses %W~ key selectors)."""
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server") or ""):
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False).stdout
            version = re.search(r"v=(\d+)\.", out)
            if version and int(version.group(1)) >= 7:
                return candidate
    return None


def build_services(tmp: Path, variables: dict[str, str], profiles: set[str]) -> dict[str, LocalService]:
    """Every service of the file (of ``profiles``) with its substitutions applied and checked."""
    binary = redis7_server()
    if binary is None:
        message = "no redis-server >= 7 (Debian 12's redis-server package) to run the compose ACL against"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "redis-server").symlink_to(binary)
    # The image's PATH has `celery`, `vmq` and `python3` of one installation; here: this interpreter's.
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("VMQ_", "FLOWER_", "REDIS_", "CELERY_"))} | {"PATH": path}
    redis_port = free_port()
    built: dict[str, LocalService] = {}
    for name, service in compose_services().items():
        if service.get("profiles") and not set(service["profiles"]) & profiles:
            continue
        container_ports = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
        ports = {p: (redis_port if p == "6379" else free_port()) for p in container_ports}
        localizer = localizer_for(name, service, redis_port, ports, tmp)
        command = [*service.get("entrypoint", []), *service["command"]]
        environment = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        test = service["healthcheck"]["test"]
        health = list(test[1:]) if test[0] == "CMD" else ["sh", "-c", test[1]]
        # Nothing but the substitutions may differ: every string maps back to the file's exactly.
        for text in [*command, *environment.values(), *health]:
            assert localizer.delocalize(localizer.localize(text)) == text, (name, text)
        argv = [interpolate(localizer.localize(a), variables) for a in command]
        argv += LOCAL_ONLY_ARGS.get(name, [])
        env = base_env | {k: interpolate(localizer.localize(v), variables) for k, v in environment.items()}
        health = [interpolate(localizer.localize(a), variables) for a in health]
        cwd = localizer.localize(IMAGE_WORKDIR.get(name, VMQ_WORKDIR))
        built[name] = LocalService(name, argv, env, cwd, health, tmp / f"{name}.log", ports)
    return built


# ------------------------------------------------------------------------------------------ running
def wait_until(condition: Callable[[], bool], timeout_s: float, what: str,
               services: dict[str, LocalService]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for service in services.values():
            if service.process is not None and service.process.poll() is not None:
                raise AssertionError(f"{service.name} exited ({service.process.returncode}): "
                                     f"{service.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            logs = next(iter(services.values())).log.parent
            raise AssertionError(f"{what} not within {timeout_s:g} s; logs in {logs}")
        time.sleep(0.3)


def wait_healthy(services: dict[str, LocalService], timeout_s: float) -> dict[str, float]:
    """Run every service's health check (in parallel) until each passes once; seconds each took."""
    started = time.monotonic()
    pending = dict(services)
    took: dict[str, float] = {}
    last: dict[str, str] = {}

    def all_passed() -> bool:
        checks = {name: s.check_health() for name, s in pending.items()}
        for name, proc in checks.items():
            out, _ = proc.communicate(timeout=30)
            last[name] = (out.decode(errors="replace").strip().splitlines() or [""])[-1]
            if proc.returncode == 0:
                took[name] = round(time.monotonic() - started, 1)
                del pending[name]
        return not pending

    try:
        wait_until(all_passed, timeout_s, "health checks", services)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still unhealthy: { {n: last.get(n) for n in pending} }") from None
    return took


def http_get(url: str, auth: str | None = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def find_process(*markers: str) -> int:
    """The pid of the one process whose command line contains every marker."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes() if proc_dir.name.isdigit() else b""
        except OSError:
            continue
        if cmdline and all(marker.encode() in cmdline for marker in markers):
            found.append(int(proc_dir.name))
    assert len(found) == 1, (markers, found)
    return found[0]


def kill_leftover_responders(marker: str) -> None:
    """Safety net if the guests service died without powering its guests off: its responders run in their
    own sessions, so find them by their config path (unique to this test) and SIGKILL them by pid."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"responder" in cmdline:
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[dict[str, LocalService], dict[str, str], dict[str, float]]]:
    """The whole compose stack (demo profile included) as local processes; every one stopped at the end."""
    variables = {name: secrets.token_hex(16) for name in env_example_names()}
    variables["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_hex(8)}"
    variables["VMQ_NAMESPACE"] = "stacktest"  # not the default: the namespace must reach the ACL too
    services = build_services(tmp_path, variables, profiles={"demo"})
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        services["redis"].start()
        wait_healthy({"redis": services["redis"]}, 10)
        for name, service in services.items():
            if name != "redis":
                service.start()
        took = wait_healthy(services, 45)
        timings |= {f"healthy:{name}": s for name, s in took.items()}
        timings["all healthy"] = round(time.monotonic() - t0, 1)
        yield services, variables, timings
    finally:
        for name in [n for n in services if n not in ("redis", "beat")] + ["beat", "redis"]:
            if name in services:
                services[name].stop()
        kill_leftover_responders(str(tmp_path))


# ------------------------------------------------------------------------------------------- the test
def test_every_compose_service_runs_from_its_own_command_line_and_they_work_together(
        stack: tuple[dict[str, LocalService], dict[str, str], dict[str, float]]) -> None:
    services, variables, timings = stack
    t0 = time.monotonic()
    namespace = variables["VMQ_NAMESPACE"]
    vmq_url = services["monitor"].env["VMQ_REDIS_URL"]
    guest_url = services["guests"].env["VMQ_GUEST_REDIS_URL"]
    assert vmq_url.startswith("redis://vmq:") and guest_url.startswith("redis://guest:")
    host_urls = [services[f"host-{host}"].env["VMQ_REDIS_URL"] for host in EXAMPLE_HOSTS]
    assert all(url.startswith("redis://host:") for url in host_urls), "host workers run as the `host` user"
    store = RedisStore.from_url(vmq_url, Keys(namespace))

    # beat -> monitor: probe rounds advance
    first = store.rounds.current_round()
    wait_until(lambda: store.rounds.current_round() > first, 10, "a new probe round", services)

    # every example host's worker registered with a fresh heartbeat, its own queue, its own test node
    hosts = {name: info for name, alive, info in store.hosts.hosts_overview() if alive}
    assert set(EXAMPLE_HOSTS) <= set(hosts), hosts
    for host in EXAMPLE_HOSTS:
        assert hosts[host].get("queue") == f"host.{host}"

    # the demo guests answer as the `guest` ACL user; each VM turns healthy on the host listing its domain
    expected = {f"{host}-vm{i}": host for host in EXAMPLE_HOSTS for i in range(1, VMS_PER_HOST + 1)}

    def all_healthy() -> bool:
        records = dict(zip(expected, store.vms.records(list(expected))))
        return all(rec.state == "healthy" and rec.host == expected[vm]
                   for vm, rec in records.items())

    wait_until(all_healthy, 30, f"{sorted(expected)} healthy on their hosts", services)
    timings["VMs healthy"] = round(time.monotonic() - t0, 1)

    # Flower: anonymous refused; with the basic auth from the environment, the workers and per-host queues
    flower = f"http://127.0.0.1:{services['flower'].ports['5555']}"
    auth = variables["FLOWER_BASIC_AUTH"]
    assert http_get(f"{flower}/")[0] == 401
    assert http_get(f"{flower}/api/workers")[0] == 401
    assert http_get(f"{flower}/", auth)[0] == 200
    wanted = {"monitor", *EXAMPLE_HOSTS}
    seen: set[str] = set()

    def flower_lists_workers() -> bool:
        status, body = http_get(f"{flower}/api/workers?refresh=1", auth, timeout_s=15)
        seen.update(name.split("@")[0] for name in (json.loads(body) if status == 200 else {}))
        return wanted <= seen

    wait_until(flower_lists_workers, 20, f"Flower's /api/workers listing {sorted(wanted)}", services)
    status, page = http_get(f"{flower}/broker", auth)
    assert status == 200
    for queue in ("vmq.monitor", "vmq.timeouts", *(f"host.{h}" for h in EXAMPLE_HOSTS)):
        assert queue.encode() in page, f"Flower's Broker tab does not show {queue}"
    assert variables["REDIS_VMQ_PASSWORD"].encode() not in page

    # A hung guest is restarted through its host's queue, and Flower shows that task clearly: its name,
    # routed to host.node1 (the routing key of that queue's direct exchange), run by node1's worker, its
    # args naming the VM. (`vmq set` lifts the 30 s boot grace for this one VM so the test stays short.)
    fault_vm = "node1-vm2"
    subprocess.run(["vmq", "set", fault_vm, "boot_grace_s=0"], env=services["monitor"].env, check=True,
                   capture_output=True, timeout=30)
    responder_pid = find_process(f"responder-{fault_vm}.toml", services["guests"].cwd)
    os.kill(responder_pid, signal.SIGSTOP)

    def restart_task_in_flower() -> dict[str, Any] | None:
        status, body = http_get(f"{flower}/api/tasks?taskname=vmq.host.restart_vm", auth)
        tasks = json.loads(body) if status == 200 else {}
        done = [t for t in tasks.values() if fault_vm in str(t.get("args")) and t.get("state") == "SUCCESS"]
        return done[0] if done else None

    wait_until(lambda: restart_task_in_flower() is not None, 30, "the restart task in Flower", services)
    task = restart_task_in_flower()
    assert task is not None and task["routing_key"] == "host.node1" and task["worker"].startswith("node1@")
    assert "'acted': True" in str(task.get("result")), task
    wait_until(lambda: store.vms.record(fault_vm).state == "healthy", 20, f"{fault_vm} recovered",
               services)
    timings["restart seen in Flower, VM recovered"] = round(time.monotonic() - t0, 1)

    # Prometheus /metrics of the monitor worker (active once vmq/metrics.py exists)
    if (ROOT / "vmq" / "metrics.py").exists():
        metrics_port = services["monitor"].ports["9464"]
        wait_until(lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 200, 10,
                   "/metrics answering", services)
        assert b"vmq_up" in http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]

    # The ACL: nobody gets in without a password, the guest user can do nothing but its two things,
    # and no service or responder met a single denial while all of the above happened.
    port = int(vmq_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).get("x")
    guest = redis.Redis.from_url(guest_url)
    for forbidden in (lambda: guest.hgetall(f"{namespace}:secrets"),
                      lambda: guest.publish(f"{namespace}:probes", "x"),
                      lambda: guest.xrange(f"{namespace}:replies", count=1),
                      lambda: guest.xadd(f"{namespace}:events", {"type": "forged"})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    guest.close()
    host_client = redis.Redis.from_url(host_urls[0])
    with pytest.raises(redis.exceptions.NoPermissionError):
        host_client.hgetall(f"{namespace}:secrets")  # the VMs' keys stay out of the hypervisors' reach
    host_client.close()
    logs = [s.log for s in services.values()] + sorted(Path(services["guests"].cwd).rglob("*.log"))
    denials = [f"{log.name}: {line}" for log in logs for line in log.read_text(errors="replace").splitlines()
               if "NOPERM" in line or "no permissions" in line]
    assert not denials, denials
    redis_dir = Path(services["redis"].cwd)
    assert (redis_dir / "appendonlydir").is_dir() and (redis_dir / "users.acl").stat().st_mode & 0o077 == 0
    assert variables["REDIS_VMQ_PASSWORD"] not in (redis_dir / "users.acl").read_text()
    store.client.close()
    timings["checks"] = round(time.monotonic() - t0, 1)
    print(f"stack timings (s): {timings}")
