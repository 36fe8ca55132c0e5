"""In-guest responder: answers each probe on ``<ns>:probes`` with a signed ``XADD`` to ``<ns>:replies``.

Standard library only and Python >= 3.9: it is copied into guests as ``vmq_responder.py`` and run as
``python3 vmq_responder.py --config /etc/vmq/responder.toml``. It speaks just enough RESP2 itself.
With ``transport = "channel"`` it talks to the host over the virtio-serial port ``org.vmq.responder.0``
instead of Redis: one probe per line in, one ``{"m": ..., "s": ...}`` line out for the newest of the probes
read together (docs/protocol.md).
The wire format is docs/protocol.md; ``vmq.codec`` imports the encoding functions from here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import re
import select
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from typing import TypeGuard  # Python 3.10+, needed only by type checkers

__version__ = "0.1.0"
WIRE_VERSION = 1
REPLY_MAC_PREFIX = b"vmq-reply-v1\n"
MAX_PROBE_BYTES = 4096
CHANNEL_DRAIN_BYTES = 128 * 1024  # read at most this much of a backlog of probes before answering
CONNECT_TIMEOUT_S = 5.0
POLL_S = 0.5  # subscriber read timeout: how quickly a stop request is noticed
PING_AFTER_IDLE_S = 5.0  # an idle subscriber pings; no answer within PONG_TIMEOUT_S means a dead server
PONG_TIMEOUT_S = 5.0
BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.2, 10.0
LOG_EVERY_S = 60.0
RESPONDER_CHANNEL = "org.vmq.responder.0"  # the virtio-serial port name; vmq.model has the same constant
VIRTIO_PORTS_SYSFS = "/sys/class/virtio-ports"
CHANNEL_BACKOFF_CAP_S = 2.0  # reopening a local port is cheap: notice a host that connects within 2 s
CHANNEL_WRITE_TIMEOUT_S = 5.0  # a reply the host does not take within this is a dead link: reopen
TRANSPORTS = ("redis", "channel")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # same rule as vmq.keys.valid_name
_NONCE = re.compile(r"[0-9a-f]{32}")
log = logging.getLogger("vmq.responder")


# ---------------------------------------------------------------- wire format (pure)
def reply_signature(key: bytes, message: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``REPLY_MAC_PREFIX + message`` under the VM's 32-byte key."""
    return hmac.new(key, REPLY_MAC_PREFIX + message, hashlib.sha256).hexdigest()


def encode_reply(vm_id: str, round_id: int, nonce: str, boot_id: str, seq: int, params: dict[str, Any],
                 key: bytes, guest_ms: int | None = None) -> tuple[bytes, str]:
    """Compact JSON reply (field order of protocol.md) and its signature; guest_ms defaults to now."""
    body = {"v": WIRE_VERSION, "vm": vm_id, "round": round_id, "nonce": nonce, "boot_id": boot_id, "seq": seq,
            "guest_ms": int(time.time() * 1000) if guest_ms is None else guest_ms, "params": params}
    message = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return message, reply_signature(key, message)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_probe(raw: bytes) -> tuple[int, str, int]:
    """Decode a probe to (round, nonce, sent_ms); raises ValueError("<reason>: <detail>") if unusable."""
    if len(raw) > MAX_PROBE_BYTES:
        raise ValueError(f"oversized: probe is {len(raw)} bytes (max {MAX_PROBE_BYTES})")
    try:
        probe = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"not_json: probe is not UTF-8 JSON ({exc})") from None
    if not isinstance(probe, dict):  # ValueError, not TypeError: callers catch one error for any bad probe
        kind = type(probe).__name__
        raise ValueError(f"not_object: probe must be a JSON object, not {kind}")  # noqa: TRY004
    if not _is_int(probe.get("v")) or probe["v"] != WIRE_VERSION:
        raise ValueError(f"bad_version: unsupported probe version {probe.get('v')!r}")
    if probe.get("type") != "probe":
        raise ValueError(f"bad_type: type must be 'probe', got {probe.get('type')!r}")
    round_id, nonce, sent_ms = probe.get("round"), probe.get("nonce"), probe.get("sent_ms")
    if not _is_int(round_id) or round_id <= 0:
        raise ValueError(f"bad_round: round must be a positive integer, got {round_id!r}")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise ValueError("bad_nonce: nonce must be 32 lowercase hex characters")
    if not _is_int(sent_ms) or sent_ms < 0:
        raise ValueError(f"bad_sent_ms: sent_ms must be a non-negative integer, got {sent_ms!r}")
    return round_id, nonce, sent_ms


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def find_channel_device(sysfs: str = VIRTIO_PORTS_SYSFS, dev: str = "/dev",
                        name: str = RESPONDER_CHANNEL) -> str:
    """The guest's character device for virtio-serial port ``name``: /dev/vportNpM whose sysfs ``name`` file
    says so, else udev's symlink /dev/virtio-ports/<name> (which may not exist yet: opening it fails then)."""
    try:
        ports = sorted(os.listdir(sysfs))
    except OSError:
        ports = []
    for port in ports:
        if _read_text(os.path.join(sysfs, port, "name")).strip() == name:
            return os.path.join(dev, port)
    return os.path.join(dev, "virtio-ports", name)


