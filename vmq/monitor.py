"""Monitor use cases: send a probe round, ingest replies, judge due rounds, dispatch restarts.

Written against the store's ports and a ``dispatch`` callable, so no Celery or libvirt here. One ``tick``
ingests and judges everything that is due, under the judge lock; any number of timeout workers may call it
and each round is judged exactly once, by arrival times recorded in Redis, however late the tick runs.
Reading the VMs is ``vmq.judge.Judge``; acting on a decision is ``vmq.verdict.Verdicts``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from vmq.codec import WIRE_VERSION, new_nonce
from vmq.config import Settings
from vmq.evidence import ProbingGap, crash_evidence, probing_gap, silence_evidence
from vmq.failover_flow import FailoverFlow
from vmq.housekeeping import (
    end_guard_episodes,
    expire_maintenance,
    note_maintenance_windows,
    record_guard_episodes,
    sweep_hosts,
)
from vmq.ingest import Ingestor, IngestResult, LatestReplies, RejectLog
from vmq.intent import priority as intent_priority
from vmq.judge import Judge
from vmq.model import Action, AuditEvent, DomainEventKind, DomainStatus
from vmq.policy import decide, storm_guard
from vmq.ports import Store
from vmq.verdict import Dispatch, VerdictResult, Verdicts

__all__ = ["DRAIN_MIN_REPLIES", "DUPLICATE_GAP", "EVENT_STATUS", "Monitor", "TickReport"]

log = logging.getLogger(__name__)

#: A beat's round is refused as a duplicate when the latest one went out less than this fraction of T1 ago.
DUPLICATE_GAP = 0.6
#: The beat's probe also ticks when the oldest unjudged deadline passed this many T1 ago (its judge is overdue).
OVERDUE_SHARE = 0.5
#: Guests' replies per round from which a mid-round drain pays (vmq.monitor.Monitor.drain_due).
DRAIN_MIN_REPLIES = 500


def app_reason(checks: object) -> str:
    """The words of an application liveness verdict, from the checks a reply named."""
    names = ", ".join(str(c) for c in checks) if isinstance(checks, list) else "?"
    return f"liveness check(s) {names} failed their threshold in the guest"


#: Guest-watchdog actions that leave the hung guest as it was: vmq judges it at once (the others restart it).
WATCHDOG_JUDGED = frozenset({"none", "pause", "debug", "injectnmi"})

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
    """What one tick did (for logs, tasks' return values and benchmarks); folded by the Monitor alone."""

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

    def add_ingest(self, result: IngestResult) -> bool:
        """Fold one ingest in; returns whether it completed (False: the lease ran out)."""
        self.ingested += result.ingested
        self.valid += result.valid
        for reason, count in result.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        self.healed += result.healed
        self.lost += result.lost
        return result.complete

    def add_verdict(self, vm: str, result: VerdictResult) -> None:
        """Fold one verdict in."""
        if result.flagged:
            self.flagged.append(vm)
        if result.dispatched:
            self.dispatched.append(vm)


class Monitor:
    """The central half of vmq: probe, ingest, judge, dispatch."""

    def __init__(self, store: Store, settings: Settings, dispatch: Dispatch,
                 failover: FailoverFlow | None = None) -> None:
        self.store = store
        self.failover = failover  # None: a dead host's VMs stay unreachable (no fence, no start elsewhere)
        self.settings = settings
        self.judge = Judge(store, settings)
        self.verdicts = Verdicts(store, settings, dispatch)
        self._t2_ms = int(settings.reply_timeout_s * 1000)
        self._ingestor = Ingestor(store, settings.max_reply_bytes,
                                  RejectLog(settings.probe_interval_s),  # one line per VM and reason per T1
                                  LatestReplies(int(settings.reply_save_interval_s * 1000)),
                                  int(settings.guest_maintenance_max_s * 1000))
        self._windows_noted = False  # note_maintenance_windows ran in this process
        self._replies_added: int | None = None  # the guests' stream's entries-added when drain_due last read it

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
        harmless. The gap is more than half of T1, so two beats in antiphase cannot both get rounds through,
        and less than T1 by enough to absorb a probe task that starts late.
        """
        round_id, sent_ms, started = self._start_round(int(DUPLICATE_GAP * self.settings.probe_interval_s * 1000))
        if not started:
            log.debug("probe refused: round=%s went out at %s (another beat)", round_id, sent_ms)
            return None
        # Each round's judge task ticks at its deadline; the probe ticks only to catch up on a round whose judge
        # is overdue (a judge task lost, or a worker that was down): one tick per round, not two.
        upcoming = self.store.rounds.next_deadline()
        overdue = upcoming is not None and upcoming < sent_ms - int(OVERDUE_SHARE * self.settings.probe_interval_s * 1000)
        return round_id, sent_ms, self.tick() if overdue else TickReport()

    def drain_due(self) -> bool:
        """Whether a drain half a T1 into the round pays: the guests' stream grew by DRAIN_MIN_REPLIES or more
        since this process last asked (the burst of ``redis``-path replies is then verified before any deadline).
        A cluster of relayed VMs, whose hosts write one entry per round, skips it: one task per round less."""
        added = self.store.replies.entries_added()
        previous, self._replies_added = self._replies_added, added
        return added is None or previous is None or added - previous >= DRAIN_MIN_REPLIES

    def _start_round(self, min_gap_ms: int) -> tuple[int, int, bool]:
        round_id, sent_ms, started = self.store.rounds.start_round(new_nonce(), self._t2_ms,
                                                                   self.settings.rounds_kept, WIRE_VERSION,
                                                                   min_gap_ms)
        if started:
            log.debug("probe round=%s sent_ms=%s", round_id, sent_ms)
        return round_id, sent_ms, started

    # ---------------------------------------------------------------- tick
    def tick(self) -> TickReport:
        """Ingest replies and judge every round whose deadline has passed (idempotent, lock-serialised)."""
        report = TickReport()
        store = self.store
        with store.rounds.judge_lock(lease_s=self.judge.lease_s, wait_s=self.settings.probe_interval_s) as lease:
            if not lease:
                report.locked_out = True
                return report
            now_ms = store.clock.time_ms()
            overview = sweep_hosts(store, now_ms)
            if self.failover is not None:
                self.failover.on_tick(overview, now_ms)
            if not self._windows_noted:  # once per process: windows from before they were noted
                if not note_maintenance_windows(store, lease.renew):
                    report.locked_out = True
                    return report
                self._windows_noted = True
            expire_maintenance(store, now_ms)
            sent_ms: dict[int, int] | None = None
            for round_id, deadline_ms in store.rounds.due_rounds(now_ms):
                # Renewed before each round: once it ran out, another judge carries on from here.
                if not lease.renew() or not report.add_ingest(self._ingestor.ingest(deadline_ms, lease)):
                    report.locked_out = True
                    return report
                now_ms = store.clock.time_ms()  # the verdict's time: after its evidence is in
                sent_ms = store.rounds.round_sent_times() if sent_ms is None else sent_ms
                gap = probing_gap(round_id, sent_ms, now_ms, int(self.settings.probe_interval_s * 1000),
                                  self._t2_ms)
                if self._replies_lost_for(round_id, deadline_ms):
                    self._unjudged(round_id, now_ms, report)
                elif gap.reason and not gap.reconnected_since_ms:
                    store.audit.append(AuditEvent.EVIDENCE_LOST, "", "", now_ms, round=round_id, reason=gap.reason)
                    log.warning("round=%s not judged: %s", round_id, gap.reason)
                else:
                    self._judge(round_id, deadline_ms, now_ms, report, gap)
                store.rounds.finish_round(round_id)
                report.judged_rounds.append(round_id)
            # Replies before the next deadline are final for it: ingest them now so recoveries show at once.
            upcoming = store.rounds.next_deadline()
            up_to = now_ms - 1 if upcoming is None else min(now_ms - 1, upcoming)
            if not report.add_ingest(self._ingestor.ingest(up_to, lease)):
                report.locked_out = True
        return report

    def _replies_lost_for(self, round_id: int, deadline_ms: int) -> bool:
        """True when replies trimmed unread may have answered this round (they arrived after it was sent)."""
        lost_until = self.store.replies.evidence_lost_until()
        if not lost_until:
            return False
        sent_ms = self.store.rounds.round_sent_ms(round_id)
        return lost_until >= (deadline_ms - self._t2_ms if sent_ms is None else sent_ms)

    def _unjudged(self, round_id: int, now_ms: int, report: TickReport) -> None:
        """Replies that may have answered this round were trimmed unread: silence is no evidence."""
        silent = len(self.store.replies.silent_since(round_id))
        self.store.audit.append(AuditEvent.EVIDENCE_LOST, "", "", now_ms, round=round_id, silent=silent,
                                reason="replies were trimmed from the stream before vmq read them: round not judged")
        report.unjudged.append(round_id)
        log.warning("round=%s not judged: replies were lost before they were read (%d silent)", round_id, silent)

    # ---------------------------------------------------------------- hypervisor events
    def on_domain_event(self, vm: str, host: str, kind: str, event: str, detail: str) -> TickReport:
        """Record a libvirt domain event from ``host``; a crash or a guest watchdog is judged now, without waiting
        for T2; a disk I/O error's reason stays in the domain's reason (the policy flags such a pause).

        ``kind`` is a DomainEventKind value (vmq.hypervisor.types.classify), as it came over the wire.
        """
        report = TickReport()
        store = self.store
        with store.rounds.judge_lock(lease_s=self.judge.lease_s,
                                     wait_s=max(1.0, self.settings.probe_interval_s)) as acquired:
            now_ms = store.clock.time_ms()
            rec = store.vms.record(vm)
            if not rec.exists or rec.host != host:
                store.audit.append(AuditEvent.DOMAIN_EVENT_IGNORED, vm, host, now_ms, kind=kind, event=event,
                                   detail=detail,
                                   reason=f"vm is on {rec.host or 'no host'}" if rec.exists else "unknown vm")
                return report
            previous_reason = rec.domain_reason
            status = EVENT_STATUS.get(kind)
            fields: dict[str, object] = {}
            if status is not None:
                fields = {"domain_status": status.value, "domain_reason": detail}
                rec = replace(rec, domain_status=status, domain_reason=detail)
            if kind == DomainEventKind.PAUSED and detail == "ioerror" and previous_reason.startswith("ioerror:"):
                fields["domain_reason"] = previous_reason  # keep the I/O error's reason (ioerror:enospc)
                rec = replace(rec, domain_reason=previous_reason)
            if kind == DomainEventKind.IO_ERROR:  # the pause that usually follows keeps this reason
                fields = {"domain_reason": f"ioerror:{detail}"}
                rec = replace(rec, domain_reason=f"ioerror:{detail}")
            if kind == DomainEventKind.STARTED or (kind == DomainEventKind.WATCHDOG and detail == "reset"):
                fields["booted_at_ms"] = now_ms  # a watchdog reset is QEMU's own restart: the grace starts over
                rec = replace(rec, booted_at_ms=now_ms)
            if fields:
                store.vms.set_fields(vm, fields)
            store.audit.append(AuditEvent.DOMAIN_EVENT, vm, host, now_ms, kind=kind, event=event, detail=detail)
            # Judged at once: a crash (panics included), and a guest watchdog whose action left the guest as it
            # was (none, pause, debug, inject-nmi); QEMU itself handled reset, poweroff and shutdown.
            watchdog = detail if kind == DomainEventKind.WATCHDOG and detail in WATCHDOG_JUDGED else ""
            if not (kind == DomainEventKind.CRASH or watchdog) or not acquired:
                return report
            view = replace(self.judge.view(rec, now_ms), watchdog=watchdog)
            decision = decide(view, self.judge.policy_for(rec), now_ms)
            evidence = crash_evidence(view, event, detail, self.judge.policy.max_restarts)
            report.add_verdict(vm, self.verdicts.act(view, rec, decision, evidence,
                                                     store.rounds.current_round(), now_ms))
        return report

    # ---------------------------------------------------------------- judge
    def _judge(self, round_id: int, deadline_ms: int, now_ms: int, report: TickReport,
               gap: ProbingGap | None = None) -> None:
        store, judge = self.store, self.judge
        silent = store.replies.silent_since(round_id)
        # Covered VMs whose host's entry for this round is not in: silent, their relay did not finish the round.
        late = store.replies.covered_late(round_id)
        silent += sorted(set(late) - set(silent))
        # VMs that answer but whose replies say an application liveness check failed: judged as silence is.
        sick = {vm: v for vm, v in store.vms.app_unhealthy().items() if int(v.get("round", 0)) >= round_id - 2}
        silent += sorted(set(sick) - set(silent))
        if not silent:
            end_guard_episodes(store, set(), now_ms)
            return
        inputs = judge.inputs(store.vms.records(silent), now_ms, round_id)
        judged, in_flight = inputs.judged, inputs.in_flight
        judged = [replace(j, view=replace(j.view, app_unhealthy=app_reason(sick[j.view.vm]["checks"])))
                  if j.view.vm in sick else j for j in judged]
        if gap is not None and gap.reconnected_since_ms:  # after a gap in probing: see probing_gap
            waiting = [j.view.vm for j in judged if j.view.last_valid_ms < gap.reconnected_since_ms]
            judged = [j for j in judged if j.view.last_valid_ms >= gap.reconnected_since_ms]
            if waiting:
                store.audit.append(AuditEvent.EVIDENCE_LOST, "", "", now_ms, round=round_id, reason=gap.reason,
                                   not_judged=len(waiting))
                log.warning("round=%s: %d silent VMs not judged: %s", round_id, len(waiting), gap.reason)
        decisions = {j.view.vm: decide(j.view, judge.policy_for(j.record), now_ms) for j in judged}
        # Storm and partition guard: count this round's judged silence per host before acting on any of it.
        silent_by_host: dict[str, int] = {}
        for j in judged:
            if decisions[j.view.vm].action is not Action.NONE and j.view.domain_status is not DomainStatus.CRASHED:
                silent_by_host[j.view.host] = silent_by_host.get(j.view.host, 0) + 1
        # The cluster's size: VMs with a key, or (more, when agent VMs answer without one) the VMs that answered
        # this round plus those judged silent in it.
        # (The app-unhealthy VMs answered this round: counted among those, not twice.)
        # (Covered VMs of a late host are counted as answered by their score and are judged: counted once.)
        expected = max(store.keyring.monitored_count(),
                       store.replies.answered_count(round_id) - len(late)
                       + sum(j.view.vm not in sick for j in judged))
        cluster, by_host = storm_guard(silent_by_host, {h: c.vm_count for h, c in inputs.hosts.items()},
                                       expected, self.settings.storm_fraction, self.settings.storm_min_vms)
        record_guard_episodes(store, cluster, by_host, silent_by_host, round_id, now_ms)
        answered = dict(zip(silent, store.replies.last_rounds(silent)))
        held = 0  # restarts the storm/host guard holds this round (vmq.metrics)
        # Where restarts compete (the per-host limit counts this round's own), the operators' priority goes first.
        for j in sorted(judged, key=lambda j: (-intent_priority(j.record.intent), j.view.vm)):
            # Decide again with the guard and with the restarts this very round has already dispatched.
            storm = cluster or by_host.get(j.view.host, "")
            view = replace(j.view, storm=storm, host_restarts_in_flight=in_flight.get(j.view.host, 0))
            decision = decide(view, judge.policy_for(j.record), now_ms)
            held += 1 if storm and decision.reasons[-1] == storm else 0
            last = self._ingestor.latest.freshest(view.vm, j.last_reply)
            evidence = silence_evidence(view, round_id, deadline_ms, int(answered[view.vm] or 0), storm, last,
                                        judge.policy.max_restarts)
            if view.vm in sick:
                evidence["app_unhealthy"] = sick[view.vm]
            result = self.verdicts.act(view, j.record, decision, evidence, round_id, now_ms)
            report.add_verdict(view.vm, result)
            if result.dispatched and view.host:
                in_flight[view.host] = in_flight.get(view.host, 0) + 1  # the per-host limit counts this one
        if held:
            store.stats.incr_stat("storm_holds", held)
