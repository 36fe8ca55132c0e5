"""Carrying out the judge's decisions: the evidence a verdict records, and acting on it.

A decision (vmq.policy.decide) becomes a `faulty` transition that opens or continues an incident, a
`failed` one that escalates, or a restart request handed to ``dispatch`` (a Celery task in production).
Every change is a compare-and-set on the VM's generation (vmq/lua/transition.lua): when another judge moved
the VM first, its verdict stands and this one does nothing. Written against ``RedisStore`` and two
callables, so no Celery or libvirt here; ``vmq.monitor.Monitor`` and ``vmq.manual`` drive it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmq.config import Settings
from vmq.model import Action, Decision, DomainStatus, VmState, VmView
from vmq.routing import host_queue
from vmq.store.redis import Record, RedisStore

if TYPE_CHECKING:
    from vmq.monitor import TickReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartRequest:
    """What the monitor asks a host worker to do; JSON-serialisable (``asdict``)."""

    vm: str
    host: str
    generation: int
    incident: str
    round: int
    issued_ms: int
    hard: bool = False  # destroy + create instead of reset (second rung of the ladder)
    crashed: bool = False  # the hypervisor reported a crash: no activity check needed
    manual: bool = False  # an operator asked (`vmq restart`): no activity check either
    expires_ms: int = 0  # Redis ms after which the host must not act on it (the verdict is stale); 0: never


def silence_evidence(view: VmView, round_id: int, deadline_ms: int, last_answered_round: int, storm: str,
                     last_reply: str | None, max_restarts: int) -> dict[str, object]:
    """What a verdict on a silent VM records (pure): the round it missed, its domain, budget and guards, and
    its last valid reply (JSON text, or None) decoded."""
    return {
        "round": round_id, "deadline_ms": deadline_ms, "last_valid_ms": view.last_valid_ms,
        "rounds_missed": round_id - last_answered_round,
        "domain": {"status": view.domain_status.value, "reason": view.domain_reason},
        "budget": {"used": view.restarts_in_window, "max": max_restarts,
                   "attempts_this_incident": view.incident_attempts},
        "guards": {"host_alive": view.host_alive, "host_degraded": view.host_degraded,
                   "kill_switch": view.restarts_suspended, "storm": storm,
                   "host_restarts_in_flight": view.host_restarts_in_flight},
        "last_reply": json.loads(last_reply) if last_reply else None}


def crash_evidence(view: VmView, event: str, detail: str, max_restarts: int) -> dict[str, object]:
    """What a verdict on a crash reported by libvirt records (pure): the event, the last reply's time, budget."""
    return {"hypervisor_event": {"event": event, "detail": detail},
            "last_valid_ms": view.last_valid_ms,
            "budget": {"used": view.restarts_in_window, "max": max_restarts}}


