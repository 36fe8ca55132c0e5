"""The operator's restart (`vmq restart VM [--force]`): the same path as an automatic one.

The request runs in the monitor worker under the judge lock, is decided by ``policy.decide_manual`` (the
automatic guards minus the ones about silence; ``force`` skips the budget), opens an incident like a
verdict does (``-> faulty``, event ``restart_requested``) and is dispatched through the monitor's
``Verdicts.send_restart``: the same ``host.<name>`` queue, claim, budget count and audit trail.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace

from vmq import lifecycle
from vmq.model import Action, AuditEvent, VmState
from vmq.monitor import Monitor
from vmq.policy import decide_manual
from vmq.routing import host_queue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManualOutcome:
    """What became of an operator's restart request (JSON-serialisable with ``asdict``)."""

    vm: str
    outcome: str  # "dispatched" or "refused"
    reasons: list[str] = field(default_factory=list)
    host: str = ""
    queue: str = ""
    incident: str = ""
    generation: int = 0


def manual_restart(monitor: Monitor, vm: str, force: bool = False, requested_by: str = "") -> ManualOutcome:
    """Decide and, if allowed, dispatch an operator's restart of ``vm``; every outcome is audited."""
    store, judge = monitor.store, monitor.judge
    wait_s = max(1.0, monitor.settings.probe_interval_s)
    with store.rounds.judge_lock(lease_s=judge.lease_s, wait_s=wait_s) as acquired:
        if not acquired:
            return ManualOutcome(vm, "refused", ["the judge is busy (lock held): try again"])
        now_ms = store.clock.time_ms()
        rec = store.vms.record(vm)
        if not rec.exists:
            return ManualOutcome(vm, "refused", [f"unknown VM {vm}"])
        view = judge.view(rec, now_ms)
        decision = decide_manual(view, judge.policy_for(rec), force)
        reasons = list(decision.reasons)
        base: dict[str, object] = {"host": view.host, "reasons": reasons, "action": decision.action.value,
                                   "manual": True, "force": force, "requested_by": requested_by}
        if decision.action is not Action.RESTART:
            store.audit.append(AuditEvent.RESTART_REFUSED, vm, view.host, now_ms, reasons=reasons, force=force,
                               requested_by=requested_by)
            log.info("vm=%s manual restart refused: %s", vm, reasons[0])
            return ManualOutcome(vm, "refused", reasons, host=view.host)
        generation, incident = rec.generation, rec.incident
        text = "; ".join(reasons)
        if view.state is VmState.FAULTY:
            store.audit.append(AuditEvent.RESTART_REQUESTED, vm, view.host, now_ms, incident=incident, **base)
        else:
            incident = f"{vm}:manual:{uuid.uuid4().hex[:8]}"
            result = lifecycle.open_incident(
                store.vms, rec, now_ms, incident, now_ms, AuditEvent.RESTART_REQUESTED, base,
                {"decision": text, "decision_action": decision.action.value, "decision_grounds": text,
                 "attempts": 0})
            if not result.applied:
                return ManualOutcome(vm, "refused", [f"its state changed meanwhile (now {result.previous}): try again"],
                                     host=view.host)
            generation = result.generation
            view = replace(view, state=VmState.FAULTY, incident_attempts=0)
        if not monitor.verdicts.send_restart(view, decision, incident, generation, store.rounds.current_round(),
                                             now_ms, base, manual=True):
            return ManualOutcome(vm, "refused", ["the broker refused the restart task (see the monitor log)"],
                                 host=view.host, incident=incident)
        return ManualOutcome(vm, "dispatched", reasons, host=view.host, queue=host_queue(view.host),
                             incident=incident, generation=store.vms.record(vm).generation)
