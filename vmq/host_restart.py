"""Host-side use case: carry out one restart request on this host's hypervisor, exactly once.

Re-asserts the world before acting (the attempt is still open, the domain is on this host), claims the
attempt atomically (a redelivered or duplicated task is a no-op), acts by the domain's state, and records
the outcome as a state transition with its evidence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from vmq import lifecycle
from vmq.errors import DomainNotFound, HypervisorError
from vmq.hypervisor.types import busy, moving
from vmq.model import AuditEvent, DomainStatus, RestartAction, VmState
from vmq.ports import Hypervisor, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartOutcome:
    """What the host worker did with a request."""

    vm: str
    host: str
    acted: bool
    action: str
    result: str


def _action_for(status: DomainStatus, hard: bool = False) -> RestartAction:
    if hard and status in (DomainStatus.RUNNING, DomainStatus.PAUSED):
        return RestartAction.DESTROY_CREATE
    if status is DomainStatus.RUNNING:
        return RestartAction.RESET
    if status is DomainStatus.PAUSED:
        return RestartAction.RESUME_RESET  # a reset alone leaves a paused domain paused
    if status is DomainStatus.CRASHED:
        return RestartAction.CREATE
    return RestartAction.LEFT_ALONE


def _perform(hypervisor: Hypervisor, vm: str, action: RestartAction) -> None:
    if action is RestartAction.RESET:
        hypervisor.reset(vm)
    elif action is RestartAction.RESUME_RESET:
        hypervisor.resume(vm)
        hypervisor.reset(vm)
    elif action is RestartAction.CREATE:
        hypervisor.start(vm)
    elif action is RestartAction.DESTROY_CREATE:
        hypervisor.destroy(vm)
        hypervisor.start(vm)


@dataclass(frozen=True)
class ActivityCheck:
    """Corroboration before acting on silence: sample the domain's counters twice ``window_s`` apart."""

    window_s: float = 1.0
    blocks: bool = True  # a guest whose own I/O moves is `silent-but-active`: hold instead of resetting
    min_bytes_per_s: float = 16384.0  # the floor below which disk/network I/O is background noise


def _sample_activity(hypervisor: Hypervisor, vm: str, check: ActivityCheck) -> dict[str, object]:
    first = hypervisor.activity(vm)
    time.sleep(check.window_s)
    second = hypervisor.activity(vm)
    return {"busy": busy(first, second, check.min_bytes_per_s), "moving": moving(first, second),
            "window_s": check.window_s, "min_bytes_per_s": check.min_bytes_per_s,
            "first": asdict(first), "second": asdict(second)}


