"""Monitor use cases: send a probe round, ingest replies, judge due rounds, dispatch restarts.

Written against ``RedisStore`` and a ``dispatch`` callable, so no Celery or libvirt here. One ``tick``
ingests and judges everything that is due, under a lock; any number of timeout workers may call it
and each round is judged exactly once, by arrival times recorded in Redis, however late the tick runs.
Acting on a decision (transitions, escalation, restart requests) is ``vmq.verdict.Verdicts``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise

from vmq.codec import WIRE_VERSION, new_nonce
from vmq.config import Settings
from vmq.ingest import Ingestor, LatestReplies, RejectLog
from vmq.model import Action, DomainEventKind, DomainStatus, VmState, VmView
from vmq.policy import PolicyConfig, decide, storm_guard, with_overrides
from vmq.responder import BACKOFF_CAP_S
from vmq.store.redis import HostContext, Record, RedisStore
from vmq.sweeps import end_guard_episodes, expire_maintenance, record_guard_episodes, sweep_hosts
from vmq.verdict import RestartRequest, Verdicts, crash_evidence, silence_evidence

__all__ = ["DUPLICATE_GAP", "EVENT_STATUS", "Monitor", "ProbingGap", "RestartRequest", "TickReport", "policy_config",
           "probing_gap", "view_of"]

log = logging.getLogger(__name__)

#: A beat's round is refused as a duplicate when the latest one went out less than this fraction of T1 ago.
DUPLICATE_GAP = 0.6


@dataclass(frozen=True)
class ProbingGap:
    """What a gap in probing leaves of a round's evidence (see ``probing_gap``)."""

    reason: str = ""  # empty: no gap near this round, judge it as usual
    reconnected_since_ms: int = 0  # > 0: judge only VMs that answered since then; 0: judge nobody


def probing_gap(round_id: int, sent_ms: Mapping[int, int], now_ms: int, t1_ms: int, t2_ms: int) -> ProbingGap:
    """How much of ``round_id``'s silence is evidence, given the gaps in probing around it (pure).

    No round goes out while Redis is down or unreachable, so a gap in the send times of the recent rounds
    (``sent_ms``, Redis' clock; ``now_ms`` stands in for the next round while none has gone out) longer than
    max(T2 - T1, 2 x T1) means Redis, beat or every monitor was away. A round whose window [sent, sent + T2]
    meets the gap is not judged at all: its replies may never have been delivered. After the gap the guests
    reconnect, each after its back-off (vmq.responder: up to min(gap, 10 s)): in a round sent within that
    allowance (+ T1) only the VMs that have answered since the gap are judged; the others are still
    reconnecting, and one that is really hung is judged in the first round after the allowance
    (tests/integration/test_faults.py).
    """
    if round_id not in sent_ms:
        return ProbingGap()
    times = sorted(sent_ms.items())
    times.append((0, max(now_ms, times[-1][1])))
    threshold_ms = max(t2_ms - t1_ms, 2 * t1_ms)
    start_ms = sent_ms[round_id]
    held = ProbingGap()
    for (before, gap_from), (after, gap_to) in pairwise(times):
        gap_ms = gap_to - gap_from
        if gap_ms <= threshold_ms or gap_from >= start_ms + t2_ms:
            continue
        reconnect_ms = min(gap_ms, int(BACKOFF_CAP_S * 1000)) + t1_ms
        what = (f"no probe round went out for {gap_ms / 1000:.1f} s (round {before} to "
                f"{f'round {after}' if after else 'now'}): Redis, beat or the monitors were away")
        if gap_to > start_ms:
            return ProbingGap(f"no evidence: {what}")
        if gap_to + reconnect_ms > start_ms:
            held = ProbingGap(f"{what}; guests get {reconnect_ms / 1000:.1f} s to reconnect", gap_to)
    return held


#: The domain status a classified libvirt lifecycle event implies (see vmq.hypervisor.events.classify).
EVENT_STATUS: Mapping[str, DomainStatus] = {
    DomainEventKind.CRASH: DomainStatus.CRASHED,
    DomainEventKind.OPERATOR_STOP: DomainStatus.SHUTOFF,
    DomainEventKind.MIGRATING_AWAY: DomainStatus.PAUSED,
    DomainEventKind.PAUSED: DomainStatus.PAUSED,
    DomainEventKind.RESUMED: DomainStatus.RUNNING,
    DomainEventKind.STARTED: DomainStatus.RUNNING,
}


@dataclass
class TickReport:
    """What one tick did (for logs, tasks' return values and benchmarks)."""

    judged_rounds: list[int] = field(default_factory=list)
    ingested: int = 0
    valid: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    healed: list[str] = field(default_factory=list)
    lost: int = 0  # replies trimmed from the stream before they were read
    unjudged: list[int] = field(default_factory=list)  # rounds whose replies may have been lost: no verdict
    locked_out: bool = False


