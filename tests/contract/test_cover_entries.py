"""Cover entries (docs/protocol.md): once per round a host names the agent VMs it asked that did not answer,
relative to its latest full listing; Redis vouches for each listed VM once per listing and keeps the others
covered (vmq/lua/relay_cover.lua), so a healthy round writes nothing per VM. Every rule of the per-VM paths must
hold: silence in a finished round is evidence, a round the host did not finish by its deadline is not, a host
vouches only for VMs its record places there on the agent path, a restart starts a VM's account afresh. On
fakeredis and a real redis-server."""

from __future__ import annotations

import json

from tests.contract.test_monitor_store import HOST_A, HOST_B, SECRET, World
from tests.contract.test_relayed_answers import agent_vm
from vmq.model import ProbePath, VmState
from vmq.relay_cover import cover_fields
from vmq.relayed import COVERED_ROUND, MAX_AGENT_DOC_BYTES


def cover(world: World, host: str, round_id: int, silent: tuple[str, ...] = (), listing: list[str] | None = None,
          base: int | None = None, unasked: tuple[str, ...] = (), final: bool = True) -> int:
    """XADD ``host``'s cover entry for ``round_id`` as its relay does; returns its arrival (Redis ms)."""
    fields = cover_fields(round_id, world.nonce(round_id), round_id if listing is not None else base or 0,
                          listing, silent)
    ids = world.store.relays.append(host, [], round_id if final else None, unasked, cover=fields)
    return int(ids[-1].split("-")[0])


def judged(world: World, round_id: int) -> list[str]:
    """Make ``round_id`` due, tick; the VMs flagged."""
    world.make_due(round_id)
    return world.monitor.tick().flagged


def covered_fleet(world: World, vms: list[str], host: str = HOST_A) -> int:
    """``vms`` on ``host``'s agent path, listed in a full entry and healthy; returns that round."""
    for vm in vms:
        agent_vm(world, vm, host)
    first = world.probe()
    cover(world, host, first, listing=vms)
    assert judged(world, first) == []
    assert all(world.state(vm) == VmState.HEALTHY.value for vm in vms)
    return first


def scores(world: World, vms: list[str]) -> list[float | None]:
    return list(world.client.zmscore(world.keys.last_round, vms))


def test_a_full_listing_heals_its_vms_and_later_rounds_write_nothing_per_vm(world: World) -> None:
    vms = ["a-1", "a-2", "a-3"]
    base = covered_fleet(world, vms)
    assert scores(world, vms) == [COVERED_ROUND] * 3
    for _ in range(5):
        round_id = world.probe()
        arrival = cover(world, HOST_A, round_id, base=base)
        assert judged(world, round_id) == []
        assert scores(world, vms) == [COVERED_ROUND] * 3, "a healthy round leaves every VM's score alone"
        assert world.store.replies.last_rounds(vms) == [float(round_id)] * 3  # the host's round stands for them
        assert world.store.replies.last_seen_many(vms) == [float(arrival)] * 3
    assert all(world.state(vm) == VmState.HEALTHY.value for vm in vms)


def test_a_vm_named_silent_in_a_round_its_host_finished_is_restarted_with_its_real_last_round(world: World) -> None:
    base = covered_fleet(world, ["a-1", "a-2"])
    second = world.probe()
    cover(world, HOST_A, second, base=base)
    assert judged(world, second) == []
    third = world.probe()
    cover(world, HOST_A, third, silent=("a-2",), base=base)
    world.make_due(third)
    report = world.monitor.tick()
    assert report.flagged == ["a-2"] and report.dispatched == ["a-2"] and world.dispatched[-1].host == HOST_A
    assert scores(world, ["a-1", "a-2"]) == [COVERED_ROUND, float(second)]
    [faulty] = world.events("faulty", "a-2")
    assert json.loads(faulty["evidence"])["rounds_missed"] == third - second


def test_a_round_whose_entry_is_not_in_by_its_deadline_judges_no_covered_vm(world: World) -> None:
    base = covered_fleet(world, ["a-1", "a-2"])
    second = world.probe()
    assert judged(world, second) == [], "no entry: the host's relay did not finish the round, no evidence"
    assert "did not report this round finished" in world.record("a-1")["decision"]
    cover(world, HOST_A, second, base=base)  # late: after the deadline
    third = world.probe()
    cover(world, HOST_A, third, base=base)
    assert judged(world, third) == []
    assert [world.state(vm) for vm in ("a-1", "a-2")] == [VmState.HEALTHY.value] * 2 and world.dispatched == []


