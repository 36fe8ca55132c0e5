"""Issue 7, least privilege, on real redis-servers and real Celery and responder processes.

- The compose stack's ACL (deploy/redis/users.acl.template, rendered by deploy/redis/entrypoint.sh exactly as
  tests/integration/test_stack.py starts it): what the `guest`, `default` and `vmq` users may and may not do,
  one refusal per test case.
- Celery accepts JSON only: a pickled task message is refused by a real worker; the same task in JSON runs.
- TLS: one ``rediss://`` URL form serves redis-py, the Celery broker and its result backend; a whole local
  cluster runs over a TLS-only Redis; a client or responder that does not trust the CA never gets in.
- No secret (VM key, rotated key, Redis password) in any log, CLI output or the audit stream.

Flower's basic auth (401 without it, 200 with it) is checked by test_stack.py and not repeated here.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.contract.test_monitor_store import Broker, make_settings
from tests.integration.conftest import FAST, events_of
from tests.integration.test_responder_redis import RedisServer, make_tls_files
from tests.integration.test_stack import LocalService, build_services, env_example_names, wait_healthy
from vmq.codec import encode_reply
from vmq.config import load_settings
from vmq.errors import StoreError
from vmq.host_failover import FailoverStart, start_failed_over
from vmq.host_restart import restart_vm
from vmq.hypervisor.fake import FakeHypervisor
from vmq.inventory import sync_inventory
from vmq.keys import Keys
from vmq.model import DomainInfo, DomainStatus
from vmq.monitor import Monitor
from vmq.responder import load_config as load_responder_config
from vmq.sim.guests import GuestFleet, responder_argv
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis
from vmq.store.redis import RedisStore
from workers.app import create_app

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NS = "sec"
KEYS = Keys(NS)


# ------------------------------------------------------------------------- the compose stack's Redis
@dataclass
class StackRedis:
    """The compose file's redis service, started here through its own entrypoint (the rendered ACL)."""

    service: LocalService
    vmq_url: str  # the services' VMQ_REDIS_URL (user `vmq`)
    guest_url: str  # the demo guests' VMQ_GUEST_REDIS_URL (user `guest`)
    host_url: str  # the host workers' VMQ_REDIS_URL (user `host`)
    passwords: tuple[str, str, str]

    @property
    def port(self) -> int:
        return self.service.ports["6379"]

    def stop(self) -> None:
        self.service.stop()


def start_stack_redis(directory: Path, namespace: str = NS) -> StackRedis:
    """Redis as docker-compose.yml runs it (test_stack.py's substitutions), with fresh passwords."""
    variables = {name: secrets.token_hex(16) for name in env_example_names()}
    variables["VMQ_NAMESPACE"] = namespace
    services = build_services(directory, variables, profiles={"demo"})
    services["redis"].start()
    try:
        wait_healthy({"redis": services["redis"]}, 10)
    except BaseException:
        services["redis"].stop()
        raise
    return StackRedis(services["redis"], services["monitor"].env["VMQ_REDIS_URL"],
                      services["guests"].env["VMQ_GUEST_REDIS_URL"], services["host-node1"].env["VMQ_REDIS_URL"],
                      (variables["REDIS_VMQ_PASSWORD"], variables["REDIS_GUEST_PASSWORD"],
                       variables["REDIS_HOST_PASSWORD"]))


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRedis]:
    server = start_stack_redis(tmp_path_factory.mktemp("acl"))
    with redis.Redis.from_url(server.vmq_url) as vmq:  # something worth stealing in every key a guest could try
        vmq.hset(KEYS.secrets, "web-1", "ab" * 32)
        vmq.hset(KEYS.vm("web-1"), mapping={"state": "healthy", "host": "node1"})
        vmq.xadd(KEYS.reply_stream, {"m": "{}", "s": "00"})
        vmq.xadd(KEYS.events, {"type": "healthy", "vm": "web-1"})
    yield server
    server.stop()


def assert_refused(error: redis.RedisError | None, command: tuple[str, ...]) -> None:
    """NOPERM from the ACL. DEBUG is refused before the ACL is consulted when Redis runs with its default
    enable-debug-command no (Redis 7), so its protected-command error counts as a refusal too."""
    if command[0] == "DEBUG" and isinstance(error, redis.ResponseError) and "not allowed" in str(error):
        return
    assert isinstance(error, redis.exceptions.NoPermissionError), f"{command}: {error!r}"