def policy_config(settings: Settings) -> PolicyConfig:
    """The restart condition's knobs from Settings."""
    return PolicyConfig(
        boot_grace_s=settings.boot_grace_s,
        recovery_timeout_s=settings.recovery_timeout_s,
        restart_timeout_s=settings.restart_timeout_s,
        max_restarts=settings.max_restarts,
        restart_window_s=settings.restart_window_s,
        backoff_base_s=settings.backoff_base_s,
        backoff_max_s=settings.backoff_max_s,
        max_concurrent_restarts_per_host=settings.max_concurrent_restarts_per_host,
    )


def view_of(vm: str, rec: Record, **extra: object) -> VmView:
    """Build the policy's view of a VM from its stored record plus context."""
    grace_anchor = max(int(rec.get("booted_at_ms") or 0), int(rec.get("monitored_since_ms") or 0))
    return VmView(
        vm=vm,
        state=VmState(rec.get("state", VmState.UNKNOWN.value)),
        host=rec.get("host", ""),
        state_since_ms=int(rec.get("state_since_ms") or 0),
        domain_status=DomainStatus(rec.get("domain_status", DomainStatus.ABSENT.value)),
        domain_reason=rec.get("domain_reason", ""),
        booted_at_ms=grace_anchor,
        **extra,  # type: ignore[arg-type]
    )


