"""The host's probe relay (issue 15): hears each probe round and answers it for this host's ``agent`` and
``channel`` VMs, writing what it gathered to ``<ns>:relayed`` in batches (docs/protocol.md).

One thread (``run``; tests drive ``step``) subscribes to the probes, keeps the relayed VMs from the store's
inventory, asks each ``agent`` VM's guest agent through a bounded pool (at most one call in flight per VM)
and writes each probe to each ``channel`` VM's virtio-serial socket (vmq.hypervisor.channel). Answers are
flushed at least every ``flush_interval_s`` while they arrive, at once when the round's are all in. A VM
whose agent fails gives no answer: silence is the evidence the monitor judges. No Celery, no libvirt here.

Two lanes keep a hung agent from costing others: a VM whose last call answered (or that was never asked)
is called in the fast lane, bounded to ``FAST_LANE_TIMEOUT_S``; one that timed out or answered slowly is
called in the small slow lane with the round's whole timeout. The slow lane is smaller than the libvirt
adapter's agent pool (4), so hung agents never hold every one of its threads.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Hashable

from vmq.config import Settings
from vmq.errors import HypervisorError, StoreError
from vmq.hypervisor.channel import ChannelRelay, Polled
from vmq.model import DomainStatus, ProbePath
from vmq.ports import Hypervisor, Store
from vmq.relay_agent import FAST_LANE_TIMEOUT_S, HOST_SIDE_REASONS, Called, call_agent
from vmq.relay_answers import OncePer, Outbox, RelayStats, channel_answer, channel_reply_check
from vmq.relay_cover import CoverKeeper
from vmq.relay_feed import FeedKeeper
from vmq.responder import parse_probe

__all__ = ["AGENT_WORKERS", "FLUSH_INTERVAL_S", "ProbeRelay", "info_due", "info_every_rounds"]

log = logging.getLogger(__name__)

AGENT_WORKERS = 8  # fast-lane threads: 200 VMs x 1.3 ms / 8 = 33 ms per round
SLOW_LANE_WORKERS = 2  # below the libvirt adapter's own 4 agent threads
AGENT_TIMEOUT_SHARE = 0.8  # an agent call never outlives 0.8 T1: the next round finds the VM free
FLUSH_INTERVAL_S = 0.05
TICK_S = 0.01  # the loop's wait while answers are pending
IDLE_WAIT_S = 0.05
CHANNEL_WAIT_S = 0.02  # channel polls alternate with probe reads this often
SUMMARY_INTERVAL_S = 60.0
RECENT_ROUNDS = 8


def info_every_rounds(settings: Settings) -> int:
    """Rounds between two guest-info readings of one VM: VMQ_RELAY_INFO_INTERVAL_S in rounds (at least 1)."""
    return max(1, round(settings.relay_info_interval_s / settings.probe_interval_s))


_info_every = info_every_rounds  # ProbeRelay's parameter of that name shadows it there


def info_due(vm: str, round_id: int, every: int) -> bool:
    """True when ``vm``'s guest info (and its state parameters) ride along in ``round_id``: every ``every``
    rounds (0: never), in a round that depends on the VM, so a host's VMs spread over the rounds."""
    return every > 0 and (round_id + zlib.crc32(vm.encode())) % every == 0


