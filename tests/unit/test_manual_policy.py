"""The operator's restart condition (policy.decide_manual) as a table: pure, no time needed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.unit.test_policy import CFG, NOW_MS, silent_vm
from vmq.model import Action, DomainStatus, VmState
from vmq.policy import MANUAL_FROM, TRANSITIONS, decide_manual

R, N = Action.RESTART, Action.NONE

# (id, view changes, force, expected action, phrase that must appear in the reasons)
TABLE: list[tuple[str, dict[str, Any], bool, Action, str]] = [
    ("a healthy VM is restarted on request", {}, False, R, "operator asked for a restart"),
    ("a faulty VM held by back-off is restarted on request",
     {"state": VmState.FAULTY, "incident_attempts": 1, "last_restart_ms": NOW_MS - 1000}, False, R, "reset"),
    ("a VM in its boot grace is restarted on request", {"booted_at_ms": NOW_MS - 1000}, False, R, "reset"),
    ("a storm does not stop an explicit request", {"storm": "storm guard: 9 of 10"}, False, R, "reset"),
    ("a crashed domain is restarted on request", {"domain_status": DomainStatus.CRASHED}, False, R, "reset"),
    ("a restart in progress is refused", {"state": VmState.RESTARTING}, True, N, "already in progress"),
    ("a failed VM must be cleared first", {"state": VmState.FAILED}, True, N, "`vmq clear` it first"),
    ("a VM in maintenance is refused", {"state": VmState.MAINTENANCE}, True, N, "vmq maintenance VM --off"),
    ("a disabled VM is refused", {"state": VmState.DISABLED}, True, N, "`vmq enable` it first"),
    ("an unreachable VM is refused", {"state": VmState.UNREACHABLE}, True, N, "host's worker is gone"),
    ("a domain on no live host is refused", {"domain_status": DomainStatus.ABSENT}, True, N, "not found"),
    ("a domain shut off on purpose is refused", {"domain_status": DomainStatus.SHUTOFF,
                                                 "domain_reason": "destroyed"}, True, N, "shut off (destroyed)"),
    ("a domain in an odd state is refused", {"domain_status": DomainStatus.OTHER, "domain_reason": "blocked"},
     True, N, "no safe action"),
    ("a host in maintenance is refused", {"host_maintenance": True}, True, N, "host node1 is in maintenance"),
    ("a host whose heartbeat is gone is refused", {"host_alive": False}, True, N, "heartbeat is late or gone"),
    ("a degraded host is refused", {"host_degraded": True}, True, N, "cannot reach libvirt"),
    ("the kill switch refuses even a forced restart", {"restarts_suspended": True}, True, N, "kill switch"),
    ("the per-host limit refuses even a forced restart", {"host_restarts_in_flight": 2}, True, N,
     "restarts in flight"),
    ("an exhausted budget refuses", {"restarts_in_window": 3}, False, N, "--force skips the budget"),
    ("--force goes past an exhausted budget", {"restarts_in_window": 3}, True, R, "forced past it"),
    ("--force within the budget is an ordinary restart", {"restarts_in_window": 1}, True, R, "budget 2 of 3"),
]


@pytest.mark.parametrize(("changes", "force", "expected", "phrase"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_manual_restart_condition(changes: dict[str, Any], force: bool, expected: Action, phrase: str) -> None:
    decision = decide_manual(replace(silent_vm(), **changes), CFG, force)
    assert decision.action is expected
    assert decision.hard is False, "an operator's restart is a reset, never a re-creation"
    assert any(phrase in reason for reason in decision.reasons), decision.reasons
    if expected is N:
        assert decision.reasons[0].startswith("manual restart refused: ")


@pytest.mark.parametrize("state", sorted(MANUAL_FROM), ids=lambda state: state.value)
def test_every_state_a_manual_restart_starts_from_can_open_an_incident(state: VmState) -> None:
    # The request goes state -> faulty -> restarting: both steps must be in the state machine.
    assert state is VmState.FAULTY or VmState.FAULTY in TRANSITIONS[state]
    assert VmState.RESTARTING in TRANSITIONS[VmState.FAULTY]
