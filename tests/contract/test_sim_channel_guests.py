"""The simulator's channel guests: vmq.sim.bridge.ChannelBridge plays QEMU's chardev between a host's
ChannelRelay and the real responder file (a subprocess, ``transport = "channel"``), run by GuestFleet.

Real unix sockets throughout; the fleet's reboot is triggered as in a cluster, by a ``restarted`` event on a
real Redis' audit stream.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.contract.test_monitor_store import redis_server  # noqa: F401 - the module's throw-away Redis
from vmq.codec import RawEntry, ReplyVerifier, RoundBook, encode_probe, new_nonce, new_secret
from vmq.hypervisor.channel import ChannelRelay, ChannelReply
from vmq.keys import Keys
from vmq.model import RESPONDER_CHANNEL, AuditEvent, Probe, ProbePath
from vmq.sim.bridge import ChannelBridge
from vmq.sim.guests import GuestFleet, guest_socket_path
from vmq.sim.testnode import channel_socket_path, stable_uuid
from vmq.store.audit import RedisAudit
from vmq.store.redis import connect

NAMESPACE = "simch"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vmqb-", dir="/tmp"))  # unix socket paths: 107 bytes at most
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    sock.connect(path)
    return sock


def _wait(condition: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _silent(sock: socket.socket, wait_s: float = 0.3) -> bool:
    sock.settimeout(wait_s)
    try:
        return not sock.recv(100)  # b"" would be EOF, not silence
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2.0)


def test_the_bridge_copies_bytes_both_ways_between_its_host_and_guest_sockets(short_dir: Path) -> None:
    bridge = ChannelBridge(str(short_dir / "h.sock"), str(short_dir / "g.sock")).start()
    try:
        host, guest = _connect(str(short_dir / "h.sock")), _connect(str(short_dir / "g.sock"))
        assert _wait(lambda: bridge.host_connected and bridge.guest_connected)
        host.sendall(b"probe 1\n")
        assert guest.recv(100) == b"probe 1\n"
        guest.sendall(b"reply 1\n")
        assert host.recv(100) == b"reply 1\n"
        big = bytes(range(256)) * 400  # 100 KiB, more than one read
        guest.sendall(big)
        got = b""
        while len(got) < len(big):
            got += host.recv(65536)
        assert got == big
        host.close()
        guest.close()
    finally:
        bridge.stop()
    assert not (short_dir / "h.sock").exists() and not (short_dir / "g.sock").exists()


def test_bytes_for_an_absent_side_are_dropped_and_each_side_serves_one_connection_at_a_time(short_dir: Path) -> None:
    bridge = ChannelBridge(str(short_dir / "h.sock"), str(short_dir / "g.sock")).start()
    try:
        host = _connect(str(short_dir / "h.sock"))
        assert _wait(lambda: bridge.host_connected)
        host.sendall(b"nobody reads this\n")  # no guest yet: a virtio port with no reader
        assert _wait(lambda: bridge.guest.dropped_bytes == len(b"nobody reads this\n"))
        guest = _connect(str(short_dir / "g.sock"))
        assert _wait(lambda: bridge.guest_connected)
        assert _silent(guest)
        second = _connect(str(short_dir / "h.sock"))  # waits in the backlog, as a second client of QEMU's socket
        guest.sendall(b"to the first host\n")
        assert host.recv(100) == b"to the first host\n"
        assert _silent(second)
        host.close()
        assert _wait(lambda: bridge.host.accepted == 2)  # the waiting client is taken once the first has gone
        guest.sendall(b"to the second host\n")
        assert second.recv(100) == b"to the second host\n"
        second.close()
        guest.close()
    finally:
        bridge.stop()


def test_a_bridge_refuses_socket_paths_too_long_for_unix_sockets() -> None:
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        ChannelBridge("/tmp/" + "x" * 120, "/tmp/g.sock")


# ---------------------------------------------------------------- the fleet's channel guest, end to end
def _probe_and_collect(relay: ChannelRelay, rounds: dict[int, tuple[str, int]], round_id: int,
                       wait_s: float) -> list[ChannelReply]:
    probe = Probe(round=round_id, nonce=new_nonce(), sent_ms=int(time.time() * 1000))
    rounds[round_id] = (probe.nonce, probe.sent_ms)
    relay.send_probe(encode_probe(probe))
    replies: list[ChannelReply] = []
    deadline = time.monotonic() + wait_s
    while not replies and time.monotonic() < deadline:
        polled = relay.poll(0.2)
        assert polled.rejects == []
        replies += polled.replies
    return replies


def _boot_ids(replies: list[ChannelReply], rounds: dict[int, tuple[str, int]], key: bytes) -> list[str]:
    entries: list[RawEntry] = [
        (f"{int(reply.received_s * 1000) + 1}-0".encode(), [b"m", reply.message, b"s", reply.signature])
        for reply in replies]
    accepted, rejected = ReplyVerifier().verify(entries, {"vm-c": key}, RoundBook(rounds), 8192)
    assert rejected == []
    return [reply.boot_id for reply in accepted]


def test_a_channel_guest_answers_through_its_bridge_is_silent_when_hung_and_answers_again_after_a_reboot(
    short_dir: Path, redis_server: int  # noqa: F811 - the fixture imported above
) -> None:
    url = f"redis://127.0.0.1:{redis_server}/0"
    keys = Keys(NAMESPACE)
    secret = new_secret()
    host_socket = channel_socket_path(str(short_dir), stable_uuid("vm-c"), RESPONDER_CHANNEL)
    fleet = GuestFleet(url, keys, {"vm-c": secret}, short_dir, boot_delay_s=0.2,
                       paths={"vm-c": ProbePath.CHANNEL}, channel_sockets={"vm-c": host_socket})
    relay, rounds = ChannelRelay(), dict[int, tuple[str, int]]()
    client = connect(url)
    try:
        fleet.start()
        config = (short_dir / "responder-vm-c.toml").read_text()
        assert 'transport = "channel"' in config and guest_socket_path(host_socket) in config
        assert "redis_url" not in config  # a channel guest holds no Redis credentials
        relay.open("vm-c", host_socket)
        bridge = fleet.bridges["vm-c"]
        assert _wait(lambda: bridge.guest_connected and bridge.host_connected, 15)
        first_boot = fleet.guests["vm-c"].boot_id
        assert _boot_ids(_probe_and_collect(relay, rounds, 1, 10), rounds, bytes.fromhex(secret)) == [first_boot]

        fleet.hang("vm-c")
        assert _probe_and_collect(relay, rounds, 2, 1.5) == []  # frozen: the probe is sent, nothing comes back

        RedisAudit(client, keys).append(AuditEvent.RESTARTED, "vm-c", "node1", int(time.time() * 1000), action="reset")
        assert _wait(lambda: fleet.guests["vm-c"].reboots == 1 and bridge.guest_connections == 2, 15)
        second_boot = fleet.guests["vm-c"].boot_id
        assert second_boot != first_boot
        link = relay.link("vm-c")
        assert link is not None and link.connected  # the host side stayed up, as QEMU's socket outlives a reset
        replies: list[ChannelReply] = []
        for round_id in range(3, 8):  # the new responder may still be settling on its port
            replies = _probe_and_collect(relay, rounds, round_id, 2)
            if replies:
                break
        assert _boot_ids(replies, rounds, bytes.fromhex(secret)) == [second_boot]
    finally:
        relay.close_all()
        fleet.stop()
        client.close()
    assert not Path(host_socket).exists()
