"""The responder's channel transport: config, finding the port, framing, and whole exchanges over a unix
socket the test serves (standing in for the virtio-serial port) and over a pty (a real character device)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.responders import serving
from vmq.codec import ReplyVerifier, RoundBook, decode_reply
from vmq.responder import (
    MAX_PROBE_BYTES,
    RESPONDER_CHANNEL,
    ConfigProblem,
    ResponderConfig,
    channel_reply_line,
    encode_reply,
    find_channel_device,
    load_config,
)

SECRET_HEX = "5e" * 32
KEY = bytes.fromhex(SECRET_HEX)
CHANNEL_ENV = {"VMQ_VM_ID": "web-1", "VMQ_SECRET_KEY": SECRET_HEX, "VMQ_TRANSPORT": "channel",
               "VMQ_BOOT_ID": "boot-1"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes, test names are long."""
    path = Path(tempfile.mkdtemp(prefix="vmqc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- config
def test_the_channel_transport_needs_no_redis_url_and_finds_the_port_by_default() -> None:
    config = load_config(None, CHANNEL_ENV)
    assert (config.transport, config.channel_path, config.redis_url) == ("channel", None, "")
    assert config.secret_key == KEY


def test_the_transport_and_channel_path_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "responder.toml"
    path.write_text(f'vm_id = "web-1"\nsecret_key = "{SECRET_HEX}"\ntransport = "channel"\n'
                    'channel_path = "/dev/vport2p1"\n')
    assert load_config(str(path), {}).channel_path == "/dev/vport2p1"
    assert load_config(str(path), {"VMQ_CHANNEL_PATH": "/dev/vport3p1"}).channel_path == "/dev/vport3p1"
    assert load_config(None, {**CHANNEL_ENV, "VMQ_TRANSPORT": "Channel"}).transport == "channel"


def test_redis_stays_the_default_transport_and_still_demands_its_url() -> None:
    env = {key: value for key, value in CHANNEL_ENV.items() if key != "VMQ_TRANSPORT"}
    with pytest.raises(ConfigProblem, match="^redis_url: "):
        load_config(None, env)
    assert load_config(None, {**env, "VMQ_REDIS_URL": "redis://r"}).transport == "redis"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"VMQ_TRANSPORT": "serial"}, "transport"),
        ({"VMQ_REDIS_URL": "http://r"}, "redis_url"),  # a URL given anyway must still be valid
        ({"VMQ_SECRET_KEY": ""}, "secret_key"),  # replies are signed whatever carries them
    ],
)
def test_bad_channel_settings_are_named(environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigProblem, match=f"^{key}: "):
        load_config(None, {**CHANNEL_ENV, **environ})


def test_the_port_is_found_by_its_sysfs_name_else_by_the_udev_link(tmp_path: Path) -> None:
    sysfs = tmp_path / "virtio-ports"
    for port, name in (("vport1p1", "org.qemu.guest_agent.0"), ("vport2p1", RESPONDER_CHANNEL)):
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    assert find_channel_device(str(sysfs), "/dev") == "/dev/vport2p1"
    (sysfs / "vport2p1" / "name").write_text("something.else\n")
    assert find_channel_device(str(sysfs), "/dev") == f"/dev/virtio-ports/{RESPONDER_CHANNEL}"
    assert find_channel_device(str(tmp_path / "absent"), "/dev") == f"/dev/virtio-ports/{RESPONDER_CHANNEL}"


def test_a_reply_line_is_one_compact_json_line_carrying_the_exact_signed_message() -> None:
    message, signature = encode_reply("web-1", 7, "ab" * 16, "boot-1", 1, {"health": {}}, KEY, guest_ms=5)
    line = channel_reply_line(message, signature)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert line.startswith(b'{"m":"{\\"v\\":1,')
    body = json.loads(line)
    assert list(body) == ["m", "s"]
    assert body["m"].encode() == message
    assert body["s"] == signature


# ---------------------------------------------------------------- whole exchanges
def channel_config(path: Path) -> ResponderConfig:
    return load_config(None, {**CHANNEL_ENV, "VMQ_CHANNEL_PATH": str(path)})


class HostEnd:
    """The host side of the port, as the test sees it: a listening unix socket the responder connects to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.conn: socket.socket | None = None
        self.buffer = b""

    def accept(self) -> socket.socket:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(10)
        self.buffer = b""
        return self.conn

    def probe(self, round_id: int) -> tuple[str, int]:
        nonce, sent_ms = os.urandom(16).hex(), int(time.time() * 1000)
        assert self.conn is not None
        self.conn.sendall(json.dumps({"v": 1, "type": "probe", "round": round_id, "nonce": nonce,
                                      "sent_ms": sent_ms}).encode() + b"\n")
        return nonce, sent_ms

    def reply_line(self) -> bytes:
        assert self.conn is not None
        while b"\n" not in self.buffer:
            chunk = self.conn.recv(65536)
            assert chunk, "the responder closed the channel"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def verify_centrally(lines: list[bytes], book: RoundBook) -> list[int]:
    """Rounds of the reply lines, verified by the monitor's own code (both the strict and the bulk path)."""
    arrival_ms = int(time.time() * 1000)
    entries: list[tuple[bytes, list[bytes]]] = []
    for line in lines:
        body = json.loads(line)
        fields = {b"m": body["m"].encode(), b"s": body["s"].encode()}
        reply = decode_reply(f"{arrival_ms}-0".encode(), fields, {"web-1": KEY}, book, 8192)
        assert (reply.vm, reply.boot_id) == ("web-1", "boot-1")
        entries.append((f"{arrival_ms}-0".encode(), [b"m", fields[b"m"], b"s", fields[b"s"]]))
    accepted, rejected = ReplyVerifier().verify(entries, {"web-1": KEY}, book, 8192)  # type: ignore[arg-type]
    assert rejected == []
    return [verified.round for verified in accepted]


