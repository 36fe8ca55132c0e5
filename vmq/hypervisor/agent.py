"""QEMU guest-agent calls of the libvirt adapter (``LibvirtHypervisor.agent_ping`` / ``guest_info``).

Besides vmq.hypervisor.libvirt, the only module that imports ``libvirt``. It uses the typed agent calls
only: ``virDomainGetTime`` (``getTime``) and ``virDomainGetGuestInfo`` (``guestInfo``); the raw
``libvirt_qemu.qemuAgentCommand`` would taint every domain ``custom-ga-command``.

Facts this is built on (FIELD-NOTES, measured on QEMU 7.2 / libvirt 9.0):

* libvirt waits for typed agent calls for ever by default, and once an agent hangs every later call takes
  a fixed 5 s re-sync, whatever timeout the caller had in mind. ``virDomainAgentSetResponseTimeout`` fixes
  both (1 s set: a failing call takes 1.0 s), so it is set before the first agent call on a domain, again
  for a new connection, a new domain ID (the domain restarted) or a different timeout. Its unit is whole
  seconds: ``floor(timeout_s)``, at least 1 s (below 1 s vmq's own wait still returns on time, and the
  abandoned libvirt call frees its slot after 1 s).
* libvirt queues agent calls per domain (a second call waited 9.5 s behind a hung one). vmq refuses a
  second call on a domain while one is in flight, at once, with AgentBusy.
* libvirtd serves at most ``max_client_requests`` = 5 requests per client connection at a time (default);
  the rest wait unread. Agent calls therefore get their own pool of ``AGENT_WORKERS`` = 4 threads *and*
  their own connection, so up to 4 hung agents never hold back a restart or a listing on the main
  connection, and 4 in flight stay under the 5 libvirtd serves. A 5th concurrent ping waits for a free
  thread (within its own timeout). An in-process driver (``test:///``) has no such limit, and a second
  connection there would open a second, separate world: there agent calls share the main connection.

The caller waits at most ``timeout_s`` per call; a call still inside libvirt then is abandoned (Python
cannot interrupt it) and keeps its domain "in flight" until libvirt returns.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import libvirt

from vmq.errors import (
    AgentBusy,
    AgentError,
    AgentTimeout,
    AgentUnavailable,
    DomainNotRunning,
    HypervisorUnavailable,
)
from vmq.hypervisor.types import AgentAnswer, guest_time_ms, reduce_guest_info

T = TypeVar("T")

#: Agent threads (and so agent requests in flight) per hypervisor: under libvirtd's max_client_requests (5).
AGENT_WORKERS = 4

#: What guest_info asks the agent for (os.*, hostname, fs.*); users, timezone, disks and interfaces are not read.
GUEST_INFO_TYPES = (
    libvirt.VIR_DOMAIN_GUEST_INFO_OS | libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME | libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM
)

# VIR_ERR_AGENT_UNRESPONSIVE messages that mean "no agent to talk to" rather than "the agent is silent";
# libvirt prefixes every one of them with "Guest agent is not responding: ".
_NO_AGENT_WORDS = ("not connected", "not configured", "not available due to an error")

# Codes that say "agent calls are impossible here": no agent channel configured, or the driver has none.
_NO_AGENT_CODES = frozenset({libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_NO_SUPPORT})

# Marks a (connection, domain) on whose driver agentSetResponseTimeout does not exist (the test driver).
_UNSUPPORTED = 0

# URI schemes whose driver runs inside this process: each connection is its own world, no libvirtd limits.
_IN_PROCESS_SCHEMES = frozenset({"test"})


class Connector(Protocol):
    """What AgentCaller needs of LibvirtHypervisor: its lazily opened connection and its error translation."""

    def _connect(self, operation: str, name: str | None) -> Any: ...

    def _translate(self, operation: str, name: str | None, connection: Any) -> AbstractContextManager[None]: ...

    def _close_connection(self) -> None: ...


def response_timeout_s(timeout_s: float) -> int:
    """The whole seconds given to agentSetResponseTimeout for a call bounded by ``timeout_s``: at most
    ``timeout_s``, at least 1 (0 would be libvirt's NOWAIT, negative values its "block"/"default")."""
    return max(1, int(timeout_s))


def classify_agent_error(exc: Any, what: str) -> AgentError | DomainNotRunning | None:
    """The vmq error for an agent-specific ``libvirtError``, or None to leave it to the adapter's general
    translation (no such domain, connection broken, anything else)."""
    code = exc.get_error_code()
    message = str(exc.get_error_message() or exc)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return DomainNotRunning(f"{what} failed: {message}")
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
        if any(words in message for words in _NO_AGENT_WORDS):
            return AgentUnavailable(f"{what} failed, no guest agent: {message}")
        return AgentTimeout(f"{what} failed, guest agent did not answer in time: {message}")
    if code in _NO_AGENT_CODES:
        return AgentUnavailable(f"{what} failed, no guest agent: {message}")
    return None


@contextlib.contextmanager
def _agent_errors(what: str) -> Iterator[None]:
    """Translate agent-specific libvirt errors; let the others reach the adapter's general translation."""
    try:
        yield
    except libvirt.libvirtError as exc:
        error = classify_agent_error(exc, what)
        if error is None:
            raise
        raise error from exc


class AgentCaller:
    """Guest-agent calls with their own bounded pool, one call in flight per domain; thread-safe."""

    def __init__(
        self, uri: str, main: Connector, make_own: Callable[[], Connector], workers: int = AGENT_WORKERS
    ) -> None:
        """Calls go over ``make_own()``'s connection, made on first use, or ``main``'s for an in-process driver;
        opens nothing yet."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.uri = uri
        self.workers = workers
        self._main = main
        self._make_own = make_own
        self._side: Connector | None = None
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: set[str] = set()
        # Response timeouts already set, per connection (forgotten with it), by (domain name, domain ID).
        self._bounds: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], int]] = weakref.WeakKeyDictionary()

    def ping(self, name: str, timeout_s: float) -> AgentAnswer:
        """Ask the domain's agent for the guest time (``getTime``); latency_ms times that call alone.
        Raises AgentBusy, AgentTimeout, AgentUnavailable, AgentAnswerInvalid, DomainNotRunning, DomainNotFound,
        HypervisorUnavailable."""

        def action(connection: Any) -> AgentAnswer:
            domain = connection.lookupByName(name)
            with _agent_errors(f"agent_ping {name!r} on {self.uri}"):
                self._bound(connection, domain, timeout_s)
                started = time.perf_counter()
                raw = domain.getTime(0)
                latency_ms = (time.perf_counter() - started) * 1000.0
            return AgentAnswer(guest_time_ms=guest_time_ms(raw), latency_ms=latency_ms)

        return self._call("agent_ping", name, timeout_s, action)

    def guest_info(self, name: str, timeout_s: float) -> dict[str, object]:
        """OS, hostname and filesystems from the domain's agent (``guestInfo``), see reduce_guest_info; raises
        as ``ping``."""

        def action(connection: Any) -> dict[str, object]:
            domain = connection.lookupByName(name)
            with _agent_errors(f"guest_info {name!r} on {self.uri}"):
                self._bound(connection, domain, timeout_s)
                raw = domain.guestInfo(GUEST_INFO_TYPES, 0)
            return reduce_guest_info(raw)

        return self._call("guest_info", name, timeout_s, action)

    def close(self) -> None:
        """Stop the agent threads (calls still inside libvirt are abandoned) and close the agent connection;
        idempotent; reopens on next use."""
        with self._lock:
            pool, self._pool = self._pool, None
            side, self._side = self._side, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if side is not None and side is not self._main:
            side._close_connection()

    # -- machinery ----------------------------------------------------------------------------------

    def _call(self, operation: str, name: str, timeout_s: float, action: Callable[[Any], T]) -> T:
        """Run ``action`` on the agent pool unless ``name`` already has a call in flight; wait ``timeout_s``."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        what = f"{operation} {name!r} on {self.uri}"
        with self._lock:
            if name in self._in_flight:
                raise AgentBusy(f"{what}: another guest-agent call on this domain is still in flight")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.workers, thread_name_prefix="vmq-agent"
                )
            future: concurrent.futures.Future[T] = self._pool.submit(self._run, operation, name, action)
            self._in_flight.add(name)
        # Fires when libvirt returns, or at once if the call is cancelled before it started.
        future.add_done_callback(lambda _done: self._release(name))
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()  # still queued behind busy threads: never starts; running: abandoned
            raise AgentTimeout(f"{what}: no answer within {timeout_s:g} s") from exc
        except concurrent.futures.CancelledError as exc:
            raise HypervisorUnavailable(f"{what}: cancelled because the hypervisor was closed") from exc

    def _run(self, operation: str, name: str, action: Callable[[Any], T]) -> T:
        """Run ``action(connection)`` on the agent connection, translated; in an agent pool thread."""
        with self._lock:
            side = self._side
            if side is None:
                in_process = urlsplit(self.uri).scheme in _IN_PROCESS_SCHEMES
                side = self._side = self._main if in_process else self._make_own()
        connection = side._connect(operation, name)
        with side._translate(operation, name, connection):
            return action(connection)

    def _release(self, name: str) -> None:
        with self._lock:
            self._in_flight.discard(name)

    def _bound(self, connection: Any, domain: Any, timeout_s: float) -> None:
        """Set the domain's agent response timeout unless this connection already set this value for it."""
        seconds = response_timeout_s(timeout_s)
        key = (domain.name(), domain.ID())
        with self._lock:
            known = self._bounds.setdefault(connection, {})
            if known.get(key) in (seconds, _UNSUPPORTED):
                return
        try:
            domain.agentSetResponseTimeout(seconds, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            seconds = _UNSUPPORTED  # this driver has no agent timeout: only vmq's own wait bounds the call
        with self._lock:
            known[key] = seconds
