"""The in-guest responder's pure parts: probe parsing, reply encoding, config loading, state parameters."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from vmq import responder
from vmq.responder import (
    REPLY_MAC_PREFIX,
    WIRE_VERSION,
    ConfigProblem,
    HealthCommand,
    HealthRunner,
    RedisReplyError,
    _health_commands,
    collect_params,
    encode_reply,
    load_config,
    main,
    parse_probe,
    parse_redis_url,
    parse_toml_subset,
    reply_signature,
)

SECRET_HEX = "8f" * 16 + "0a1b2c3d" * 4
KEY = bytes.fromhex(SECRET_HEX)
NONCE = "0123456789abcdef0123456789abcdef"
GOOD_PROBE = {"v": 1, "type": "probe", "round": 42, "nonce": NONCE, "sent_ms": 1764102345123}


def probe_bytes(**changes: object) -> bytes:
    body = {**GOOD_PROBE, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


# ---------------------------------------------------------------- probes
def test_a_well_formed_probe_parses_to_round_nonce_and_sent_ms() -> None:
    assert parse_probe(probe_bytes()) == (42, NONCE, 1764102345123)


def test_a_probe_with_extra_fields_is_still_accepted() -> None:
    assert parse_probe(probe_bytes(extra="ignored"))[0] == 42


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not_json"),
        (b"not json", "not_json"),
        (b"\xff\xfe\x00", "not_json"),
        (b'{"v": 1,', "not_json"),
        (b"[]", "not_object"),
        (b"null", "not_object"),
        (b"17", "not_object"),
        (b'"probe"', "not_object"),
        (probe_bytes(v=...), "bad_version"),
        (probe_bytes(v=2), "bad_version"),
        (probe_bytes(v=0), "bad_version"),
        (probe_bytes(v=True), "bad_version"),
        (probe_bytes(v="1"), "bad_version"),
        (probe_bytes(v=1.0), "bad_version"),
        (probe_bytes(type=...), "bad_type"),
        (probe_bytes(type="reply"), "bad_type"),
        (probe_bytes(round=...), "bad_round"),
        (probe_bytes(round=0), "bad_round"),
        (probe_bytes(round=-3), "bad_round"),
        (probe_bytes(round=True), "bad_round"),
        (probe_bytes(round=1.5), "bad_round"),
        (probe_bytes(round="42"), "bad_round"),
        (probe_bytes(round=None), "bad_round"),
        (probe_bytes(nonce=...), "bad_nonce"),
        (probe_bytes(nonce=NONCE.upper()), "bad_nonce"),
        (probe_bytes(nonce=NONCE[:-1]), "bad_nonce"),
        (probe_bytes(nonce=NONCE + "0"), "bad_nonce"),
        (probe_bytes(nonce="g" * 32), "bad_nonce"),
        (probe_bytes(nonce=NONCE + "\n"), "bad_nonce"),
        (probe_bytes(nonce=12345), "bad_nonce"),
        (probe_bytes(sent_ms=...), "bad_sent_ms"),
        (probe_bytes(sent_ms="1764102345123"), "bad_sent_ms"),
        (probe_bytes(sent_ms=True), "bad_sent_ms"),
        (probe_bytes(sent_ms=1.5), "bad_sent_ms"),
        (probe_bytes(sent_ms=-1), "bad_sent_ms"),
        (probe_bytes(padding="x" * 5000), "oversized"),
    ],
)
def test_a_bad_probe_raises_value_error_naming_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}: "):
        parse_probe(raw)


# ---------------------------------------------------------------- replies
PARAMS = {"load": [0.1, 0.2, 0.3], "mem_total_kb": 2048000, "mem_available_kb": 1500000,
          "disk_total_b": 10, "disk_free_b": 5, "uptime_s": 12.5,
          "health": {"sshd": {"status": 0, "age_s": 1.2}}}


def encode(**changes: object) -> tuple[bytes, str]:
    args: dict[str, object] = {"vm_id": "web-1", "round_id": 1234, "nonce": NONCE, "boot_id": "boot-a",
                               "seq": 17, "params": PARAMS, "key": KEY, "guest_ms": 1764102345130, **changes}
    return encode_reply(**args)  # type: ignore[arg-type]


def test_a_reply_is_compact_json_with_the_protocol_field_order() -> None:
    message, _ = encode()
    body = json.loads(message)
    assert list(body) == ["v", "vm", "round", "nonce", "boot_id", "seq", "guest_ms", "params"]
    assert body == {"v": WIRE_VERSION, "vm": "web-1", "round": 1234, "nonce": NONCE, "boot_id": "boot-a",
                    "seq": 17, "guest_ms": 1764102345130, "params": PARAMS}
    assert b" " not in message
    assert message == json.dumps(body, separators=(",", ":")).encode()


def test_the_signature_is_hmac_sha256_of_prefix_and_message_in_lowercase_hex() -> None:
    message, signature = encode()
    assert signature == hmac.new(KEY, b"vmq-reply-v1\n" + message, hashlib.sha256).hexdigest()
    assert signature == reply_signature(KEY, message)
    assert REPLY_MAC_PREFIX == b"vmq-reply-v1\n"
    assert len(signature) == 64
    assert signature == signature.lower()


def test_encoding_the_same_reply_twice_gives_identical_bytes_and_signature() -> None:
    assert encode() == encode()


def test_changing_any_single_byte_of_the_message_breaks_the_signature() -> None:
    message, signature = encode()
    for index in range(len(message)):
        tampered = bytearray(message)
        tampered[index] ^= 0x01
        assert not hmac.compare_digest(reply_signature(KEY, bytes(tampered)), signature), index


def test_another_key_or_another_field_value_gives_another_signature() -> None:
    message, signature = encode()
    assert reply_signature(bytes(32), message) != signature
    assert encode(round_id=1235)[1] != signature
    assert encode(vm_id="web-2")[1] != signature


def test_guest_ms_defaults_to_the_guest_clock() -> None:
    before = int(time.time() * 1000)
    message, _ = encode(guest_ms=None)
    assert before <= json.loads(message)["guest_ms"] <= int(time.time() * 1000) + 1


# ---------------------------------------------------------------- state parameters
STATE_FIELDS = {"load", "mem_total_kb", "mem_available_kb", "disk_total_b", "disk_free_b", "uptime_s",
                "health"}


def test_collect_params_returns_the_documented_fields_with_their_types() -> None:
    health = {"sshd": {"status": 0, "age_s": 0.5}}
    params = collect_params("/", health)
    assert set(params) == STATE_FIELDS
    assert params["health"] == health
    assert len(params["load"]) == 3
    assert all(isinstance(value, float) for value in params["load"])
    assert params["disk_total_b"] >= params["disk_free_b"] >= 0
    if Path("/proc/meminfo").exists():
        assert params["mem_total_kb"] >= params["mem_available_kb"] > 0
        assert params["uptime_s"] > 0
    json.dumps(params, allow_nan=False)


def test_missing_proc_files_and_disks_give_null_fields_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responder, "_read_text", lambda path: "")

    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load)
    params = collect_params("/no/such/disk")
    assert params == dict.fromkeys(STATE_FIELDS - {"health"}) | {"health": {}}


def test_health_runner_reports_status_timeout_and_unrunnable_commands() -> None:
    stop_event = threading.Event()
    ok = HealthRunner(HealthCommand("ok", (sys.executable, "-c", "raise SystemExit(3)"), 5, 10), stop_event)
    slow = HealthRunner(HealthCommand("slow", (sys.executable, "-c", "import time; time.sleep(30)"), 0.3, 10),
                        stop_event)
    missing = HealthRunner(HealthCommand("missing", ("/no/such/program",), 5, 10), stop_event)
    assert ok.snapshot() == {"status": None, "age_s": None, "kind": "readiness", "failing": 0}
    started = time.monotonic()
    for runner in (ok, slow, missing):
        runner.run_once()
    assert time.monotonic() - started < 5
    assert ok.snapshot()["status"] == 3
    assert "error" not in ok.snapshot()
    assert slow.snapshot()["status"] is None
    assert "timed out" in slow.snapshot()["error"]
    assert missing.snapshot()["status"] is None
    assert "could not run" in missing.snapshot()["error"]
    assert 0 <= ok.snapshot()["age_s"] < 5
    assert [r.snapshot()["failing"] for r in (ok, slow, missing)] == [1, 1, 1]
    assert not ok.unhealthy(), "a readiness check never makes the application unhealthy"


def test_a_liveness_check_is_unhealthy_after_its_threshold_of_failing_runs_in_a_row_and_well_after_one_pass(
        tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    check = HealthRunner(HealthCommand("app", (sys.executable, "-c", f"import os; raise SystemExit(os.path.exists({str(flag)!r}))"),
                                       5, 10, kind="liveness", failure_threshold=2), threading.Event())
    check.run_once()
    assert (check.snapshot()["failing"], check.unhealthy()) == (0, False)
    flag.touch()
    check.run_once()
    assert (check.snapshot()["failing"], check.unhealthy()) == (1, False)
    check.run_once()
    assert (check.snapshot()["failing"], check.unhealthy()) == (2, True)
    flag.unlink()
    check.run_once()
    assert (check.snapshot()["failing"], check.unhealthy()) == (0, False)


@pytest.mark.parametrize(("entry", "problem"), [
    ({"kind": "alive"}, "kind: must be liveness or readiness"),
    ({"kind": "liveness", "failure_threshold": 0}, "failure_threshold: must be an integer from 1 to 100"),
    ({"kind": "liveness", "failure_threshold": "3"}, "failure_threshold: must be int"),
])
def test_bad_health_kinds_and_thresholds_are_config_problems(entry: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigProblem, match=problem):
        _health_commands([{"name": "app", "command": "true", **entry}])


# ---------------------------------------------------------------- RESP parsing
def test_resp_values_parse_only_once_complete() -> None:
    wire = b"*3\r\n$7\r\nmessage\r\n$10\r\nvmq:probes\r\n$5\r\nhello\r\n"
    for cut in range(len(wire)):
        assert responder._parse_resp(bytearray(wire[:cut]), 0)[0] is responder._INCOMPLETE
    assert responder._parse_resp(bytearray(wire + b"+OK\r\n"), 0) == ([b"message", b"vmq:probes", b"hello"],
                                                                       len(wire))


@pytest.mark.parametrize(
    ("wire", "value"),
    [(b"+OK\r\n", b"OK"), (b"+\r\n", b""), (b":12\r\n", 12), (b"$-1\r\n", None), (b"*-1\r\n", None),
     (b"$0\r\n\r\n", b""), (b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", [b"pong", b""]),
     (b"$4\r\na\r\nb\r\n", b"a\r\nb")],
)
def test_resp_values_decode(wire: bytes, value: object) -> None:
    assert responder._parse_resp(bytearray(wire), 0) == (value, len(wire))


def test_resp_error_replies_become_exceptions_and_garbage_is_a_connection_error() -> None:
    class FakeSocket:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def settimeout(self, timeout_s: float) -> None:
            pass

        def recv(self, size: int) -> bytes:
            data, self.data = self.data, b""
            return data

    connection = object.__new__(responder.RespConnection)
    connection.sock, connection.buffer = FakeSocket(b"$x\r\n"), bytearray()  # type: ignore[assignment]
    with pytest.raises(ConnectionError, match="protocol error"):
        connection.read()
    connection.sock, connection.buffer = FakeSocket(b"+O"), bytearray()  # type: ignore[assignment]
    with pytest.raises(ConnectionError, match="closed"):
        connection.read()
    error, _ = responder._parse_resp(bytearray(b"-NOPERM no permissions\r\n"), 0)
    assert isinstance(error, RedisReplyError)
    assert "NOPERM" in str(error)
    with pytest.raises(ConnectionError):
        responder._parse_resp(bytearray(b"?what\r\n"), 0)


# ---------------------------------------------------------------- redis URLs
def test_redis_urls_parse_with_percent_decoded_credentials() -> None:
    url = parse_redis_url("rediss://vm%40guest:p%40ss%3Aw%2Frd@redis.example:6380/3")
    assert url == (True, "redis.example", 6380, "vm@guest", "p@ss:w/rd", 3)
    assert parse_redis_url("redis://127.0.0.1") == (False, "127.0.0.1", 6379, None, None, None)
    assert parse_redis_url("redis://:only-pass@h/0") == (False, "h", 6379, None, "only-pass", 0)
    assert parse_redis_url("redis://[::1]:7000").host == "::1"


@pytest.mark.parametrize(
    "url",
    ["", "http://h", "redis://", "redis://h:notaport", "redis://h/db1", "redis://h?ssl=1", "redis://user@h"],
)
def test_bad_redis_urls_are_config_problems_naming_redis_url(url: str) -> None:
    with pytest.raises(ConfigProblem, match="^redis_url: "):
        parse_redis_url(url)


# ---------------------------------------------------------------- config
FULL_TOML = f"""
# responder config
vm_id = "web-1"
redis_url = 'redis://vmqguest:pw@10.0.0.1:6379/2'
secret_key = "{SECRET_HEX}"   # 32 bytes
namespace = "prod"
reply_stream_maxlen = 5_000
tls_ca_file = "{__file__}"
tls_insecure = false
disk_path = "/var"
log_level = "debug"

