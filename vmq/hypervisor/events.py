"""Domain lifecycle events from libvirt: LifecycleListener, and event_words for libvirt's numbers.

    libvirt event-loop thread (one per process, while any listener runs): callbacks only enqueue
    listener thread (one per listener): (re)connects with back-off, calls on_event / on_state in order

So a slow or failing callback cannot stall keepalive; an exception in one is logged, never fatal.
``on_state(True)`` on (re)connection, ``on_state(False)`` when the connection is lost or cannot be
opened: only changes are reported, and not the deliberate disconnect of stop().

**One connection for actions and events.** libvirt's test driver gives every connection its own world,
and a remote connection only delivers events asynchronously if the event loop was registered before it
was opened. So the listener owns the connection and lends it: ``LifecycleListener(uri, ...,
read_only=False).hypervisor()`` is a LibvirtHypervisor that acts through the listener's current
connection and follows it across reconnects (while the listener is disconnected or stopped it falls
back to a connection of its own). Lending needs ``read_only=False``; the default read-only connection
is enough for events. ``listener.connection`` exposes the raw connection as well.

Of vmq, only the adapter modules of this package import libvirt (here lazily). DomainEvent and classify are
pure, live in vmq.hypervisor.types and are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from vmq.hypervisor.eventwords import constant_word, event_words
from vmq.hypervisor.types import EVENTS, METADATA_EVENT, DomainEvent, classify
from vmq.model import DomainEventKind

if TYPE_CHECKING:
    from vmq.hypervisor.libvirt import LibvirtHypervisor

__all__ = ["EVENTS", "METADATA_EVENT", "DomainEvent", "DomainEventKind", "LifecycleListener", "classify",
           "event_words"]

log = logging.getLogger(__name__)

_Items: TypeAlias = "queue.SimpleQueue[object]"  # a listener's queue: DomainEvent, _Lost or _STOP

_ALIVE_CHECK_S = 1.0  # how often the listener thread asks libvirt whether its connection is alive
# stop(): how long to wait for the listener thread, then for libvirt's event-loop thread.
_JOIN_LISTENER_S = 1.5
_JOIN_LOOP_S = 0.5


def _libvirt() -> Any:
    """libvirt-python, imported on first use so that importing this module does not need it."""
    import libvirt

    return libvirt



def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """Swallow libvirt's stderr printing; failures still arrive as exceptions."""


def _wake(timer: int, _opaque: object) -> None:
    """One-shot timeout: makes virEventRunDefaultImpl return so the loop thread sees its stop flag."""
    _libvirt().virEventRemoveTimeout(timer)


def _run_loop(stopping: threading.Event) -> None:
    """Body of the event-loop thread: run libvirt's default loop until told to stop."""
    libvirt = _libvirt()
    while not stopping.is_set():
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # the top of a daemon loop: log, breathe, go on
            log.exception("libvirt event loop iteration failed")
            stopping.wait(0.1)


class _EventLoop:
    """libvirt's default event loop: registered once per process, run by one daemon thread while in use."""

    def __init__(self) -> None:
        """Nothing registered or running yet."""
        self._lock = threading.Lock()  # held across register/start and stop/join
        self._registered = False
        self._users = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def acquire(self) -> None:
        """Register the default implementation (first call in the process only) and run it in a thread."""
        libvirt = _libvirt()
        with self._lock:
            if not self._registered:
                libvirt.registerErrorHandler(_ignore_libvirt_error, None)
                libvirt.virEventRegisterDefaultImpl()
                self._registered = True
            self._users += 1
            if self._thread is None:
                self._stopping = threading.Event()
                self._thread = threading.Thread(
                    target=_run_loop, args=(self._stopping,), name="vmq-libvirt-event-loop", daemon=True
                )
                self._thread.start()

    def release(self) -> None:
        """Drop one user; the last one stops the loop thread and joins it (at most _JOIN_LOOP_S)."""
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._thread is None:
                return
            thread, self._thread = self._thread, None
            self._stopping.set()
            _libvirt().virEventAddTimeout(0, _wake, None)
            thread.join(_JOIN_LOOP_S)
            if thread.is_alive():
                log.warning("libvirt event loop thread did not stop within %.3g s; abandoned", _JOIN_LOOP_S)