def channel_reply_line(message: bytes, signature: str) -> bytes:
    """One reply on the channel: compact ``{"m": <message as a string>, "s": <hex>}`` and a newline (ASCII)."""
    return json.dumps({"m": message.decode("utf-8"), "s": signature}, separators=(",", ":")).encode() + b"\n"


def collect_params(disk_path: str = "/", health: dict[str, Any] | None = None) -> dict[str, Any]:
    """State parameters of protocol.md (kB, bytes, seconds); a value that cannot be read is None."""
    meminfo_lines = re.findall(r"^(\w+):\s*(\d+)", _read_text("/proc/meminfo"), re.MULTILINE)
    meminfo = {name: int(value) for name, value in meminfo_lines}
    uptime = re.match(r"\s*(\d+(?:\.\d+)?)", _read_text("/proc/uptime"))
    params: dict[str, Any] = {"load": None, "mem_total_kb": meminfo.get("MemTotal"),
                              "mem_available_kb": meminfo.get("MemAvailable"), "disk_total_b": None,
                              "disk_free_b": None, "uptime_s": float(uptime.group(1)) if uptime else None}
    try:
        params["load"] = [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    try:
        vfs = os.statvfs(disk_path)
        params["disk_total_b"] = vfs.f_blocks * vfs.f_frsize
        params["disk_free_b"] = vfs.f_bavail * vfs.f_frsize  # what an unprivileged writer can still use
    except (OSError, AttributeError):
        pass
    params["health"] = dict(health or {})
    return params


# ---------------------------------------------------------------- configuration
class ConfigProblem(ValueError):
    """The responder configuration is invalid; the message names the key and never the secret."""


class RedisUrl(NamedTuple):
    """A parsed ``redis://`` or ``rediss://`` URL (user and password percent-decoded)."""

    tls: bool
    host: str
    port: int
    username: str | None
    password: str | None
    db: int | None


def parse_redis_url(url: str) -> RedisUrl:
    """Parse ``redis[s]://[user[:password]@]host[:port][/db]``; raises ConfigProblem naming redis_url."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ConfigProblem("redis_url: not a valid URL") from None
    path = parts.path.strip("/")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or not (path.isdigit() or not path):
        raise ConfigProblem("redis_url: must look like redis[s]://[user[:password]@]host[:port][/db]")
    if parts.query or parts.fragment:
        raise ConfigProblem("redis_url: query options are not supported (use tls_ca_file / tls_insecure)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        raise ConfigProblem("redis_url: a user needs a password (redis://user:password@host)")
    db = int(path) if path else None
    return RedisUrl(parts.scheme == "rediss", parts.hostname, port, username, password, db)


@dataclass(frozen=True)
class HealthCommand:
    """One health command, run without a shell every interval_s, killed after timeout_s. ``kind`` liveness:
    ``failure_threshold`` failing runs in a row mark the reply ``app_unhealthy`` (the monitor then judges the VM
    as it judges silence); readiness (the default): reported, never acted on."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float = 5.0
    interval_s: float = 10.0
    kind: str = "readiness"
    failure_threshold: int = 3


@dataclass(frozen=True)
class ResponderConfig:
    """Validated responder settings; the secret and URL are kept out of repr() so they cannot reach a log."""

    vm_id: str
    redis_url: str = field(repr=False)  # may embed a password
    secret_key: bytes = field(repr=False)
    namespace: str = "vmq"
    reply_stream_maxlen: int = 200_000
    tls_ca_file: str | None = None
    tls_insecure: bool = False
    boot_id: str | None = None
    disk_path: str = "/"
    log_level: str = "INFO"
    health: tuple[HealthCommand, ...] = ()
    sentinels: tuple[tuple[str, int], ...] = ()  # ask these for the master; redis_url gives credentials and db
    sentinel_master: str = "vmq"
    transport: str = "redis"  # "redis", or "channel": the virtio-serial port, no Redis at all
    channel_path: str | None = None  # channel transport: None = find the port (find_channel_device)
    maintenance_file: str = "/run/vmq/maintenance-until"  # `--maintenance 2h` writes it; read with every reply


# Every key but `health` may also come from VMQ_<KEY>, which overrides the file.
_KEYS = ("vm_id", "redis_url", "secret_key", "namespace", "reply_stream_maxlen", "tls_ca_file",
         "tls_insecure", "boot_id", "disk_path", "log_level", "sentinels", "sentinel_master", "transport",
         "channel_path", "maintenance_file")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
          "off": False}