def test_a_silent_vm_that_answers_again_is_covered_again_and_healed(world: World) -> None:
    base = covered_fleet(world, ["a-1"])
    second = world.probe()
    cover(world, HOST_A, second, silent=("a-1",), base=base)
    world.store.hosts.set_kill_switch(None)  # flagged, not restarted: it stays faulty
    assert judged(world, second) == ["a-1"] and world.state("a-1") == VmState.FAULTY.value
    third = world.probe()
    cover(world, HOST_A, third, base=base)
    report = world.tick_after_arrivals()
    assert report.healed == ["a-1"] and world.state("a-1") == VmState.HEALTHY.value
    assert scores(world, ["a-1"]) == [COVERED_ROUND]


def test_a_listing_vouches_only_for_its_own_agent_vms_and_covers_the_others_once_placed(world: World) -> None:
    agent_vm(world, "a-1")
    agent_vm(world, "b-1", host=HOST_B)
    world.register("web-2")  # the redis path
    first = world.probe()
    cover(world, HOST_A, first, listing=["a-1", "b-1", "web-2", "ghost"])
    report = world.tick_after_arrivals()
    assert report.healed == ["a-1"]
    assert report.rejected == {"wrong_host": 1, "wrong_path": 1, "unknown_vm": 1}
    assert world.state("b-1") == VmState.UNKNOWN.value and world.state("web-2") == VmState.UNKNOWN.value
    world.store.vms.write_many({"b-1": {"host": HOST_A}})  # b-1 moved here: the host's next entry covers it
    second = world.probe()
    cover(world, HOST_A, second, base=first)
    report = world.tick_after_arrivals()
    assert report.healed == ["b-1"] and report.rejected == {}
    assert scores(world, ["b-1", "web-2"])[0] == COVERED_ROUND and scores(world, ["web-2"])[0] < COVERED_ROUND


def test_an_entry_relative_to_a_listing_redis_never_applied_is_refused_until_the_next_full_one(world: World) -> None:
    base = covered_fleet(world, ["a-1"])
    second = world.probe()
    cover(world, HOST_A, second, silent=("a-1",), base=base + 1)  # the listing of base + 1 never arrived
    world.make_due(second)
    report = world.monitor.tick()
    assert report.rejected == {"cover_base": 1} and report.flagged == []  # nothing vouched: no evidence
    third = world.probe()
    cover(world, HOST_A, third, silent=("a-1",), listing=["a-1"])
    assert judged(world, third) == ["a-1"]


def test_a_vm_left_out_of_the_listing_keeps_its_real_last_round_and_is_judged_on_its_own(world: World) -> None:
    base = covered_fleet(world, ["a-1", "a-2"])
    second = world.probe()
    cover(world, HOST_A, second, base=base)
    world.tick_after_arrivals()
    third = world.probe()
    cover(world, HOST_A, third, listing=["a-1"])  # the host no longer asks a-2 (its relay lost it)
    world.tick_after_arrivals()
    assert scores(world, ["a-2"]) == [float(second)]
    assert judged(world, third) == ["a-2"], "a VM nobody vouches for any more is silent"


def test_a_vm_moved_to_another_host_is_covered_there_and_its_old_host_cannot_silence_it(world: World) -> None:
    covered_fleet(world, ["a-1", "a-2"])
    agent_vm(world, "b-1", host=HOST_B)
    world.store.vms.write_many({"a-2": {"host": HOST_B}})  # migrated
    second = world.probe()
    cover(world, HOST_B, second, listing=["b-1", "a-2"])
    cover(world, HOST_A, second, silent=("a-2",), base=second - 1)  # the old host has not noticed yet
    assert judged(world, second) == []
    assert world.client.hget(world.keys.relay_cover_owner, "a-2") == HOST_B.encode()
    assert scores(world, ["a-2"]) == [COVERED_ROUND]