[[health]]
name = "sshd"
command = "systemctl is-active 'ssh d'"   # split with shlex
timeout_s = 5
interval_s = 2.5

[[health]]
name = "db"
command = "pg_isready -q"
"""


@pytest.fixture
def no_vmq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VMQ_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "responder.toml"
    path.write_text(text)
    return str(path)


def test_a_full_toml_file_loads_into_a_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML), {})
    assert config.vm_id == "web-1"
    assert config.redis_url == "redis://vmqguest:pw@10.0.0.1:6379/2"
    assert config.secret_key == KEY
    assert (config.namespace, config.reply_stream_maxlen, config.disk_path) == ("prod", 5000, "/var")
    assert (config.tls_ca_file, config.tls_insecure, config.log_level) == (__file__, False, "DEBUG")
    assert config.boot_id is None
    assert config.health == (
        HealthCommand("sshd", ("systemctl", "is-active", "ssh d"), 5.0, 2.5),
        HealthCommand("db", ("pg_isready", "-q"), 5.0, 10.0),
    )


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    other_secret = "ab" * 32
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not checked before connecting\n")
    config = load_config(write(tmp_path, FULL_TOML), {
        "VMQ_VM_ID": "web-2", "VMQ_REDIS_URL": "rediss://h:6380", "VMQ_SECRET_KEY": other_secret,
        "VMQ_NAMESPACE": "test", "VMQ_REPLY_STREAM_MAXLEN": "7000", "VMQ_TLS_CA_FILE": str(ca_file),
        "VMQ_TLS_INSECURE": "true", "VMQ_BOOT_ID": "sim-boot-1", "UNRELATED": "x",
    })
    assert (config.vm_id, config.redis_url) == ("web-2", "rediss://h:6380")
    assert config.secret_key == bytes.fromhex(other_secret)
    assert (config.namespace, config.reply_stream_maxlen, config.tls_ca_file) == ("test", 7000, str(ca_file))
    assert config.tls_insecure is True
    assert config.boot_id == "sim-boot-1"
    assert config.disk_path == "/var"
    assert len(config.health) == 2


def test_environment_alone_is_enough_and_defaults_apply() -> None:
    config = load_config(None, {"VMQ_VM_ID": "db-3", "VMQ_REDIS_URL": "redis://r",
                                "VMQ_SECRET_KEY": SECRET_HEX})
    assert (config.namespace, config.reply_stream_maxlen, config.disk_path) == ("vmq", 200_000, "/")
    assert (config.tls_ca_file, config.tls_insecure, config.boot_id, config.health) == (None, False, None, ())
    assert config.log_level == "INFO"


def test_the_secret_and_url_password_never_appear_in_the_config_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML), {})
    assert SECRET_HEX not in repr(config)
    assert repr(KEY) not in repr(config)
    assert "pw@" not in repr(config)


GOOD_ENV = {"VMQ_VM_ID": "web-1", "VMQ_REDIS_URL": "redis://r", "VMQ_SECRET_KEY": SECRET_HEX}


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"VMQ_VM_ID": ""}, "vm_id"),
        ({"VMQ_VM_ID": "web 1"}, "vm_id"),
        ({"VMQ_VM_ID": "a:b"}, "vm_id"),
        ({"VMQ_NAMESPACE": "x:y"}, "namespace"),
        ({"VMQ_REDIS_URL": ""}, "redis_url"),
        ({"VMQ_REDIS_URL": "http://r"}, "redis_url"),
        ({"VMQ_SECRET_KEY": SECRET_HEX[:-2]}, "secret_key"),
        ({"VMQ_SECRET_KEY": SECRET_HEX[:-1] + "z"}, "secret_key"),
        ({"VMQ_REPLY_STREAM_MAXLEN": "0"}, "reply_stream_maxlen"),
        ({"VMQ_REPLY_STREAM_MAXLEN": "lots"}, "reply_stream_maxlen"),
        ({"VMQ_TLS_INSECURE": "maybe"}, "tls_insecure"),
        ({"VMQ_TLS_CA_FILE": "/no/such/ca.pem"}, "tls_ca_file"),
        ({"VMQ_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_bad_environment_values_raise_config_problem_naming_the_key(
    environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigProblem, match=f"^{key}: ") as caught:
        load_config(None, {**GOOD_ENV, **environ})
    assert SECRET_HEX not in str(caught.value)


def test_a_missing_secret_is_named() -> None:
    with pytest.raises(ConfigProblem, match="^secret_key: "):
        load_config(None, {"VMQ_VM_ID": "web-1", "VMQ_REDIS_URL": "redis://r"})


BASE_TOML = f'vm_id = "web-1"\nredis_url = "redis://r"\nsecret_key = "{SECRET_HEX}"\n'


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("vmid = 'typo'\n", "vmid"),
        ("reply_stream_maxlen = '5'\n", "reply_stream_maxlen"),  # a string in the file is not converted
        ("reply_stream_maxlen = 1.5\n", "reply_stream_maxlen"),
        ("tls_insecure = 1\n", "tls_insecure"),
        ("disk_path = 3\n", "disk_path"),
        ("health = 'sshd'\n", "health"),
        ("[[health]]\ncommand = 'true'\n", r"health\[0\]\.name"),
        ("[[health]]\nname = 'a'\n", r"health\[0\]\.command"),
        ("[[health]]\nname = 'a'\ncommand = ''\n", r"health\[0\]\.command"),
        ("[[health]]\nname = 'a'\ncommand = 'echo \"unbalanced'\n", r"health\[0\]\.command"),
        ("[[health]]\nname = 'a'\ncommand = 'true'\ntimeout_s = 0\n", r"health\[0\]\.timeout_s"),
        ("[[health]]\nname = 'a'\ncommand = 'true'\ninterval_s = -1\n", r"health\[0\]\.interval_s"),
        ("[[health]]\nname = 'a'\ncommand = 'true'\ntimeout_s = 'soon'\n", r"health\[0\]\.timeout_s"),
        ("[[health]]\nname = 'a'\ncommand = 'true'\nshell = true\n", r"health\[0\]\.shell"),
        ("[[health]]\nname = 'a'\ncommand = 'true'\n[[health]]\nname = 'a'\ncommand = 'false'\n",
         r"health\[1\]\.name"),
    ],
)
def test_bad_file_values_raise_config_problem_naming_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigProblem, match=f"^{key}: "):
        load_config(write(tmp_path, BASE_TOML + extra), {})


def test_an_unreadable_or_invalid_file_is_a_config_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblem, match="cannot load"):
        load_config(str(tmp_path / "missing.toml"), {})
    with pytest.raises(ConfigProblem, match="cannot load"):
        load_config(write(tmp_path, "vm_id = \n"), {})


def test_the_fallback_parser_is_used_before_python_3_11(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, FULL_TOML)
    expected = load_config(path, {})
    monkeypatch.setattr(sys, "version_info", (3, 9, 18))
    assert load_config(path, {}) == expected


# ---------------------------------------------------------------- the fallback TOML parser
SUBSET_TOML = r"""
# a comment line
   # an indented comment
