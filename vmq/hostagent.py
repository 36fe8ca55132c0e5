"""The host worker's agent: keeps its host registered and its inventory current, tells the monitor
about lifecycle events it did not cause itself, and runs the host's probe relay (vmq.relay) for its
``agent``/``channel`` VMs.

No Celery here: the worker gives it a ``report_event`` callable (which sends the monitor's task), getters
for this process's store and hypervisor, and a way to install the listener's connection as the hypervisor
its tasks use. libvirt is imported only when the listener starts (vmq.hypervisor.events).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from vmq.config import Settings
from vmq.errors import HypervisorError, VmqError
from vmq.host_failover import lock_manager_state
from vmq.hypervisor.types import METADATA_EVENT, DomainEvent, classify
from vmq.intent import NAMESPACE as INTENT_NAMESPACE
from vmq.inventory import mark_degraded, renew_heartbeat, sync_inventory
from vmq.model import REPORTED_EVENT_KINDS, DomainEventKind
from vmq.ports import Hypervisor, Store
from vmq.relay import ProbeRelay

__all__ = ["OWN_EVENTS_S", "HostAgent", "OwnActions", "ReportEvent"]

log = logging.getLogger(__name__)

#: After an action on a VM ends, its events stay ours this long (s): libvirt delivers them a little late.
OWN_EVENTS_S = 5.0
#: While an action runs, its events are ours for at most this long (s), in case it never ends.
ACTING_HOLD_S = 3600.0
#: How long start() waits for the listener's first connection (s).
LISTENER_CONNECT_S = 10.0


class ReportEvent(Protocol):
    """Sends one lifecycle event to the monitor: ``(vm, host, kind value, libvirt event, libvirt detail)``."""

    def __call__(self, vm: str, host: str, kind: str, event: str, detail: str) -> None: ...


class OwnActions:
    """The VMs this process is acting on: their lifecycle events are its own doing, not news for the monitor.

    ``clock`` is monotonic seconds. Thread-safe: tasks mark VMs while the listener thread asks.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, after_s: float = OWN_EVENTS_S,
                 hold_s: float = ACTING_HOLD_S) -> None:
        self._clock = clock
        self._after_s = after_s
        self._hold_s = hold_s
        self._until: dict[str, float] = {}  # vm -> clock time until which its events are ours
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def acting(self, vm: str) -> Iterator[None]:
        """Mark ``vm`` as acted on for the block, and for ``after_s`` after it ends (however it ends)."""
        with self._lock:
            self._until[vm] = self._clock() + self._hold_s
        try:
            yield
        finally:
            with self._lock:
                self._until[vm] = self._clock() + self._after_s

    def is_own(self, vm: str) -> bool:
        """True while an event of ``vm`` is this process's own doing."""
        with self._lock:
            return self._until.get(vm, 0.0) > self._clock()


