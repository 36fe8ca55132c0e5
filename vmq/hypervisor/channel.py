"""Host side of the responder's virtio-serial channel: one unix-socket link per VM, probes out, replies in.

libvirt exposes a domain's ``org.vmq.responder.0`` channel as a unix socket that QEMU listens on; the
relay connects to it, writes each probe as one line and reads the guest's ``{"m": ..., "s": ...}`` reply
lines (docs/protocol.md, "The virtio-serial channel"). It does not verify replies: ``vmq.codec`` does,
centrally, exactly as for replies that came through Redis. Pure sockets and selectors, no libvirt.

Bounded by design: a VM gets at most ``read_budget_bytes`` of reading per ``poll``, its buffer never holds
more than one line's cap, and an over-long line is dropped up to its newline; so a guest sending endless
garbage never delays another guest's replies. A socket that is missing, refuses or closes is retried after
0.2 s doubling to ``backoff_cap_s``; until then the VM is simply reported as not connected.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Self

import orjson

__all__ = ["ChannelLink", "ChannelReject", "ChannelRelay", "ChannelReply", "Polled"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REPLY_BYTES = 8192  # Settings.max_reply_bytes' default
BACKOFF_FIRST_S = 0.2
READ_CHUNK_BYTES = 65536
MAX_PENDING_SEND_BYTES = 65536  # a guest that stops reading probes loses new ones beyond this


class ChannelReply(NamedTuple):
    """One reply line as received from ``vm``'s channel: the signed message bytes and the hex signature
    (ASCII bytes, as the reply stream carries them). Not verified: vmq.codec does that."""

    vm: str
    message: bytes
    signature: bytes
    received_s: float  # the relay's clock (time.time()) when the line was read


class ChannelReject(NamedTuple):
    """One line from ``vm`` that was not a reply: ``reason`` is ``malformed`` or ``oversized``."""

    vm: str
    reason: str
    detail: str


class Polled(NamedTuple):
    """What one ``ChannelRelay.poll`` read: replies in arrival order per VM, and the rejected lines."""

    replies: list[ChannelReply]
    rejects: list[ChannelReject]


@dataclass
class ChannelLink:
    """The relay's state for one VM's socket (read-only for callers: see ``ChannelRelay.link``)."""

    vm: str
    path: str
    sock: socket.socket | None = None
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # inside an over-long line: drop bytes up to its newline
    failures: int = 0
    retry_at: float = 0.0  # monotonic time of the next connection attempt
    error: str | None = None  # why the VM is not connected, if it is not

    @property
    def connected(self) -> bool:
        """True while a socket to the VM's channel is open."""
        return self.sock is not None