title = "hash # inside a string"  # a trailing comment
escaped = "tab\there \"quoted\" back\\slash \u00e9"
literal = 'C:\no\escapes'
empty = ""
count = 42
big = 1_000_000
negative = -7
ratio = 0.25
exponent = 1e3
yes = true
no = false
words = ["a", 'b', "c#d" , ]
none = []

[server]
host-name = "db"

[[health]]
name = "sshd"
command = "systemctl is-active sshd"
timeout_s = 5

[[health]]
name = "disk"
command = "test -w /"
interval_s = 2.5
"""


def test_the_fallback_parser_agrees_with_tomllib_on_the_supported_subset() -> None:
    parsed = parse_toml_subset(SUBSET_TOML)
    assert parsed == tomllib.loads(SUBSET_TOML)
    assert parsed["title"] == "hash # inside a string"
    assert parsed["escaped"] == 'tab\there "quoted" back\\slash \u00e9'
    assert parsed["literal"] == "C:\\no\\escapes"
    assert parsed["words"] == ["a", "b", "c#d"]
    assert (parsed["big"], parsed["negative"], parsed["exponent"]) == (1_000_000, -7, 1000.0)
    assert parsed["yes"] is True
    assert parsed["server"] == {"host-name": "db"}
    assert [entry["name"] for entry in parsed["health"]] == ["sshd", "disk"]


def test_the_fallback_parser_reads_the_full_example_like_tomllib() -> None:
    assert parse_toml_subset(FULL_TOML) == tomllib.loads(FULL_TOML)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('a = "unterminated\n', "line 1 (a)"),
        ("a = 1\na = 2\n", "line 2 (a)"),
        ("a = [\n  'x',\n]\n", "line 1 (a)"),
        ("a = [1, 2]\n", "line 1 (a)"),
        ("a = bare\n", "line 1 (a)"),
        ("a = 1 2\n", "line 1 (a)"),
        ('a = "bad \\q escape"\n', "line 1 (a)"),
        ("just words\n", "line 1"),
        ("[t]\nx = 1\n[t]\n", "line 3"),
        ("t = 1\n[[t]]\n", "line 2"),
        ("[[t]\n", "line 1"),
        ("a.b = 1\n", "line 1"),
    ],
)
def test_the_fallback_parser_rejects_what_it_does_not_support_with_a_line_number(
    text: str, where: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{where.replace('(', '[(]').replace(')', '[)]')}: "):
        parse_toml_subset(text)


def test_a_fallback_parse_error_never_echoes_the_secret() -> None:
    with pytest.raises(ValueError, match="secret_key") as caught:
        parse_toml_subset(f"secret_key = {SECRET_HEX}\n")
    assert SECRET_HEX not in str(caught.value)


# ---------------------------------------------------------------- entry point and portability
def test_main_exits_2_with_one_line_naming_the_key_on_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_vmq_env: None
) -> None:
    path = write(tmp_path, f'vm_id = "web-1"\nredis_url = "redis://r"\nsecret_key = "{SECRET_HEX[:-4]}"\n')
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "secret_key" in err
    assert SECRET_HEX[:-4] not in err
    assert "Traceback" not in err


def test_main_prints_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert f"wire v{WIRE_VERSION}" in capsys.readouterr().out


def test_the_module_is_python_3_9_syntax_and_imports_only_the_standard_library() -> None:
    source = Path(responder.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    top_level: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert top_level <= set(sys.stdlib_module_names) | {"__future__"}, top_level
    assert "tomllib" not in top_level
    assert not any(isinstance(node, ast.Match) for node in ast.walk(tree))
    assert "from __future__ import annotations" in source