class HostAgent:
    """One host worker's inventory loop (a daemon thread), probe relay (another), lifecycle-event reporting
    and own-event muting.

    Idempotent to stop; ``start`` once per process. Store and hypervisor are getters because the
    hypervisor the tasks use becomes the listener's connection once the listener runs. ``relay`` builds the
    probe relay (default: vmq.relay.ProbeRelay on the same getters); None runs none.
    """

    def __init__(self, settings: Settings, store: Callable[[], Store], hypervisor: Callable[[], Hypervisor],
                 report_event: ReportEvent, install_hypervisor: Callable[[Hypervisor], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 relay: Callable[[HostAgent], ProbeRelay] | None = None) -> None:
        self.settings = settings
        self.host = settings.require_host()
        self._store = store
        self._hypervisor = hypervisor
        self._report_event = report_event
        self._install_hypervisor = install_hypervisor
        self._clock = clock
        self.own = OwnActions(clock)
        self.stop_event = threading.Event()
        self.sync_soon = threading.Event()  # set: the inventory loop syncs at once (stop() sets it too)
        self.listener: Any = None
        self._thread: threading.Thread | None = None
        self.relay: ProbeRelay | None = None
        self._make_relay = relay or (lambda agent: ProbeRelay(agent.settings, agent.host, agent._store,
                                                              agent._hypervisor, clock=agent._clock))

    # ------------------------------------------------------------------ own actions and events
    def acting(self, vm: str) -> contextlib.AbstractContextManager[None]:
        """Context manager: events of ``vm`` during (and shortly after) the block are not reported."""
        return self.own.acting(vm)

    def kind_to_report(self, event: DomainEvent) -> DomainEventKind | None:
        """The kind to tell the monitor about, or None: noise (OTHER) or this process's own doing."""
        kind = classify(event)
        if kind not in REPORTED_EVENT_KINDS or self.own.is_own(event.name):
            return None
        return kind

    def on_event(self, event: DomainEvent) -> None:
        """Listener callback: report the event if the monitor needs to hear it; a change of a domain's vmq
        metadata (vmq.intent) makes the inventory read it again at once."""
        if event.event == METADATA_EVENT:
            if event.detail == INTENT_NAMESPACE:
                log.info("host=%s vm=%s vmq metadata changed: inventory now", self.host, event.name)
                self.sync_soon.set()
            return
        kind = self.kind_to_report(event)
        if kind is None:
            return
        log.info("host=%s vm=%s libvirt event %s/%s -> %s", self.host, event.name, event.event, event.detail,
                 kind.value)
        self._report_event(event.name, self.host, kind.value, event.event, event.detail)

    def on_state(self, connected: bool) -> None:
        """Listener callback: log the event connection going up or down."""
        log.log(logging.INFO if connected else logging.ERROR, "host=%s libvirt event connection %s", self.host,
                "up" if connected else "lost")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the lifecycle listener (if libvirt can deliver events here), the inventory thread, then the
        probe relay's thread."""
        self.listener = self._start_listener()
        self._thread = threading.Thread(target=self._run, name="vmq-inventory", daemon=True)
        self._thread.start()
        self.relay = self._make_relay(self)
        self.relay.start()

    def stop(self) -> None:
        """Stop the threads and the listener, and drop the heartbeat at once instead of letting it expire."""
        self.stop_event.set()
        self.sync_soon.set()  # wakes the inventory loop
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        try:
            self._store().hosts.drop_heartbeat(self.host)
        except VmqError as exc:
            log.warning("could not drop heartbeat: %s", exc)

    def _start_listener(self) -> Any:
        """The running LifecycleListener, or None when libvirt cannot deliver events (inventory still polls)."""
        from vmq.hypervisor.events import LifecycleListener  # imports libvirt lazily

        try:
            listener = LifecycleListener(self.settings.libvirt_uri, self.on_event, self.on_state, read_only=False)
            if self._install_hypervisor is not None:
                self._install_hypervisor(listener.hypervisor())  # tasks act through the listener's connection
            listener.start()
            listener.wait_connected(LISTENER_CONNECT_S)
        except Exception:  # events are an accelerator; the inventory and silence judging work without them
            log.exception("host=%s libvirt lifecycle events unavailable", self.host)
            return None
        return listener

    # ------------------------------------------------------------------ inventory
    def sync_once(self) -> None:
        """One heartbeat + inventory sync; the heartbeat is only renewed while libvirt answers.

        Raises HypervisorError when libvirt does not answer, StoreError when Redis fails.
        """
        s = self.settings
        lock = lock_manager_state(s.lock_manager, s.libvirt_uri, s.virtlockd_socket)
        report = sync_inventory(self._store(), self._hypervisor(), self.host, s.host_heartbeat_ttl_s,
                                detect_paths=s.probe_path_detect, lock=lock)
        if report.new_vms or report.migrated:
            log.info("host=%s inventory: %d domains, new=%s migrated=%s", self.host, report.domains,
                     report.new_vms, report.migrated)
        if report.path_changed:
            log.info("host=%s probe path detected anew for %s", self.host, report.path_changed)
        relay = self.relay
        if relay is not None and (report.new_vms or report.migrated or report.started or report.path_changed):
            relay.refresh_soon()  # the relay asks the VMs this pass placed from its next iteration on

    def step(self, sync_due: bool) -> bool:
        """One iteration of the loop: a full sync if due, else a heartbeat. True if a due sync succeeded
        (a failed one is tried again at the next iteration); never raises."""
        settings = self.settings
        try:
            if sync_due:
                self.sync_once()  # lists domains and renews the heartbeat
                return True
            renew_heartbeat(self._store(), self.host, settings.host_heartbeat_ttl_s)
        except HypervisorError as exc:
            # Alive but blind: the host is `degraded`; its VMs are flagged, never restarted on silence.
            log.error("host=%s libvirt unavailable (degraded): %s", self.host, exc)
            try:
                mark_degraded(self._store(), self.host, settings.libvirt_uri, settings.host_heartbeat_ttl_s,
                              str(exc))
            except VmqError as store_exc:  # Redis down as well: the loop goes on
                log.error("host=%s inventory sync failed: %s", self.host, store_exc)
        except VmqError as exc:
            log.error("host=%s inventory sync failed: %s", self.host, exc)
        except Exception:  # the agent must outlive any single failure
            log.exception("host=%s inventory agent error", self.host)
        return False

    def _run(self) -> None:
        settings = self.settings
        period_s = min(settings.host_heartbeat_interval_s, settings.host_heartbeat_ttl_s / 3)
        next_sync = 0.0
        while not self.stop_event.is_set():
            soon = self.sync_soon.is_set()
            if soon:  # cleared only once seen: a change noted meanwhile is read by the sync that follows
                self.sync_soon.clear()
            if self.step(soon or self._clock() >= next_sync):
                next_sync = self._clock() + settings.inventory_interval_s
            self.sync_soon.wait(period_s)  # a metadata change (on_event) cuts the wait short