def _get(raw: Mapping[str, Any], key: str, kind: type, default: Any = None, where: str = "") -> Any:
    """raw[key] checked against kind (an int is accepted as a float), or default if absent."""
    if key not in raw:
        return default
    value = raw[key]
    if kind is float and _is_int(value):
        value = float(value)
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise ConfigProblem(f"{where}{key}: must be {kind.__name__}, got {type(value).__name__}")
    return value


def _sentinels(value: Any) -> tuple[tuple[str, int], ...]:
    """``sentinels``: an array of "host:port" (or, from VMQ_SENTINELS, one comma-separated string)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConfigProblem('sentinels: must be an array of "host:port" strings')
    out = []
    for item in filter(None, (item.strip() for item in items)):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigProblem(f"sentinels: {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def _health_commands(entries: Any) -> tuple[HealthCommand, ...]:
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigProblem("health: must be an array of tables ([[health]])")
    commands: list[HealthCommand] = []
    for index, entry in enumerate(entries):
        where = f"health[{index}]."
        unknown = sorted(set(entry) - {"name", "command", "timeout_s", "interval_s", "kind", "failure_threshold"})
        if unknown:
            raise ConfigProblem(f"{where}{unknown[0]}: unknown key")
        name = _get(entry, "name", str, "", where)
        if not _NAME.fullmatch(name) or name in {command.name for command in commands}:
            raise ConfigProblem(f"{where}name: must be a unique name of A-Z a-z 0-9 _ . -")
        try:
            argv = tuple(shlex.split(_get(entry, "command", str, "", where)))
        except ValueError as exc:
            raise ConfigProblem(f"{where}command: {exc}") from None
        if not argv:
            raise ConfigProblem(f"{where}command: required, a program and its arguments")
        timeout_s = _get(entry, "timeout_s", float, 5.0, where)
        interval_s = _get(entry, "interval_s", float, 10.0, where)
        for key, value in (("timeout_s", timeout_s), ("interval_s", interval_s)):
            if value <= 0:
                raise ConfigProblem(f"{where}{key}: must be a positive number of seconds")
        kind = _get(entry, "kind", str, "readiness", where)
        if kind not in ("liveness", "readiness"):
            raise ConfigProblem(f"{where}kind: must be liveness or readiness")
        threshold = _get(entry, "failure_threshold", int, 3, where)
        if not 1 <= threshold <= 100:
            raise ConfigProblem(f"{where}failure_threshold: must be an integer from 1 to 100")
        commands.append(HealthCommand(name, argv, timeout_s, interval_s, kind, threshold))
    return tuple(commands)


def load_config(path: str | None, environ: Mapping[str, str]) -> ResponderConfig:
    """Read the TOML file (if any), apply VMQ_* overrides from environ, validate; raises ConfigProblem."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                text = handle.read().decode("utf-8")
            if sys.version_info >= (3, 11):  # noqa: UP036 - guests may run 3.9/3.10, which lack tomllib
                import tomllib
                raw = tomllib.loads(text)
            else:
                raw = parse_toml_subset(text)
        except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigProblem(f"config: cannot load {path}: {exc}") from None
    unknown = sorted(set(raw) - set(_KEYS) - {"health"})
    if unknown:
        raise ConfigProblem(f"{unknown[0]}: unknown key")
    for key in _KEYS:
        value = environ.get(f"VMQ_{key.upper()}")
        if value is not None:  # environment values are strings: convert the two that are not
            raw[key] = (_BOOLS.get(value.strip().lower(), value) if key == "tls_insecure" else
                        int(value) if key == "reply_stream_maxlen" and value.strip().isdigit() else value)
    vm_id, namespace = _get(raw, "vm_id", str, ""), _get(raw, "namespace", str, "vmq")
    for key, value in (("vm_id", vm_id), ("namespace", namespace)):
        if not _NAME.fullmatch(value):
            raise ConfigProblem(f"{key}: required, 1-128 of A-Z a-z 0-9 _ . -")
    transport = _get(raw, "transport", str, "redis").strip().lower()
    if transport not in TRANSPORTS:
        raise ConfigProblem("transport: must be redis or channel")
    url = _get(raw, "redis_url", str, "")
    if transport == "redis" or url:  # the channel needs no Redis; a URL given anyway must still be valid
        parse_redis_url(url)
    secret = _get(raw, "secret_key", str, "").strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", secret):
        raise ConfigProblem("secret_key: required, 64 hex characters (32 bytes)")
    maxlen = _get(raw, "reply_stream_maxlen", int, 200_000)
    if maxlen < 1:
        raise ConfigProblem("reply_stream_maxlen: must be a positive integer")
    ca_file = _get(raw, "tls_ca_file", str) or None
    if ca_file and not os.path.isfile(ca_file):
        raise ConfigProblem(f"tls_ca_file: no such file {ca_file}")
    sentinels, master = _sentinels(raw.get("sentinels", [])), _get(raw, "sentinel_master", str, "vmq")
    if sentinels and (not _NAME.fullmatch(master) or url.startswith("rediss:")):
        raise ConfigProblem("sentinel_master: required with sentinels, 1-128 of A-Z a-z 0-9 _ . - "
                            "(and redis_url must be redis://, no TLS through sentinels)")
    log_level = _get(raw, "log_level", str, "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigProblem("log_level: must be DEBUG, INFO, WARNING or ERROR")
    return ResponderConfig(
        vm_id=vm_id, redis_url=url, secret_key=bytes.fromhex(secret), namespace=namespace,
        reply_stream_maxlen=maxlen, tls_ca_file=ca_file,
        tls_insecure=_get(raw, "tls_insecure", bool, False), boot_id=_get(raw, "boot_id", str) or None,
        disk_path=_get(raw, "disk_path", str, "/"), log_level=log_level,
        health=_health_commands(raw.get("health", [])), sentinels=sentinels, sentinel_master=master,
        transport=transport, channel_path=_get(raw, "channel_path", str) or None,
        maintenance_file=_get(raw, "maintenance_file", str, "/run/vmq/maintenance-until"))


_TOML_STR = r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\''
_TOML_LINE = re.compile(
    r"\s*(?:\[\[\s*(?P<array>[\w-]+)\s*\]\]|\[\s*(?P<table>[\w-]+)\s*\]"
    rf"|(?P<key>[\w-]+)\s*=\s*(?P<value>{_TOML_STR}|\[\s*(?:(?:{_TOML_STR})\s*,\s*)*(?:(?:{_TOML_STR})\s*)?\]"
    r"|true|false|[+-]?\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?))?\s*(?:#.*)?")


def _toml_scalar(token: str) -> Any:
    if token.startswith('"'):
        return json.loads(token, strict=False)  # TOML basic-string escapes are JSON's
    if token.startswith("'"):
        return token[1:-1]
    if token.startswith("["):
        return [_toml_scalar(item) for item in re.findall(_TOML_STR, token)]
    if token in ("true", "false"):
        return token == "true"
    digits = token.replace("_", "")
    return float(digits) if re.search(r"[.eE]", digits) else int(digits)


def parse_toml_subset(text: str) -> dict[str, Any]:
    """TOML subset for Python < 3.11: comments, strings, numbers, booleans, string arrays, [t], [[t]]."""
    root: dict[str, Any] = {}
    table = root
    for number, line in enumerate(text.splitlines(), 1):
        match, named = _TOML_LINE.fullmatch(line), re.match(r"\s*([\w-]+)\s*=", line)
        where = f"line {number}" + (f" ({named[1]})" if named else "")  # not the line: it may hold the secret
        if not match:
            raise ValueError(f"{where}: unsupported TOML (this parser knows strings, numbers, booleans, "
                             "one-line string arrays, [table] and [[array]])")
        name = match["table"] or match["array"]
        if name:
            if (match["table"] and name in root) or not isinstance(root.setdefault(name, []), list):
                raise ValueError(f"{where}: table {name!r} defined twice")
            table = {}
            if match["array"]:
                root[name].append(table)
            else:
                root[name] = table
        elif match["key"]:
            if match["key"] in table:
                raise ValueError(f"{where}: key defined twice")
            try:
                table[match["key"]] = _toml_scalar(match["value"])
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
    return root


# ---------------------------------------------------------------- RESP2 over a socket
class RedisReplyError(Exception):
    """Redis answered a command with an error reply (``-ERR ...``, ``-NOPERM ...``)."""


_INCOMPLETE = object()


def _parse_resp(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 value at buf[pos:] and the position after it; (_INCOMPLETE, pos) if more bytes are needed."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line, after = bytes(buf[pos:pos + 1]), bytes(buf[pos + 1:end]), end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisReplyError(line.decode("utf-8", "replace")), after
    if kind not in (b":", b"$", b"*"):
        raise ConnectionError(f"RESP protocol error: unexpected type byte {kind!r}")
    number = int(line)  # a ValueError here is a protocol error too: read() reports it as ConnectionError
    if kind == b":" or number < 0:  # an integer, or the null bulk string / null array
        return (number if kind == b":" else None), after
    if kind == b"$":
        if len(buf) < after + number + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after:after + number]), after + number + 2
    items: list[Any] = []
    for _ in range(number):
        item, after = _parse_resp(buf, after)
        if item is _INCOMPLETE:
            return _INCOMPLETE, pos
        items.append(item)
    return items, after


