"""The restart condition and the health state machine: pure functions, time passed in as ``now_ms``.

``decide`` is called for a VM that did not answer a round in time. Its reasons are written to the
audit stream verbatim, so they are sentences an operator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmq.model import Action, Decision, DomainStatus, VmState, VmView

#: Every transition the state machine allows (from -> possible to). Anything else is a bug.
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    VmState.UNKNOWN: frozenset({VmState.HEALTHY, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.HEALTHY: frozenset({VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.FAULTY: frozenset(
        {VmState.HEALTHY, VmState.RESTARTING, VmState.FAILED, VmState.UNKNOWN, VmState.MAINTENANCE,
         VmState.DISABLED}
    ),
    VmState.RESTARTING: frozenset(
        {VmState.RECOVERING, VmState.HEALTHY, VmState.FAULTY, VmState.UNKNOWN, VmState.MAINTENANCE,
         VmState.DISABLED}
    ),
    VmState.RECOVERING: frozenset({VmState.HEALTHY, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.FAILED: frozenset({VmState.UNKNOWN, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.MAINTENANCE: frozenset({VmState.UNKNOWN, VmState.DISABLED}),
    VmState.DISABLED: frozenset({VmState.UNKNOWN, VmState.MAINTENANCE}),
}

#: States in which a valid reply makes the VM healthy again.
ANSWER_HEALS = frozenset({VmState.UNKNOWN, VmState.FAULTY, VmState.RESTARTING, VmState.RECOVERING})

#: States from which silence can lead to a verdict.
JUDGED = frozenset({VmState.UNKNOWN, VmState.HEALTHY, VmState.FAULTY, VmState.RESTARTING, VmState.RECOVERING})


def can_transition(current: VmState, target: VmState) -> bool:
    """True when the state machine allows ``current -> target``."""
    return target in TRANSITIONS[current]


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of the restart condition (seconds)."""

    boot_grace_s: float = 30.0
    recovery_timeout_s: float = 60.0
    restart_timeout_s: float = 60.0
    max_restarts: int = 3
    restart_window_s: float = 3600.0


def _age_s(now_ms: int, since_ms: int) -> float:
    return max(0.0, (now_ms - since_ms) / 1000.0)


def _not_judged(view: VmView, cfg: PolicyConfig, now_ms: int) -> str | None:
    """The reason this silent VM is not judged at all right now, or None."""
    if view.state not in JUDGED:
        return f"state is {view.state.value}: not judged until an operator changes it"
    if not view.has_key:
        return "no responder key registered: cannot judge silence"
    if view.domain_status is DomainStatus.ABSENT:
        return "domain not found on any live host"
    if view.domain_status is DomainStatus.SHUTOFF:
        return f"domain is shut off on purpose ({view.domain_reason or 'unknown reason'}): left alone"
    state_age = _age_s(now_ms, view.state_since_ms)
    if view.state is VmState.RESTARTING and state_age < cfg.restart_timeout_s:
        return f"restart in progress for {state_age:.1f} s"
    if view.state is VmState.RECOVERING and state_age < cfg.recovery_timeout_s:
        return f"recovering: {state_age:.1f} s of {cfg.recovery_timeout_s:g} s since the restart"
    boot_age = _age_s(now_ms, view.booted_at_ms)
    if view.booted_at_ms and boot_age < cfg.boot_grace_s:
        return f"boot grace: started {boot_age:.1f} s ago (grace {cfg.boot_grace_s:g} s)"
    return None


def decide(view: VmView, cfg: PolicyConfig, now_ms: int) -> Decision:
    """The restart condition for a VM that missed a round's deadline; pure and total.

    For a judged VM the first reason always states the silence (it grows every round); the reasons after
    it are the grounds of the verdict, which the monitor audits only when they change.
    """
    skip = _not_judged(view, cfg, now_ms)
    if skip is not None:
        return Decision(Action.NONE, (skip,))
    if view.last_valid_ms:
        reasons = [f"no valid reply for {_age_s(now_ms, view.last_valid_ms):.1f} s"]
    else:
        reasons = ["no valid reply since monitoring started"]
    if view.state is VmState.RESTARTING:
        reasons.append(f"restart task did not complete within {cfg.restart_timeout_s:g} s")
    elif view.state is VmState.RECOVERING:
        reasons.append(f"no answer within the recovery timeout ({cfg.recovery_timeout_s:g} s)")
    if not view.host_alive:
        return Decision(Action.FLAG, (*reasons, f"host {view.host or '?'} heartbeat is stale: not restarting"))
    if not view.last_valid_ms:
        return Decision(Action.FLAG, (*reasons, ("never answered since monitoring started: silence alone is "
                                                "no evidence of a hang, not restarting")))
    if view.restarts_in_window >= cfg.max_restarts:
        return Decision(
            Action.FAIL,
            (*reasons, (f"restart budget exhausted: {view.restarts_in_window} of {cfg.max_restarts} "
                       f"in {cfg.restart_window_s:g} s")),
        )
    if view.restarts_suspended:
        return Decision(Action.FLAG, (*reasons, "restarts are suspended by the kill switch"))
    if view.domain_status is DomainStatus.OTHER:
        return Decision(Action.FLAG, (*reasons, f"domain state {view.domain_reason or 'other'}: no safe action"))
    reasons.append(f"budget {view.restarts_in_window + 1} of {cfg.max_restarts} in {cfg.restart_window_s:g} s")
    return Decision(Action.RESTART, tuple(reasons))
