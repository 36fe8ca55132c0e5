"""Carrying out the judge's decisions: a `faulty` verdict that opens or continues an incident, a `failed` one
that escalates, or a restart request handed to ``dispatch`` (a Celery task in production).

Every change is a compare-and-set on the VM's generation (vmq.lifecycle): when another judge moved the VM
first, its verdict stands and this one does nothing. Callers hold the judge lock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from vmq import lifecycle
from vmq.config import Settings
from vmq.model import Action, AuditEvent, Decision, DomainStatus, RestartRequest, VmRecord, VmState, VmView
from vmq.ports import Store
from vmq.routing import host_queue

log = logging.getLogger(__name__)

Dispatch = Callable[[RestartRequest], None]


@dataclass(frozen=True)
class VerdictResult:
    """What acting on one decision did: the VM became `faulty` now, and/or a restart was dispatched."""

    flagged: bool = False
    dispatched: bool = False


class Verdicts:
    """Acts on decisions: transitions, audit events, escalations and restart dispatch.

    ``dispatch`` sends a restart request to its host's queue; it may raise: a refused dispatch gives the verdict
    back to the next round. Escalations reach operators as audit events (``escalated``), which the notifier
    turns into webhook calls outside the judge (vmq.notifications).
    """

    def __init__(self, store: Store, settings: Settings, dispatch: Dispatch) -> None:
        self.store = store
        self.dispatch = dispatch
        self._restart_window_ms = int(settings.restart_window_s * 1000)
        self._task_expires_ms = int(settings.restart_task_expires_s * 1000)

    def act(self, view: VmView, rec: VmRecord, decision: Decision, evidence: dict[str, object],
            round_id: int, now_ms: int) -> VerdictResult:
        """Carry out one decision on ``view`` (``rec`` is its record as read). A VM not yet `faulty` becomes
        so (opening an incident) unless the decision is NONE."""
        store = self.store
        reasons = "; ".join(decision.reasons)
        if decision.action is Action.NONE:
            if rec.decision != reasons:
                store.vms.set_fields(view.vm, {"decision": reasons, "decision_action": decision.action.value})
            return VerdictResult()
        generation = rec.generation
        incident = rec.incident
        grounds = "; ".join((decision.action.value, *decision.reasons[1:]))
        base = {"host": view.host, "reasons": list(decision.reasons), "action": decision.action.value}
        flagged = False
        if view.state is not VmState.FAULTY:
            opened_ms = (rec.incident_opened_ms or now_ms) if incident else now_ms
            incident_was_open = bool(incident)
            incident = incident or f"{view.vm}:{round_id}:{uuid.uuid4().hex[:8]}"
            result = lifecycle.open_incident(
                store.vms, rec, now_ms, incident, opened_ms, AuditEvent.FAULTY, {**base, "evidence": evidence},
                {"decision": reasons, "decision_action": decision.action.value, "decision_grounds": grounds})
            if not result.applied:
                return VerdictResult()  # someone else moved it: their verdict stands
            generation, flagged = result.generation, True
            if not incident_was_open:  # a new incident: count it and time its detection (vmq.metrics)
                store.stats.record_fault(view.last_valid_ms, now_ms)
            log.warning("vm=%s host=%s round=%s faulty: %s", view.vm, view.host, round_id, reasons)
        else:
            # The first reason states the silence and changes every round; the grounds after it do not,
            # so only a change of grounds is an audit event.
            if rec.decision_grounds != grounds:
                store.audit.append(AuditEvent.DECISION, view.vm, view.host, now_ms, incident=incident,
                                   reasons=list(decision.reasons), action=decision.action.value, evidence=evidence)
            store.vms.set_fields(view.vm, {"decision": reasons, "decision_action": decision.action.value,
                                           "decision_grounds": grounds})
        if decision.action is Action.FAIL:
            self.fail(view, rec, incident, generation, now_ms, base, evidence)
            return VerdictResult(flagged)
        if decision.action is Action.RESTART:
            sent = self.send_restart(view, decision, incident, generation, round_id, now_ms, base)
            return VerdictResult(flagged, sent)
        return VerdictResult(flagged)

    def fail(self, view: VmView, rec: VmRecord, incident: str, generation: int, now_ms: int,
             base: dict[str, object], evidence: dict[str, object]) -> None:
        """`faulty` -> `failed` (if still at ``generation``), then escalate: the ``escalated`` audit event, which
        the notifier sends (class ``failed``)."""
        if not lifecycle.fail(self.store.vms, rec, generation, now_ms, incident, base).applied:
            return
        log.error("vm=%s failed: %s", view.vm, "; ".join(base["reasons"]))  # type: ignore[arg-type]
        self.store.audit.append(AuditEvent.ESCALATED, view.vm, view.host, now_ms, incident=incident,
                                reasons=base["reasons"], evidence=evidence)

    def send_restart(self, view: VmView, decision: Decision, incident: str, generation: int, round_id: int,
                     now_ms: int, base: dict[str, object], manual: bool = False) -> bool:
        """`faulty` -> `restarting` (if still at ``generation``; counted in the budget), then hand the request
        to ``dispatch``; True when it was sent. A refused dispatch is undone (back to `faulty`, budget entry
        taken back) for the next round to decide again."""
        store, queue = self.store, host_queue(view.host)
        result = lifecycle.dispatch_restart(store.vms, view.vm, generation, now_ms, incident, queue, decision.hard,
                                            view.incident_attempts + 1, self._restart_window_ms, base)
        if not result.applied:
            return False
        request = RestartRequest(view.vm, view.host, result.generation, incident, round_id, now_ms,
                                 hard=decision.hard, crashed=view.domain_status is DomainStatus.CRASHED,
                                 manual=manual, expires_ms=now_ms + self._task_expires_ms)
        try:
            self.dispatch(request)
        except Exception as exc:  # the broker refused: give the verdict back to the next round
            log.exception("vm=%s restart dispatch to %s failed", view.vm, queue)
            lifecycle.undo_dispatch(store.vms, view.vm, result.generation, now_ms, incident, view.host, str(exc),
                                    view.incident_attempts)
            return False
        store.stats.incr_stat("restarts_dispatched")
        log.warning("vm=%s restart dispatched to %s incident=%s hard=%s", view.vm, queue, incident, decision.hard)
        return True