class RespConnection:
    """One blocking RESP2 connection: connect (TLS for rediss://), AUTH, SELECT, then commands."""

    def __init__(self, url: RedisUrl, tls_ca_file: str | None = None, tls_insecure: bool = False) -> None:
        self.sock = socket.create_connection((url.host, url.port), timeout=CONNECT_TIMEOUT_S)
        self.buffer = bytearray()
        try:
            if url.tls:
                context = ssl.create_default_context(cafile=tls_ca_file)
                if tls_insecure:
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                self.sock = context.wrap_socket(self.sock, server_hostname=url.host)
            if url.password is not None:
                self.call("AUTH", *([url.username] if url.username else []), url.password)
            if url.db:
                self.call("SELECT", url.db)
        except BaseException:
            self.sock.close()
            raise

    def send(self, *args: str | bytes | int) -> None:
        """Write one command as a RESP array of bulk strings."""
        data = [arg if isinstance(arg, bytes) else str(arg).encode("utf-8") for arg in args]
        self.sock.sendall(b"*%d\r\n" % len(data) + b"".join(b"$%d\r\n%s\r\n" % (len(d), d) for d in data))

    def read(self, timeout_s: float | None = None) -> Any:
        """Read one reply; raises socket.timeout (keeping partial input), ConnectionError on EOF."""
        self.sock.settimeout(CONNECT_TIMEOUT_S if timeout_s is None else timeout_s)
        while True:
            try:
                value, used = _parse_resp(self.buffer, 0)
            except ValueError as exc:
                raise ConnectionError(f"RESP protocol error: {exc}") from exc
            if value is not _INCOMPLETE:
                del self.buffer[:used]
                return value
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.buffer += chunk

    def call(self, *args: str | bytes | int) -> Any:
        """Send a command and return its reply; raises RedisReplyError on an error reply."""
        self.send(*args)
        reply = self.read()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply


# ---------------------------------------------------------------- the agent
class HealthRunner:
    """Runs one health command in its own daemon thread; ``snapshot()`` never waits for it."""

    def __init__(self, command: HealthCommand, stop: threading.Event) -> None:
        self.command, self.stop, self.lock = command, stop, threading.Lock()
        self.result: tuple[int | None, float, str | None] | None = None  # (status, monotonic end, error)
        self.failing = 0  # runs in a row that failed (non-zero status, timeout, could not run)
        self.thread = threading.Thread(target=self._loop, name=f"health-{command.name}", daemon=True)

    def run_once(self) -> None:
        """Run the command once (no shell, output discarded) and record its exit status or failure."""
        status, error = None, None
        try:
            status = subprocess.run(self.command.argv, check=False, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=self.command.timeout_s).returncode
        except subprocess.TimeoutExpired:
            error = f"timed out after {self.command.timeout_s:g}s"
        except OSError as exc:
            error = f"could not run: {exc.strerror or exc}"
        with self.lock:
            self.result = (status, time.monotonic(), error)
            self.failing = 0 if status == 0 else self.failing + 1

    def _loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            self.run_once()
            self.stop.wait(max(0.0, started + self.command.interval_s - time.monotonic()))

    def snapshot(self) -> dict[str, Any]:
        """Last result as {"status", "age_s", "kind", "failing"[, "error"]}; status and age are null before the
        first run ends; ``failing`` counts the failing runs in a row."""
        with self.lock:
            result, failing = self.result, self.failing
        kind = {"kind": self.command.kind, "failing": failing}
        if result is None:
            return {"status": None, "age_s": None, **kind}
        entry = {"status": result[0], "age_s": round(time.monotonic() - result[1], 1), **kind}
        return entry if result[2] is None else {**entry, "error": result[2]}

    def unhealthy(self) -> bool:
        """True when this is a liveness check that failed ``failure_threshold`` runs in a row."""
        with self.lock:
            return self.command.kind == "liveness" and self.failing >= self.command.failure_threshold