def test_probes_over_the_channel_get_replies_that_the_monitor_verifies(short_dir: Path) -> None:
    host = HostEnd(short_dir / "port")
    try:
        with serving(channel_config(host.path)) as agent:
            conn = host.accept()
            rounds, lines = {}, []
            for round_id in (1, 2, 3):
                rounds[round_id] = host.probe(round_id)
                lines.append(host.reply_line())
            assert verify_centrally(lines, RoundBook(rounds)) == [1, 2, 3]
            # garbage, an over-long line, a line with no end for a while, blank lines: skipped, then a good one
            conn.sendall(b"not json\n\n" + b"{" * (MAX_PROBE_BYTES + 10) + b"\n")
            conn.sendall(b"x" * (3 * MAX_PROBE_BYTES))
            time.sleep(0.2)
            conn.sendall(b"x" * MAX_PROBE_BYTES + b"\n")
            rounds[4] = host.probe(4)
            assert verify_centrally([host.reply_line()], RoundBook(rounds)) == [4]
            assert agent.probes_skipped == {"not_json": 1, "oversized": 2}
            deadline = time.monotonic() + 5  # counted just after the line is written
            while agent.replies_sent < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert agent.replies_sent == 4
    finally:
        host.close()


def test_probes_that_piled_up_in_the_port_get_one_reply_to_the_newest(short_dir: Path) -> None:
    # As after a boot or a stall: QEMU holds the host's probes until the guest opens the port, and then they all
    # arrive at once. A reply to the newest round covers the earlier ones (the monitor judges "no reply to this
    # round or a later one"), so answering each in turn would only make the current round late.
    host = HostEnd(short_dir / "port")
    try:
        with serving(channel_config(host.path)) as agent:
            conn = host.accept()
            rounds = {1: host.probe(1)}
            assert verify_centrally([host.reply_line()], RoundBook(rounds)) == [1]
            waiting = b""
            for round_id in range(2, 42):
                nonce, sent_ms = os.urandom(16).hex(), int(time.time() * 1000)
                rounds[round_id] = (nonce, sent_ms)
                waiting += json.dumps({"v": 1, "type": "probe", "round": round_id, "nonce": nonce,
                                       "sent_ms": sent_ms}).encode() + b"\n"
            conn.sendall(waiting)
            assert verify_centrally([host.reply_line()], RoundBook(rounds)) == [41]
            rounds[42] = host.probe(42)
            assert verify_centrally([host.reply_line()], RoundBook(rounds)) == [42]
            assert agent.probes_skipped == {"superseded": 39}
    finally:
        host.close()


def test_the_responder_reopens_after_the_host_end_closes_without_spinning(short_dir: Path) -> None:
    host = HostEnd(short_dir / "port")
    try:
        with serving(channel_config(host.path)) as agent:
            host.accept()
            nonce, sent_ms = host.probe(1)
            assert verify_centrally([host.reply_line()], RoundBook({1: (nonce, sent_ms)})) == [1]
            assert host.conn is not None
            # The host end closes: the responder reads EOF, backs off and reopens. Close each reopened
            # connection at once for 1.5 s: the back-off keeps the number of attempts small.
            host.conn.close()
            attempts, deadline = 0, time.monotonic() + 1.5
            host.listener.settimeout(0.1)
            while time.monotonic() < deadline:
                try:
                    host.accept().close()
                    attempts += 1
                except TimeoutError:
                    pass
            assert 1 <= attempts <= 8, attempts
            host.listener.settimeout(10)
            host.accept()
            nonce, sent_ms = host.probe(2)
            assert verify_centrally([host.reply_line()], RoundBook({2: (nonce, sent_ms)})) == [2]
            assert agent.failures == 0
    finally:
        host.close()


def test_a_port_that_does_not_exist_yet_is_waited_for(short_dir: Path) -> None:
    path = short_dir / "port"
    with serving(channel_config(path)) as agent:
        time.sleep(1.0)
        assert 1 <= agent.failures <= 8  # backed off, never crashed, never spun
        host = HostEnd(path)
        try:
            host.accept()  # within the 2 s back-off cap
            nonce, sent_ms = host.probe(9)
            assert verify_centrally([host.reply_line()], RoundBook({9: (nonce, sent_ms)})) == [9]
        finally:
            host.close()


def test_a_character_device_path_is_opened_as_a_device(short_dir: Path) -> None:
    """A pty stands in for /dev/vportNpM: the responder opens the slave path like the real port; closing
    the master makes reads fail (EIO), as a virtio port's do, and the responder backs off instead of failing."""
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line editing: the bytes pass as they are, like a virtio port
    try:
        with serving(channel_config(Path(os.ttyname(slave)))) as agent:
            nonce, sent_ms = os.urandom(16).hex(), int(time.time() * 1000)
            time.sleep(0.3)  # let it open the device before the probe is written
            os.write(master, json.dumps({"v": 1, "type": "probe", "round": 5, "nonce": nonce,
                                         "sent_ms": sent_ms}).encode() + b"\n")
            received, deadline = b"", time.monotonic() + 10
            while not received.endswith(b"\n") and time.monotonic() < deadline:
                received += os.read(master, 65536)
            assert verify_centrally([received.rstrip(b"\n")], RoundBook({5: (nonce, sent_ms)})) == [5]
            os.close(slave)
            os.close(master)
            master = slave = -1
            time.sleep(1.0)
            assert agent.failures >= 1
            assert agent.replies_sent == 1
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