def refusal(url: str, *command: str) -> redis.RedisError | None:
    """Run one command on a fresh connection; the error Redis answered with, or None if it was allowed."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.execute_command(*command)
    except redis.RedisError as exc:
        return exc
    finally:
        client.close()
    return None


GUEST_REFUSED = {
    "HGETALL-secrets": ("HGETALL", KEYS.secrets),
    "GET-secrets": ("GET", KEYS.secrets),
    "HGETALL-vm-record": ("HGETALL", KEYS.vm("web-1")),
    "GET-round-seq": ("GET", KEYS.round_seq),
    "XRANGE-replies": ("XRANGE", KEYS.reply_stream, "-", "+"),
    "XREVRANGE-replies": ("XREVRANGE", KEYS.reply_stream, "+", "-"),
    "XREAD-replies": ("XREAD", "STREAMS", KEYS.reply_stream, "0"),
    "XLEN-replies": ("XLEN", KEYS.reply_stream),
    "XTRIM-replies": ("XTRIM", KEYS.reply_stream, "MAXLEN", "0"),
    "DEL-replies": ("DEL", KEYS.reply_stream),
    "XADD-events": ("XADD", KEYS.events, "*", "type", "forged"),
    "XADD-other-stream": ("XADD", f"{NS}:replies2", "*", "m", "x"),
    "PUBLISH-probes": ("PUBLISH", KEYS.probe_channel, '{"v": 1, "type": "probe"}'),
    # a host's batch of relayed answers (issue 15): a guest must not be able to speak as a host
    "XADD-relayed": ("XADD", KEYS.relay_stream, "*", "h", "node1", "a", '[{"vm":"web-1","p":"agent"}]'),
    "XADD-relayed-MAXLEN-0": ("XADD", KEYS.relay_stream, "MAXLEN", "0", "*", "h", "node1", "a", "[]"),
    "LPUSH-vmq.monitor": ("LPUSH", "vmq.monitor", "{}"),
    "RPUSH-vmq.timeouts": ("RPUSH", "vmq.timeouts", "{}"),
    "LPUSH-host.node1": ("LPUSH", "host.node1", "{}"),
    "SUBSCRIBE-other-channel": ("SUBSCRIBE", f"{NS}:other"),
    "SUBSCRIBE-celery-events": ("SUBSCRIBE", "/0.celeryev/task.sent"),
    "PSUBSCRIBE-namespace": ("PSUBSCRIBE", f"{NS}:*"),
    "FLUSHALL": ("FLUSHALL",),
    "FLUSHDB": ("FLUSHDB",),
    "CONFIG-GET": ("CONFIG", "GET", "*"),
    "KEYS": ("KEYS", "*"),
    "SCAN": ("SCAN", "0"),
    "ACL-LIST": ("ACL", "LIST"),
    "DEBUG": ("DEBUG", "SLEEP", "0"),
    "SHUTDOWN": ("SHUTDOWN", "NOSAVE"),
    "EVAL": ("EVAL", "return 1", "0"),
    "INFO": ("INFO",),
    "CLIENT-LIST": ("CLIENT", "LIST"),
    "MONITOR": ("MONITOR",),
}


@pytest.mark.parametrize("command", list(GUEST_REFUSED.values()), ids=list(GUEST_REFUSED))
def test_the_guest_user_is_refused(acl_redis: StackRedis, command: tuple[str, ...]) -> None:
    assert_refused(refusal(acl_redis.guest_url, *command), command)


def test_the_guest_user_hears_probes_and_appends_replies_which_is_all_a_responder_needs(
        acl_redis: StackRedis) -> None:
    guest = redis.Redis.from_url(acl_redis.guest_url, socket_timeout=5)
    vmq = redis.Redis.from_url(acl_redis.vmq_url, socket_timeout=5)
    pubsub = guest.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.probe_channel)
    assert pubsub.get_message(timeout=5) is None  # the subscribe confirmation, swallowed
    assert vmq.publish(KEYS.probe_channel, "probe-1") == 1
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["data"] == b"probe-1"
    entry_id = guest.xadd(KEYS.reply_stream, {"m": "{}", "s": "11"}, maxlen=1000, approximate=True)
    assert vmq.xrange(KEYS.reply_stream, entry_id, entry_id)[0][1] == {b"m": b"{}", b"s": b"11"}
    assert guest.ping()
    pubsub.close()
    guest.close()
    vmq.close()


DEFAULT_REFUSED = {
    "PING": ("PING",),
    "GET": ("GET", "x"),
    "HGETALL-secrets": ("HGETALL", KEYS.secrets),
    "SUBSCRIBE-probes": ("SUBSCRIBE", KEYS.probe_channel),
    "PUBLISH-probes": ("PUBLISH", KEYS.probe_channel, "x"),
    "XADD-replies": ("XADD", KEYS.reply_stream, "*", "m", "x"),
    "LPUSH-vmq.monitor": ("LPUSH", "vmq.monitor", "{}"),
    "FLUSHALL": ("FLUSHALL",),
}


@pytest.mark.parametrize("command", list(DEFAULT_REFUSED.values()), ids=list(DEFAULT_REFUSED))
def test_a_connection_without_auth_is_refused(acl_redis: StackRedis, command: tuple[str, ...]) -> None:
    error = refusal(f"redis://127.0.0.1:{acl_redis.port}/0", *command)
    assert isinstance(error, redis.AuthenticationError), error


@pytest.mark.parametrize("user", ["default", "guest", "host", "vmq"])
def test_a_wrong_password_is_refused(acl_redis: StackRedis, user: str) -> None:
    client = redis.Redis(port=acl_redis.port, username=user, password="not-the-password",
                         retry=Retry(NoBackoff(), 0))  # redis-py would retry a refused AUTH 3 times
    with pytest.raises(redis.AuthenticationError):
        client.ping()
    client.close()


VMQ_REFUSED = {
    "FLUSHALL": ("FLUSHALL",),
    "FLUSHDB": ("FLUSHDB",),
    "CONFIG-GET": ("CONFIG", "GET", "*"),
    "CONFIG-SET": ("CONFIG", "SET", "appendonly", "no"),
    "KEYS": ("KEYS", "*"),
    "ACL-LIST": ("ACL", "LIST"),
    "DEBUG": ("DEBUG", "SLEEP", "0"),
    "SHUTDOWN": ("SHUTDOWN", "NOSAVE"),
    "MONITOR": ("MONITOR",),
    "CLIENT-KILL": ("CLIENT", "KILL", "ID", "1"),
    "GET-outside-its-keys": ("GET", "other-app:secret"),
}


@pytest.mark.parametrize("command", list(VMQ_REFUSED.values()), ids=list(VMQ_REFUSED))
def test_the_vmq_user_is_refused_dangerous_commands(acl_redis: StackRedis, command: tuple[str, ...]) -> None:
    assert_refused(refusal(acl_redis.vmq_url, *command), command)


HOST_REFUSED = {
    # the VMs' keys: a compromised hypervisor must not be able to sign any VM's replies
    "HGETALL-secrets": ("HGETALL", KEYS.secrets),
    "HGET-secrets": ("HGET", KEYS.secrets, "web-1"),
    "HSET-secrets": ("HSET", KEYS.secrets, "web-1", "00" * 32),
    "HGETALL-secrets-previous": ("HGETALL", KEYS.secrets_previous),
    # the guests' replies and the monitor's own bookkeeping
    "XADD-replies": ("XADD", KEYS.reply_stream, "*", "m", "x"),
    "XRANGE-replies": ("XRANGE", KEYS.reply_stream, "-", "+"),
    "XRANGE-relayed": ("XRANGE", KEYS.relay_stream, "-", "+"),  # write only: hosts cannot read each other's
    "SET-round-seq": ("SET", KEYS.round_seq, "1"),
    "HGETALL-rounds": ("HGETALL", KEYS.rounds),
    "SET-judge-lock": ("SET", KEYS.judge_lock, "me"),
    "SET-replies-cursor": ("SET", KEYS.reply_cursor, "0-0"),
    "SET-relayed-cursor": ("SET", KEYS.relay_cursor, "0-0"),
    "ZADD-relayed-rounds": ("ZADD", KEYS.relay_rounds, "1", "node2|1"),
    "SET-kill-switch": ("SET", KEYS.restarts_suspended, "1"),
    "GET-outside-its-keys": ("GET", "other-app:secret"),
    "FLUSHALL": ("FLUSHALL",),
    "KEYS": ("KEYS", "*"),
    "CONFIG-GET": ("CONFIG", "GET", "*"),
    "ACL-LIST": ("ACL", "LIST"),
}


@pytest.mark.parametrize("command", list(HOST_REFUSED.values()), ids=list(HOST_REFUSED))
def test_the_host_user_is_refused_the_vms_keys_and_the_monitors_bookkeeping(
        acl_redis: StackRedis, command: tuple[str, ...]) -> None:
    assert_refused(refusal(acl_redis.host_url, *command), command)


def test_the_host_user_does_what_a_host_worker_does(acl_redis: StackRedis) -> None:
    """Inventory, heartbeat, a restart claimed and carried out, the relay's batches and probe subscription, all
    as the `host` user, beside a monitor as `vmq`: no denial on the way."""
    keys = Keys(NS)  # a namespace of its own would not match the ACL: use the stack's, on fresh VM names
    monitor_store = RedisStore.from_url(acl_redis.vmq_url, keys)
    host_store = RedisStore.from_url(acl_redis.host_url, keys)
    settings = make_settings(namespace=NS)
    broker = Broker()
    monitor = Monitor(monitor_store, settings, broker.dispatch)
    vm, host = "acl-vm-1", "acl-host"
    hypervisor = FakeHypervisor(f"fake://{host}", [DomainInfo(vm, "u-acl-1", DomainStatus.RUNNING, "booted")])
    monitor_store.keyring.set_secret(vm, "cd" * 32)
    sync_inventory(host_store, hypervisor, host, 15)  # registers and places the VM, writes the heartbeat
    assert monitor_store.vms.record(vm).host == host and host_store.hosts.domain_names(host) == {vm}
    feed = host_store.relays.subscribe_probes()
    first, _ = monitor.probe()
    heard = [feed.get(0.5) for _ in range(3)]  # the first read takes the subscription's confirmation
    assert any(heard), "the host hears the probes"
    feed.close()
    nonce = monitor_store.client.hget(keys.rounds, first).decode().partition(":")[0]
    message, signature = encode_reply(vm, first, nonce, "boot-1", 1, {"uptime_s": 1.0}, bytes.fromhex("cd" * 32))
    monitor_store.client.xadd(keys.reply_stream, {"m": message, "s": signature})
    second, _ = monitor.probe()  # answered the first round, silent in the second
    monitor_store.client.zadd(keys.rounds_pending, {str(second): monitor_store.clock.time_ms() + 1})
    time.sleep(0.01)
    assert monitor.tick().dispatched == [vm], "silent past its deadline: faulty, restart dispatched"
    [request] = broker.sent
    outcome = restart_vm(host_store, hypervisor, host, vm, request.generation, request.incident, "acl-worker")
    assert outcome.acted and hypervisor.calls[-1] == ("reset", vm)
    host_store.relays.append(host, [{"vm": vm, "p": "agent", "round": first, "nonce": "n"}], first, [])
    host_store.hosts.set_host_fields(host, {"relay_seen_ms": host_store.clock.time_ms()})
    restarted = [f for _, f in monitor_store.audit.read(count=10_000) if f.get("vm") == vm]
    assert any(f.get("type") == "restarted" for f in restarted), restarted
    # A path change the inventory detects starts the VM's account afresh, taking it out of its host's cover.
    monitor_store.client.hset(keys.relay_cover_owner, vm, host)
    host_store.vms.start_monitoring(vm, host_store.clock.time_ms())
    assert monitor_store.client.smembers(keys.relay_cover_pending(host)) == {vm.encode()}
    monitor_store.client.close()
    host_store.client.close()


def test_a_host_worker_starts_a_failed_over_vm_but_cannot_open_fence_or_confirm_an_incident(
        acl_redis: StackRedis) -> None:
    """Issue 18 under the ACL: the `host` user keeps its definitions and starts a dead host's VM (its own claim),
    but the incidents and operators' confirmations are the monitor's and the CLI's alone."""
    keys = Keys(NS)
    monitor_store = RedisStore.from_url(acl_redis.vmq_url, keys)
    host_store = RedisStore.from_url(acl_redis.host_url, keys)
    vm, dead, target = "acl-vm-2", "acl-dead", "acl-target"
    alpha = FakeHypervisor(f"fake://{dead}", [DomainInfo(vm, "u-acl-2", DomainStatus.RUNNING, "booted")])
    sync_inventory(host_store, alpha, dead, 15)  # keeps its definition under <ns>:host:<dead>:defs
    [sha] = [doc["sha"] for doc in monitor_store.failovers.definitions(dead, [vm]).values()]
    monitor_store.hosts.heartbeat(dead, {"seen_ms": 0}, 1)  # the host dies
    time.sleep(0.01)
    bravo = FakeHypervisor(f"fake://{target}")
    outcome = start_failed_over(host_store, bravo, target, FailoverStart(vm, dead, target, 1, sha), "acl-worker")
    assert outcome["started"] is True and bravo.domain_info(vm).status is DomainStatus.RUNNING
    for forbidden in (lambda: host_store.failovers.confirm_fenced(dead, 1, "a guest's friend", 0),
                      lambda: host_store.failovers.open_incident(dead, 1, {"state": "fenced"}),
                      lambda: host_store.failovers.claim_start(vm, 2, target)):
        with pytest.raises(StoreError, match="no permissions to access one of the keys"):
            forbidden()
    assert monitor_store.failovers.incident(dead) == {} and monitor_store.failovers.fence_confirmation(dead) == {}
    monitor_store.client.close()
    host_store.client.close()