class Responder:
    """Answers each valid probe with one signed reply (Redis: SUBSCRIBE + XADD; channel: lines on the
    virtio-serial port), reconnecting or reopening until stopped."""

    def __init__(self, config: ResponderConfig) -> None:
        # The channel transport needs no Redis URL (load_config lets it be empty there).
        self.config = config
        needs_url = config.transport == "redis" or bool(config.redis_url)
        self.url: RedisUrl | None = parse_redis_url(config.redis_url) if needs_url else None
        boot_id = _read_text("/proc/sys/kernel/random/boot_id").strip()
        self.boot_id = config.boot_id or boot_id or str(uuid.uuid4())
        self.probe_channel, self.reply_stream = f"{config.namespace}:probes", f"{config.namespace}:replies"
        self.replies_sent, self.seq, self.failures = 0, 0, 0
        self.probes_skipped: dict[str, int] = {}  # reason ("not_json", "oversized", ...) -> probes ignored
        self.max_replies: int | None = None  # stop after this many replies (--once)
        self.publisher: RespConnection | None = None
        self._last_logged: dict[str, float] = {}
        self._health_stop = threading.Event()
        self.health = [HealthRunner(command, self._health_stop) for command in config.health]

    def _log_limited(self, reason: str, level: int, message: str, *args: object,
                     exc_info: bool = False) -> None:
        """Log at most once per LOG_EVERY_S per reason, so a flood of bad probes cannot fill the disk."""
        now = time.monotonic()
        if now - self._last_logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_logged[reason] = now
            log.log(level, message, *args, exc_info=exc_info)

    def _back_off(self, stop: threading.Event, reason: str, why: str, exc_info: bool = False,
                  cap_s: float = BACKOFF_CAP_S) -> None:
        """Wait 0.2 s doubling to cap_s (10 s), jittered so that many guests do not reconnect in lockstep."""
        delay = min(cap_s, BACKOFF_FIRST_S * 2 ** min(self.failures, 16)) * random.uniform(0.5, 1.0)
        self.failures += 1
        level = logging.ERROR if exc_info else logging.WARNING
        self._log_limited(reason, level, "%s, retrying in %.1fs", why, delay, exc_info=exc_info)
        stop.wait(delay)

    def _connect(self) -> RespConnection:
        url = self._master_url() if self.config.sentinels else self.url
        if url is None:
            raise ConfigProblem("redis_url: required for the redis transport")
        return RespConnection(url, self.config.tls_ca_file, self.config.tls_insecure)

    def _master_url(self) -> RedisUrl:
        """Ask the sentinels, in turn, where the master is now (asked again on every connect)."""
        problems = []
        for host, port in self.config.sentinels:
            try:
                sentinel = RespConnection(RedisUrl(False, host, port, None, None, None))
                try:
                    address = sentinel.call("SENTINEL", "get-master-addr-by-name", self.config.sentinel_master)
                finally:
                    sentinel.sock.close()
            except (OSError, RedisReplyError) as exc:
                problems.append(f"{host}:{port}: {exc}")
                continue
            if isinstance(address, list) and len(address) == 2 and self.url is not None:
                return self.url._replace(host=address[0].decode(), port=int(address[1]))
            problems.append(f"{host}:{port}: does not know {self.config.sentinel_master}")
        raise ConnectionError("no sentinel named the master: " + "; ".join(problems))

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Serve until stop_event is set; while Redis is away retry after 0.2 s doubling to 10 s, jittered."""
        stop = stop_event or threading.Event()
        for runner in self.health:
            runner.thread.start()
        if self.config.transport == "channel":
            return self._run_channel(stop)
        log.info("responder started vm=%s boot_id=%s channel=%s", self.config.vm_id, self.boot_id,
                 self.probe_channel)
        try:
            while not stop.is_set():
                try:
                    self._serve(stop)
                except (OSError, RedisReplyError) as exc:  # OSError: refused, reset, timed out, TLS failures
                    name = type(exc).__name__
                    self._back_off(stop, f"redis:{name}", f"redis unavailable ({name}: {exc})")
                except Exception as exc:  # noqa: BLE001 - a bug must not silence the guest: log, carry on
                    name = type(exc).__name__
                    self._back_off(stop, f"bug:{name}", f"unexpected error {exc!r}", exc_info=True)
        finally:
            self._health_stop.set()
            log.info("responder stopped vm=%s replies_sent=%d", self.config.vm_id, self.replies_sent)

    def _serve(self, stop: threading.Event) -> None:
        """One session: subscribe, answer probes, PING when idle; raises OSError when a connection fails."""
        subscriber = self._connect()
        try:
            subscriber.call("SUBSCRIBE", self.probe_channel)
            self.publisher = self._connect()
            if self.failures:
                log.info("reconnected to redis vm=%s", self.config.vm_id)
            self.failures, last_heard, ping_sent = 0, time.monotonic(), None
            while not stop.is_set():
                try:
                    message = subscriber.read(POLL_S)
                except socket.timeout:  # noqa: UP041 - not the same class as TimeoutError on Python 3.9
                    now = time.monotonic()
                    if ping_sent is not None and now - ping_sent > PONG_TIMEOUT_S:
                        raise ConnectionError(f"no answer to PING within {PONG_TIMEOUT_S:g}s") from None
                    if ping_sent is None and now - last_heard > PING_AFTER_IDLE_S:
                        subscriber.send("PING")
                        ping_sent = now
                    continue
                last_heard, ping_sent = time.monotonic(), None
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    self._answer(message[2], stop)
                elif isinstance(message, RedisReplyError):  # e.g. an ACL without +ping
                    self._log_limited("subscriber", logging.WARNING, "probe connection error: %s", message)
        finally:
            subscriber.sock.close()
            if self.publisher is not None:
                self.publisher.sock.close()
                self.publisher = None

    def _sign(self, raw: bytes) -> tuple[int, bytes, str] | None:
        """(round, reply message, signature) for a probe; None (counted, logged rate-limited) if unusable."""
        try:
            round_id, nonce, _sent_ms = parse_probe(raw)
        except ValueError as exc:
            self._skip(str(exc))
            return None
        self.seq += 1
        health = {runner.command.name: runner.snapshot() for runner in self.health}
        params = collect_params(self.config.disk_path, health)
        failed = sorted(runner.command.name for runner in self.health if runner.unhealthy())
        if failed:  # the monitor judges the VM as it judges silence (docs/protocol.md, "Application liveness")
            params["app_unhealthy"] = failed
        remaining_ms = maintenance_remaining_ms(self.config.maintenance_file)
        if remaining_ms:  # the guest asks not to be judged for a while (`--maintenance`; the monitor caps it)
            params["maintenance_for_ms"] = remaining_ms
        message, signature = encode_reply(self.config.vm_id, round_id, nonce, self.boot_id, self.seq, params,
                                          self.config.secret_key)
        return round_id, message, signature

    def _skip(self, why: str) -> None:
        """Count and log (rate-limited) a probe that gets no reply; why is "<reason>: <detail>"."""
        reason = why.split(":")[0]
        self.probes_skipped[reason] = self.probes_skipped.get(reason, 0) + 1
        self._log_limited(f"probe:{reason}", logging.WARNING, "ignoring probe: %s", why)

    def _replied(self, round_id: int, stop: threading.Event) -> None:
        self.replies_sent += 1
        log.debug("replied vm=%s round=%s seq=%s", self.config.vm_id, round_id, self.seq)
        if self.max_replies is not None and self.replies_sent >= self.max_replies:
            stop.set()

    def _answer(self, raw: bytes, stop: threading.Event) -> None:
        signed = self._sign(raw)
        if signed is None:
            return
        round_id, message, signature = signed
        for attempt in (1, 2):  # an idle publisher may have been dropped: retry once on a fresh connection
            try:
                self.publisher = self.publisher or self._connect()
                self.publisher.call("XADD", self.reply_stream, "MAXLEN", "~", self.config.reply_stream_maxlen,
                                    "*", "m", message, "s", signature)
                break
            except RedisReplyError as exc:
                if str(exc).startswith("READONLY"):  # a master demoted by a failover: find the new one
                    raise ConnectionError(f"XADD refused by a replica: {exc}") from exc
                self._log_limited(f"xadd:{str(exc).split(' ')[0]}", logging.ERROR, "XADD refused: %s", exc)
                return
            except OSError:
                if self.publisher is not None:
                    self.publisher.sock.close()
                    self.publisher = None
                if attempt == 2:
                    raise
        self._replied(round_id, stop)

    # ------------------------------------------------------------ the channel transport
    def _run_channel(self, stop: threading.Event) -> None:
        """Serve the virtio-serial port until stopped; reopen after 0.2 s doubling to 2 s while it is away."""
        log.info("responder started vm=%s boot_id=%s transport=channel path=%s", self.config.vm_id,
                 self.boot_id, self.config.channel_path or "auto")
        try:
            while not stop.is_set():
                try:
                    self._serve_channel(stop)
                except OSError as exc:  # no device yet, EOF/EIO while the host end is closed, EBUSY, EPIPE
                    name = type(exc).__name__
                    self._back_off(stop, f"channel:{name}", f"channel unavailable ({name}: {exc})",
                                   cap_s=CHANNEL_BACKOFF_CAP_S)
                except Exception as exc:  # noqa: BLE001 - a bug must not silence the guest: log, carry on
                    name = type(exc).__name__
                    self._back_off(stop, f"bug:{name}", f"unexpected error {exc!r}", exc_info=True,
                                   cap_s=CHANNEL_BACKOFF_CAP_S)
        finally:
            self._health_stop.set()
            log.info("responder stopped vm=%s replies_sent=%d", self.config.vm_id, self.replies_sent)

    def _open_channel(self) -> tuple[int, str]:
        """A non-blocking fd on the port and its path. In a guest the path is a character device (os.open);
        where it is a unix socket (tests, a host-side stand-in) it is connected instead. Either way the rest
        is the same os.read/os.write/poll code. Raises OSError (FileNotFoundError before the port exists)."""
        path = self.config.channel_path or find_channel_device()
        if stat.S_ISSOCK(os.stat(path).st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
            fd = sock.detach()
            os.set_blocking(fd, False)
            return fd, path
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY), path

    def _serve_channel(self, stop: threading.Event) -> None:
        """One session on the port: read probe lines, write reply lines; raises OSError when the link fails.

        A virtio port whose host end is closed polls as HUP and reads EOF (or EIO): that ends the session and
        run() backs off before reopening, so an absent host never makes this loop spin."""
        fd, path = self._open_channel()
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            pending, skipping, heard = bytearray(), False, False
            while not stop.is_set():
                if not poller.poll(POLL_S * 1000):
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise ConnectionError("end of file: the host end of the channel is not connected")
                if not heard:
                    heard = True
                    if self.failures:
                        log.info("channel connected vm=%s path=%s", self.config.vm_id, path)
                    self.failures = 0
                pending += chunk
                # Take in whatever else is waiting: after a pause (boot, a stall) the host's probes pile up in the
                # port, and only the newest needs an answer (a reply to a round covers every earlier round).
                while len(pending) < CHANNEL_DRAIN_BYTES and poller.poll(0):
                    try:
                        more = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if not more:
                        break  # end of file: the next read says so again and ends the session
                    pending += more
                start, probes = 0, []
                while True:
                    end = pending.find(b"\n", start)
                    if end < 0:
                        break
                    line, start = bytes(pending[start:end]), end + 1
                    if skipping:  # the tail of an over-long line, already counted
                        skipping = False
                    elif line.strip():  # blank lines are ignored: the host may use them to keep alive
                        try:
                            parse_probe(line)
                        except ValueError as exc:
                            self._skip(str(exc))
                        else:
                            probes.append(line)
                if probes and not stop.is_set():
                    if len(probes) > 1:  # superseded by a newer probe read at the same time: not answered
                        self.probes_skipped["superseded"] = self.probes_skipped.get("superseded", 0) + len(probes) - 1
                    self._answer_line(fd, probes[-1], stop)
                del pending[:start]
                if not skipping and len(pending) > MAX_PROBE_BYTES:
                    self._skip(f"oversized: probe line exceeds {MAX_PROBE_BYTES} bytes")
                    skipping = True
                if skipping:
                    pending.clear()
        finally:
            os.close(fd)

    def _answer_line(self, fd: int, line: bytes, stop: threading.Event) -> None:
        signed = self._sign(line)
        if signed is None:
            return
        round_id, message, signature = signed
        self._write_all(fd, channel_reply_line(message, signature))
        self._replied(round_id, stop)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        """Write all of data to the non-blocking fd within CHANNEL_WRITE_TIMEOUT_S; raises OSError if not.
        (A virtio port whose host end is closed would block a write forever: never write blocking.)"""
        view, deadline = memoryview(data), time.monotonic() + CHANNEL_WRITE_TIMEOUT_S
        writable = select.poll()
        writable.register(fd, select.POLLOUT)
        while view:
            try:
                view = view[os.write(fd, view):]
                continue
            except BlockingIOError:
                pass
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise ConnectionError(f"the host took no reply for {CHANNEL_WRITE_TIMEOUT_S:g}s")
            for _fd, events in writable.poll(remaining_s * 1000):
                if events & (select.POLLHUP | select.POLLERR) and not events & select.POLLOUT:
                    raise ConnectionError("the host end of the channel closed while writing a reply")


def maintenance_remaining_ms(path: str, now_s: float | None = None) -> int:
    """Milliseconds left of the maintenance window the guest declared in ``path`` (its end, epoch seconds by
    the guest's clock), 0 when there is none, it is over, or the file does not read."""
    try:
        with open(path, encoding="ascii") as handle:
            until_s = float(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0
    left_ms = int((until_s - (time.time() if now_s is None else now_s)) * 1000)
    return max(0, left_ms)


def declare_maintenance(path: str, duration: str) -> str:
    """Write (``90m``, ``2h``, ``3600``: seconds) or remove (``off``) the guest's maintenance window; the words
    to print. Raises ConfigProblem on a duration that is not one."""
    if duration == "off":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return "maintenance off: judged again from the monitor's next round (a window it began runs to its end)"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", duration.strip())
    if not match:
        raise ConfigProblem(f"--maintenance: {duration!r} is not a duration like 90m, 2h or 3600")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{time.time() + seconds:.3f}\n")
    return f"maintenance for {seconds:g} s: not judged meanwhile (the monitor caps it: VMQ_GUEST_MAINTENANCE_MAX_S)"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: parse arguments, load config, log to stderr, serve until SIGTERM (exit 0)."""
    parser = argparse.ArgumentParser(prog="vmq_responder", description="vmq in-guest probe responder")
    parser.add_argument("--config", metavar="PATH", help="TOML config file (VMQ_* variables override it)")
    parser.add_argument("--once", action="store_true", help="answer a single probe, then exit")
    parser.add_argument("--maintenance", metavar="DURATION|off",
                        help="declare long work in this guest (e.g. 2h for OS updates): not judged meanwhile; exit")
    parser.add_argument("--version", action="version",
                        version=f"vmq-responder {__version__} (wire v{WIRE_VERSION})")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigProblem as exc:
        print(f"vmq-responder: config error: {exc}", file=sys.stderr)
        return 2
    if args.maintenance:
        try:
            print(declare_maintenance(config.maintenance_file, args.maintenance))
        except (ConfigProblem, OSError) as exc:
            print(f"vmq-responder: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s vmq-responder: %(message)s")
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda _signum, _frame: stop.set())
    responder = Responder(config)
    responder.max_replies = 1 if args.once else None
    responder.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