class Monitor:
    """The central half of vmq: probe, ingest, judge, dispatch."""

    def __init__(self, store: RedisStore, settings: Settings, dispatch: Callable[[RestartRequest], None],
                 notify: Callable[[dict[str, object]], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.verdicts = Verdicts(store, settings, dispatch, notify)
        self.policy = policy_config(settings)
        self._t2_ms = int(settings.reply_timeout_s * 1000)
        self._host_fresh_ms = int(3 * settings.host_heartbeat_interval_s * 1000)
        # Short, and renewed before each round: a timeout worker killed while judging blocks the others for
        # at most this long. Overrunning it is safe (every transition is a compare-and-set), only wasteful.
        self._lease_s = max(2.0, 2 * settings.probe_interval_s)
        self._ingestor = Ingestor(store, settings.max_reply_bytes,
                                  RejectLog(settings.probe_interval_s),  # one line per VM and reason per T1
                                  LatestReplies(int(settings.reply_save_interval_s * 1000)))

    @property
    def dispatch(self) -> Callable[[RestartRequest], None]:
        """Sends a restart request to its host's queue (``Verdicts.dispatch``); may be replaced."""
        return self.verdicts.dispatch

    @dispatch.setter
    def dispatch(self, dispatch: Callable[[RestartRequest], None]) -> None:
        self.verdicts.dispatch = dispatch

    @property
    def notify(self) -> Callable[[dict[str, object]], None] | None:
        """Queues an escalation of a `failed` VM (``Verdicts.notify``), or None; may be replaced."""
        return self.verdicts.notify

    @notify.setter
    def notify(self, notify: Callable[[dict[str, object]], None] | None) -> None:
        self.verdicts.notify = notify

    # ---------------------------------------------------------------- probe
    def probe(self) -> tuple[int, int]:
        """Broadcast a new round, then judge what is due; returns (round, sent_ms).

        The round goes out first: its send time starts every guest's deadline, so catching up on replies
        must never delay it.
        """
        round_id, sent_ms, _ = self._start_round(0)
        self.tick()
        return round_id, sent_ms

    def probe_from_beat(self) -> tuple[int, int, TickReport] | None:
        """The beat's probe: as ``probe`` (plus what its tick did), but None, with nothing sent or judged, when
        the latest round went out less than DUPLICATE_GAP x T1 ago (by Redis' clock): a second beat is then
        harmless.

        The gap is more than half of T1, so two beats ticking in antiphase cannot both get rounds through,
        and less than T1 by enough to absorb a probe task that starts late.
        """
        round_id, sent_ms, started = self._start_round(int(DUPLICATE_GAP * self.settings.probe_interval_s * 1000))
        if not started:
            log.debug("probe refused: round=%s went out at %s (another beat)", round_id, sent_ms)
            return None
        return round_id, sent_ms, self.tick()

    def _start_round(self, min_gap_ms: int) -> tuple[int, int, bool]:
        round_id, sent_ms, started = self.store.start_round(new_nonce(), self._t2_ms, self.settings.rounds_kept,
                                                            WIRE_VERSION, min_gap_ms)
        if started:
            log.debug("probe round=%s sent_ms=%s", round_id, sent_ms)
        return round_id, sent_ms, started

    # ---------------------------------------------------------------- tick
    def tick(self) -> TickReport:
        """Ingest replies and judge every round whose deadline has passed (idempotent, lock-serialised)."""
        report = TickReport()
        with self.store.judge_lock(lease_s=self._lease_s, wait_s=self.settings.probe_interval_s) as lease:
            if not lease:
                report.locked_out = True
                return report
            now_ms = self.store.time_ms()
            sweep_hosts(self.store, now_ms)
            expire_maintenance(self.store, now_ms)
            sent_ms: dict[int, int] | None = None
            for round_id, deadline_ms in self.store.due_rounds(now_ms):
                if not lease.renew():  # we overran the lease: another judge carries on from here
                    report.locked_out = True
                    return report
                if not self._ingestor.ingest(deadline_ms, report, lease):
                    report.locked_out = True  # the lease ran out while reading: the next holder judges
                    return report
                now_ms = self.store.time_ms()  # the verdict's time: after its evidence is in
                sent_ms = self.store.round_sent_times() if sent_ms is None else sent_ms
                gap = probing_gap(round_id, sent_ms, now_ms, int(self.settings.probe_interval_s * 1000),
                                  self._t2_ms)
                if self._replies_lost_for(round_id, deadline_ms):
                    self._unjudged(round_id, now_ms, report)
                elif gap.reason and not gap.reconnected_since_ms:
                    self.store.audit("evidence_lost", "", "", now_ms, round=round_id, reason=gap.reason)
                    log.warning("round=%s not judged: %s", round_id, gap.reason)
                else:
                    self._judge(round_id, deadline_ms, now_ms, report, gap)
                self.store.finish_round(round_id)
                report.judged_rounds.append(round_id)
            # Replies before the next deadline are final for it: ingest them now so recoveries show at once.
            upcoming = self.store.next_deadline()
            if not self._ingestor.ingest(now_ms - 1 if upcoming is None else min(now_ms - 1, upcoming), report,
                                         lease):
                report.locked_out = True
        return report

    def _replies_lost_for(self, round_id: int, deadline_ms: int) -> bool:
        """True when replies trimmed unread may have answered this round (they arrived after it was sent)."""
        lost_until = self.store.evidence_lost_until()
        if not lost_until:
            return False
        sent_ms = self.store.round_sent_ms(round_id)
        return lost_until >= (deadline_ms - self._t2_ms if sent_ms is None else sent_ms)

    def _unjudged(self, round_id: int, now_ms: int, report: TickReport) -> None:
        """Replies that may have answered this round were trimmed unread: silence is no evidence."""
        silent = len(self.store.silent_since(round_id))
        self.store.audit("evidence_lost", "", "", now_ms, round=round_id, silent=silent,
                         reason="replies were trimmed from the stream before vmq read them: round not judged")
        report.unjudged.append(round_id)
        log.warning("round=%s not judged: replies were lost before they were read (%d silent)", round_id, silent)

    # ---------------------------------------------------------------- hypervisor events
    def on_domain_event(self, vm: str, host: str, kind: str, event: str, detail: str) -> TickReport:
        """Record a libvirt lifecycle event from ``host``; a crash is judged now, without waiting for T2.

        ``kind`` is a DomainEventKind value (vmq.hypervisor.types.classify), as it came over the wire.
        """
        report = TickReport()
        with self.store.judge_lock(lease_s=self._lease_s, wait_s=max(1.0, self.settings.probe_interval_s)) as acquired:
            now_ms = self.store.time_ms()
            rec = self.store.vm_record(vm)
            if not rec or rec.get("host") != host:
                self.store.audit("domain_event_ignored", vm, host, now_ms, kind=kind, event=event, detail=detail,
                                 reason=f"vm is on {rec.get('host') or 'no host'}" if rec else "unknown vm")
                return report
            status = EVENT_STATUS.get(kind)
            fields: dict[str, object] = {}
            if status is not None:
                fields = {"domain_status": status.value, "domain_reason": detail}
            if kind == DomainEventKind.STARTED:
                fields["booted_at_ms"] = now_ms
            if fields:
                self.store.set_fields(vm, fields)
                rec.update({k: str(v) for k, v in fields.items()})
            self.store.audit("domain_event", vm, host, now_ms, kind=kind, event=event, detail=detail)
            if kind != DomainEventKind.CRASH or not acquired:
                return report
            view = self._views([vm], [rec], now_ms)[0][0][1]
            decision = decide(view, self._policy_for(rec), now_ms)
            evidence = crash_evidence(view, event, detail, self.policy.max_restarts)
            self.verdicts.act(view, rec, decision, evidence, self.store.current_round(), now_ms, report)
        return report

    def _policy_for(self, rec: Record) -> PolicyConfig:
        """The cluster's knobs with this VM's overrides (record fields ``policy.<knob>``) applied."""
        overrides = {k[7:]: v for k, v in rec.items() if k.startswith("policy.")}
        if not overrides:
            return self.policy
        cfg, refused = with_overrides(self.policy, overrides)
        if refused:
            log.warning("vm overrides refused: %s", refused)
        return cfg

    def _views(self, vms: list[str], records: list[Record], now_ms: int) -> tuple[
        list[tuple[int, VmView]], list[str | None], dict[str, int], dict[str, HostContext]
    ]:
        """The policy's views of ``vms`` (skipping removed ones), with their last replies, the restarts in
        flight per host and the hosts' context, all read in a few round trips."""
        window_start = now_ms - int(self.settings.restart_window_s * 1000)
        restarts, last_replies, keyed, suspended = self.store.judge_context(vms, window_start)
        hosts = self.store.host_context((r.get("host", "") for r in records if r.get("host")), now_ms,
                                        self._host_fresh_ms)
        in_flight = self.store.restarting_by_host()
        seen = self.store.last_seen_many(vms)
        views: list[tuple[int, VmView]] = []
        for i, vm in enumerate(vms):
            rec = records[i]
            if not rec:
                continue  # listed in last_round but no record: removed VM
            host = hosts.get(rec.get("host", ""))
            views.append((i, view_of(
                vm, rec, has_key=vm in keyed, host_alive=bool(host and host.alive),
                host_degraded=bool(host and host.degraded),
                host_maintenance=bool(host and host.in_maintenance(now_ms)),
                last_valid_ms=int(seen[i] or 0), restarts_in_window=restarts[i], restarts_suspended=suspended,
                incident_attempts=int(rec.get("attempts") or 0),
                last_restart_ms=int(rec.get("last_restart_ms") or 0),
                host_restarts_in_flight=in_flight.get(rec.get("host", ""), 0))))
        return views, last_replies, in_flight, hosts

    # ---------------------------------------------------------------- judge
    def _judge(self, round_id: int, deadline_ms: int, now_ms: int, report: TickReport,
               gap: ProbingGap | None = None) -> None:
        silent = self.store.silent_since(round_id)
        if not silent:
            end_guard_episodes(self.store, set(), now_ms)
            return
        records = self.store.vm_records(silent)
        views, last_replies, in_flight, hosts = self._views(silent, records, now_ms)
        if gap is not None and gap.reconnected_since_ms:  # after a gap in probing: see probing_gap
            waiting = [view.vm for _, view in views if view.last_valid_ms < gap.reconnected_since_ms]
            views = [(i, view) for i, view in views if view.last_valid_ms >= gap.reconnected_since_ms]
            if waiting:
                self.store.audit("evidence_lost", "", "", now_ms, round=round_id, reason=gap.reason,
                                 not_judged=len(waiting))
                log.warning("round=%s: %d silent VMs not judged: %s", round_id, len(waiting), gap.reason)
        decisions = {view.vm: decide(view, self._policy_for(records[i]), now_ms) for i, view in views}
        # Storm and partition guard: count this round's judged silence per host before acting on any of it.
        silent_by_host: dict[str, int] = {}
        for _, view in views:
            if decisions[view.vm].action is not Action.NONE and view.domain_status is not DomainStatus.CRASHED:
                silent_by_host[view.host] = silent_by_host.get(view.host, 0) + 1
        cluster, by_host = storm_guard(silent_by_host, {h: c.vm_count for h, c in hosts.items()},
                                       self.store.monitored_count(), self.settings.storm_fraction,
                                       self.settings.storm_min_vms)
        record_guard_episodes(self.store, cluster, by_host, silent_by_host, round_id, now_ms)
        answered = self.store.last_rounds(silent)
        held = 0  # restarts the storm/host guard holds this round (vmq.metrics)
        for i, view in views:
            # Decide again with the guard and with the restarts this very round has already dispatched.
            storm = cluster or by_host.get(view.host, "")
            view = replace(view, storm=storm, host_restarts_in_flight=in_flight.get(view.host, 0))
            decision = decide(view, self._policy_for(records[i]), now_ms)
            held += 1 if storm and decision.reasons[-1] == storm else 0
            last = self._ingestor.latest.freshest(view.vm, last_replies[i])
            evidence = silence_evidence(view, round_id, deadline_ms, int(answered[i] or 0), storm, last,
                                        self.policy.max_restarts)
            if self.verdicts.act(view, records[i], decision, evidence, round_id, now_ms, report) and view.host:
                in_flight[view.host] = in_flight.get(view.host, 0) + 1  # the per-host limit counts this one
        if held:
            self.store.incr_stat("storm_holds", held)