# --------------------------------------------------------------------------------- Celery: JSON only
def clean_env() -> dict[str, str]:
    """This environment without any VMQ_* of ours, with this checkout importable (as LocalCluster does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def start_worker(workdir: Path, redis_url: str, name: str = "worker") -> tuple[subprocess.Popen[bytes], Path]:
    """One real monitor worker (queue vmq.monitor), as LocalCluster starts it, logging to workdir/NAME.log."""
    log_path = workdir / f"{name}.log"
    env = {**clean_env(), "VMQ_REDIS_URL": redis_url, "VMQ_NAMESPACE": NS, "VMQ_METRICS_PORT": "0"}
    with open(log_path, "ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "vmq.monitor", "-P", "threads",
             "-c", "2", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
            env=env, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    return worker, log_path


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(0.1)


def test_a_pickled_task_message_is_refused_by_the_worker_and_the_same_task_in_json_runs(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    settings = load_settings({"redis_url": redis_server.url, "namespace": NS})
    app = create_app(settings)
    client = redis.Redis.from_url(redis_server.url)

    def store_round() -> int:
        return int(client.get(KEYS.round_seq) or 0)

    # A probe-round task whose body is a pickle: a plain tuple (Celery's own (args, kwargs, embed)), no gadget.
    pickled = app.send_task("vmq.monitor.probe_round", queue="vmq.monitor", serializer="pickle")
    queued = [json.loads(raw) for raw in client.lrange("vmq.monitor", 0, -1)]
    assert [m["content-type"] for m in queued] == ["application/x-python-serialize"]
    assert type(pickle.loads(base64.b64decode(queued[0]["body"]))) is tuple  # our own bytes

    worker, log_path = start_worker(tmp_path, redis_server.url)
    try:
        wait_for(lambda: b"ContentDisallowed" in log_path.read_bytes(), 30, "the worker refusing the pickle")
        assert client.llen("vmq.monitor") == 0  # taken off the queue and dropped, not left for a retry
        time.sleep(1)
        assert store_round() == 0, "the pickled task ran"
        log_text = log_path.read_text()
        assert ("Received invalid task message: Refusing to deserialize untrusted content of type pickle "
                "(application/x-python-serialize)\nThe message has been ignored and discarded.") in log_text
        assert f"[{pickled.id}] received" not in log_text

        jsoned = app.send_task("vmq.monitor.probe_round", queue="vmq.monitor")  # the control, as beat sends it
        wait_for(lambda: store_round() == 1, 15, "the JSON probe round")
        assert f"[{jsoned.id}] received" in log_path.read_text()
        assert client.llen("vmq.monitor") == 0
    finally:
        worker.terminate()
        worker.wait(timeout=15)
        app.close()
        client.close()


# ------------------------------------------------------------------------------------------------ TLS
@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, dict[str, Path]]]:
    """A TLS-only redis-server (--port 0 --tls-port N) with a certificate from a CA made for this test."""
    files = make_tls_files(tmp_path / "tls")
    server = RedisServer(tmp_path, files)
    try:
        server.start()
    except RuntimeError:
        server.kill()
        pytest.skip("this redis-server was built without TLS (Debian's redis-server 7.0 has it)")
    yield server, files
    server.kill()


def tls_url(server: RedisServer, ca_file: Path | None, cert_reqs: str | None = "required") -> str:
    """The one URL form that redis-py, kombu's broker and Celery's result backend all accept (deployment.md)."""
    query = "&".join(([f"ssl_cert_reqs={cert_reqs}"] if cert_reqs else []) +
                     ([f"ssl_ca_certs={ca_file}"] if ca_file else []))
    return f"rediss://127.0.0.1:{server.port}/0?{query}"


def vmq_cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`vmq ARGS` with VMQ_REDIS_URL=url (no other VMQ_* of ours)."""
    return subprocess.run([sys.executable, "-m", "vmq.cli", *args], env={**clean_env(), "VMQ_REDIS_URL": url, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_vmq_keys_add_channel_prints_a_config_with_no_redis_url_and_no_password(
        acl_redis: StackRedis, tmp_path: Path) -> None:
    added = vmq_cli(acl_redis.vmq_url, "keys", "add", "web-7", "--channel", VMQ_NAMESPACE=NS)
    assert added.returncode == 0, added.stderr
    assert "redis_url" not in added.stdout and not any(pw in added.stdout for pw in acl_redis.passwords)
    config = tmp_path / "responder.toml"
    config.write_text(added.stdout)
    loaded = load_responder_config(str(config), {})
    assert (loaded.vm_id, loaded.transport, loaded.namespace) == ("web-7", "channel", NS)
    with redis.Redis.from_url(acl_redis.vmq_url) as vmq:
        assert vmq.hget(KEYS.secrets, "web-7") == loaded.secret_key.hex().encode()
    both = vmq_cli(acl_redis.vmq_url, "keys", "add", "web-8", "--channel", "--guest-redis-url", acl_redis.guest_url,
                   VMQ_NAMESPACE=NS)
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_one_rediss_url_serves_the_store_the_cli_the_celery_broker_and_the_result_backend(
        tls_redis: tuple[RedisServer, dict[str, Path]]) -> None:
    server, files = tls_redis
    url = tls_url(server, files["ca"])
    with pytest.raises(redis.ConnectionError):  # TLS only: nothing answers in plain text
        redis.Redis(port=server.port, socket_timeout=2).ping()

    store = RedisStore.from_url(url, KEYS)
    assert store.clock.time_ms() > 0
    store.client.close()
    checked = vmq_cli(url, "check")
    assert (checked.returncode, checked.stdout) == (0, "ok\n"), checked.stderr

    app = create_app(load_settings({"redis_url": url}))
    with app.connection_for_write() as connection:  # the broker (kombu)
        connection.ensure_connection(max_retries=1)
        assert connection.default_channel.client.ping()
    app.backend.store_result("tls-probe", {"over": "tls"}, "SUCCESS")  # the result backend
    assert app.backend.get_task_meta("tls-probe")["result"] == {"over": "tls"}
    app.close()

    # Why ssl_cert_reqs must be in the URL: Celery's result backend refuses a rediss:// URL without it.
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        _ = create_app(load_settings({"redis_url": tls_url(server, files["ca"], cert_reqs=None)})).backend


def test_the_responder_config_printed_by_vmq_keys_add_for_a_rediss_url_answers_over_tls(
        tls_redis: tuple[RedisServer, dict[str, Path]], tmp_path: Path) -> None:
    server, files = tls_redis
    added = vmq_cli(tls_url(server, files["ca"]), "keys", "add", "web-1", VMQ_NAMESPACE=NS)
    assert added.returncode == 0, added.stderr
    # the responder takes no URL query: the CA of the services' URL becomes its tls_ca_file
    assert f'redis_url = "rediss://127.0.0.1:{server.port}/0"\n' in added.stdout
    assert f'tls_ca_file = "{files["ca"]}"\n' in added.stdout
    config = tmp_path / "responder.toml"
    config.write_text(added.stdout)
    responder = subprocess.Popen([*responder_argv(config), "--once"], env=clean_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
    client = server.client()
    try:
        wait_for(lambda: dict(client.pubsub_numsub(KEYS.probe_channel))[KEYS.probe_channel.encode()] == 1, 15,
                 "the responder subscribed")
        client.publish(KEYS.probe_channel, json.dumps({"v": 1, "type": "probe", "round": 1, "nonce": "a" * 32,
                                                       "sent_ms": 1}))
        assert responder.wait(timeout=15) == 0  # --once: exits after its one reply
        assert client.xlen(KEYS.reply_stream) == 1
    finally:
        if responder.poll() is None:
            responder.kill()
            responder.wait(timeout=10)
        client.close()


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_redis: tuple[RedisServer, dict[str, Path]],
                                                       tmp_path: Path) -> None:
    server, _ = tls_redis
    other_ca = make_tls_files(tmp_path / "other")["ca"]
    for url in (tls_url(server, None), tls_url(server, other_ca)):
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(url, socket_timeout=5).ping()
        checked = vmq_cli(url, "check")
        assert checked.returncode == 2 and "certificate verify failed" in checked.stderr, checked
        assert len(checked.stderr.strip().splitlines()) == 1 and checked.stdout == ""


def start_responder(directory: Path, url: str, namespace: str, ca_file: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The responder file as a guest runs it, with its own TOML config, logging to directory/responder.log."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "responder.toml"
    config.write_text(f'vm_id = "web-1"\nredis_url = "{url}"\nsecret_key = "{secrets.token_hex(32)}"\n'
                      f'namespace = "{namespace}"\ntls_ca_file = "{ca_file}"\nlog_level = "INFO"\n')
    env = clean_env()
    log_path = directory / "responder.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(responder_argv(config), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log_path


def test_a_responder_that_does_not_trust_the_servers_certificate_never_connects_and_says_why(
        tls_redis: tuple[RedisServer, dict[str, Path]], tmp_path: Path) -> None:
    server, files = tls_redis
    other_ca = make_tls_files(tmp_path / "other")["ca"]
    url = f"rediss://127.0.0.1:{server.port}/0"
    trusting, _ = start_responder(tmp_path / "trusting", url, "right", files["ca"])
    doubting, doubting_log = start_responder(tmp_path / "doubting", url, "wrong", other_ca)
    client = server.client()
    try:
        wait_for(lambda: dict(client.pubsub_numsub("right:probes"))[b"right:probes"] == 1, 15,
                 "the responder trusting the CA subscribed")
        wait_for(lambda: b"certificate verify failed" in doubting_log.read_bytes(), 15, "the refusal logged")
        time.sleep(1)
        assert dict(client.pubsub_numsub("wrong:probes"))[b"wrong:probes"] == 0
        assert doubting.poll() is None  # it keeps retrying over TLS (with back-off), it does not give up
        assert "redis unavailable (SSLCertVerificationError" in doubting_log.read_text()
    finally:
        for process in (trusting, doubting):
            process.terminate()
            process.wait(timeout=10)
        client.close()


def test_a_whole_cluster_runs_over_a_tls_only_redis_and_restarts_a_hung_guest(
        tls_redis: tuple[RedisServer, dict[str, Path]], tmp_path: Path) -> None:
    server, files = tls_redis
    spec = ClusterSpec(placement={"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]},
                       env={**FAST, "VMQ_METRICS_PORT": "0"}, boot_delay_s=1.0)
    cluster = LocalCluster(tmp_path / "cluster", tls_url(server, files["ca"]), spec)
    try:
        cluster.start()
        cluster.wait_healthy(timeout_s=60)
        assert cluster.fleet is not None
        config = (cluster.workdir / "responder-vm-1.toml").read_text()  # guests verify the CA too
        assert f'redis_url = "rediss://127.0.0.1:{server.port}/0"' in config
        assert f'tls_ca_file = "{files["ca"]}"' in config
        t_hang = cluster.store.clock.time_ms()
        cluster.fleet.hang("vm-1")
        cluster.wait_for(lambda: bool(events_of(cluster, type="restarted", vm="vm-1")), 30, "vm-1 restarted")
        assert events_of(cluster, type="restarted", vm="vm-1")[0]["host"] == "node1"
        cluster.wait_for(lambda: cluster.states()["vm-1"] == "healthy", 30, "vm-1 healthy again")
        assert [e["vm"] for e in events_of(cluster, type="restarted")] == ["vm-1"]
        faulty_ms = events_of(cluster, type="faulty", vm="vm-1")[0]["time_ms"] - t_hang
        restarted_ms = events_of(cluster, type="restarted", vm="vm-1")[0]["time_ms"] - t_hang
        print(f"over TLS (T1 0.5 s, T2 1.5 s): faulty {faulty_ms} ms, restarted {restarted_ms} ms after the hang")
    finally:
        cluster.stop()
    logs = {path.name: path.read_text(errors="replace") for path in cluster.workdir.glob("*.log")}
    assert not [name for name, text in logs.items() if re.search(r"SSL|certificate verify", text)], logs


# ------------------------------------------------------------ a whole cluster behind the stack's ACL
@pytest.fixture
def acl_cluster(tmp_path: Path) -> Iterator[Callable[..., tuple[LocalCluster, StackRedis]]]:
    """A LocalCluster on the compose stack's Redis: services as the `vmq` user, responders as `guest`."""
    started: list[LocalCluster | StackRedis] = []

    def build(placement: dict[str, list[str]], **env: str) -> tuple[LocalCluster, StackRedis]:
        server = start_stack_redis(tmp_path / "redis")
        started.append(server)
        spec = ClusterSpec(placement=placement, env={**FAST, "VMQ_NAMESPACE": NS, "VMQ_METRICS_PORT": "0", **env},
                           boot_delay_s=1.0, guests=False)
        cluster = LocalCluster(tmp_path / "cluster", server.vmq_url, spec)
        started.append(cluster)
        cluster.start()
        cluster.fleet = GuestFleet(server.guest_url, cluster.settings.keys, cluster.secrets, cluster.workdir,
                                   spec.boot_delay_s, watch_url=server.vmq_url)
        cluster.fleet.start()
        return cluster, server

    yield build
    for thing in reversed(started):
        thing.stop()


def cli_out(cluster: LocalCluster, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "vmq.cli", *args], env=cluster.env, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout + done.stderr


def printed_key(output: str) -> str:
    found = re.search(r'^secret_key = "([0-9a-f]{64})"$', output, re.MULTILINE)
    assert found, output
    return found[1]


def test_no_key_or_password_appears_in_any_log_cli_output_or_the_audit_stream(
        acl_cluster: Callable[..., tuple[LocalCluster, StackRedis]]) -> None:
    cluster, server = acl_cluster({"node1": ["vm-1", "vm-2"], "node2": ["vm-3"]})
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    # a fault and its restart
    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="restarted", vm="vm-1")), 30, "vm-1 restarted")
    cluster.wait_for(lambda: cluster.states()["vm-1"] == "healthy", 30, "vm-1 healthy again")
    # a rotation: the guest gets its new key; the old one is still accepted during the grace
    rotated = cli_out(cluster, "keys", "rotate", "vm-2", "--grace", "1h", "--guest-redis-url", server.guest_url)
    new_key = printed_key(rotated)
    guest = cluster.fleet.guests["vm-2"]
    assert guest.process is not None
    guest.process.kill()
    guest.process.wait(timeout=10)
    guest.secret = new_key
    cluster.fleet.boot("vm-2")
    # a new VM's key, and a forged reply signed with a key nobody has, to make the ingest log a rejection
    added = cli_out(cluster, "keys", "add", "vm-9", "--guest-redis-url", server.guest_url)
    added_key = printed_key(added)
    with redis.Redis.from_url(server.guest_url) as intruder:
        forged = json.dumps({"v": 1, "vm": "vm-3", "round": 1, "nonce": "0" * 32, "boot_id": "b", "seq": 1,
                             "guest_ms": 0, "params": {}})
        intruder.xadd(KEYS.reply_stream, {"m": forged, "s": "0" * 64})
    # without --guest-redis-url the services' own URL (and password) would go into the guest: refused
    refused = subprocess.run([sys.executable, "-m", "vmq.cli", "keys", "add", "vm-8"], env=cluster.env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "--guest-redis-url" in refused.stderr and refused.stdout == ""
    assert "vm-8" not in cluster.store.keyring.secrets()
    time.sleep(2)
    assert cluster.states()["vm-2"] == "healthy"

    outputs = {" ".join(args): cli_out(cluster, *args) for args in (
        ("status", "--json"), ("status",), ("events", "--json"), ("events",), ("hosts", "--json"),
        ("explain", "vm-1"), ("explain", "vm-2"), ("config", "--json"), ("config",), ("check", "--monitor"))}
    assert "vm-1" in outputs["status --json"] and "key_rotated" in outputs["events --json"]
    with redis.Redis.from_url(server.vmq_url) as client:
        audit = "\n".join(repr(fields) for _, fields in client.xrange(KEYS.events))
        audit += repr(client.xinfo_stream(KEYS.events))
    cluster.stop()  # every process writes its last lines
    places = {path.name: path.read_text(errors="replace") for path in sorted(cluster.workdir.glob("*.log"))}
    places |= {"redis.log": server.service.log.read_text(errors="replace"), "audit stream": audit}
    places |= {f"vmq {command}": text for command, text in outputs.items()}
    places["vmq keys add vm-8 (refused)"] = refused.stdout + refused.stderr
    assert {"monitor.log", "beat.log", "host-node1.log", "responder-vm-1.log"} <= set(places)

    keys = {f"key of {vm}": key for vm, key in cluster.secrets.items()}  # vm-2's is the rotated-out one
    keys |= {"vm-2's new key": new_key, "vm-9's key": added_key}
    passwords = {"vmq's Redis password": server.passwords[0], "guest's Redis password": server.passwords[1]}
    leaks = [f"{what} in {place}" for place, text in places.items()
             for what, value in (keys | passwords).items() if value in text]
    assert leaks == []
    # The one place a key is printed: the responder config that `vmq keys add/rotate` write on stdout.
    assert new_key in rotated and added_key in added
    assert server.passwords[0] not in rotated + added


TRIMMER = """
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1])
client.ping()
print("ready", flush=True)
sys.stdin.readline()
while True:
    client.xadd(sys.argv[2], {"m": "x", "s": "x"}, maxlen=0, approximate=False)
    time.sleep(0.0005)
"""


def test_a_guest_that_trims_the_reply_stream_to_nothing_blinds_vmq_but_never_gets_a_vm_restarted(
        acl_cluster: Callable[..., tuple[LocalCluster, StackRedis]]) -> None:
    """The guest ACL cannot restrict XADD's arguments: XADD <ns>:replies MAXLEN 0 erases every reply. vmq
    counts the replies trimmed before it read them (XINFO's entries-added) and judges no round they may
    have answered: no evidence, no verdict."""
    placement = {"node1": [f"vm-{i}" for i in range(1, 6)], "node2": [f"vm-{i}" for i in range(6, 11)]}
    cluster, server = acl_cluster(placement)
    cluster.wait_healthy(timeout_s=60)
    # The intruder runs in its own process, and starts in the middle of a round's burst of replies (the
    # hardest case: the judge has already read some of that round's replies).
    intruder = subprocess.Popen([sys.executable, "-c", TRIMMER, server.guest_url, KEYS.reply_stream],
                                env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert intruder.stdin is not None and intruder.stdout is not None
        assert intruder.stdout.readline() == b"ready\n"
        last_round = cluster.store.rounds.current_round()
        cluster.wait_for(lambda: cluster.store.rounds.current_round() > last_round, 5, "the next probe round", poll_s=0.01)
        t_start = cluster.store.clock.time_ms()
        intruder.stdin.write(b"go\n")
        intruder.stdin.flush()
        cluster.wait_for(lambda: bool(events_of(cluster, type="evidence_lost")), 20, "an evidence_lost event")
        first = events_of(cluster, type="evidence_lost")[0]
        print(f"rounds left unjudged from {first['time_ms'] - t_start} ms after the trimming began")
        time.sleep(3)  # several more rounds under attack (T1 0.5 s)
        assert len(events_of(cluster, type="evidence_lost")) >= 4
        assert cluster.store.stats.counters()[0].get("replies_lost", 0) > 0
    finally:
        intruder.kill()
        intruder.wait(timeout=10)
    cluster.wait_for(lambda: set(cluster.states().values()) == {"healthy"}, 30, "everyone healthy again")
    story = [(e["type"], e["vm"], e["time_ms"] - t_start) for e in events_of(cluster) if e["time_ms"] >= t_start]
    assert events_of(cluster, type="restart_dispatched") == [], story
    assert [e for e in events_of(cluster, type="faulty") if e["time_ms"] >= t_start] == [], story