class Verdicts:
    """Acts on decisions: transitions, audit events, escalations and restart dispatch.

    ``dispatch`` sends a restart request to its host's queue; ``notify`` queues an escalation (a webhook POST
    with retries), or is None. Both may raise: a refused dispatch gives the verdict back to the next round, a
    failed notification is logged. Callers hold the judge lock.
    """

    def __init__(self, store: RedisStore, settings: Settings, dispatch: Callable[[RestartRequest], None],
                 notify: Callable[[dict[str, object]], None] | None = None) -> None:
        self.store = store
        self.dispatch = dispatch
        self.notify = notify
        self._restart_window_ms = int(settings.restart_window_s * 1000)
        self._task_expires_ms = int(settings.restart_task_expires_s * 1000)

    def act(self, view: VmView, rec: Record, decision: Decision, evidence: dict[str, object],
            round_id: int, now_ms: int, report: TickReport) -> bool:
        """Carry out one decision on ``view`` (``rec`` is its record as read); True when a restart was
        dispatched. A VM not yet `faulty` becomes so (opening an incident) unless the decision is NONE."""
        reasons = "; ".join(decision.reasons)
        if decision.action is Action.NONE:
            if rec.get("decision") != reasons:
                self.store.set_fields(view.vm, {"decision": reasons, "decision_action": decision.action.value})
            return False
        generation = int(rec.get("generation") or 0)
        incident = rec.get("incident", "")
        grounds = "; ".join((decision.action.value, *decision.reasons[1:]))
        base = {"host": view.host, "reasons": list(decision.reasons), "action": decision.action.value}
        if view.state is not VmState.FAULTY:
            # unknown/healthy/recovering/restarting -> faulty: open (or continue) the incident.
            opened_ms = int(rec.get("incident_opened_ms") or now_ms) if incident else now_ms
            incident_was_open = bool(incident)
            incident = incident or f"{view.vm}:{round_id}:{uuid.uuid4().hex[:8]}"
            ok, _, generation = self.store.transition(
                view.vm, [view.state], VmState.FAULTY, now_ms, {"type": "faulty", "incident": incident,
                                                                   **base, "evidence": evidence},
                fields={"incident": incident, "incident_opened_ms": opened_ms, "decision": reasons,
                        "decision_action": decision.action.value, "decision_grounds": grounds},
                expected_generation=generation,
            )
            if not ok:
                return False  # someone else moved it: their verdict stands
            report.flagged.append(view.vm)
            if not incident_was_open:  # a new incident: count it and time its detection (vmq.metrics)
                self.store.record_fault(view.last_valid_ms, now_ms)
            log.warning("vm=%s host=%s round=%s faulty: %s", view.vm, view.host, round_id, reasons)
        else:
            # The first reason states the silence and changes every round; the grounds after it do not,
            # so only a change of grounds is an audit event.
            if rec.get("decision_grounds") != grounds:
                self.store.audit("decision", view.vm, view.host, now_ms, incident=incident,
                                 reasons=list(decision.reasons), action=decision.action.value,
                                 evidence=evidence)
            self.store.set_fields(view.vm, {"decision": reasons, "decision_action": decision.action.value,
                                            "decision_grounds": grounds})
        if decision.action is Action.FAIL:
            self.fail(view, incident, generation, now_ms, base, evidence)
            return False
        if decision.action is Action.RESTART:
            return self.send_restart(view, decision, incident, generation, round_id, now_ms, base, report)
        return False

    def fail(self, view: VmView, incident: str, generation: int, now_ms: int, base: dict[str, object],
             evidence: dict[str, object]) -> None:
        """`faulty` -> `failed` (if still at ``generation``), then escalate: audit event and ``notify``."""
        ok, _, _ = self.store.transition(view.vm, [VmState.FAULTY], VmState.FAILED, now_ms,
                                         {"type": "failed", "incident": incident, **base},
                                         expected_generation=generation)
        if not ok:
            return
        log.error("vm=%s failed: %s", view.vm, "; ".join(base["reasons"]))  # type: ignore[arg-type]
        escalation: dict[str, object] = {"type": "escalated", "vm": view.vm, "host": view.host,
                                         "incident": incident, "time_ms": now_ms, "reasons": base["reasons"],
                                         "evidence": evidence}
        self.store.audit("escalated", view.vm, view.host, now_ms, incident=incident, reasons=base["reasons"])
        if self.notify is not None:
            try:
                self.notify(escalation)  # a Celery task with retries: never blocks the judge
            except Exception:
                log.exception("vm=%s escalation could not be queued", view.vm)

    def send_restart(self, view: VmView, decision: Decision, incident: str, generation: int, round_id: int,
                     now_ms: int, base: dict[str, object], report: TickReport, manual: bool = False) -> bool:
        """`faulty` -> `restarting` (if still at ``generation``; counted in the budget), then hand the request
        to ``dispatch``; True when it was sent. A refused dispatch is undone (back to `faulty`, budget entry
        taken back) for the next round to decide again."""
        queue = host_queue(view.host)
        ok, _, new_gen = self.store.transition(
            view.vm, [VmState.FAULTY], VmState.RESTARTING, now_ms,
            {"type": "restart_dispatched", "incident": incident, "queue": queue, "hard": decision.hard, **base},
            fields={"attempts": view.incident_attempts + 1, "last_restart_ms": now_ms},
            expected_generation=generation, count_restart=True,
            restart_window_ms=self._restart_window_ms,
        )
        if not ok:
            return False
        request = RestartRequest(view.vm, view.host, new_gen, incident, round_id, now_ms, hard=decision.hard,
                                 crashed=view.domain_status is DomainStatus.CRASHED, manual=manual,
                                 expires_ms=now_ms + self._task_expires_ms)
        try:
            self.dispatch(request)
        except Exception as exc:  # the broker refused: give the verdict back to the next round
            log.exception("vm=%s restart dispatch to %s failed", view.vm, queue)
            self.store.transition(view.vm, [VmState.RESTARTING], VmState.FAULTY, now_ms,
                                  {"type": "dispatch_failed", "incident": incident, "host": view.host,
                                   "error": str(exc)},
                                  fields={"attempts": view.incident_attempts}, expected_generation=new_gen)
            self.store.uncount_restart(view.vm, new_gen, now_ms)  # nothing was restarted: budget untouched
            return False
        report.dispatched.append(view.vm)
        self.store.incr_stat("restarts_dispatched")
        log.warning("vm=%s restart dispatched to %s incident=%s hard=%s", view.vm, queue, incident, decision.hard)
        return True
