"""QEMU's part of a simulated guest's virtio-serial channel: two unix sockets and a thread copying bytes.

libvirt's test driver writes a ``<channel type='unix'>`` into a domain's XML but binds no socket, and a
simulated guest has no virtio port. A ChannelBridge plays both: it listens at the **host** path the domain's
XML names (where a host's ChannelRelay connects, as it would to QEMU's chardev socket) and at a **guest**
path the guest's responder opens as its port (``transport = "channel"``, ``channel_path`` = that socket), and
copies bytes both ways. What it keeps of the real thing:

* each side accepts one connection at a time, like QEMU's chardev server: a second client waits in the
  listen backlog until the first one goes;
* bytes arriving while the other side is absent are dropped (a virtio port with no reader), and so are bytes
  beyond ``max_pending_bytes`` waiting for a side that does not read (a frozen guest);
* the guest side may come and go (a reboot kills and restarts the responder) while the host side stays
  connected, as QEMU's socket outlives a guest reset.

A hang (SIGSTOP of the responder) leaves its connection open and unread: probes pile up and are dropped,
no reply comes back. Standard library only; one thread per bridge; ``stop()`` closes everything.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Bytes held for a side that does not read before newer ones are dropped (as ChannelRelay's send cap).
MAX_PENDING_BYTES = 65536
_CHUNK_BYTES = 65536
_POLL_S = 0.1  # how soon stop() is noticed
_MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes with its terminating NUL on Linux


@dataclass
class _Side:
    """One end of the bridge: its listening socket, its current connection and what waits to be sent to it."""

    name: str
    path: str
    listener: socket.socket | None = None
    conn: socket.socket | None = None
    pending: bytearray = field(default_factory=bytearray)
    accepted: int = 0  # connections accepted so far
    dropped_bytes: int = 0  # bytes meant for this side that were dropped


class ChannelBridge:
    """Copies bytes between a host-side and a guest-side unix socket (see the module docstring)."""

    def __init__(self, host_path: str, guest_path: str, max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        for path in (host_path, guest_path):
            if len(os.fsencode(path)) > _MAX_UNIX_PATH_BYTES:
                raise ValueError(f"unix socket path longer than {_MAX_UNIX_PATH_BYTES} bytes: {path!r}")
        self.host = _Side("host", host_path)
        self.guest = _Side("guest", guest_path)
        self.max_pending_bytes = max_pending_bytes
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters and connections the properties read

    # ------------------------------------------------------------ public
    def start(self) -> ChannelBridge:
        """Bind both sockets (replacing stale socket files) and start copying; raises OSError if a bind fails."""
        for side in (self.host, self.guest):
            if os.path.exists(side.path):
                os.unlink(side.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(side.path)
                listener.listen(4)
            except BaseException:
                listener.close()
                self._close_listeners()
                raise
            listener.setblocking(False)
            side.listener = listener
            self._selector.register(listener, selectors.EVENT_READ, (side, "accept"))
        self._thread = threading.Thread(target=self._run, name=f"channel-bridge-{os.path.basename(self.host.path)}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop copying, close every socket and remove both socket files; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for side in (self.host, self.guest):
            self._disconnect(side)
        self._close_listeners()
        self._selector.close()

    @property
    def host_connected(self) -> bool:
        """True while a host-side client (a relay) is connected."""
        with self._lock:
            return self.host.conn is not None

    @property
    def guest_connected(self) -> bool:
        """True while the guest's responder is connected."""
        with self._lock:
            return self.guest.conn is not None

    @property
    def guest_connections(self) -> int:
        """How many times a guest connected (a rebooted guest connects again)."""
        with self._lock:
            return self.guest.accepted

    # ------------------------------------------------------------ the thread
    def _other(self, side: _Side) -> _Side:
        return self.guest if side is self.host else self.host

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self._selector.select(_POLL_S)
            except OSError:  # closed under us by stop()
                return
            for key, events in ready:
                side, role = key.data
                try:
                    if role == "accept":
                        self._accept(side)
                    else:
                        if events & selectors.EVENT_READ:
                            self._read(side)
                        if events & selectors.EVENT_WRITE and side.conn is not None:
                            self._flush(side)
                except Exception:
                    log.exception("channel bridge %s: %s side failed", self.host.path, side.name)
                    self._disconnect(side)

    def _accept(self, side: _Side) -> None:
        assert side.listener is not None
        try:
            conn, _ = side.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        with self._lock:
            side.conn = conn
            side.accepted += 1
        side.pending.clear()
        # One connection at a time: stop accepting until it goes (later clients wait in the backlog).
        self._selector.unregister(side.listener)
        self._selector.register(conn, selectors.EVENT_READ, (side, "data"))

    def _read(self, side: _Side) -> None:
        assert side.conn is not None
        try:
            data = side.conn.recv(_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect(side)
            return
        self._forward(self._other(side), data)

    def _forward(self, target: _Side, data: bytes) -> None:
        if target.conn is None:
            target.dropped_bytes += len(data)  # nobody at the other end: a virtio port with no reader
            return
        room = self.max_pending_bytes - len(target.pending)
        if room < len(data):
            target.dropped_bytes += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        target.pending += data
        self._flush(target)

    def _flush(self, side: _Side) -> None:
        assert side.conn is not None
        if side.pending:
            try:
                sent = side.conn.send(side.pending)
                del side.pending[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._disconnect(side)
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if side.pending else 0)
        self._selector.modify(side.conn, events, (side, "data"))

    def _disconnect(self, side: _Side) -> None:
        with self._lock:
            conn, side.conn = side.conn, None
        side.pending.clear()
        if conn is None:
            return
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError, RuntimeError):  # not registered, or the selector is closed
            pass
        conn.close()
        if side.listener is not None and not self._stop.is_set():
            self._selector.register(side.listener, selectors.EVENT_READ, (side, "accept"))

    def _close_listeners(self) -> None:
        for side in (self.host, self.guest):
            listener, side.listener = side.listener, None
            if listener is None:
                continue
            try:
                self._selector.unregister(listener)
            except (KeyError, ValueError, RuntimeError):
                pass
            listener.close()
            try:
                os.unlink(side.path)
            except FileNotFoundError:
                pass
