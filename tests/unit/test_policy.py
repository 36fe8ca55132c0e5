"""The restart condition as one table, and the health state machine (pure, time passed in as now_ms)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vmq.model import Action, DomainStatus, VmState, VmView
from vmq.policy import ANSWER_HEALS, JUDGED, TRANSITIONS, PolicyConfig, can_transition, decide

NOW_MS = 1_764_000_000_000
CFG = PolicyConfig(boot_grace_s=30.0, recovery_timeout_s=60.0, restart_timeout_s=90.0, max_restarts=3,
                   restart_window_s=3600.0)


def silent_vm(**changes: Any) -> VmView:
    """A VM that answered 7 s ago, booted long ago, on a live host, with budget left: a plain hang."""
    base = VmView(
        vm="web-1",
        state=VmState.HEALTHY,
        host="node1",
        state_since_ms=NOW_MS - 600_000,
        has_key=True,
        host_alive=True,
        domain_status=DomainStatus.RUNNING,
        domain_reason="booted",
        booted_at_ms=NOW_MS - 3_600_000,
        last_valid_ms=NOW_MS - 7_000,
        restarts_in_window=0,
        restarts_suspended=False,
    )
    return replace(base, **changes)


N, F, R, X = Action.NONE, Action.FLAG, Action.RESTART, Action.FAIL

# (id, view changes, policy changes, expected action, phrase that must appear in the reasons)
TABLE: list[tuple[str, dict[str, Any], dict[str, Any], Action, str]] = [
    # -- not judged at all
    ("a VM in maintenance is not judged", {"state": VmState.MAINTENANCE}, {}, N,
     "state is maintenance: not judged until an operator changes it"),
    ("a disabled VM is not judged", {"state": VmState.DISABLED}, {}, N, "state is disabled: not judged"),
    ("a failed VM is not judged again", {"state": VmState.FAILED}, {}, N, "state is failed: not judged"),
    ("maintenance wins over a dead host, no key and an exhausted budget",
     {"state": VmState.MAINTENANCE, "host_alive": False, "has_key": False, "restarts_in_window": 9}, {}, N,
     "state is maintenance"),
    ("a VM without a responder key is not judged", {"has_key": False}, {}, N, "no responder key registered"),
    ("a VM whose domain is on no live host is not judged", {"domain_status": DomainStatus.ABSENT}, {}, N,
     "domain not found on any live host"),
    ("a VM whose domain was shut off on purpose is left alone",
     {"domain_status": DomainStatus.SHUTOFF, "domain_reason": "destroyed"}, {}, N,
     "domain is shut off on purpose (destroyed): left alone"),
    ("a shut off VM with no known reason is left alone too",
     {"domain_status": DomainStatus.SHUTOFF, "domain_reason": ""}, {}, N, "(unknown reason): left alone"),
    ("a VM restarting for less than the restart timeout is waited for",
     {"state": VmState.RESTARTING, "state_since_ms": NOW_MS - 89_900}, {}, N, "restart in progress for 89.9 s"),
    ("a VM recovering for less than the recovery timeout is waited for",
     {"state": VmState.RECOVERING, "state_since_ms": NOW_MS - 59_900}, {}, N,
     "recovering: 59.9 s of 60 s since the restart"),
    ("a VM booted less than the boot grace ago is not judged", {"booted_at_ms": NOW_MS - 29_900}, {}, N,
     "boot grace: started 29.9 s ago (grace 30 s)"),
    ("a VM booted in the future by clock skew is still in its boot grace", {"booted_at_ms": NOW_MS + 5_000},
     {}, N, "boot grace: started 0.0 s ago"),
    # -- flagged, not restarted
    ("a VM that never answered is flagged but not restarted", {"last_valid_ms": 0}, {}, F,
     "never answered since monitoring started"),
    ("a never-answering VM is flagged even with a zero boot grace", {"last_valid_ms": 0, "booted_at_ms": 0},
     {"boot_grace_s": 0.0}, F, "no valid reply since monitoring started"),
    ("a VM on a host with a stale heartbeat is flagged, not restarted", {"host_alive": False}, {}, F,
     "host node1 heartbeat is late or gone: not restarting"),
    ("a dead host is reported before a never-answered VM", {"host_alive": False, "last_valid_ms": 0}, {}, F,
     "heartbeat is late or gone"),
    ("a VM with no recorded host on a dead host is reported as host ?", {"host_alive": False, "host": ""}, {},
     F, "host ? heartbeat is late or gone"),
    ("restarts suspended by the kill switch only flag the VM", {"restarts_suspended": True}, {}, F,
     "restarts are suspended by the kill switch"),
    ("a domain in another state (blocked) has no safe action",
     {"domain_status": DomainStatus.OTHER, "domain_reason": "blocked"}, {}, F,
     "domain state blocked: no safe action"),
    # -- failed: budget exhausted
    ("a VM exactly at its restart budget fails", {"restarts_in_window": 3}, {}, X,
     "restart budget exhausted: 3 of 3 in 3600 s"),
    ("a VM above its restart budget fails", {"restarts_in_window": 5}, {}, X, "restart budget exhausted: 5 of 3"),
    ("an exhausted budget fails the VM even while the kill switch is on",
     {"restarts_in_window": 3, "restarts_suspended": True}, {}, X, "restart budget exhausted"),
    ("max_restarts 0 fails a silent VM at once", {}, {"max_restarts": 0}, X, "restart budget exhausted: 0 of 0"),
    # -- restart
    ("a healthy running VM that went silent is restarted", {}, {}, R, "budget 1 of 3 in 3600 s"),
    ("the restart reasons say how long the VM has been silent", {}, {}, R, "no valid reply for 7.0 s"),
    ("a healthy paused VM that went silent is restarted", {"domain_status": DomainStatus.PAUSED}, {}, R,
     "budget 1 of 3"),
    ("a healthy crashed VM that went silent is restarted", {"domain_status": DomainStatus.CRASHED}, {}, R,
     "budget 1 of 3"),
    ("a faulty VM with budget left is restarted", {"state": VmState.FAULTY, "restarts_in_window": 2}, {}, R,
     "budget 3 of 3"),
    ("an unknown VM that answered before is restarted", {"state": VmState.UNKNOWN}, {}, R, "budget 1 of 3"),
    ("a VM restarting for longer than the restart timeout is restarted again",
     {"state": VmState.RESTARTING, "state_since_ms": NOW_MS - 90_000, "restarts_in_window": 1}, {}, R,
     "restart task did not complete within 90 s"),
    ("a VM recovering for longer than the recovery timeout is restarted again",
     {"state": VmState.RECOVERING, "state_since_ms": NOW_MS - 60_000, "restarts_in_window": 1}, {}, R,
     "no answer within the recovery timeout (60 s)"),
    ("a VM booted exactly the boot grace ago is judged", {"booted_at_ms": NOW_MS - 30_000}, {}, R, "budget 1 of 3"),
    ("a VM with no boot time is judged without grace", {"booted_at_ms": 0}, {}, R, "budget 1 of 3"),
]


@pytest.mark.parametrize(
    ("changes", "policy_changes", "action", "phrase"),
    [pytest.param(changes, policy, action, phrase, id=name) for name, changes, policy, action, phrase in TABLE],
)
def test_the_restart_condition(changes: dict[str, Any], policy_changes: dict[str, Any], action: Action,
                               phrase: str) -> None:
    decision = decide(silent_vm(**changes), replace(CFG, **policy_changes), NOW_MS)
    assert decision.action is action, decision.reasons
    assert phrase in "; ".join(decision.reasons)


def test_the_table_reaches_every_action() -> None:
    assert {row[3] for row in TABLE} == set(Action)


def test_the_decision_depends_only_on_its_inputs() -> None:
    view = silent_vm(state=VmState.RECOVERING, state_since_ms=NOW_MS - 30_000)
    assert decide(view, CFG, NOW_MS) == decide(view, CFG, NOW_MS)
    assert decide(view, CFG, NOW_MS).action is Action.NONE
    assert decide(view, CFG, NOW_MS + 30_000).action is Action.RESTART


# ---------------------------------------------------------------- the state machine
def test_every_state_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(VmState)
    assert all(isinstance(target, VmState) for targets in TRANSITIONS.values() for target in targets)


@pytest.mark.parametrize(
    ("current", "target"),
    [(VmState.UNKNOWN, VmState.HEALTHY), (VmState.HEALTHY, VmState.FAULTY), (VmState.FAULTY, VmState.RESTARTING),
     (VmState.RESTARTING, VmState.RECOVERING), (VmState.RECOVERING, VmState.HEALTHY)],
    ids=lambda state: state.value,
)
def test_the_main_path_from_unknown_through_a_restart_back_to_healthy_is_allowed(current: VmState,
                                                                                  target: VmState) -> None:
    assert can_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [(VmState.UNKNOWN, VmState.RESTARTING), (VmState.HEALTHY, VmState.RESTARTING),
     (VmState.HEALTHY, VmState.FAILED), (VmState.HEALTHY, VmState.RECOVERING),
     (VmState.RECOVERING, VmState.RESTARTING), (VmState.MAINTENANCE, VmState.HEALTHY)],
    ids=lambda state: state.value,
)
def test_shortcuts_around_the_faulty_state_are_refused(current: VmState, target: VmState) -> None:
    assert not can_transition(current, target)


def test_a_failed_vm_only_leaves_to_unknown_maintenance_or_disabled() -> None:
    assert TRANSITIONS[VmState.FAILED] == {VmState.UNKNOWN, VmState.MAINTENANCE, VmState.DISABLED}
    assert not can_transition(VmState.FAILED, VmState.HEALTHY)


@pytest.mark.parametrize("state", list(VmState), ids=lambda state: state.value)
def test_no_state_transitions_to_itself(state: VmState) -> None:
    assert not can_transition(state, state)


@pytest.mark.parametrize("state", list(VmState), ids=lambda state: state.value)
def test_an_operator_can_put_every_vm_into_maintenance_or_disable_it(state: VmState) -> None:
    assert {VmState.MAINTENANCE, VmState.DISABLED} - {state} <= TRANSITIONS[state]


@pytest.mark.parametrize("state", sorted(ANSWER_HEALS), ids=lambda state: state.value)
def test_every_state_a_valid_answer_heals_may_become_healthy(state: VmState) -> None:
    assert can_transition(state, VmState.HEALTHY)


@pytest.mark.parametrize("state", sorted(JUDGED - {VmState.FAULTY}), ids=lambda state: state.value)
def test_every_judged_state_may_become_faulty_when_silent(state: VmState) -> None:
    assert can_transition(state, VmState.FAULTY)


def test_a_restart_task_may_end_recovering_faulty_or_unknown() -> None:
    assert {VmState.RECOVERING, VmState.FAULTY, VmState.UNKNOWN} <= TRANSITIONS[VmState.RESTARTING]
    assert can_transition(VmState.FAULTY, VmState.FAILED)
