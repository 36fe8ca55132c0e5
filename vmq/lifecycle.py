"""The VM lifecycle: every named transition of a VM's state, each a compare-and-set with its audit event.

The state machine itself (which moves are legal) is ``vmq.policy.TRANSITIONS``; the judge, the verdicts, the
host worker and the operator's commands all move a VM through the functions here, so each transition's event
and fields are written once. Every function returns the store's ``TransitionResult``: ``applied`` False means
another actor moved the VM first (its move stands).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vmq.model import AuditEvent, Transition, TransitionResult, VmRecord, VmState
from vmq.policy import ANSWER_HEALS
from vmq.ports import VmRecords

#: States an operator may clear back to `unknown`.
CLEARABLE = (VmState.FAILED, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED)
#: Reset fields of a VM whose incident is over.
_NO_INCIDENT = {"incident": "", "decision": ""}


def _move(vms: VmRecords, rec: VmRecord, sources: Iterable[VmState], target: VmState, now_ms: int,
          event_type: AuditEvent, event: Mapping[str, Any], fields: Mapping[str, Any] | None = None,
          any_generation: bool = False, **options: Any) -> TransitionResult:
    spec = Transition(rec.vm, tuple(sources), target, now_ms, {"type": event_type.value, **event}, fields or {},
                      None if any_generation else rec.generation, **options)
    return vms.transition(spec)


# ---------------------------------------------------------------------- the judge's verdicts
def open_incident(vms: VmRecords, rec: VmRecord, now_ms: int, incident: str, opened_ms: int,
                  event_type: AuditEvent, event: Mapping[str, Any], decision: Mapping[str, Any]) -> TransitionResult:
    """unknown/healthy/recovering/restarting -> `faulty`, opening (or continuing) ``incident``: ``event_type``
    is FAULTY for a verdict, RESTART_REQUESTED for an operator's restart; ``decision`` holds the decision
    fields recorded with it."""
    return _move(vms, rec, [rec.state], VmState.FAULTY, now_ms, event_type, {"incident": incident, **event},
                 {"incident": incident, "incident_opened_ms": opened_ms, **decision})


def fail(vms: VmRecords, rec: VmRecord, generation: int, now_ms: int, incident: str,
         event: Mapping[str, Any]) -> TransitionResult:
    """`faulty` -> `failed` at ``generation``: the budget or ladder is exhausted; left alone until cleared."""
    return vms.transition(Transition(rec.vm, (VmState.FAULTY,), VmState.FAILED, now_ms,
                                     {"type": AuditEvent.FAILED.value, "incident": incident, **event},
                                     expected_generation=generation))


def dispatch_restart(vms: VmRecords, vm: str, generation: int, now_ms: int, incident: str, queue: str,
                     hard: bool, attempts: int, restart_window_ms: int, event: Mapping[str, Any]) -> TransitionResult:
    """`faulty` -> `restarting` at ``generation``, counted in the restart budget: attempt ``attempts``."""
    return vms.transition(Transition(
        vm, (VmState.FAULTY,), VmState.RESTARTING, now_ms,
        {"type": AuditEvent.RESTART_DISPATCHED.value, "incident": incident, "queue": queue, "hard": hard, **event},
        {"attempts": attempts, "last_restart_ms": now_ms}, generation, count_restart=True,
        restart_window_ms=restart_window_ms))


def undo_dispatch(vms: VmRecords, vm: str, generation: int, now_ms: int, incident: str, host: str, error: str,
                  attempts: int) -> TransitionResult:
    """`restarting` -> `faulty`: the broker refused the restart task, and its budget entry is taken back."""
    result = vms.transition(Transition(
        vm, (VmState.RESTARTING,), VmState.FAULTY, now_ms,
        {"type": AuditEvent.DISPATCH_FAILED.value, "incident": incident, "host": host, "error": error},
        {"attempts": attempts}, generation))
    vms.uncount_restart(vm, generation, now_ms)
    return result


def heal(rec: VmRecord, round_id: int, arrival_ms: int, boot_id: str) -> Transition | None:
    """The transition a valid reply makes (-> `healthy`, closing any incident), or None when the VM's state
    does not heal on an answer (pure: batched by the caller with ``transition_many``)."""
    if rec.state not in ANSWER_HEALS:
        return None
    if rec.state is VmState.RECOVERING and arrival_ms < rec.booted_at_ms:
        return None  # it reached Redis before libvirt's restart was recorded: the old boot's, not the new one's
    incident = rec.incident
    event: dict[str, object] = {"type": (AuditEvent.RECOVERED if incident else AuditEvent.HEALTHY).value,
                                "host": rec.host, "round": round_id, "boot_id": boot_id,
                                "previous_boot_id": rec.boot_id}
    if incident:
        opened = rec.incident_opened_ms or arrival_ms
        event["incident"] = incident
        event["recovered_after_s"] = round((arrival_ms - opened) / 1000.0, 3)
        # An unclaimed `restarting` attempt that heals never reached libvirt; a claimed one whose worker
        # never reported (its claim's hold ended) did if the guest booted again.
        event["restarted"] = rec.state is VmState.RECOVERING or (
            rec.state is VmState.RESTARTING and bool(rec.claim) and boot_id != rec.boot_id)
    return Transition(rec.vm, (rec.state,), VmState.HEALTHY, arrival_ms, event,
                      fields={"incident": "", "boot_id": boot_id, "decision": "", "decision_action": "",
                              "decision_grounds": "", "attempts": 0},
                      expected_generation=rec.generation)


# ---------------------------------------------------------------------- hosts coming and going
def mark_unreachable(vms: VmRecords, rec: VmRecord, now_ms: int, host: str, reason: str) -> TransitionResult:
    """-> `unreachable`: the VM's host is down; nothing is judged or restarted there."""
    return _move(vms, rec, [rec.state], VmState.UNREACHABLE, now_ms, AuditEvent.UNREACHABLE,
                 {"host": host, "reason": reason}, {"decision": reason})


