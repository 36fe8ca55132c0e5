"""The responder file, run as a guest runs it, in channel mode, answering probes that ChannelRelay sends.

No QEMU here: a small bridge plays its part. It listens where libvirt's channel socket would be (the relay
connects there, as it will to the real one) and where the guest's port would be (the responder connects
there: a unix socket is accepted as the port, on the same code path as the character device), and copies
bytes between the two.
"""

from __future__ import annotations

import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.responders import find_old_python
from vmq import responder as responder_module
from vmq.codec import ReplyVerifier, RoundBook, encode_probe, new_nonce
from vmq.hypervisor.channel import ChannelRelay, ChannelReply
from vmq.model import Probe

pytestmark = pytest.mark.integration

RESPONDER_FILE = Path(responder_module.__file__)
SECRET_HEX = secrets.token_hex(32)
KEY = bytes.fromhex(SECRET_HEX)


class FakeQemu:
    """Two listening unix sockets, host side and guest side, with the bytes of each copied to the other."""

    def __init__(self, directory: Path) -> None:
        self.host_path, self.guest_path = directory / "host.sock", directory / "guest.sock"
        self.selector, self.stop = selectors.DefaultSelector(), threading.Event()
        self.ends: dict[str, socket.socket | None] = {"host": None, "guest": None}
        self.guest_connected = threading.Event()
        for side, path in (("host", self.host_path), ("guest", self.guest_path)):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(2)
            self.selector.register(listener, selectors.EVENT_READ, ("listen", side))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.1):
                kind, side = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if kind == "listen":
                    conn, _ = sock.accept()
                    self._close(side)
                    self.ends[side] = conn
                    self.selector.register(conn, selectors.EVENT_READ, ("conn", side))
                    if side == "guest":
                        self.guest_connected.set()
                    continue
                data = sock.recv(65536)
                if not data:
                    self._close(side)
                    continue
                other = self.ends["guest" if side == "host" else "host"]
                if other is not None:  # with nobody on the other side the bytes are lost, as in QEMU
                    other.sendall(data)
        for side in ("host", "guest"):
            self._close(side)

    def _close(self, side: str) -> None:
        conn = self.ends[side]
        if conn is not None:
            self.selector.unregister(conn)
            conn.close()
            self.ends[side] = None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


@pytest.fixture
def qemu() -> Iterator[FakeQemu]:
    directory = Path(tempfile.mkdtemp(prefix="vmqi-", dir="/tmp"))  # unix socket paths: 107 bytes at most
    bridge = FakeQemu(directory)
    yield bridge
    bridge.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("interpreter", ["this", "3.9 or 3.10"])
def test_the_responder_file_answers_relayed_probes_over_the_channel_and_the_replies_verify(
    qemu: FakeQemu, interpreter: str
) -> None:
    python = sys.executable if interpreter == "this" else find_old_python()
    if python is None:
        pytest.skip("no Python 3.9 or 3.10 interpreter here")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "VMQ_VM_ID": "guest-1", "VMQ_SECRET_KEY": SECRET_HEX,
           "VMQ_TRANSPORT": "channel", "VMQ_CHANNEL_PATH": str(qemu.guest_path), "VMQ_BOOT_ID": "boot-c",
           "VMQ_LOG_LEVEL": "DEBUG"}  # no VMQ_REDIS_URL: the channel needs none
    process = subprocess.Popen([python, "-I", "-S", str(RESPONDER_FILE)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    relay, verifier = ChannelRelay(), ReplyVerifier()
    try:
        assert relay.open("guest-1", str(qemu.host_path))
        assert qemu.guest_connected.wait(15), "the responder never opened its port"
        rounds: dict[int, tuple[str, int]] = {}
        for round_id in range(1, 6):
            probe = Probe(round=round_id, nonce=new_nonce(), sent_ms=int(time.time() * 1000))
            rounds[round_id] = (probe.nonce, probe.sent_ms)
            started = time.monotonic()
            assert relay.send_probe(encode_probe(probe)) == ["guest-1"]
            replies: list[ChannelReply] = []
            while not replies and time.monotonic() - started < 10:
                polled = relay.poll(0.5)
                assert polled.rejects == []
                replies += polled.replies
            print(f"\nround {round_id}: reply relayed in {(time.monotonic() - started) * 1000:.1f} ms")
            assert len(replies) == 1
            entry = (f"{int(replies[0].received_s * 1000) + 1}-0".encode(),
                     [b"m", replies[0].message, b"s", replies[0].signature])
            accepted, rejected = verifier.verify([entry], {"guest-1": KEY}, RoundBook(rounds), 8192)
            assert rejected == []
            assert [(reply.vm, reply.round, reply.boot_id) for reply in accepted] == [("guest-1", round_id, "boot-c")]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        relay.close_all()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "transport=channel" in stderr
    assert "responder stopped vm=guest-1 replies_sent=5" in stderr
    assert SECRET_HEX not in stderr
