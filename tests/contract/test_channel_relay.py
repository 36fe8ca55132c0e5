"""ChannelRelay against real unix sockets and fake guests (threads standing in for QEMU's channel socket):
answers, silence, garbage, an endless line, disconnects, and 200 VMs in one round."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmq.codec import ReplyVerifier, RoundBook
from vmq.hypervisor.channel import ChannelRelay, ChannelReply, Polled
from vmq.responder import channel_reply_line, encode_reply

KEYS = {f"vm-{index}": bytes([index % 256]) * 32 for index in range(200)}


def probe_line(round_id: int) -> tuple[bytes, str, int]:
    nonce, sent_ms = os.urandom(16).hex(), int(time.time() * 1000)
    body = {"v": 1, "type": "probe", "round": round_id, "nonce": nonce, "sent_ms": sent_ms}
    return json.dumps(body, separators=(",", ":")).encode(), nonce, sent_ms


def signed_line(vm: str, probe: bytes) -> bytes:
    body = json.loads(probe)
    message, signature = encode_reply(vm, body["round"], body["nonce"], "boot-1", 1, {}, KEYS[vm])
    return channel_reply_line(message, signature)


class FakeGuest:
    """A listening unix socket (QEMU's side of the channel) and a thread that plays the guest: for every
    probe line it calls ``behaviour(guest, conn, probe)``, by default a signed reply."""

    def __init__(self, directory: Path, vm: str,
                 behaviour: Callable[[FakeGuest, socket.socket, bytes], None] | None = None) -> None:
        self.vm, self.path = vm, directory / f"{vm}.sock"
        self.behaviour = behaviour or (lambda guest, conn, probe: conn.sendall(signed_line(guest.vm, probe)))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(4)
        self.listener.settimeout(0.1)
        self.stop, self.connections, self.probes = threading.Event(), 0, 0
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True, name=f"guest-{vm}")
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self.conn = conn
            conn.settimeout(0.1)
            buffer = b""
            with conn:
                while not self.stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        self.probes += 1
                        try:
                            self.behaviour(self, conn, line)
                        except OSError:
                            break

    def hang_up(self) -> None:
        """Close the current connection (QEMU going away); the listener still accepts a reconnection."""
        if self.conn is not None:
            self.conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vmqr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guests(short_dir: Path) -> Iterator[Callable[..., FakeGuest]]:
    made: list[FakeGuest] = []

    def make(vm: str, behaviour: Callable[[FakeGuest, socket.socket, bytes], None] | None = None) -> FakeGuest:
        made.append(FakeGuest(short_dir, vm, behaviour))
        return made[-1]

    yield make
    for guest in made:
        guest.stop.set()  # all at once: each thread notices within 0.1 s
    for guest in made:
        guest.close()


@pytest.fixture
def relay() -> Iterator[ChannelRelay]:
    with ChannelRelay() as instance:
        yield instance


def collect(relay: ChannelRelay, until: Callable[[list[ChannelReply]], bool], timeout_s: float = 10,
            ) -> tuple[Polled, int]:
    """Poll until ``until(replies so far)`` or the timeout; returns everything read and the number of polls."""
    replies: list[ChannelReply] = []
    rejects = []
    polls, deadline = 0, time.monotonic() + timeout_s
    while not until(replies) and time.monotonic() < deadline:
        polled = relay.poll(0.2)
        polls += 1
        replies += polled.replies
        rejects += polled.rejects
    return Polled(replies, rejects), polls


def verify(replies: list[ChannelReply], rounds: dict[int, tuple[str, int]]) -> list[str]:
    """The VMs whose replies the monitor's verifier accepts (arrival: the relay's receive time)."""
    entries = [(f"{int(reply.received_s * 1000) + 1}-0".encode(), [b"m", reply.message, b"s", reply.signature])
               for reply in replies]
    accepted, rejected = ReplyVerifier().verify(entries, KEYS, RoundBook(rounds), 8192)  # type: ignore[arg-type]
    assert rejected == []
    return sorted(verified.vm for verified in accepted)


def test_connected_guests_answer_a_probe_and_the_replies_verify_centrally(
    relay: ChannelRelay, guests: Callable[..., FakeGuest]
) -> None:
    for vm in ("vm-1", "vm-2", "vm-3"):
        assert relay.open(vm, str(guests(vm).path)) is True
    probe, nonce, sent_ms = probe_line(1)
    assert sorted(relay.send_probe(probe)) == ["vm-1", "vm-2", "vm-3"]
    polled, _ = collect(relay, lambda replies: len(replies) >= 3)
    assert verify(polled.replies, {1: (nonce, sent_ms)}) == ["vm-1", "vm-2", "vm-3"]
    assert polled.rejects == []
    # a probe to a subset reaches only that subset
    probe, nonce, sent_ms = probe_line(2)
    assert relay.send_probe(probe, vms=["vm-2", "vm-404"]) == ["vm-2"]
    polled, _ = collect(relay, lambda replies: len(replies) >= 1)
    assert verify(polled.replies, {2: (nonce, sent_ms)}) == ["vm-2"]
    assert relay.poll(0.3).replies == []
    with pytest.raises(ValueError, match="newline"):
        relay.send_probe(b"{}\n{}")


def test_a_silent_guest_costs_nothing_and_does_not_hold_up_the_others(
    relay: ChannelRelay, guests: Callable[..., FakeGuest]
) -> None:
    silent = guests("vm-1", lambda guest, conn, probe: None)
    relay.open("vm-1", str(silent.path))
    relay.open("vm-2", str(guests("vm-2").path))
    probe, nonce, sent_ms = probe_line(1)
    relay.send_probe(probe)
    polled, _ = collect(relay, lambda replies: len(replies) >= 1)
    assert verify(polled.replies, {1: (nonce, sent_ms)}) == ["vm-2"]
    assert collect(relay, lambda replies: False, timeout_s=0.5)[0].replies == []
    assert relay.is_connected("vm-1")


def test_garbage_lines_are_counted_as_malformed_and_good_lines_around_them_still_count(
    relay: ChannelRelay, guests: Callable[..., FakeGuest]
) -> None:
    garbage = [b"not json", b"[1,2]", b'{"m":"x"}', b'{"m":1,"s":"ab"}', b'{"m":"x","s":"ab","extra":1}',
               b'{"m":"\\ud800","s":"ab"}', b"\xff\xfe", b'{"m":"x","s":"\xc3\xa9"}']

    def noisy(guest: FakeGuest, conn: socket.socket, probe: bytes) -> None:
        conn.sendall(b"\n".join(garbage) + b"\n\n" + signed_line(guest.vm, probe))

    relay.open("vm-1", str(guests("vm-1", noisy).path))
    probe, nonce, sent_ms = probe_line(1)
    relay.send_probe(probe)
    polled, _ = collect(relay, lambda replies: len(replies) >= 1)
    assert verify(polled.replies, {1: (nonce, sent_ms)}) == ["vm-1"]
    polled2, _ = collect(relay, lambda replies: False, timeout_s=0.3)
    rejects = polled.rejects + polled2.rejects
    assert [reject.reason for reject in rejects] == ["malformed"] * len(garbage)
    assert {reject.vm for reject in rejects} == {"vm-1"}
    assert relay.counts["malformed"] == len(garbage)


def test_an_endless_line_is_dropped_and_never_delays_another_guest(
    relay: ChannelRelay, guests: Callable[..., FakeGuest]
) -> None:
    def endless(guest: FakeGuest, conn: socket.socket, probe: bytes) -> None:
        if guest.probes == 1:  # the first probe: a line that ends only after 1 MiB, then a good reply
            conn.sendall(b"x" * (1 << 20) + b"\n" + signed_line(guest.vm, probe))
            return
        conn.settimeout(0.05)
        while not guest.stop.is_set():  # later probes: a line that never ends
            try:
                conn.sendall(b"y" * 65536)
            except TimeoutError:
                continue

    relay.open("vm-0", str(guests("vm-0", endless).path))
    probe, nonce, sent_ms = probe_line(1)
    relay.send_probe(probe)
    polled, _ = collect(relay, lambda replies: len(replies) >= 1)
    assert verify(polled.replies, {1: (nonce, sent_ms)}) == ["vm-0"]
    assert relay.counts["oversized"] == 1

    for index in range(1, 6):
        relay.open(f"vm-{index}", str(guests(f"vm-{index}").path))
    probe, nonce, sent_ms = probe_line(2)
    relay.send_probe(probe)
    started = time.monotonic()
    polled, polls = collect(relay, lambda replies: len(replies) >= 5)
    print(f"\n5 replies next to an endless line: {(time.monotonic() - started) * 1000:.1f} ms, {polls} polls")
    assert verify(polled.replies, {2: (nonce, sent_ms)}) == [f"vm-{index}" for index in range(1, 6)]
    noisy = relay.link("vm-0")
    assert noisy is not None
    collect(relay, lambda _: noisy.skipping)  # on a loaded machine the guest may not have sent a line's worth yet
    assert noisy.connected and noisy.skipping
    assert len(noisy.inbox) <= relay.max_line_bytes  # the buffer stays capped
    assert relay.counts["oversized"] == 2  # the endless line counts once, however long it grows


def test_a_guest_that_hangs_up_is_reconnected_with_back_off(
    relay: ChannelRelay, guests: Callable[..., FakeGuest]
) -> None:
    guest = guests("vm-1")
    relay.open("vm-1", str(guest.path))
    deadline = time.monotonic() + 5
    while guest.conn is None and time.monotonic() < deadline:
        time.sleep(0.01)
    guest.hang_up()
    collect(relay, lambda replies: not relay.is_connected("vm-1"), timeout_s=5)
    assert relay.counts["disconnected"] == 1
    assert relay.send_probe(probe_line(1)[0]) == []  # nothing is queued for a VM that is not connected
    link = relay.link("vm-1")
    assert link is not None
    assert link.error == "closed by the peer"
    collect(relay, lambda replies: relay.is_connected("vm-1"), timeout_s=5)
    assert relay.is_connected("vm-1")
    assert guest.connections == 2
    probe, nonce, sent_ms = probe_line(2)
    relay.send_probe(probe)
    polled, _ = collect(relay, lambda replies: len(replies) >= 1)
    assert verify(polled.replies, {2: (nonce, sent_ms)}) == ["vm-1"]


def test_a_missing_or_refusing_socket_is_reported_as_not_connected_until_it_appears(
    relay: ChannelRelay, short_dir: Path, guests: Callable[..., FakeGuest]
) -> None:
    assert relay.open("vm-1", str(short_dir / "vm-1.sock")) is False
    link = relay.link("vm-1")
    assert link is not None
    assert (link.connected, link.error) == (False, "no such socket")
    refusing = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    refusing.bind(str(short_dir / "refusing.sock"))  # bound, never listening: connections are refused
    try:
        assert relay.open("vm-2", str(short_dir / "refusing.sock")) is False
        started = time.monotonic()
        collect(relay, lambda replies: False, timeout_s=1.0)
        assert time.monotonic() - started < 1.5
        link2 = relay.link("vm-2")
        assert link2 is not None
        assert link2.error is not None and "ConnectionRefusedError" in link2.error
        assert 2 <= relay.counts["connect_failed"] <= 10  # backed off: a few attempts, not a storm
    finally:
        refusing.close()
    guests("vm-1")  # the socket appears (the domain started)
    collect(relay, lambda replies: relay.is_connected("vm-1"), timeout_s=5)
    assert relay.is_connected("vm-1")
    relay.close("vm-1")
    relay.close("vm-1")
    assert relay.vms == ["vm-2"]
    assert not relay.is_connected("vm-1")


def test_two_hundred_guests_all_answer_within_one_poll_cycle(
    relay: ChannelRelay, guests: Callable[..., FakeGuest]
) -> None:
    for vm in KEYS:
        assert relay.open(vm, str(guests(vm).path))
    probe, nonce, sent_ms = probe_line(1)
    started = time.monotonic()
    assert len(relay.send_probe(probe)) == 200
    polled, polls = collect(relay, lambda replies: len(replies) >= 200, timeout_s=30)
    elapsed_s = time.monotonic() - started
    print(f"\n200 guests: all replies in {elapsed_s * 1000:.1f} ms, {polls} polls")
    assert verify(polled.replies, {1: (nonce, sent_ms)}) == sorted(KEYS)
    assert polled.rejects == []