class ProbeRelay:
    """This host's relay loop; ``start``/``stop`` run it on a daemon thread, ``step`` runs one iteration.

    ``store`` and ``hypervisor`` are getters (the host worker swaps its hypervisor once the listener runs);
    ``clock`` is monotonic seconds; ``channel_relay`` builds the channel links (a ChannelRelay). ``stats``
    counts everything (readable from another thread: its copies are atomic under the GIL)."""

    def __init__(self, settings: Settings, host: str, store: Callable[[], Store],
                 hypervisor: Callable[[], Hypervisor], clock: Callable[[], float] = time.monotonic,
                 channel_relay: Callable[[], ChannelRelay] | None = None, agent_workers: int = AGENT_WORKERS,
                 slow_workers: int = SLOW_LANE_WORKERS, flush_interval_s: float = FLUSH_INTERVAL_S,
                 info_every_rounds: int | None = None, summary_interval_s: float = SUMMARY_INTERVAL_S) -> None:
        self.settings, self.host = settings, host
        self._store, self._hypervisor, self._clock = store, hypervisor, clock
        self.timeout_s = min(settings.probe_interval_s * AGENT_TIMEOUT_SHARE, settings.relay_agent_timeout_s)
        self.info_every_rounds = _info_every(settings) if info_every_rounds is None else info_every_rounds
        self.summary_interval_s = summary_interval_s
        self.stats = RelayStats()
        self.outbox = Outbox(flush_interval_s, max_age_s=settings.probe_interval_s)
        self._channel = (channel_relay or (lambda: ChannelRelay(settings.max_reply_bytes, clock=clock)))()
        self._pools = (concurrent.futures.ThreadPoolExecutor(agent_workers, thread_name_prefix="vmq-relay-agent"),
                       concurrent.futures.ThreadPoolExecutor(slow_workers, thread_name_prefix="vmq-relay-slow"))
        self._results: queue.SimpleQueue[Called] = queue.SimpleQueue()
        self._once_per_round = OncePer(settings.probe_interval_s)
        self._once_per_10s = OncePer(10.0)
        self.agent_vms: list[str] = []
        self.channel_vms: list[str] = []
        self.unlinked_vms: list[str] = []  # channel VMs whose domain shows no channel socket (never asked)
        self._in_flight: set[str] = set()  # agent VMs with a call queued or running (loop thread only)
        self._slow: set[str] = set()  # agent VMs called in the slow lane
        self._expected: set[str] = set()  # VMs whose answer to the current round is still awaited
        self._round = 0
        self._round_ends_s = 0.0  # when the current round's calls have all answered or timed out
        self._unasked: set[str] = set()  # VMs the round could not ask (HOST_SIDE_REASONS, channel unreachable)
        self._asking: set[str] = set()  # agent VMs of the current round whose call was queued
        self._started: set[tuple[int, str]] = set()  # (round, vm) of calls that started (pool threads add)
        self._finished = 0  # the latest round reported finished (written with a batch)
        self._finishing: tuple[int, list[str], dict[str, str] | None] | None = None  # end mark not yet written
        # The agent VMs' answers as one cover entry per round (VMQ_RELAY_FORM=cover), or compact ones (None).
        self.cover = CoverKeeper(host) if settings.relay_form == "cover" else None
        self._partial_at = float("inf")  # when the round's partial cover entry is due (while calls still run)
        self._recent: deque[int] = deque(maxlen=RECENT_ROUNDS)
        self.feeds = FeedKeeper(host, lambda: self._store().relays.subscribe_probes(), clock, self._feed_lost)
        self._flush_retry_at = 0.0
        self._next_refresh = 0.0
        self._next_summary = clock() + summary_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Run the loop on a daemon thread (once)."""
        self._thread = threading.Thread(target=self.run, name="vmq-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop and wait for it (idempotent); the thread flushes and closes on its way out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def run(self) -> None:
        """The loop: ``step`` until stopped; never dies of a single failure."""
        log.info("host=%s probe relay started (agent timeout %.2f s)", self.host, self.timeout_s)
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:  # the relay must outlive any single failure
                    log.exception("host=%s probe relay error", self.host)
                    self._stop.wait(0.5)
        finally:
            self.close()

    def close(self) -> None:
        """Flush what is left, unsubscribe, close the channel links and the pools (calls running are left)."""
        self.flush()
        self.feeds.close()
        self._channel.close_all()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        log.info("host=%s probe relay stopped: %s", self.host, self.stats.summary())

    # ------------------------------------------------------------------ one iteration
    def step(self, wait_s: float | None = None) -> None:
        """Refresh the VMs if due, read at most one probe (waiting up to ``wait_s``), poll the channels,
        collect agent results, flush if due. Raises nothing for Redis, libvirt or a guest's fault."""
        if wait_s is None:
            wait_s = TICK_S if self._expected or len(self.outbox) else IDLE_WAIT_S
        if self._clock() >= self._next_refresh:
            self.refresh()
        self._collect()
        feed = self.feeds.ready()
        channels = bool(self._channel.vms)
        raw: bytes | None = None
        if feed is not None:
            try:
                raw = feed.get(0.0 if channels else wait_s)
            except StoreError as exc:
                self.feeds.lost(exc)
        elif not channels:
            self._stop.wait(wait_s)
        if raw is not None:
            self.on_probe(raw)
        if channels:
            self._on_polled(self._channel.poll(min(wait_s, CHANNEL_WAIT_S)))
        self._collect()
        now = self._clock()
        if self._round > self._finished and self._finishing is None and (not self._expected
                                                                          or now >= self._round_ends_s):
            self._finish_round()
        if now >= self._partial_at and self._expected and self._finishing is None and self._round > self._finished:
            self._write_partial()
        if now >= self._flush_retry_at and (self._finishing is not None
                                            or self.outbox.due(now, round_complete=not self._expected)):
            self.flush()
        if now >= self._next_summary:
            self._next_summary = now + self.summary_interval_s
            log.info("host=%s relay %s", self.host, self.stats.summary())

    def refresh_soon(self) -> None:
        """Re-read the relayed VMs at the loop's next iteration (any thread: one float store)."""
        self._next_refresh = 0.0

    def refresh(self) -> None:
        """Re-read which of this host's VMs to relay: running domains whose record names this host and whose
        probe path is ``agent`` or ``channel``; open/close the channel links to match."""
        interval_s = self.settings.inventory_interval_s
        self._next_refresh = self._clock() + interval_s
        try:
            store = self._store()
            records = store.vms.records(sorted(store.hosts.domain_names(self.host)))
        except StoreError as exc:
            self.stats.counts["inventory_failed"] += 1
            self._next_refresh = self._clock() + min(1.0, interval_s)
            self._log_limited("inventory", logging.WARNING, "host=%s relay cannot read the inventory: %s",
                              self.host, exc)
            return
        wanted = [r for r in records if r.exists and r.host == self.host and r.domain_status is DomainStatus.RUNNING]
        self.agent_vms = [r.vm for r in wanted if r.probe_path is ProbePath.AGENT]
        channel = [r.vm for r in wanted if r.probe_path is ProbePath.CHANNEL]
        for vm in set(self._channel.vms) - set(channel):
            self._channel.close(vm)
        linked, unlinked = [], []
        for vm in channel:
            try:
                path = self._hypervisor().channel_socket(vm)
            except HypervisorError as exc:  # no such channel (any more): not relayed until it has one
                self.stats.counts["no_socket"] += 1
                self._channel.close(vm)
                unlinked.append(vm)
                self._log_limited(("socket", vm), logging.WARNING, "host=%s vm=%s no channel socket: %s",
                                  self.host, vm, exc)
                continue
            self._channel.open(vm, path)  # a socket not there yet is "not connected", retried with back-off
            linked.append(vm)
        self.channel_vms, self.unlinked_vms = linked, unlinked

    # ------------------------------------------------------------------ probes
    def on_probe(self, raw: bytes) -> None:
        """Handle one probe as published: validate it, ask every agent VM, forward it to every channel VM,
        renew the relay heartbeat. A probe that does not parse, or a round already handled, is skipped."""
        try:
            round_id, nonce, sent_ms = parse_probe(raw)
        except ValueError as exc:
            self.stats.counts["probe_invalid"] += 1
            self._log_limited("probe", logging.WARNING, "host=%s relay skipped a bad probe: %s", self.host, exc)
            return
        if round_id in self._recent:
            self.stats.counts["probe_duplicate"] += 1
            return
        self._recent.append(round_id)
        self.stats.counts["probes"] += 1
        if self._round > self._finished and self._finishing is None:
            self._finish_round()  # the previous round ends here at the latest
        self._round, self._expected, self._unasked, self._asking = round_id, set(), set(), set()
        if self.cover is not None:
            self.cover.start(round_id, nonce, self.agent_vms)
            self._partial_at = self._clock() + self.outbox.flush_interval_s
        deadline_s = self._clock() + self.timeout_s
        self._round_ends_s = deadline_s
        every = self.info_every_rounds
        for vm in self.agent_vms:
            if vm in self._in_flight:
                self._dropped(vm, "agent_busy", "the previous call is still running")
                continue
            slow = vm in self._slow
            self._in_flight.add(vm)
            self._expected.add(vm)
            self._asking.add(vm)
            with_info = info_due(vm, round_id, every)
            self._pools[slow].submit(self._call_agent, vm, round_id, nonce, deadline_s, slow, with_info)
        # A channel the relay cannot reach (no socket, not connected) is the host's trouble: those VMs are not
        # asked, and the round's mark says so (their silence is no evidence). A connected VM that does not read
        # its port is asked: its silence is.
        self._unasked.update(self.unlinked_vms)
        self._unasked.update(vm for vm in self.channel_vms if not self._channel.is_connected(vm))
        if self.channel_vms:
            line = raw.strip()
            if b"\n" in line:  # valid JSON spread over lines: the channel's framing needs one line
                line = (f'{{"v":1,"type":"probe","round":{round_id},"nonce":"{nonce}","sent_ms":{sent_ms}}}'
                        .encode())
            self._expected.update(self._channel.send_probe(line, self.channel_vms))
        self._heartbeat()

    def _call_agent(self, vm: str, round_id: int, nonce: str, deadline_s: float, slow: bool,
                    with_info: bool) -> None:
        """In a pool thread: one ping (and guest_info when asked) within the round's deadline."""
        self._results.put(call_agent(self._hypervisor, self._clock, vm, round_id, nonce, deadline_s, slow, with_info,
                                     on_start=self._started.add))

    def _collect(self) -> None:
        """Take the finished agent calls into the outbox and the counters (loop thread)."""
        while True:
            try:
                called = self._results.get_nowait()
            except queue.Empty:
                return
            vm = called.vm
            self._in_flight.discard(vm)
            if called.round_id == self._round:
                self._expected.discard(vm)
                if called.reason in HOST_SIDE_REASONS:
                    self._unasked.add(vm)
            if called.reason != "agent_late":
                self.stats.counts["agent_calls"] += 1
            if called.answer is None:
                if called.reason == "agent_timeout":
                    self._slow.add(vm)
                self._dropped(vm, called.reason, called.detail)
                continue
            latency_ms = called.latency_ms or 0.0
            if latency_ms < FAST_LANE_TIMEOUT_S * 1000 / 2:
                self._slow.discard(vm)
            else:
                self._slow.add(vm)
            self.stats.agent_latency_ms.add(latency_ms)
            self.stats.counts["answers_agent"] += 1
            if "info" in called.answer:
                self.stats.counts["info"] += 1
            if called.info_failed:
                self.stats.counts["info_failed"] += 1
            if self.cover is None:
                self.outbox.add(called.answer, called.done_s)
            elif not self.cover.answered(vm, called.round_id, called.answer, called.done_s):
                self.stats.drops["agent_late"] += 1  # an earlier round's answer: that round's entry is written

    def _on_polled(self, polled: Polled) -> None:
        """Take one channel poll's replies into the outbox (after the cheap ``vm`` check), count rejects."""
        now = self._clock()
        for reject in polled.rejects:
            self._dropped(reject.vm, reject.reason, reject.detail)
        for reply in polled.replies:
            reason, round_id = channel_reply_check(reply.vm, reply.message)
            if reason is not None:
                self._dropped(reply.vm, reason, "reply names another VM" if reason == "wrong_vm" else "not JSON")
                continue
            if round_id == self._round:
                self._expected.discard(reply.vm)
            self.stats.counts["answers_channel"] += 1
            self.outbox.add(channel_answer(reply.vm, reply.message, reply.signature), now)

    # ------------------------------------------------------------------ writes
    def flush(self) -> bool:
        """Write the outbox as one batch (``store.relays.append``); on failure keep it for the next flush
        (retried after 0.1 s), dropping answers older than T1. True if nothing is left unwritten."""
        items = self.outbox.take()
        finishing = self._finishing
        if not items and finishing is None:
            return True
        try:
            if finishing is None:
                self._store().relays.append(self.host, [answer for _, answer in items])
            else:
                round_id, unasked, cover = finishing
                self._store().relays.append(self.host, [answer for _, answer in items], round_id, unasked, cover)
                if cover is not None and self.cover is not None:
                    self.cover.written(cover)
                self._finished, self._finishing = round_id, None
        except StoreError as exc:
            now = self._clock()
            dropped = self.outbox.put_back(items, now)
            self.stats.counts["flush_failed"] += 1
            self.stats.counts["dropped_stale"] += dropped
            self._flush_retry_at = now + 0.1
            self._log_limited("flush", logging.WARNING, "host=%s relay cannot write %d answers (%d dropped as "
                              "stale): %s", self.host, len(items), dropped, exc)
            return False
        now = self._clock()
        covered = self.cover.delays(now) if finishing is not None and self.cover is not None else []
        self.stats.flushed(len(items) + len(covered), [(now - ready_s) * 1000.0 for ready_s, _ in items] + covered)
        return True

    def _write_partial(self) -> None:
        """Calls of the round still run: write the agent answers in so far as a partial cover entry (no finish
        mark), so a hung agent delays no other VM's answer; again a flush interval later if more came in."""
        self._partial_at = self._clock() + self.outbox.flush_interval_s
        if self.cover is None or not self.cover.unwritten():
            return
        fields = self.cover.fields(self._round)
        if fields is None:
            return
        try:
            self._store().relays.append(self.host, [], cover=fields)
        except StoreError as exc:
            self.stats.counts["flush_failed"] += 1
            self._log_limited("flush", logging.WARNING, "host=%s relay cannot write a partial cover entry: %s",
                              self.host, exc)
            return
        self.cover.written(fields)
        delays = self.cover.delays(self._clock())
        self.stats.flushed(len(delays), delays)

    def _finish_round(self) -> None:
        """Mark the current round finished: every VM asked has answered or timed out (or its time is up). The
        mark goes with the next flush, naming the VMs never asked: only then is a relayed VM's silence in
        that round evidence for the monitor."""
        round_id = self._round
        started = {vm for started_round, vm in list(self._started) if started_round == round_id}
        unasked = self._unasked | (self._asking - started)  # late, or still queued when the round ended
        self._started = {call for call in list(self._started) if call[0] > round_id}
        self._finishing = (round_id, sorted(unasked), None if self.cover is None else self.cover.fields(round_id))
        if unasked:
            self.stats.counts["unasked"] += len(unasked)

    def _heartbeat(self) -> None:
        """Tell the monitor this host's relay handled a round (Redis time, ms)."""
        try:
            store = self._store()
            store.hosts.set_host_fields(self.host, {"relay_seen_ms": store.clock.time_ms()})
        except StoreError as exc:
            self.stats.counts["heartbeat_failed"] += 1
            self._log_limited("heartbeat", logging.WARNING, "host=%s relay heartbeat failed: %s", self.host, exc)

    def _feed_lost(self, exc: StoreError, delay_s: float) -> None:
        self.stats.counts["subscribe_failed"] += 1
        self._log_limited("subscribe", logging.WARNING, "host=%s relay lost the probe channel (retry in %.1f s): "
                          "%s", self.host, delay_s, exc)

    # ------------------------------------------------------------------ counting and logging
    def _dropped(self, vm: str, reason: str, detail: str) -> None:
        """Count a VM's missing or refused answer; log it at most once per VM and reason per T1."""
        self.stats.drops[reason] += 1
        self._log_limited((vm, reason), logging.INFO, "host=%s vm=%s round=%s no relayed answer (%s): %s",
                          self.host, vm, self._round, reason, detail, per_round=True)

    def _log_limited(self, key: Hashable, level: int, message: str, *args: object, per_round: bool = False) -> None:
        """Log unless ``key`` was logged within T1 (``per_round``) or within 10 s."""
        limiter = self._once_per_round if per_round else self._once_per_10s
        if limiter(key, self._clock()):
            log.log(level, message, *args)