def mark_reachable(vms: VmRecords, rec: VmRecord, now_ms: int, host: str, reason: str) -> TransitionResult:
    """`unreachable` -> `unknown`: the host is back; judged afresh after the grace."""
    result = _move(vms, rec, [VmState.UNREACHABLE], VmState.UNKNOWN, now_ms, AuditEvent.REACHABLE,
                   {"host": host, "reason": reason}, {"decision": reason})
    if result.applied:
        vms.start_monitoring(rec.vm, now_ms)
    return result


# ---------------------------------------------------------------------- the host worker's outcomes
def give_back(vms: VmRecords, vm: str, generation: int, now_ms: int, event_type: AuditEvent, host: str,
              incident: str, result: str, undo: Mapping[str, Any] | None = None, **data: Any) -> TransitionResult:
    """`restarting` -> `faulty`: the attempt did not restart the domain (misrouted, failed, silent but
    active); ``undo`` resets fields the attempt set."""
    return vms.transition(Transition(
        vm, (VmState.RESTARTING,), VmState.FAULTY, now_ms,
        {"type": event_type.value, "host": host, "incident": incident, "result": result, **data},
        {"decision": result, **(undo or {})}, generation))


def left_alone(vms: VmRecords, vm: str, generation: int, now_ms: int, host: str, incident: str, result: str,
               domain_status: str, domain_reason: str) -> TransitionResult:
    """`restarting` -> `unknown`: the domain is shut off or paused on purpose; the incident closes."""
    return vms.transition(Transition(
        vm, (VmState.RESTARTING,), VmState.UNKNOWN, now_ms,
        {"type": AuditEvent.RESTART_LEFT_ALONE.value, "host": host, "incident": incident, "result": result,
         "domain_status": domain_status},
        {"incident": "", "decision": result, "domain_status": domain_status, "domain_reason": domain_reason},
        generation))


def restarted(vms: VmRecords, vm: str, generation: int, now_ms: int, host: str, incident: str,
              event: Mapping[str, Any], action: str) -> TransitionResult:
    """`restarting` -> `recovering`: libvirt carried out ``action``; the boot grace counts from now."""
    return vms.transition(Transition(
        vm, (VmState.RESTARTING,), VmState.RECOVERING, now_ms,
        {"type": AuditEvent.RESTARTED.value, "host": host, "incident": incident, "action": action, **event},
        {"booted_at_ms": now_ms, "last_action": action, "decision": ""}, generation))


# ---------------------------------------------------------------------- operators
def clear(vms: VmRecords, rec: VmRecord, now_ms: int) -> TransitionResult:
    """failed/faulty/maintenance/disabled -> `unknown` with a fresh restart budget (operator clear)."""
    result = _move(vms, rec, CLEARABLE, VmState.UNKNOWN, now_ms, AuditEvent.CLEARED,
                   {"host": rec.host, "reason": "operator clear"}, _NO_INCIDENT, any_generation=True)
    if result.applied:
        vms.reset_budget(rec.vm)
        vms.start_monitoring(rec.vm, now_ms)
    return result


def maintenance_on(vms: VmRecords, rec: VmRecord, now_ms: int, until_ms: int,
                   reason: str = "operator") -> TransitionResult:
    """-> `maintenance` until ``until_ms`` (-1: until lifted); not while a restart is under way. ``reason``:
    who asked (operator, guest)."""
    sources = [s for s in VmState if s not in (VmState.MAINTENANCE, VmState.RESTARTING)]
    result = _move(vms, rec, sources, VmState.MAINTENANCE, now_ms, AuditEvent.MAINTENANCE,
                   {"host": rec.host, "reason": reason, "until_ms": until_ms},
                   {"maintenance_until_ms": max(until_ms, 0), "incident": ""})
    if result.applied and until_ms > 0:
        vms.schedule_maintenance_end(rec.vm, until_ms)  # housekeeping.expire_maintenance ends it then
    return result


def maintenance_off(vms: VmRecords, rec: VmRecord, now_ms: int, reason: str = "operator") -> TransitionResult:
    """`maintenance` -> `unknown` (lifted, or its window expired); judged afresh after the grace."""
    result = _move(vms, rec, [VmState.MAINTENANCE], VmState.UNKNOWN, now_ms, AuditEvent.MAINTENANCE_ENDED,
                   {"host": rec.host, "reason": reason}, {"maintenance_until_ms": 0})
    if result.applied:
        vms.start_monitoring(rec.vm, now_ms)
    return result


def disable(vms: VmRecords, rec: VmRecord, now_ms: int) -> TransitionResult:
    """-> `disabled`: never judged until enabled; not while a restart is under way."""
    sources = [s for s in VmState if s not in (VmState.DISABLED, VmState.RESTARTING)]
    return _move(vms, rec, sources, VmState.DISABLED, now_ms, AuditEvent.DISABLED,
                 {"host": rec.host, "reason": "disable"}, {"incident": "", "decision": "disable"})


def enable(vms: VmRecords, rec: VmRecord, now_ms: int) -> TransitionResult:
    """`disabled` -> `unknown`: judged again after the grace."""
    result = _move(vms, rec, [VmState.DISABLED], VmState.UNKNOWN, now_ms, AuditEvent.ENABLED,
                   {"host": rec.host, "reason": "enable"}, {"incident": "", "decision": "enable"})
    if result.applied:
        vms.start_monitoring(rec.vm, now_ms)
    return result