_LOOP = _EventLoop()


@dataclass(frozen=True)
class _Lost:
    """Mark put on the queue by libvirt's close callback: connection ``generation`` is gone."""

    generation: int
    reason: int


_STOP = object()  # queue item: stop() was called


class LifecycleListener:
    """Calls on_event for each lifecycle event of any domain on ``uri``, on_state on (dis)connection."""

    def __init__(
        self,
        uri: str,
        on_event: Callable[[DomainEvent], None],
        on_state: Callable[[bool], None] | None = None,
        keepalive_interval_s: int = 5,
        keepalive_count: int = 3,
        reconnect_backoff_s: tuple[float, float] = (0.5, 10.0),
        read_only: bool = True,
    ) -> None:
        """Remember the settings; nothing runs before start(); keepalive 0 disables it; ValueError."""
        first_s, last_s = reconnect_backoff_s
        if not 0 < first_s <= last_s:
            raise ValueError(f"reconnect_backoff_s needs 0 < first <= max, got {reconnect_backoff_s!r}")
        if keepalive_interval_s < 0 or keepalive_count < 0:
            raise ValueError(f"keepalive must be >= 0, got {keepalive_interval_s!r} s x {keepalive_count!r}")
        self.uri = uri
        self.read_only = read_only
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_count = keepalive_count
        self.reconnect_backoff_s = (first_s, last_s)
        self._on_event = on_event
        self._on_state = on_state
        self._lock = threading.Lock()  # start/stop
        self._lend_lock = threading.Lock()  # the current connection and the hypervisors borrowing it
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._items: _Items = queue.SimpleQueue()
        self._connected = threading.Event()
        self._connection: Any = None
        self._generation = 0
        self._hypervisors: weakref.WeakSet[LibvirtHypervisor] = weakref.WeakSet()

    def __repr__(self) -> str:
        """Show the URI and whether the listener is connected."""
        return f"LifecycleListener({self.uri!r}, connected={self._connected.is_set()})"

    @property
    def connection(self) -> Any:
        """The open libvirt connection events arrive on, or None while disconnected."""
        return self._connection

    def start(self) -> None:
        """Start listening in background threads; returns at once; idempotent."""
        with self._lock:
            if self._thread is not None:
                return
            _LOOP.acquire()
            self._stopping, self._items = threading.Event(), queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._run,
                args=(self._stopping, self._items),
                name=f"vmq-lifecycle {self.uri}",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        """Disconnect, deliver what was queued, join the threads (about 2 s at most); idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._stopping.set()
            self._items.put(_STOP)
            thread.join(_JOIN_LISTENER_S)
            if thread.is_alive():  # stuck opening a connection to a host that does not answer
                log.warning("lifecycle listener uri=%s still opening at stop(); abandoned", self.uri)
            _LOOP.release()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected (True) or ``timeout_s`` passed (False)."""
        return self._connected.wait(timeout_s)

    def hypervisor(self, call_timeout_s: float = 30.0) -> LibvirtHypervisor:
        """A LibvirtHypervisor acting through this listener's connection; ValueError if read-only."""
        if self.read_only:
            raise ValueError("a read-only listener cannot lend its connection; use read_only=False")
        from vmq.hypervisor.libvirt import LibvirtHypervisor  # deferred: it imports libvirt

        with self._lend_lock:
            hypervisor = LibvirtHypervisor(self.uri, call_timeout_s, connection=self._connection)
            self._hypervisors.add(hypervisor)
        return hypervisor

    # -- the listener thread ------------------------------------------------------------------------

    def _run(self, stopping: threading.Event, items: _Items) -> None:
        """Connect, pump events until the connection is lost, back off, repeat until stopped."""
        first_s, last_s = self.reconnect_backoff_s
        delay_s = first_s
        state: bool | None = None
        while not stopping.is_set():
            self._generation += 1
            try:
                connection, callback_ids = self._open(items, self._generation)
            except Exception as exc:  # noqa: BLE001 - daemon loop top: any failure to open is "retry later"
                log.warning("cannot listen to uri=%s, retrying in %.3g s: %s", self.uri, delay_s, exc)
                state = self._report(state, False)
                self._pump(stopping, items, None, time.monotonic() + delay_s)
                delay_s = min(delay_s * 2, last_s)
                continue
            if stopping.is_set():  # stop() came while we were opening
                self._close(connection, callback_ids)
                break
            delay_s = first_s
            self._lend(connection)
            state = self._report(state, True)
            self._pump(stopping, items, connection, None)
            self._lend(None)
            self._close(connection, callback_ids)
            if not stopping.is_set():
                log.warning("lost the libvirt connection uri=%s; reconnecting", self.uri)
                state = self._report(state, False)
        self._pump(stopping, items, None, time.monotonic())  # deliver what is still queued

    def _open(self, items: _Items, generation: int) -> tuple[Any, list[int]]:
        """Open a connection with keepalive, lifecycle (and metadata-change, where libvirt has them) and close
        callbacks; raises on failure."""
        libvirt = _libvirt()
        connection = self._open_connection()
        try:
            if self.keepalive_interval_s > 0:
                try:
                    connection.setKeepAlive(self.keepalive_interval_s, self.keepalive_count)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
                    log.debug("no keepalive on uri=%s (a local driver): %s", self.uri, exc)
            callback_ids = [int(connection.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, items))]
            # Beyond the lifecycle, where libvirt has them: vmq's metadata changed (the host's inventory reads it
            # again at once), the guest's watchdog fired, a disk I/O error with its reason, the guest agent
            # (dis)connected.
            for name, callback in (("METADATA_CHANGE", self._on_metadata), ("WATCHDOG", self._on_watchdog),
                                   ("IO_ERROR_REASON", self._on_io_error), ("AGENT_LIFECYCLE", self._on_agent)):
                try:
                    callback_ids.append(int(connection.domainEventRegisterAny(
                        None, getattr(libvirt, f"VIR_DOMAIN_EVENT_ID_{name}"), callback, items)))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
                    log.debug("no %s events on uri=%s: %s", name, self.uri, exc)
            connection.registerCloseCallback(self._on_close, (items, generation))
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                connection.close()
            raise
        return connection, callback_ids

    def _open_connection(self) -> Any:
        """Open read-only (read-write if refused for other reasons than reachability) or read-write."""
        libvirt = _libvirt()
        if self.read_only:
            try:
                return libvirt.openReadOnly(self.uri)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR:
                    raise  # cannot reach the host: a read-write attempt would fail the same way
                log.info("read-only connection to uri=%s refused, trying read-write: %s", self.uri, exc)
        return libvirt.open(self.uri)  # libvirt-python >= 9 raises rather than return None

    def _close(self, connection: Any, callback_ids: list[int]) -> None:
        """Deregister and close a connection; a dead one complains, which is ignored."""
        libvirt = _libvirt()
        steps: list[Callable[[], object]] = [functools.partial(connection.domainEventDeregisterAny, callback_id)
                                            for callback_id in callback_ids]
        for step in (*steps, connection.unregisterCloseCallback, connection.close):
            with contextlib.suppress(libvirt.libvirtError):
                step()

    def _pump(
        self, stopping: threading.Event, items: _Items, connection: Any, deadline: float | None
    ) -> None:
        """Deliver queued events until stop, the deadline, or the loss of ``connection`` (if any)."""
        next_check = time.monotonic() + _ALIVE_CHECK_S
        while True:
            now = time.monotonic()
            if connection is not None and now >= next_check:
                if not _is_alive(connection):
                    return
                next_check = now + _ALIVE_CHECK_S
            wait_s = min(next_check, deadline if deadline is not None else next_check) - now
            try:
                item = items.get(timeout=wait_s) if wait_s > 0 else items.get_nowait()
            except queue.Empty:
                if stopping.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    return
                continue
            if item is _STOP:
                return
            if isinstance(item, _Lost):
                if connection is not None and item.generation == self._generation:
                    log.info("libvirt closed the connection uri=%s reason=%s", self.uri, item.reason)
                    return
                continue
            if isinstance(item, DomainEvent):
                self._deliver(item)

    def _deliver(self, event: DomainEvent) -> None:
        """Call on_event; an exception is logged, never propagated."""
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event failed vm=%s event=%s/%s", event.name, event.event, event.detail)

    def _report(self, previous: bool | None, connected: bool) -> bool:
        """Call on_state when the connection state changed; an exception is logged, never propagated."""
        if self._on_state is not None and previous is not connected:
            try:
                self._on_state(connected)
            except Exception:
                log.exception("on_state(%s) failed uri=%s", connected, self.uri)
        return connected

    def _lend(self, connection: Any) -> None:
        """Make ``connection`` (or None) current and hand it to every hypervisor borrowing from us."""
        with self._lend_lock:
            self._connection = connection
            for hypervisor in list(self._hypervisors):
                hypervisor.use_connection(connection)
        if connection is None:
            self._connected.clear()
        else:
            self._connected.set()

    # -- libvirt callbacks (run in the event-loop thread: only enqueue) -------------------------------

    def _on_lifecycle(self, _connection: Any, domain: Any, event: int, detail: int, items: _Items) -> None:
        """Queue one lifecycle event in words."""
        try:
            items.put(DomainEvent(domain.name(), domain.UUIDString(), *event_words(event, detail)))
        except Exception:
            log.exception("could not read a lifecycle event uri=%s", self.uri)

    def _on_metadata(self, _connection: Any, domain: Any, kind: int, namespace: str | None, items: _Items) -> None:
        """Queue a metadata change as the event ``metadata``, its detail the element's namespace."""
        try:
            items.put(DomainEvent(domain.name(), domain.UUIDString(), METADATA_EVENT, namespace or ""))
        except Exception:
            log.exception("could not read a metadata-change event uri=%s", self.uri)

    def _queue(self, items: _Items, domain: Any, event: str, detail: str) -> None:
        try:
            items.put(DomainEvent(domain.name(), domain.UUIDString(), event, detail))
        except Exception:
            log.exception("could not read a %s event uri=%s", event, self.uri)

    def _on_watchdog(self, _connection: Any, domain: Any, action: int, items: _Items) -> None:
        """Queue a watchdog event: ``watchdog``, its action in words (none, pause, reset, poweroff, ...)."""
        self._queue(items, domain, "watchdog", constant_word("VIR_DOMAIN_EVENT_WATCHDOG_", action))

    def _on_io_error(self, _connection: Any, domain: Any, _path: str, _alias: str, _action: int, reason: str,
                     items: _Items) -> None:
        """Queue a disk I/O error: ``io_error``, QEMU's reason (enospc, eio, eperm, ...)."""
        self._queue(items, domain, "io_error", (reason or "unknown").lower())

    def _on_agent(self, _connection: Any, domain: Any, state: int, _reason: int, items: _Items) -> None:
        """Queue a guest-agent lifecycle change: ``agent``, connected or disconnected."""
        self._queue(items, domain, "agent",
                    constant_word("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_", state))

    def _on_close(self, _connection: Any, reason: int, opaque: tuple[_Items, int]) -> None:
        """Queue the news that libvirt closed the connection (EOF, keepalive timeout, error)."""
        items, generation = opaque
        items.put(_Lost(generation, reason))


def _is_alive(connection: Any) -> bool:
    """Whether a libvirt connection is still usable; a closed or broken one counts as dead."""
    libvirt = _libvirt()
    try:
        return bool(connection.isAlive())
    except libvirt.libvirtError:  # also what a closed connection object raises
        return False
