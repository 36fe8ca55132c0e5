"""Compact agent batches (``q`` round, ``n`` nonce, ``k`` VMs, ``s`` state parameters of some): one entry per host
and round, checked once for its nonce by the monitor, each VM vouched for and recorded by Redis
(vmq/lua/relay_apply.lua). Bad input in any field is counted by reason and costs no other VM its answer. The older
form (an object per agent answer in ``a``) still counts. On fakeredis and a real redis-server."""

from __future__ import annotations

import json

from tests.contract.test_monitor_store import HOST_A, HOST_B, World
from tests.contract.test_relayed_answers import agent_answer, agent_vm, batch, relayed
from vmq.model import ProbePath, VmState
from vmq.relayed import MAX_AGENT_DOC_BYTES
from vmq.store.relays import MAX_ANSWERS_PER_ENTRY, batch_entries


def xadd(world: World, fields: dict[str, str]) -> None:
    world.client.xadd(world.keys.relay_stream, fields)


def test_a_flush_writes_one_compact_entry_per_round_and_the_channel_answers_apart() -> None:
    answers = [{"vm": "a-1", "p": "agent", "round": 7, "nonce": "n7", "latency_ms": 1.0, "guest_ms": 5},
               {"vm": "a-2", "p": "agent", "round": 7, "nonce": "n7", "latency_ms": 2.0, "guest_ms": 6,
                "info": {"os_id": "debian"}},
               {"vm": "a-1", "p": "agent", "round": 8, "nonce": "n8", "latency_ms": 1.0, "guest_ms": 7},
               {"vm": "c-1", "p": "channel", "m": "{}", "s": "00"}]
    entries = batch_entries("node1", answers)
    assert entries[0] == {"h": "node1", "a": '[{"vm":"c-1","p":"channel","m":"{}","s":"00"}]'}
    assert entries[1] == {"h": "node1", "q": "7", "n": "n7", "k": "a-1 a-2",
                          "s": '{"a-2":{"latency_ms":2.0,"guest_ms":6,"info":{"os_id":"debian"}}}'}
    assert entries[2] == {"h": "node1", "q": "8", "n": "n8", "k": "a-1"}
    many = [{"vm": f"a-{i}", "p": "agent", "round": 1, "nonce": "n"} for i in range(MAX_ANSWERS_PER_ENTRY + 1)]
    assert [len(e["k"].split()) for e in batch_entries("node1", many)] == [MAX_ANSWERS_PER_ENTRY, 1]


def test_one_compact_entry_heals_every_vm_it_names_and_refuses_the_others_by_reason(world: World) -> None:
    for vm in ("a-1", "a-2", "a-3"):
        agent_vm(world, vm)
    agent_vm(world, "b-1", host=HOST_B)
    relayed(world, "web-1", ProbePath.CHANNEL)
    round_id = world.probe()
    xadd(world, {"h": HOST_A, "q": str(round_id), "n": world.nonce(round_id),
                 "k": "a-1 a-2 a-3 b-1 web-1 ghost a-1"})
    report = world.tick_after_arrivals()
    assert sorted(report.healed) == ["a-1", "a-2", "a-3"]
    assert report.rejected == {"wrong_host": 1, "wrong_path": 1, "unknown_vm": 1}
    assert world.state("b-1") == world.state("web-1") == VmState.UNKNOWN.value
    rounds = world.client.zmscore(world.keys.last_round, ["a-1", "a-2", "a-3"])
    assert rounds == [float(round_id)] * 3


def test_a_compact_entry_with_another_rounds_nonce_counts_for_none_of_its_vms(world: World) -> None:
    agent_vm(world, "a-1")
    agent_vm(world, "a-2")
    first, second = world.probe(), world.probe()
    xadd(world, {"h": HOST_A, "q": str(second), "n": world.nonce(first), "k": "a-1 a-2"})
    xadd(world, {"h": HOST_A, "q": str(second + 5), "n": world.nonce(second), "k": "a-1"})  # not a round sent
    report = world.tick_after_arrivals()
    assert report.healed == [] and report.rejected == {"stale_nonce": 3}


def test_a_compact_entry_without_round_or_nonce_is_malformed_and_the_next_one_counts(world: World) -> None:
    agent_vm(world, "a-1")
    round_id = world.probe()
    xadd(world, {"h": HOST_A, "k": "a-1"})
    xadd(world, {"h": HOST_A, "q": "zero", "n": world.nonce(round_id), "k": "a-1"})
    xadd(world, {"h": HOST_A, "q": str(round_id), "k": "a-1"})
    batch(world, HOST_A, [agent_answer(world, "a-1", round_id)])
    report = world.tick_after_arrivals()
    assert report.healed == ["a-1"] and report.rejected == {"malformed": 3}


def test_bad_state_parameters_are_refused_and_the_answers_still_count(world: World) -> None:
    agent_vm(world, "a-1")
    agent_vm(world, "a-2")
    round_id = world.probe()
    huge = {"a-2": {"info": {"junk": "x" * MAX_AGENT_DOC_BYTES}}}
    xadd(world, {"h": HOST_A, "q": str(round_id), "n": world.nonce(round_id), "k": "a-1", "s": "{not json"})
    xadd(world, {"h": HOST_A, "q": str(round_id), "n": world.nonce(round_id), "k": "a-2", "s": json.dumps(huge)})
    report = world.tick_after_arrivals()
    assert sorted(report.healed) == ["a-1", "a-2"]
    assert report.rejected == {"malformed": 1, "oversized": 1}
    assert world.client.hget(world.keys.last_reply, "a-2") is None


def test_state_parameters_are_saved_only_for_vms_the_entry_vouched_for(world: World) -> None:
    agent_vm(world, "a-1")
    agent_vm(world, "b-1", host=HOST_B)
    round_id = world.probe()
    params = {"a-1": {"latency_ms": 1.5}, "b-1": {"latency_ms": 9.9}, "ghost": {"latency_ms": 1.0}}
    xadd(world, {"h": HOST_A, "q": str(round_id), "n": world.nonce(round_id), "k": "a-1 b-1",
                 "s": json.dumps(params)})
    world.tick_after_arrivals()
    saved = json.loads(world.client.hget(world.keys.last_reply, "a-1"))
    assert (saved["vm"], saved["round"], saved["via"], saved["params"]) == ("a-1", round_id, "agent",
                                                                            {"latency_ms": 1.5})
    assert world.client.hget(world.keys.last_reply, "b-1") is None, "a host cannot write another host's VM"


def test_an_old_rounds_entry_after_a_newer_one_moves_nothing_and_is_counted_replayed(world: World) -> None:
    agent_vm(world, "a-1")
    first, second = world.probe(), world.probe()
    xadd(world, {"h": HOST_A, "q": str(second), "n": world.nonce(second), "k": "a-1"})
    world.tick_after_arrivals()
    seen = world.client.zscore(world.keys.last_seen, "a-1")
    xadd(world, {"h": HOST_A, "q": str(first), "n": world.nonce(first), "k": "a-1"})
    assert world.tick_after_arrivals().rejected == {"replayed": 1}
    assert world.client.zscore(world.keys.last_round, "a-1") == second
    assert world.client.zscore(world.keys.last_seen, "a-1") == seen, "a stale answer is no sign of life"


def test_agent_answers_in_the_older_per_answer_form_still_count(world: World) -> None:
    agent_vm(world, "a-1")
    round_id = world.probe()
    xadd(world, {"h": HOST_A, "a": json.dumps([agent_answer(world, "a-1", round_id)])})
    assert world.tick_after_arrivals().healed == ["a-1"]
