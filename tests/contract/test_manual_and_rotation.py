"""The operator's restart (vmq.operator_restart) and key rotation with a grace period, on fakeredis and a real Redis."""

from __future__ import annotations

import pytest

from tests.contract.test_monitor_store import HOST_A, SECRET, World, _BusyGuest
from vmq.codec import encode_reply
from vmq.host_restart import ActivityCheck, restart_vm
from vmq.model import DomainInfo, DomainStatus, Transition, VmState
from vmq.operator_restart import manual_restart

NEW_KEY = "d4" * 32


def _budget_spent(world: World, vm: str, count: int) -> None:
    now_ms = world.store.clock.time_ms()
    world.client.zadd(world.keys.vm_restarts(vm), {f"old-{i}:{now_ms - 1000 - i}": now_ms - 1000 - i
                                                   for i in range(count)})


# ---------------------------------------------------------------- manual restart
def test_an_operator_restart_of_a_healthy_vm_opens_an_incident_and_goes_to_its_host_queue(world: World) -> None:
    world.healthy("web-1")
    outcome = manual_restart(world.monitor, "web-1", requested_by="ops@desk")
    assert (outcome.outcome, outcome.host, outcome.queue) == ("dispatched", HOST_A, f"host.{HOST_A}")
    [request] = world.dispatched
    assert (request.vm, request.host, request.manual, request.hard) == ("web-1", HOST_A, True, False)
    record = world.record("web-1")
    assert (record["state"], record["incident"], record["attempts"]) == ("restarting", outcome.incident, "1")
    assert outcome.incident.startswith("web-1:manual:") and outcome.generation == request.generation
    [requested] = world.events("restart_requested")
    assert (requested["from"], requested["to"], requested["requested_by"]) == ("healthy", "faulty", "ops@desk")
    [dispatched] = world.events("restart_dispatched")
    assert dispatched["manual"] == "true" and dispatched["queue"] == f"host.{HOST_A}"
    assert world.client.zcard(world.keys.vm_restarts("web-1")) == 1, "a manual restart counts in the budget"


def test_the_host_resets_a_manual_restart_even_when_the_guest_counters_move(world: World) -> None:
    world.healthy("web-1")
    manual_restart(world.monitor, "web-1")
    [request] = world.dispatched
    busy = _BusyGuest(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    outcome = restart_vm(world.store, busy, HOST_A, "web-1", request.generation, request.incident, "w1",
                         activity=ActivityCheck(window_s=0.05, blocks=True), manual=request.manual)
    assert (outcome.acted, outcome.action) == (True, "reset")
    assert ("activity", "web-1") not in busy.calls, "an operator's request is not second-guessed"
    assert world.state("web-1") == VmState.RECOVERING.value


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("maintenance", "maintenance"),
        ("kill_switch", "kill switch"),
        ("host_gone", "heartbeat is late or gone"),
        ("shutoff", "shut off"),
        ("restarting", "already in progress"),
    ],
)
def test_a_manual_restart_is_refused_with_the_reason_and_audited(world: World, setup: str, words: str) -> None:
    world.healthy("web-1")
    if setup == "maintenance":
        world.store.vms.transition(Transition("web-1", (VmState.HEALTHY,), VmState.MAINTENANCE,
                                              world.store.clock.time_ms(), {"type": "maintenance", "host": HOST_A}))
    elif setup == "kill_switch":
        world.store.hosts.set_kill_switch(None)
    elif setup == "host_gone":
        world.store.hosts.drop_heartbeat(HOST_A)
    elif setup == "shutoff":
        world.store.vms.write_many({"web-1": {"domain_status": "shutoff", "domain_reason": "destroyed"}})
    elif setup == "restarting":
        manual_restart(world.monitor, "web-1")
        world.dispatched.clear()
    before = world.state("web-1")
    outcome = manual_restart(world.monitor, "web-1", force=True)
    assert outcome.outcome == "refused" and words in outcome.reasons[0], outcome.reasons
    assert world.dispatched == [] and world.state("web-1") == before
    assert words in world.events("restart_refused")[-1]["reasons"]


def test_an_exhausted_budget_refuses_a_manual_restart_unless_forced(world: World) -> None:
    world.healthy("web-1")
    _budget_spent(world, "web-1", world.settings.max_restarts)
    refused = manual_restart(world.monitor, "web-1")
    assert refused.outcome == "refused" and "--force" in refused.reasons[0]
    assert world.dispatched == []
    forced = manual_restart(world.monitor, "web-1", force=True)
    assert forced.outcome == "dispatched" and "forced past it" in forced.reasons[-1]
    assert [r.vm for r in world.dispatched] == ["web-1"]
    assert world.events("restart_dispatched")[-1]["force"] == "true"


def test_a_manual_restart_of_an_unknown_vm_is_refused(world: World) -> None:
    assert manual_restart(world.monitor, "nope").reasons == ["unknown VM nope"]


# ---------------------------------------------------------------- key rotation
def _reply_with(world: World, vm: str, round_id: int, key_hex: str) -> None:
    message, signature = encode_reply(vm, round_id, world.nonce(round_id), "boot-0001", round_id, {},
                                      bytes.fromhex(key_hex))
    world.send({"m": message, "s": signature})


def test_a_rotated_key_is_accepted_alongside_the_new_one_during_the_grace(world: World) -> None:
    world.healthy("web-1")
    world.store.keyring.rotate_secret("web-1", NEW_KEY, grace_ms=60_000)
    round_1 = world.probe()
    _reply_with(world, "web-1", round_1, SECRET["web-1"])  # the guest has not been updated yet
    report = world.tick_after_arrivals()
    assert (report.valid, report.rejected) == (1, {})
    assert world.store.stats.counters()[0]["replies_previous_key"] == 1
    round_2 = world.probe()
    _reply_with(world, "web-1", round_2, NEW_KEY)  # now it has
    assert world.tick_after_arrivals().valid == 1
    assert world.store.stats.counters()[0]["replies_previous_key"] == 1


def test_a_rotated_key_is_refused_once_its_grace_has_passed(world: World) -> None:
    world.healthy("web-1")
    until_ms = world.store.keyring.rotate_secret("web-1", NEW_KEY, grace_ms=5)
    world.wait_past(until_ms + 1)
    round_id = world.probe()
    _reply_with(world, "web-1", round_id, SECRET["web-1"])
    report = world.tick_after_arrivals()
    assert (report.valid, report.rejected) == (0, {"bad_signature": 1})


def test_a_rotation_without_grace_refuses_the_old_key_at_once_and_a_third_key_never_works(world: World) -> None:
    world.healthy("web-1")
    world.store.keyring.rotate_secret("web-1", NEW_KEY, grace_ms=0)
    round_id = world.probe()
    _reply_with(world, "web-1", round_id, SECRET["web-1"])
    _reply_with(world, "web-1", round_id, SECRET["web-2"])
    assert world.tick_after_arrivals().rejected == {"bad_signature": 2}


def test_rotating_a_vm_without_a_key_is_an_error_and_revoking_drops_the_grace_key(world: World) -> None:
    from vmq.errors import StoreError

    with pytest.raises(StoreError, match="has no key"):
        world.store.keyring.rotate_secret("ghost", NEW_KEY, grace_ms=1000)
    world.healthy("web-1")
    world.store.keyring.rotate_secret("web-1", NEW_KEY, grace_ms=60_000)
    assert "web-1" in world.store.keyring.previous_secrets()
    assert world.store.keyring.delete_secret("web-1")
    assert world.store.keyring.previous_secrets() == {} and "web-1" not in world.store.keyring.secrets()