def test_a_restart_starts_the_vms_account_afresh_and_only_a_newer_round_heals_it(world: World) -> None:
    base = covered_fleet(world, ["a-1"])
    second = world.probe()
    cover(world, HOST_A, second, silent=("a-1",), base=base)
    assert judged(world, second) == ["a-1"] and world.state("a-1") == VmState.RESTARTING.value
    third, fourth = world.probe(), world.probe()
    world.store.vms.start_monitoring("a-1", world.store.clock.time_ms())  # what a restart does: owed from fourth
    cover(world, HOST_A, third, base=base)  # the old boot's answer to a round sent before the restart
    assert world.tick_after_arrivals().healed == []
    assert scores(world, ["a-1"]) == [fourth - 0.5]
    cover(world, HOST_A, fourth, base=base)
    assert world.tick_after_arrivals().healed == ["a-1"] and scores(world, ["a-1"]) == [COVERED_ROUND]


def test_a_partial_entry_then_the_final_one_and_a_replayed_entry(world: World) -> None:
    base = covered_fleet(world, ["a-1", "a-2"])
    second = world.probe()
    cover(world, HOST_A, second, silent=("a-2",), base=base, final=False)  # a-2's call still runs
    cover(world, HOST_A, second, base=base)  # then it answered: the final entry names nobody silent
    cover(world, HOST_A, second, silent=("a-1", "a-2"), base=base)  # written twice: the round is closed
    world.make_due(second)
    report = world.monitor.tick()
    assert report.flagged == [] and report.rejected == {"replayed": 1}
    assert scores(world, ["a-1", "a-2"]) == [COVERED_ROUND] * 2


def test_a_covered_vm_answering_on_its_own_path_leaves_the_cover_and_counts_there(world: World) -> None:
    base = covered_fleet(world, ["web-1"])
    world.store.keyring.set_secret("web-1", SECRET["web-1"])
    world.store.vms.set_fields("web-1", {"probe_path_set": ProbePath.REDIS.value})  # its responder answers now
    second = world.probe()
    world.reply("web-1", second)  # its host has not dropped it yet
    report = world.tick_after_arrivals()
    assert report.rejected == {} and scores(world, ["web-1"]) == [float(second)]
    assert world.client.hget(world.keys.relay_cover_owner, "web-1") is None
    cover(world, HOST_A, second + 0, base=base)  # the host's entry: it no longer vouches (wrong path)
    third = world.probe()
    assert judged(world, third) == ["web-1"], "silent on its own path: judged there"


def test_a_partial_entry_alone_heals_who_answered_but_makes_no_silence_evidence(world: World) -> None:
    base = covered_fleet(world, ["a-1", "a-2"])
    second = world.probe()
    cover(world, HOST_A, second, silent=("a-2",), base=base, final=False)  # a-2's call still ran at the deadline
    assert judged(world, second) == []
    assert "did not report this round finished" in world.record("a-2")["decision"]
    assert world.store.replies.last_rounds(["a-1", "a-2"]) == [float(second), float(base)]


def test_state_parameters_are_saved_for_vouched_answers_and_bad_ones_are_refused(world: World) -> None:
    base = covered_fleet(world, ["a-1", "a-2", "a-3"])
    second = world.probe()
    params = {"a-1": {"latency_ms": 1.3, "info": {"os_id": "debian"}}, "a-2": {"info": {"os_id": "rhel"}},
              "a-3": {"info": {"junk": "x" * MAX_AGENT_DOC_BYTES}}, "ghost": {"info": {}}, "bad name": {}}
    fields = cover_fields(second, world.nonce(second), base, None, {"a-2"}, params)
    world.store.relays.append(HOST_A, [], second, [], cover=fields)
    report = world.tick_after_arrivals()
    assert report.rejected == {"oversized": 1, "malformed": 1}
    saved = json.loads(world.client.hget(world.keys.last_reply, "a-1"))
    assert saved == {"v": 1, "vm": "a-1", "round": second, "via": "agent", "host": HOST_A,
                     "params": {"latency_ms": 1.3, "info": {"os_id": "debian"}}}
    assert world.client.hget(world.keys.last_reply, "a-2") is None, "a-2 did not answer: nothing of it is saved"
    assert world.client.hget(world.keys.last_reply, "ghost") is None
    third = world.probe()
    xadd = {"h": HOST_A, **cover_fields(third, world.nonce(third), base, None, set()), "s": "{not json",
            "r": str(third), "u": "[]"}
    world.client.xadd(world.keys.relay_stream, xadd)
    report = world.tick_after_arrivals()
    assert report.rejected == {"malformed": 1} and judged(world, third) == []