def restart_vm(store: Store, hypervisor: Hypervisor, host: str, vm: str, generation: int,
               incident: str, claimant: str, hard: bool = False, crashed: bool = False,
               activity: ActivityCheck | None = None, manual: bool = False,
               claim_hold_s: float = 60.0, expires_ms: int = 0) -> RestartOutcome:
    """Restart ``vm`` for attempt ``generation`` of ``incident`` if, and only if, it is still warranted.

    The claim holds replies off the attempt for ``claim_hold_s`` (VMQ_RESTART_TIMEOUT_S): if this worker
    dies after claiming, even after the reset, the VM is healed by its next reply after that, not left
    `restarting` for ever.

    A request older than its ``expires_ms`` (Redis time; 0: none) is skipped: its verdict is stale, and the
    monitor judges the VM afresh once ``claim_hold_s`` has passed without a restart. Redis' clock, not this
    host's: a host whose clock runs ahead would otherwise discard every restart.

    Unless libvirt reported a crash or an operator asked (``manual``), silence is corroborated first
    (``activity``): a guest whose CPU, disk or network counters still move is held, not reset, when
    ``activity.blocks``.
    """
    rec = store.vms.record(vm)
    now_ms = store.clock.time_ms()

    def skip(result: str) -> RestartOutcome:
        store.audit.append(AuditEvent.RESTART_SKIPPED, vm, host, now_ms, incident=incident, generation=generation,
                    reason=result)
        log.info("vm=%s host=%s restart skipped: %s", vm, host, result)
        store.stats.count_restart_outcome(host, "none", "skipped")
        return RestartOutcome(vm, host, False, RestartAction.LEFT_ALONE.value, result)

    def back_to_faulty(event_type: AuditEvent, result: str, undo: dict[str, object] | None = None,
                       **data: object) -> RestartOutcome:
        lifecycle.give_back(store.vms, vm, generation, now_ms, event_type, host, incident, result, undo, **data)
        log.warning("vm=%s host=%s %s: %s", vm, host, event_type.value, result)
        store.stats.count_restart_outcome(host, str(data.get("action", "none")),
                                          event_type.value.removeprefix("restart_"))
        return RestartOutcome(vm, host, False, RestartAction.LEFT_ALONE.value, result)

    if expires_ms and now_ms > expires_ms:
        return skip(f"expired: the verdict is {(now_ms - expires_ms) / 1000:.1f} s past its expiry "
                    "(VMQ_RESTART_TASK_EXPIRES_S, Redis time)")
    if rec.state is not VmState.RESTARTING or rec.generation != generation or rec.incident != incident:
        state = rec.state.value if rec.exists else "absent"
        return skip(f"attempt closed (state {state}, generation {rec.generation if rec.exists else None})")
    # Claim first: from here on only this delivery may act on, or give back, this attempt.
    if not store.vms.claim_restart(vm, generation, incident, claimant, int(claim_hold_s * 1000)):
        return skip("attempt already claimed by another delivery of this task")
    if rec.host != host:
        return back_to_faulty(AuditEvent.RESTART_MISROUTED, f"vm now runs on {rec.host or 'no host'}, not {host}")
    try:
        info = hypervisor.domain_info(vm)
    except DomainNotFound:
        return back_to_faulty(AuditEvent.RESTART_FAILED, f"domain {vm} is not defined on {host}")
    except HypervisorError as exc:
        return back_to_faulty(AuditEvent.RESTART_FAILED, f"hypervisor unavailable: {exc}")
    action = _action_for(info.status, hard)
    if action is RestartAction.LEFT_ALONE:
        result = f"domain is {info.status.value} ({info.reason or 'no reason'}): left alone"
        lifecycle.left_alone(store.vms, vm, generation, now_ms, host, incident, result, info.status.value,
                             info.reason)
        store.stats.count_restart_outcome(host, "none", "left_alone")
        return RestartOutcome(vm, host, False, action.value, result)
    sample: dict[str, object] | None = None
    if activity is not None and not crashed and not manual and action is not RestartAction.CREATE:
        try:
            sample = _sample_activity(hypervisor, vm, activity)
        except HypervisorError as exc:
            return back_to_faulty(AuditEvent.RESTART_FAILED, f"could not sample activity: {exc}")
        if sample["busy"] and activity.blocks:
            result = (f"silent but active: {', '.join(sample['busy'])} above "  # type: ignore[arg-type]
                      f"{activity.min_bytes_per_s:g} B/s")
            # Not an attempt: give back the budget entry, the ladder rung and the back-off it started.
            attempts = max(0, (rec.attempts or 1) - 1)
            outcome = back_to_faulty(AuditEvent.SILENT_BUT_ACTIVE, result, undo={"attempts": attempts, "last_restart_ms": 0},
                                     activity=sample)
            store.vms.uncount_restart(vm, generation, rec.last_restart_ms)
            return outcome
    started = time.monotonic()
    try:
        _perform(hypervisor, vm, action)
    except HypervisorError as exc:
        return back_to_faulty(AuditEvent.RESTART_FAILED, f"{action.value} failed: {exc}", action=action.value,
                              domain_status=info.status.value)
    took_ms = round((time.monotonic() - started) * 1000, 1)
    done_ms = store.clock.time_ms()
    lifecycle.restarted(store.vms, vm, generation, done_ms, host, incident,
                        {"result": "ok", "domain_status": info.status.value, "took_ms": took_ms, "activity": sample},
                        action.value)
    log.warning("vm=%s host=%s restarted action=%s took_ms=%s incident=%s", vm, host, action.value, took_ms,
                incident)
    store.stats.count_restart_outcome(host, action.value, "ok")
    return RestartOutcome(vm, host, True, action.value, "ok")


OPERATIONS = ("start", "destroy", "suspend", "resume")


def operate_domain(store: Store, hypervisor: Hypervisor, host: str, vm: str, operation: str) -> str:
    """An operator's lifecycle action on a domain of this host (audited); returns the new domain status.

    Raises ValueError for an unknown operation and HypervisorError when libvirt refuses.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")
    getattr(hypervisor, operation)(vm)
    info = hypervisor.domain_info(vm)
    store.audit.append(AuditEvent.OPERATOR_ACTION, vm, host, store.clock.time_ms(), operation=operation,
                domain_status=info.status.value)
    log.info("vm=%s host=%s operator %s -> %s", vm, host, operation, info.status.value)
    return info.status.value
