"""The restart condition and the health state machine: pure functions, time passed in as ``now_ms``.

``decide`` is called for a VM that did not answer a round in time. Its reasons are written to the
audit stream verbatim, so they are sentences an operator can act on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

from vmq.model import Action, Decision, DomainStatus, VmState, VmView

#: Every transition the state machine allows (from -> possible to). Anything else is a bug.
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    VmState.UNKNOWN: frozenset({VmState.UNREACHABLE, VmState.HEALTHY, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.HEALTHY: frozenset({VmState.UNREACHABLE, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.FAULTY: frozenset(
        {VmState.HEALTHY, VmState.RESTARTING, VmState.FAILED, VmState.UNKNOWN, VmState.MAINTENANCE,
         VmState.DISABLED, VmState.UNREACHABLE}
    ),
    VmState.RESTARTING: frozenset(
        {VmState.RECOVERING, VmState.HEALTHY, VmState.FAULTY, VmState.UNKNOWN, VmState.MAINTENANCE,
         VmState.DISABLED, VmState.UNREACHABLE}
    ),
    VmState.RECOVERING: frozenset({VmState.UNREACHABLE, VmState.HEALTHY, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.FAILED: frozenset({VmState.UNKNOWN, VmState.MAINTENANCE, VmState.DISABLED}),
    VmState.MAINTENANCE: frozenset({VmState.UNKNOWN, VmState.DISABLED}),
    VmState.DISABLED: frozenset({VmState.UNKNOWN, VmState.MAINTENANCE}),
    VmState.UNREACHABLE: frozenset({VmState.UNKNOWN, VmState.MAINTENANCE, VmState.DISABLED}),
}

#: States a VM on a host whose worker vanished moves out of, into `unreachable`.
REACHABLE = frozenset({VmState.UNKNOWN, VmState.HEALTHY, VmState.FAULTY, VmState.RESTARTING,
                       VmState.RECOVERING})

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
    backoff_base_s: float = 10.0  # wait base * 2^(n-1) after the n-th restart of an incident ...
    backoff_max_s: float = 300.0  # ... capped here ...
    backoff_jitter: float = 0.2  # ... spread by +-20 % so VMs restarted together do not retry together
    max_concurrent_restarts_per_host: int = 2
    ladder_rungs: int = 2  # reset, then destroy + create; then `failed`
    app_liveness_restart: bool = True  # an application liveness failure is restarted (False: flagged only)


#: Pause reasons that mean an operator or libvirt itself holds the domain on purpose.
DELIBERATE_PAUSE = frozenset({"user", "paused", "migration", "migrated", "snapshot", "save", "from_snapshot",
                              "shutting_down", "starting_up", "postcopy"})


def backoff_s(vm: str, attempts: int, cfg: PolicyConfig) -> float:
    """Seconds to wait after the ``attempts``-th restart of an incident; jitter derived from the VM (pure)."""
    if attempts <= 0:
        return 0.0
    base = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempts - 1))
    spread = (zlib.crc32(f"{vm}:{attempts}".encode()) % 2001 - 1000) / 1000.0  # in [-1, 1]
    return max(0.0, float(base) * (1 + cfg.backoff_jitter * spread))


def _age_s(now_ms: int, since_ms: int) -> float:
    return max(0.0, (now_ms - since_ms) / 1000.0)


def _not_judged(view: VmView, cfg: PolicyConfig, now_ms: int) -> str | None:
    """The reason this silent VM is not judged at all right now, or None."""
    if view.not_enrolled:
        return view.not_enrolled
    if view.state not in JUDGED:
        return f"state is {view.state.value}: not judged until an operator changes it"
    if not view.has_key:
        return "no responder key registered: cannot judge silence"
    if not view.relay_alive:
        return (f"host {view.host or '?'}'s relay did not report this round finished by its deadline, or could "
                "not ask this VM: silence is no evidence")
    if view.domain_status is DomainStatus.ABSENT:
        return "domain not found on any live host"
    if view.domain_status is DomainStatus.SHUTOFF:
        return f"domain is shut off on purpose ({view.domain_reason or 'unknown reason'}): left alone"
    if view.domain_status is DomainStatus.PAUSED and view.domain_reason in DELIBERATE_PAUSE:
        return f"domain is paused on purpose ({view.domain_reason}): not judged while that lasts"
    if view.host_maintenance:
        return f"host {view.host} is in maintenance"
    state_age = _age_s(now_ms, view.state_since_ms)
    if view.state is VmState.RESTARTING and state_age < cfg.restart_timeout_s:
        return f"restart in progress for {state_age:.1f} s"
    if view.state is VmState.RECOVERING and state_age < cfg.recovery_timeout_s:
        return f"recovering: {state_age:.1f} s of {cfg.recovery_timeout_s:g} s since the restart"
    boot_age = _age_s(now_ms, view.booted_at_ms)
    # A crash the hypervisor reports, or the guest's own watchdog firing, is hard evidence, in the grace period
    # too (budget and back-off bound a crash loop).
    hard_evidence = view.domain_status is DomainStatus.CRASHED or view.watchdog
    if view.booted_at_ms and boot_age < cfg.boot_grace_s and not hard_evidence:
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
    crashed = view.domain_status is DomainStatus.CRASHED
    if crashed:
        reasons = [f"the hypervisor reports the domain crashed ({view.domain_reason or 'crashed'})"]
    elif view.watchdog:
        reasons = [f"the guest's watchdog fired (action {view.watchdog}): the guest itself reports a hang"]
    elif view.app_unhealthy:
        reasons = [f"application unhealthy: {view.app_unhealthy}"]
    elif view.last_valid_ms:
        reasons = [f"no valid reply for {_age_s(now_ms, view.last_valid_ms):.1f} s"]
    else:
        reasons = ["no valid reply since monitoring started"]
    if view.state is VmState.RESTARTING:
        reasons.append(f"restart task did not complete within {cfg.restart_timeout_s:g} s")
    elif view.state is VmState.RECOVERING:
        reasons.append(f"no answer within the recovery timeout ({cfg.recovery_timeout_s:g} s)")
    hold = _hold(view, cfg, now_ms, crashed)
    if hold is not None:
        action, reason = hold
        return Decision(action, (*reasons, reason))
    hard = view.incident_attempts >= 1
    rung = "start the crashed domain" if crashed else "destroy + create" if hard else "reset"
    reasons.append(f"{rung} (rung {view.incident_attempts + 1} of {cfg.ladder_rungs}); budget "
                   f"{view.restarts_in_window + 1} of {cfg.max_restarts} in {cfg.restart_window_s:g} s")
    return Decision(Action.RESTART, tuple(reasons), hard=hard)


def _hold(view: VmView, cfg: PolicyConfig, now_ms: int, crashed: bool) -> tuple[Action, str] | None:
    """Why a judged VM is flagged or failed instead of restarted, in order of precedence; None to restart."""
    if not view.host_alive:
        return Action.FLAG, f"host {view.host or '?'} heartbeat is late or gone: not restarting"
    if view.host_degraded:
        return Action.FLAG, f"host {view.host} cannot reach libvirt (degraded): not restarting"
    if view.app_unhealthy and not cfg.app_liveness_restart:
        return Action.FLAG, "application liveness is flag only here (VMQ_APP_LIVENESS=flag): not restarting"
    if view.domain_status is DomainStatus.PAUSED and view.domain_reason.startswith("ioerror"):
        return Action.FLAG, (f"the domain is paused on a disk I/O error ({view.domain_reason}): a restart frees "
                             "no disk, not restarting")
    if not crashed and not view.watchdog and not view.last_valid_ms:
        return Action.FLAG, "never answered since monitoring started: silence alone is no evidence of a hang"
    if view.restarts_in_window >= cfg.max_restarts:
        return Action.FAIL, (f"restart budget exhausted: {view.restarts_in_window} of {cfg.max_restarts} "
                             f"in {cfg.restart_window_s:g} s")
    if view.incident_attempts >= cfg.ladder_rungs:
        return Action.FAIL, f"every rung of the ladder was tried ({view.incident_attempts}): quarantined"
    if view.restarts_suspended:
        return Action.FLAG, "restarts are suspended by the kill switch"
    if view.storm and not crashed:
        return Action.FLAG, view.storm
    if view.domain_status is DomainStatus.OTHER:
        return Action.FLAG, f"domain state {view.domain_reason or 'other'}: no safe action"
    wait_s = backoff_s(view.vm, view.incident_attempts, cfg) - _age_s(now_ms, view.last_restart_ms)
    if view.incident_attempts and wait_s > 0:
        return Action.FLAG, f"back-off: next attempt allowed in {wait_s:.1f} s"
    if view.host_restarts_in_flight >= cfg.max_concurrent_restarts_per_host:
        return Action.FLAG, (f"host {view.host} already has {view.host_restarts_in_flight} restarts in flight "
                             f"(limit {cfg.max_concurrent_restarts_per_host})")
    return None


def storm_guard(silent_by_host: dict[str, int], vms_by_host: dict[str, int], total_vms: int,
                fraction: float, min_host_vms: int = 3) -> tuple[str, dict[str, str]]:
    """Whether this round's silence looks like vmq's, the network's or a host's fault, not the guests'.

    Returns (cluster-wide reason or "", {host: reason}) for the hosts whose own VMs went silent together.
    """
    silent = sum(silent_by_host.values())
    cluster = ""
    if total_vms and silent >= min_host_vms and silent / total_vms > fraction:
        cluster = (f"storm guard: {silent} of {total_vms} VMs silent in one round (> {fraction:.0%}): "
                   "suspecting the monitor or the network, not the guests")
    hosts: dict[str, str] = {}
    for host, count in silent_by_host.items():
        size = vms_by_host.get(host, 0)
        if size and count >= min_host_vms and count / size > fraction:
            hosts[host] = (f"host guard: {count} of {size} VMs on {host} silent in one round "
                           f"(> {fraction:.0%}): suspecting the host or its network, not the guests")
    return cluster, hosts


#: The knobs a VM may override (VM record fields ``policy.<knob>``), with their types.
OVERRIDABLE: dict[str, type] = {
    "boot_grace_s": float, "recovery_timeout_s": float, "restart_timeout_s": float, "max_restarts": int,
    "restart_window_s": float, "backoff_base_s": float, "backoff_max_s": float,
    "max_concurrent_restarts_per_host": int, "ladder_rungs": int,
}


def with_overrides(cfg: PolicyConfig, overrides: dict[str, str]) -> tuple[PolicyConfig, list[str]]:
    """Apply a VM's overrides to the cluster's knobs; returns the result and the overrides it refused."""
    changes: dict[str, Any] = {}
    refused: list[str] = []
    for knob, text in overrides.items():
        kind = OVERRIDABLE.get(knob)
        try:
            value = kind(text) if kind is not None else None
        except ValueError:
            value = None
        if value is None or value < 0:
            refused.append(f"{knob}={text}")
        else:
            changes[knob] = value
    return (replace(cfg, **changes) if changes else cfg), refused


#: States from which an operator's `vmq restart` may proceed (a restart in progress, a quarantined,
#: maintained, disabled or unreachable VM is refused with the way out).
MANUAL_FROM = frozenset({VmState.UNKNOWN, VmState.HEALTHY, VmState.FAULTY, VmState.RECOVERING})

_MANUAL_REFUSAL = {
    VmState.RESTARTING: "a restart is already in progress",
    VmState.FAILED: "it is failed (quarantined): `vmq clear` it first, then restart",
    VmState.MAINTENANCE: "it is in maintenance: end it first (`vmq maintenance VM --off`)",
    VmState.DISABLED: "it is disabled: `vmq enable` it first",
    VmState.UNREACHABLE: "its host's worker is gone: nothing can act on it",
}


def decide_manual(view: VmView, cfg: PolicyConfig, force: bool = False) -> Decision:
    """An operator asked to restart this VM: the same guards as an automatic restart, minus the ones about
    silence (boot grace, back-off, storm) that an explicit request overrides. ``force`` skips the budget.

    Returns RESTART (a reset: the operator wants a reboot, not a re-creation) or NONE with the refusal.
    """
    refusal: str | None = None
    if view.state not in MANUAL_FROM:
        refusal = _MANUAL_REFUSAL.get(view.state, f"state is {view.state.value}")
    elif view.domain_status is DomainStatus.ABSENT:
        refusal = "domain not found on any live host"
    elif view.domain_status is DomainStatus.SHUTOFF:
        refusal = (f"domain is shut off ({view.domain_reason or 'unknown reason'}): start it with libvirt; "
                   "vmq restarts running domains")
    elif view.domain_status is DomainStatus.OTHER:
        refusal = f"domain state {view.domain_reason or 'other'}: no safe action"
    elif view.host_maintenance:
        refusal = f"host {view.host} is in maintenance"
    elif not view.host_alive:
        refusal = f"host {view.host or '?'} heartbeat is late or gone"
    elif view.host_degraded:
        refusal = f"host {view.host} cannot reach libvirt (degraded)"
    elif view.restarts_suspended:
        refusal = "restarts are suspended by the kill switch (`vmq resume` lifts it)"
    elif view.host_restarts_in_flight >= cfg.max_concurrent_restarts_per_host:
        refusal = (f"host {view.host} already has {view.host_restarts_in_flight} restarts in flight "
                   f"(limit {cfg.max_concurrent_restarts_per_host}): try again shortly")
    elif view.restarts_in_window >= cfg.max_restarts and not force:
        refusal = (f"restart budget exhausted: {view.restarts_in_window} of {cfg.max_restarts} in "
                   f"{cfg.restart_window_s:g} s (--force skips the budget)")
    if refusal is not None:
        return Decision(Action.NONE, (f"manual restart refused: {refusal}",))
    budget = (f"budget {view.restarts_in_window + 1} of {cfg.max_restarts} in {cfg.restart_window_s:g} s"
              + (" (forced past it)" if view.restarts_in_window >= cfg.max_restarts else ""))
    return Decision(Action.RESTART, ("operator asked for a restart", f"reset; {budget}"))