class ChannelRelay:
    """Non-blocking links to many VMs' channel sockets; ``send_probe`` writes, ``poll`` reads and parses.

    Not thread-safe: one thread calls it (the host agent's loop). ``counts`` accumulates events by name:
    ``malformed``, ``oversized``, ``connected``, ``disconnected``, ``connect_failed``, ``probe_dropped``.
    """

    def __init__(self, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, max_line_bytes: int | None = None,
                 read_budget_bytes: int = 2 * READ_CHUNK_BYTES, backoff_cap_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # A reply line carries the message as a JSON string: its quotes and backslashes are escaped, so
        # the line may be up to twice the message, plus the envelope and the signature.
        self.max_reply_bytes = max_reply_bytes
        self.max_line_bytes = max_line_bytes or 2 * max_reply_bytes + 160
        self.read_budget_bytes = max(read_budget_bytes, 1)
        self.backoff_cap_s, self.clock = backoff_cap_s, clock
        self.counts: Counter[str] = Counter()
        self._links: dict[str, ChannelLink] = {}
        self._selector = selectors.DefaultSelector()

    # ------------------------------------------------------------ links
    def open(self, vm: str, socket_path: str) -> bool:
        """Start relaying for ``vm`` over the socket at ``socket_path`` (idempotent; a new path reconnects).
        Returns whether it is connected now; if not, ``poll`` keeps retrying with back-off."""
        link = self._links.get(vm)
        if link is not None and link.path == socket_path:
            return link.connected
        if link is not None:
            self.close(vm)
        link = self._links[vm] = ChannelLink(vm, socket_path)
        self._connect(link)
        return link.connected

    def close(self, vm: str) -> None:
        """Stop relaying for ``vm`` and close its socket (idempotent)."""
        link = self._links.pop(vm, None)
        if link is not None:
            self._drop(link)

    def close_all(self) -> None:
        """Close every link and the selector; the relay is unusable afterwards."""
        for vm in list(self._links):
            self.close(vm)
        self._selector.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close_all()

    @property
    def vms(self) -> list[str]:
        """Every VM the relay was opened for, connected or not."""
        return list(self._links)

    def link(self, vm: str) -> ChannelLink | None:
        """The state of ``vm``'s link (``connected``, ``error``), or None if it was never opened."""
        return self._links.get(vm)

    def is_connected(self, vm: str) -> bool:
        """True while ``vm``'s channel socket is connected."""
        link = self._links.get(vm)
        return link is not None and link.connected

    # ------------------------------------------------------------ probes out
    def send_probe(self, probe: bytes, vms: Iterable[str] | None = None) -> list[str]:
        """Queue ``probe`` (one JSON line, without the newline) to each connected VM (all, or ``vms``) and
        write what the sockets take now; returns the VMs it was queued for. Raises ValueError on a newline."""
        if b"\n" in probe:
            raise ValueError("a probe must not contain a newline")
        line, sent = probe + b"\n", []
        for vm in self._links if vms is None else vms:
            link = self._links.get(vm)
            if link is None or link.sock is None:
                continue
            if len(link.outbox) + len(line) > MAX_PENDING_SEND_BYTES:
                self.counts["probe_dropped"] += 1
                continue
            link.outbox += line
            self._flush(link)
            sent.append(vm)
        return sent

    # ------------------------------------------------------------ replies in
    def poll(self, timeout_s: float) -> Polled:
        """Wait up to ``timeout_s`` for readable links, read each (bounded) and return the complete lines
        parsed; retries due connections first. Never raises for a VM's fault; returns as soon as anything
        was read (like select), so call it in a loop."""
        self._retry_due()
        replies: list[ChannelReply] = []
        rejects: list[ChannelReject] = []
        if not self._selector.get_map():
            time.sleep(max(0.0, min(timeout_s, self._next_retry_in())))
            return Polled(replies, rejects)
        for key, events in self._selector.select(max(0.0, min(timeout_s, self._next_retry_in()))):
            link: ChannelLink = key.data
            if events & selectors.EVENT_WRITE:
                self._flush(link)
            if events & selectors.EVENT_READ and link.sock is not None:
                self._read(link, replies, rejects)
        return Polled(replies, rejects)

    def _read(self, link: ChannelLink, replies: list[ChannelReply], rejects: list[ChannelReject]) -> None:
        """Read at most read_budget_bytes from the link and parse the complete lines it holds."""
        budget = self.read_budget_bytes
        while budget > 0 and link.sock is not None:
            try:
                chunk = link.sock.recv(min(READ_CHUNK_BYTES, budget))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(link, f"{type(exc).__name__}: {exc}")
                return
            if not chunk:
                self._lost(link, "closed by the peer")
                return
            budget -= len(chunk)
            self._lines(link, chunk, replies, rejects)

    def _lines(self, link: ChannelLink, chunk: bytes, replies: list[ChannelReply],
               rejects: list[ChannelReject]) -> None:
        inbox, start = link.inbox, 0
        inbox += chunk
        now = time.time()
        while (end := inbox.find(b"\n", start)) >= 0:
            line, start = bytes(inbox[start:end]), end + 1
            if link.skipping:  # the tail of a line already counted as oversized
                link.skipping = False
            elif len(line) > self.max_line_bytes:
                self._reject(link, "oversized", f"line of {len(line)} bytes", rejects)
            elif line.strip():  # a blank line is no reply and no fault
                self._parse(link, line, now, replies, rejects)
        del inbox[:start]
        if not link.skipping and len(inbox) > self.max_line_bytes:
            self._reject(link, "oversized", f"line longer than {self.max_line_bytes} bytes", rejects)
            link.skipping = True
        if link.skipping:
            inbox.clear()

    def _parse(self, link: ChannelLink, line: bytes, now: float, replies: list[ChannelReply],
               rejects: list[ChannelReject]) -> None:
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._reject(link, "malformed", "not UTF-8 JSON", rejects)
            return
        if not isinstance(body, dict) or set(body) != {"m", "s"}:
            self._reject(link, "malformed", 'not an object with exactly "m" and "s"', rejects)
            return
        message, signature = body["m"], body["s"]
        if not isinstance(message, str) or not isinstance(signature, str) or not signature.isascii():
            self._reject(link, "malformed", '"m" and "s" must be strings, "s" ASCII', rejects)
            return
        try:
            message_bytes = message.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped into the string
            self._reject(link, "malformed", '"m" is not valid Unicode', rejects)
            return
        if len(message_bytes) > self.max_reply_bytes or len(signature) > 256:
            self._reject(link, "oversized", f"message of {len(message_bytes)} bytes", rejects)
            return
        replies.append(ChannelReply(link.vm, message_bytes, signature.encode("ascii"), now))

    def _reject(self, link: ChannelLink, reason: str, detail: str, rejects: list[ChannelReject]) -> None:
        self.counts[reason] += 1
        rejects.append(ChannelReject(link.vm, reason, detail))

    # ------------------------------------------------------------ connections
    def _connect(self, link: ChannelLink) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(link.path)  # a unix connect completes at once or fails (EAGAIN: backlog full)
        except OSError as exc:
            sock.close()
            self.counts["connect_failed"] += 1
            reason = "no such socket" if exc.errno == errno.ENOENT else f"{type(exc).__name__}: {exc}"
            self._schedule_retry(link, reason)
            return
        link.sock, link.error, link.failures = sock, None, 0
        link.inbox.clear()
        link.outbox.clear()
        link.skipping = False
        self._selector.register(sock, selectors.EVENT_READ, link)
        self.counts["connected"] += 1
        log.info("channel connected vm=%s path=%s", link.vm, link.path)

    def _schedule_retry(self, link: ChannelLink, reason: str) -> None:
        delay_s = min(self.backoff_cap_s, BACKOFF_FIRST_S * 2 ** min(link.failures, 16))
        link.failures += 1
        link.error, link.retry_at = reason, self.clock() + delay_s
        log.debug("channel not connected vm=%s path=%s reason=%s retry_in_s=%.1f", link.vm, link.path,
                  reason, delay_s)

    def _retry_due(self) -> None:
        now = self.clock()
        for link in list(self._links.values()):
            if link.sock is None and link.retry_at <= now:
                self._connect(link)

    def _next_retry_in(self) -> float:
        waiting = [link.retry_at for link in self._links.values() if link.sock is None]
        return max(0.0, min(waiting) - self.clock()) if waiting else float("inf")

    def _lost(self, link: ChannelLink, reason: str) -> None:
        """The socket failed or closed: drop it and retry after back-off (the first retry after 0.2 s)."""
        self._drop(link)
        self.counts["disconnected"] += 1
        log.warning("channel disconnected vm=%s path=%s reason=%s", link.vm, link.path, reason)
        self._schedule_retry(link, reason)

    def _drop(self, link: ChannelLink) -> None:
        if link.sock is not None:
            self._selector.unregister(link.sock)
            link.sock.close()
            link.sock = None
        link.inbox.clear()
        link.outbox.clear()

    def _flush(self, link: ChannelLink) -> None:
        """Write as much of the link's queued probes as the socket takes; watch for writability if not all."""
        if link.sock is None:
            return
        try:
            written = link.sock.send(link.outbox) if link.outbox else 0
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            self._lost(link, f"{type(exc).__name__}: {exc}")
            return
        del link.outbox[:written]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.outbox else 0)
        if self._selector.get_key(link.sock).events != wanted:
            self._selector.modify(link.sock, wanted, link)
