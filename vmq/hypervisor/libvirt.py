"""libvirt adapter of the Hypervisor port; with .agent and .states the only modules importing ``libvirt``.

Every call runs in a worker thread of a small per-instance ``ThreadPoolExecutor`` and the caller waits
at most ``call_timeout_s``. On timeout the caller gets ``HypervisorUnavailable`` and the worker thread
is *abandoned*: Python cannot interrupt a thread blocked inside libvirt's C code, so it keeps its pool
slot until libvirt returns. Consequences, accepted on purpose:

* the pool is bounded (``_WORKERS``), so a wedged libvirtd cannot make vmq grow threads without limit;
  once every slot is stuck, later calls queue and time out too, which is the truth (the host hangs);
* ``concurrent.futures`` joins its worker threads at interpreter exit, so a process whose libvirt call
  never returns also does not exit cleanly; the supervisor's stop timeout (systemd, Celery) kills it.

The connection is opened lazily, shared by all threads (libvirt connections are thread-safe), and
forgotten when it dies or times out so the next call opens a fresh one. An open connection can be *lent*
instead (``connection=``, ``use_connection``; ``LifecycleListener.hypervisor`` lends its own so actions
and events share one): used while alive, never closed or forgotten here (its owner watches it), and
while it is dead calls fall back to our own. libvirt's own stderr printing is silenced; every
``libvirt.libvirtError`` is translated at this edge into the vmq error tree.
Guest-agent calls go to vmq.hypervisor.agent (own pool, own connection); domain XML is parsed by
vmq.hypervisor.xmldesc.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt

from vmq.errors import (
    ChannelNotFound,
    DomainNotFound,
    DomainOperationFailed,
    HypervisorUnavailable,
    LockRefused,
)
from vmq.hypervisor.agent import AgentCaller
from vmq.hypervisor.states import domain_status
from vmq.hypervisor.types import ActivitySample, AgentAnswer, HostCapacity, device_targets, total
from vmq.hypervisor.xmldesc import channel_socket_path, definition_facts, scrub_definition, virtio_channels
from vmq.intent import NO_INTENT, intent_from_domain_xml
from vmq.model import RESPONDER_CHANNEL, DomainInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

# Threads per hypervisor: enough for a few concurrent callers, small enough that stuck calls stay bounded.
_WORKERS = 4

_UNAVAILABLE_CODES: frozenset[int] = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """Swallow libvirt's error callback; errors still arrive as exceptions and are translated here."""


def _is_alive(connection: Any) -> bool:
    """Whether a libvirt connection is still usable; a closed or broken one counts as dead."""
    try:
        return bool(connection.isAlive())
    except libvirt.libvirtError:
        return False


def _describe(operation: str, name: str | None) -> str:
    """Human words for one call: ``reset 'vm-1'`` or ``list_domains``."""
    return f"{operation} {name!r}" if name is not None else operation


