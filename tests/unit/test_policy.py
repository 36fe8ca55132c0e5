"""The restart condition as one table, and the health state machine (pure, time passed in as now_ms)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vmq.model import Action, DomainStatus, VmState, VmView
from vmq.policy import (
    ANSWER_HEALS,
    JUDGED,
    TRANSITIONS,
    PolicyConfig,
    backoff_s,
    can_transition,
    decide,
    storm_guard,
    with_overrides,
)

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
    # -- issue 3's guards
    ("a domain an operator paused is not judged while that lasts",
     {"domain_status": DomainStatus.PAUSED, "domain_reason": "user"}, {}, N, "paused on purpose (user)"),
    ("a domain paused by a migration is not judged", {"domain_status": DomainStatus.PAUSED,
                                                      "domain_reason": "migrated"}, {}, N, "paused on purpose"),
    ("a domain paused by an I/O error is judged and flagged, never restarted (a restart frees no disk)",
     {"domain_status": DomainStatus.PAUSED, "domain_reason": "ioerror"}, {}, F, "paused on a disk I/O error"),
    ("a domain paused on a full disk is flagged",
     {"domain_status": DomainStatus.PAUSED, "domain_reason": "ioerror:enospc"}, {}, F, "(ioerror:enospc)"),
    ("a guest watchdog that fired is restarted even in the boot grace and if it never answered",
     {"watchdog": "none", "booted_at_ms": NOW_MS - 1000, "last_valid_ms": 0}, {}, R, "the guest's watchdog fired"),
    ("a VM on a host in maintenance is not judged", {"host_maintenance": True}, {}, N, "host node1 is in maintenance"),
    ("a host that cannot reach libvirt gets no restart on silence", {"host_degraded": True}, {}, F,
     "cannot reach libvirt (degraded)"),
    ("a crash reported by libvirt is restarted even if the VM never answered",
     {"domain_status": DomainStatus.CRASHED, "domain_reason": "crashed", "last_valid_ms": 0}, {}, R,
     "the hypervisor reports the domain crashed"),
    ("a crash is restarted through the storm guard", {"domain_status": DomainStatus.CRASHED, "storm": "storm!"},
     {}, R, "start the crashed domain (rung 1 of 2)"),
    ("a crash within the boot grace is restarted at once (found by the real-VM test)",
     {"domain_status": DomainStatus.CRASHED, "booted_at_ms": NOW_MS - 5_000}, {}, R, "start the crashed domain"),
    ("silence within the boot grace is still not judged", {"booted_at_ms": NOW_MS - 5_000}, {}, N, "boot grace"),
    ("silence during a storm is flagged, not restarted", {"storm": "storm guard: 4 of 10 VMs silent"}, {}, F,
     "storm guard: 4 of 10"),
    ("the second attempt of an incident waits out its back-off",
     {"incident_attempts": 1, "last_restart_ms": NOW_MS - 5_000}, {"backoff_jitter": 0.0}, F,
     "back-off: next attempt allowed in 5.0 s"),
    ("after its back-off the second attempt destroys and creates",
     {"incident_attempts": 1, "last_restart_ms": NOW_MS - 10_001, "restarts_in_window": 1},
     {"backoff_jitter": 0.0}, R, "destroy + create (rung 2 of 2)"),
    ("a VM whose reset and destroy + create both failed is quarantined", {"incident_attempts": 2}, {}, X,
     "every rung of the ladder was tried"),
    ("a host at its limit of concurrent restarts makes the next one wait", {"host_restarts_in_flight": 2}, {}, F,
     "already has 2 restarts in flight (limit 2)"),
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


def test_the_second_rung_is_asked_for_as_a_hard_restart() -> None:
    decision = decide(silent_vm(incident_attempts=1, last_restart_ms=NOW_MS - 60_000), CFG, NOW_MS)
    assert decision.action is Action.RESTART and decision.hard is True
    assert decide(silent_vm(), CFG, NOW_MS).hard is False


@pytest.mark.parametrize(("attempts", "expected_s"), [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (9, 300.0)])
def test_back_off_doubles_per_attempt_up_to_its_cap(attempts: int, expected_s: float) -> None:
    assert backoff_s("web-1", attempts, replace(CFG, backoff_jitter=0.0)) == expected_s


def test_back_off_jitter_stays_within_its_band_and_differs_between_vms() -> None:
    values = {backoff_s(f"vm-{i}", 1, CFG) for i in range(50)}
    assert all(8.0 <= v <= 12.0 for v in values)
    assert len(values) > 10  # VMs restarted together do not retry together


@pytest.mark.parametrize(("silent", "sizes", "total", "cluster", "hosts"), [
    pytest.param({"a": 2, "b": 2}, {"a": 5, "b": 5}, 10, True, set(), id="40 percent of the cluster is a storm"),
    pytest.param({"a": 3}, {"a": 5, "b": 15}, 20, False, {"a"}, id="3 of 5 on one host is a host suspect"),
    pytest.param({"a": 2}, {"a": 2, "b": 18}, 20, False, set(), id="fewer than 3 silent is never a guard"),
    pytest.param({"a": 1, "b": 1}, {"a": 50, "b": 50}, 100, False, set(), id="scattered hangs are judged"),
    pytest.param({"a": 3}, {"a": 10}, 10, False, set(), id="exactly the fraction is not above it"),
])
def test_the_storm_and_host_guard(silent: dict[str, int], sizes: dict[str, int], total: int, cluster: bool,
                                  hosts: set[str]) -> None:
    reason, by_host = storm_guard(silent, sizes, total, 0.3, 3)
    assert bool(reason) is cluster
    assert set(by_host) == hosts


def test_a_vms_overrides_replace_the_cluster_knobs_and_bad_ones_are_refused() -> None:
    cfg, refused = with_overrides(CFG, {"max_restarts": "5", "boot_grace_s": "120.5", "ladder_rungs": "x",
                                        "backoff_base_s": "-1", "no_such_knob": "1"})
    assert (cfg.max_restarts, cfg.boot_grace_s, cfg.ladder_rungs, cfg.backoff_base_s) == (5, 120.5, 2, 10.0)
    assert sorted(refused) == ["backoff_base_s=-1", "ladder_rungs=x", "no_such_knob=1"]
    assert decide(silent_vm(restarts_in_window=3), cfg, NOW_MS).action is Action.RESTART