class LibvirtHypervisor:
    """The Hypervisor port over one libvirt connection; every call bounded by ``call_timeout_s``."""

    def __init__(self, uri: str, call_timeout_s: float = 30.0, connection: Any = None) -> None:
        """Remember the URI (and a lent open ``connection``); opens nothing. ValueError on a bad timeout."""
        if call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0, got {call_timeout_s!r}")
        self.uri = uri
        self.call_timeout_s = call_timeout_s
        # Two locks so that a caller never waits on I/O: _pool_lock is held only to create/submit/swap,
        # _connection_lock only inside worker threads (an open that hangs blocks workers, not callers).
        self._pool_lock = threading.Lock()
        self._connection_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._connection: Any = None
        self._lent: Any = connection  # read without a lock: swapping one reference is atomic
        self._agent = AgentCaller(uri, self, lambda: LibvirtHypervisor(uri, call_timeout_s))
        # Process-wide and idempotent: without it libvirt prints every error to stderr as well.
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    def __repr__(self) -> str:
        """Show the URI, never connection internals."""
        return f"LibvirtHypervisor({self.uri!r}, call_timeout_s={self.call_timeout_s!r})"

    # -- the port -----------------------------------------------------------------------------------

    def list_domains(self) -> list[DomainInfo]:
        """All domains defined on this host, active or not, sorted by name."""

        def action(connection: Any) -> list[DomainInfo]:
            infos: list[DomainInfo] = []
            for domain, stats in _domains_with_state(connection):
                try:
                    infos.append(_domain_info(domain, stats))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # undefined between the listing and the state query
                    raise
            return sorted(infos, key=lambda info: info.name)

        return self._call("list_domains", None, action)

    def domain_info(self, name: str) -> DomainInfo:
        """One domain's status, reason and virtio channel names; raises DomainNotFound."""
        return self._call("domain_info", name, lambda connection: _domain_info(connection.lookupByName(name)))

    def activity(self, name: str) -> ActivitySample:
        """CPU time and bytes of every disk and interface; a counter libvirt cannot give is None."""
        return self._call("activity", name, lambda connection: _activity(connection.lookupByName(name)))

    def reset(self, name: str) -> None:
        """Hard-reset an active domain; raises DomainOperationFailed if it is shut off."""
        self._call("reset", name, lambda connection: connection.lookupByName(name).reset(0))

    def resume(self, name: str) -> None:
        """Resume a paused domain; raises DomainOperationFailed if it is not paused."""
        self._call("resume", name, lambda connection: connection.lookupByName(name).resume())

    def start(self, name: str) -> None:
        """Start (libvirt ``create``) a shut-off domain; raises DomainOperationFailed if it is active."""
        self._call("start", name, lambda connection: connection.lookupByName(name).create())

    def suspend(self, name: str) -> None:
        """Pause a running domain; raises DomainOperationFailed if it is not running."""
        self._call("suspend", name, lambda connection: connection.lookupByName(name).suspend())

    def destroy(self, name: str) -> None:
        """Power an active domain off hard; raises DomainOperationFailed if it is already off."""
        self._call("destroy", name, lambda connection: connection.lookupByName(name).destroy())

    def channel_socket(self, name: str, channel: str = RESPONDER_CHANNEL) -> str:
        """Host-side unix socket path of a virtio channel, from the domain's XML (live while it runs);
        raises DomainNotFound, or ChannelNotFound when it has no such channel bound to a unix socket."""

        def action(connection: Any) -> str:
            try:
                return channel_socket_path(connection.lookupByName(name).XMLDesc(0), channel)
            except (LookupError, ValueError) as exc:
                raise ChannelNotFound(f"channel_socket {name!r} on {self.uri}: {exc}") from None

        return self._call("channel_socket", name, action)

    def agent_ping(self, name: str, timeout_s: float) -> AgentAnswer:
        """Guest time and latency through the guest agent (``getTime``), within ``timeout_s``; raises
        AgentBusy, AgentTimeout, AgentUnavailable, AgentAnswerInvalid, DomainNotRunning, DomainNotFound."""
        return self._agent.ping(name, timeout_s)

    def guest_info(self, name: str, timeout_s: float) -> dict[str, object]:
        """OS id/version, hostname and filesystems through the guest agent (``guestInfo``); raises as agent_ping."""
        return self._agent.guest_info(name, timeout_s)

    def definition(self, name: str) -> str:
        """The persistent definition (``VIR_DOMAIN_XML_INACTIVE``, never ``_SECURE``: no passwords)."""
        return self._call("definition", name, lambda connection: scrub_definition(
            str(connection.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))))

    def define_and_start(self, domain_xml: str) -> None:
        """``defineXML`` then ``create``; a disk leased elsewhere (virtlockd) raises LockRefused."""
        name = definition_facts(domain_xml)[0]

        def action(connection: Any) -> None:
            try:
                connection.defineXML(domain_xml).create()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_RESOURCE_BUSY or "lockspace" in str(exc).lower():
                    raise LockRefused(f"start {name!r} on {self.uri} refused by the lock manager: {exc}") from None
                raise

        self._call("define_and_start", name, action)

    def capacity(self) -> HostCapacity:
        """``getInfo`` for CPUs and memory; the active domains' ``info`` for what they hold."""

        def action(connection: Any) -> HostCapacity:
            info = connection.getInfo()
            vcpus = memory_kib = 0
            for domain in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    _state, max_kib, _kib, count, _cpu = domain.info()
                except libvirt.libvirtError:
                    continue  # gone between the listing and the query
                vcpus, memory_kib = vcpus + int(count), memory_kib + int(max_kib)
            return HostCapacity(int(info[2]), int(info[1]), vcpus, memory_kib // 1024)

        return self._call("capacity", None, action)

    def close(self) -> None:
        """Close the connection and stop the worker threads; idempotent, never raises, reopens on next use."""
        self._agent.close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        future = pool.submit(self._close_connection)
        pool.shutdown(wait=False)
        try:
            future.result(timeout=self.call_timeout_s)
        except concurrent.futures.TimeoutError:
            log.warning(
                "closing libvirt connection uri=%s took over %.3g s; abandoned", self.uri, self.call_timeout_s
            )

    def use_connection(self, connection: Any) -> None:
        """Borrow an open libvirt connection for later calls (None: use our own); never closes it."""
        self._lent = connection

    # -- machinery ----------------------------------------------------------------------------------

    def _call(self, operation: str, name: str | None, action: Callable[[Any], T]) -> T:
        """Run ``action(connection)`` in a worker thread, translated, waiting at most call_timeout_s."""

        def run() -> T:
            connection = self._connect(operation, name)
            with self._translate(operation, name, connection):
                return action(connection)

        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_WORKERS, thread_name_prefix="vmq-libvirt"
                )
            future = self._pool.submit(run)
        try:
            return future.result(timeout=self.call_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()  # a call still queued behind stuck ones never starts; a running one is abandoned
            self._forget(None)
            raise HypervisorUnavailable(
                f"{_describe(operation, name)} on {self.uri}: no answer within {self.call_timeout_s:g} s"
            ) from exc
        except concurrent.futures.CancelledError as exc:
            raise HypervisorUnavailable(
                f"{_describe(operation, name)} on {self.uri}: cancelled because the hypervisor was closed"
            ) from exc

    def _connect(self, operation: str, name: str | None) -> Any:
        """Return the lent connection if alive, else our own, opening it; raises HypervisorUnavailable."""
        lent = self._lent
        if lent is not None:
            if _is_alive(lent):
                return lent
            log.debug("lent libvirt connection is dead, using our own uri=%s", self.uri)
        with self._connection_lock:
            connection = self._connection
            if connection is not None:
                if _is_alive(connection):
                    return connection
                log.warning("libvirt connection died, reopening uri=%s", self.uri)
                self._connection = None
            try:
                connection = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"{_describe(operation, name)}: cannot connect to {self.uri}: {exc}"
                ) from exc
            if connection is None:  # very old bindings returned None instead of raising
                raise HypervisorUnavailable(f"{_describe(operation, name)}: cannot connect to {self.uri}")
            self._connection = connection
            return connection

    def _forget(self, connection: Any) -> None:
        """Drop the shared connection (only ``connection`` if given) so the next call opens a new one.

        Not closed explicitly: other threads may still be inside a call on it; libvirt-python closes it
        when the last reference goes away.
        """
        # Never wait here: a worker stuck opening holds the lock, and then there is nothing to forget yet.
        if not self._connection_lock.acquire(blocking=False):
            return
        try:
            if connection is None or self._connection is connection:
                self._connection = None
        finally:
            self._connection_lock.release()

    def _close_connection(self) -> None:
        """Close the shared connection, ignoring libvirt's complaints about an already broken one."""
        with self._connection_lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(libvirt.libvirtError):
                connection.close()

    @contextlib.contextmanager
    def _translate(self, operation: str, name: str | None, connection: Any) -> Iterator[None]:
        """Map ``libvirtError`` to DomainNotFound, HypervisorUnavailable or DomainOperationFailed."""
        try:
            yield
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            what = _describe(operation, name)
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(f"{what}: no domain {name!r} on {self.uri}") from exc
            # An INTERNAL_ERROR (or anything) on a dead connection is the connection's fault, not the domain's.
            if code in _UNAVAILABLE_CODES or not _is_alive(connection):
                self._forget(connection)
                raise HypervisorUnavailable(
                    f"{what} on {self.uri} failed, hypervisor unavailable: {exc}"
                ) from exc
            raise DomainOperationFailed(f"{what} on {self.uri} failed: {exc}") from exc


def _domains_with_state(connection: Any) -> list[tuple[Any, dict[str, Any] | None]]:
    """Every domain with its state statistics from one call (``getAllDomainStats``), so that reading each
    domain's XML keeps a listing at one call per domain; a driver without it: the domains alone."""
    try:
        return list(connection.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
    return [(domain, None) for domain in connection.listAllDomains(0)]


def _domain_info(domain: Any, stats: dict[str, Any] | None = None) -> DomainInfo:
    """Read one libvirt domain's name, UUID, (state, reason) (from ``stats`` if given) and channels."""
    if stats is not None and "state.state" in stats and "state.reason" in stats:
        state, reason = stats["state.state"], stats["state.reason"]
    else:
        state, reason = domain.state(0)
    status, word = domain_status(state, reason)
    xml = _xml(domain)
    return DomainInfo(name=domain.name(), uuid=domain.UUIDString(), status=status, reason=word,
                      channels=virtio_channels(xml), intent=(intent_from_domain_xml(xml) or NO_INTENT) if xml else None)


def _xml(domain: Any) -> str:
    """The domain's XML (its channels and vmq metadata are read from it); "" when it cannot be read (never
    fails a listing: the channels are then unknown and the intent not said)."""
    try:
        return str(domain.XMLDesc(0))
    except libvirt.libvirtError as exc:
        _raise_unless_refusal(domain, exc)  # gone, or the connection broke: as for the state query
        log.debug("domain XML of %r unreadable, channels and intent unknown: %s", domain.name(), exc)
        return ""


def _activity(domain: Any) -> ActivitySample:
    """Read one domain's counters; refusals (not running, no such device) become None, the rest raises."""
    cpu_time_ns = _cpu_time_ns(domain)
    try:
        xml = domain.XMLDesc(0)
        disks, interfaces = device_targets(xml, "disk"), device_targets(xml, "interface")
    except ValueError:
        log.warning("domain XML of %r does not parse; disk and network counters unknown", domain.name())
        disks, interfaces = [], []
    # blockStats: (rd_req, rd_bytes, wr_req, wr_bytes, errs); interfaceStats: (rx_bytes, .., tx_bytes, ..)
    block = [_counter(domain, "blockStats", disk) for disk in disks]
    net = [_counter(domain, "interfaceStats", interface) for interface in interfaces]
    return ActivitySample(
        cpu_time_ns=cpu_time_ns,
        disk_read_bytes=total(None if stats is None else stats[1] for stats in block),
        disk_write_bytes=total(None if stats is None else stats[3] for stats in block),
        net_rx_bytes=total(None if stats is None else stats[0] for stats in net),
        net_tx_bytes=total(None if stats is None else stats[4] for stats in net),
        taken_monotonic_s=time.monotonic(),
    )


def _cpu_time_ns(domain: Any) -> int | None:
    """Total CPU time from ``getCPUStats``, else from ``info()``; None while the domain is not active."""
    try:
        return int(domain.getCPUStats(True)[0]["cpu_time"])
    except libvirt.libvirtError as exc:
        _raise_unless_refusal(domain, exc)
        # OPERATION_INVALID means "not running" -- or, on a host without the cgroup CPU controller, that
        # getCPUStats is unavailable: then the domain is active and info() has the figure.
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not _active(domain):
            return None  # not running: info() would report a stale (QEMU) or made-up (test driver) figure
    except (IndexError, KeyError, TypeError, ValueError):
        pass  # an answer of an unexpected shape: info() still has the total
    info = _counter(domain, "info")
    return None if info is None else int(info[4])


def _active(domain: Any) -> bool:
    try:
        return bool(domain.isActive())
    except libvirt.libvirtError:
        return False


def _counter(domain: Any, method: str, *args: Any) -> Any:
    """``domain.method(*args)``, or None when libvirt refuses it for this domain or device."""
    try:
        return getattr(domain, method)(*args)
    except libvirt.libvirtError as exc:
        _raise_unless_refusal(domain, exc)
        return None


def _raise_unless_refusal(domain: Any, exc: Any) -> None:
    """Re-raise errors that are not about one counter: no such domain, or the connection is broken."""
    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_NO_DOMAIN or code in _UNAVAILABLE_CODES or not _is_alive(domain.connect()):
        raise exc
