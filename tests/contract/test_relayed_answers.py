"""Answers relayed by a VM's own host (`channel` and `agent` paths), judged by the monitor: the batch's arrival
(Redis' stream id) is every answer's arrival, a host vouches only for its own VMs on their own path, and a
relayed VM's silence in a round is evidence only when its host's relay reported that very round finished, by the
deadline, having asked it. On fakeredis and a real redis-server."""

from __future__ import annotations

import json

import pytest

from tests.contract.test_monitor_store import BOOT_ID, HOST_A, HOST_B, SECRET, World
from vmq.codec import encode_reply
from vmq.model import ProbePath, VmState


def relayed(world: World, vm: str, path: ProbePath, host: str = HOST_A) -> None:
    """``vm`` registered on ``host`` with its answers on ``path``."""
    world.register(vm, host)
    world.store.vms.set_fields(vm, {"probe_path_set": path.value})


def agent_vm(world: World, vm: str, host: str = HOST_A) -> None:
    """``vm`` on ``host``'s agent path, with no responder key (as agent VMs are), its host alive."""
    assert world.store.vms.register_vm(vm, world.store.clock.time_ms())
    world.store.vms.write_many({vm: {"host": host, "domain_status": "running", "probe_path_set": "agent"}})
    world.heartbeat(host)


def agent_answer(world: World, vm: str, round_id: int, nonce: str | None = None,
                 info: dict[str, object] | None = None) -> dict[str, object]:
    answer = {"vm": vm, "p": "agent", "round": round_id, "nonce": nonce or world.nonce(round_id), "latency_ms": 1.3,
              "guest_ms": 1_700_000_000_000}
    return answer if info is None else {**answer, "info": info}


def channel_answer(world: World, vm: str, round_id: int, key_of: str | None = None) -> dict[str, object]:
    message, signature = encode_reply(vm, round_id, world.nonce(round_id), BOOT_ID, round_id, {"uptime_s": 1.0},
                                      bytes.fromhex(SECRET[key_of or vm]))
    return {"vm": vm, "p": "channel", "m": message.decode(), "s": signature}


def batch(world: World, host: str, answers: list[dict[str, object]], finished: int | None = None,
          unasked: tuple[str, ...] = ()) -> int:
    """XADD one flush as ``host``'s relay does (ending round ``finished``); returns the arrival (Redis ms) of its
    last entry (a flush is one entry per kind and round of answers)."""
    return int(world.store.relays.append(host, answers, finished, unasked)[-1].split("-")[0])


def silent_round(world: World, vm: str) -> int:
    """``vm`` answered one judged round through its host; returns the next round, sent and not yet due."""
    first = world.probe()
    batch(world, HOST_A, [agent_answer(world, vm, first)], finished=first)
    world.make_due(first)
    world.monitor.tick()
    assert world.state(vm) == VmState.HEALTHY.value
    return world.probe()


def test_an_agent_vm_answered_through_its_hosts_batch_turns_healthy_with_the_batch_arrival(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    round_id = world.probe()
    arrival = batch(world, HOST_A, [agent_answer(world, "web-1", round_id, info={"os_id": "debian"})])
    report = world.tick_after_arrivals()
    assert report.healed == ["web-1"] and world.state("web-1") == VmState.HEALTHY.value
    [event] = world.events("healthy")
    assert (event["round"], event["time"]) == (str(round_id), str(arrival))
    saved = json.loads(world.client.hget(world.keys.last_reply, "web-1"))
    assert (saved["via"], saved["host"], saved["round"]) == ("agent", HOST_A, round_id)
    assert saved["params"] == {"latency_ms": 1.3, "guest_ms": 1_700_000_000_000, "info": {"os_id": "debian"}}


def test_an_agent_vm_whose_host_finished_the_round_without_its_answer_is_faulty_and_restarted(
        world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    second = silent_round(world, "web-1")
    batch(world, HOST_A, [], finished=second)  # the relay asked; the agent did not answer in time
    world.make_due(second)
    report = world.monitor.tick()
    assert report.flagged == ["web-1"] and report.dispatched == ["web-1"]
    assert world.dispatched[-1].host == HOST_A


def test_a_vm_its_host_could_not_ask_is_not_judged_for_that_round(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    second = silent_round(world, "web-1")
    batch(world, HOST_A, [], finished=second, unasked=("web-1",))
    world.make_due(second)
    report = world.monitor.tick()
    assert report.flagged == [] and world.state("web-1") == VmState.HEALTHY.value
    assert "could not ask this VM" in world.record("web-1")["decision"]


def test_a_round_finished_mark_that_arrives_after_the_deadline_makes_no_silence_evidence(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    second = silent_round(world, "web-1")
    world.make_due(second)
    batch(world, HOST_A, [], finished=second)  # too late: the round was due before it arrived
    assert world.monitor.tick().flagged == []


def test_a_later_rounds_mark_does_not_make_an_earlier_rounds_silence_evidence(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    second = silent_round(world, "web-1")
    third = world.probe()  # the relay never heard the second round (pub/sub dropped it) but finished the third
    batch(world, HOST_A, [agent_answer(world, "web-1", third)], finished=third)
    world.make_due(second)
    report = world.monitor.tick()
    assert report.flagged == [], "the second round was never asked: its silence is no evidence"


def test_a_channel_vm_answered_with_its_own_signed_reply_through_its_host_is_healthy(world: World) -> None:
    relayed(world, "web-1", ProbePath.CHANNEL)
    round_id = world.probe()
    batch(world, HOST_A, [channel_answer(world, "web-1", round_id)])
    assert world.tick_after_arrivals().healed == ["web-1"]


def test_a_channel_answer_signed_with_another_vms_key_is_refused(world: World) -> None:
    relayed(world, "web-1", ProbePath.CHANNEL)
    relayed(world, "web-2", ProbePath.CHANNEL)
    round_id = world.probe()
    batch(world, HOST_A, [channel_answer(world, "web-1", round_id, key_of="web-2")])
    report = world.tick_after_arrivals()
    assert report.healed == [] and report.rejected == {"bad_signature": 1}


def test_a_host_cannot_vouch_for_a_vm_its_record_places_on_another_host(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT, host=HOST_A)
    round_id = world.probe()
    batch(world, HOST_B, [agent_answer(world, "web-1", round_id)])
    report = world.tick_after_arrivals()
    assert report.healed == [] and report.rejected == {"wrong_host": 1}
    assert world.state("web-1") == VmState.UNKNOWN.value


def test_an_answer_on_a_path_the_vm_is_not_on_is_refused(world: World) -> None:
    world.register("web-1")  # the redis path: its own responder must answer
    round_id = world.probe()
    batch(world, HOST_A, [agent_answer(world, "web-1", round_id)])
    report = world.tick_after_arrivals()
    assert report.healed == [] and report.rejected == {"wrong_path": 1}


def test_an_agent_answer_with_another_rounds_nonce_or_an_unknown_vm_is_refused(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    first = world.probe()
    second = world.probe()
    batch(world, HOST_A, [agent_answer(world, "web-1", second, nonce=world.nonce(first)),
                          agent_answer(world, "ghost", second)])
    report = world.tick_after_arrivals()
    assert report.healed == [] and report.rejected == {"stale_nonce": 1, "unknown_vm": 1}


def test_a_garbage_batch_is_counted_and_the_good_one_after_it_still_counts(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    round_id = world.probe()
    world.client.xadd(world.keys.relay_stream, {"h": HOST_A, "a": b"\xff not json"})
    world.client.xadd(world.keys.relay_stream, {"a": "[]"})
    batch(world, HOST_A, [{"vm": "web-1"}, agent_answer(world, "web-1", round_id)])
    report = world.tick_after_arrivals()
    assert report.healed == ["web-1"] and report.rejected == {"malformed": 3}


def test_a_replayed_relayed_answer_is_refused(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    round_id = world.probe()
    batch(world, HOST_A, [agent_answer(world, "web-1", round_id)])
    world.tick_after_arrivals()
    batch(world, HOST_A, [agent_answer(world, "web-1", round_id)])
    assert world.tick_after_arrivals().rejected == {"replayed": 1}


def test_relayed_vms_of_a_host_whose_relay_stopped_are_not_judged_and_not_restarted(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    world.register("web-2")  # on the redis path, same host: still judged
    first = world.probe()
    batch(world, HOST_A, [agent_answer(world, "web-1", first)], finished=first)
    world.reply("web-2", first)
    world.make_due(first)
    world.monitor.tick()
    second = world.probe()  # the relay stopped: no answer, no mark
    world.make_due(second)
    report = world.monitor.tick()
    assert report.flagged == ["web-2"], "the redis-path VM is judged as before"
    assert world.state("web-1") == VmState.HEALTHY.value
    assert "did not report this round finished" in world.record("web-1")["decision"]


def test_an_agent_vm_needs_no_responder_key_to_be_judged(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    world.store.keyring.delete_secret("web-1")
    round_id = world.probe()
    batch(world, HOST_A, [agent_answer(world, "web-1", round_id)])
    assert world.tick_after_arrivals().healed == ["web-1"]


def test_the_relayed_stream_is_read_to_the_deadline_like_the_reply_stream(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    second = silent_round(world, "web-1")
    batch(world, HOST_A, [], finished=second)  # the relay finished the round in time, without its answer
    deadline = world.make_due(second)
    batch(world, HOST_A, [agent_answer(world, "web-1", second)])  # after the deadline: too late
    report = world.monitor.tick()
    assert report.flagged == ["web-1"], f"an answer that arrived after the deadline {deadline} counts for nothing"


def agent_fleet(world: World, count: int) -> list[str]:
    """``count`` agent VMs on HOST_A with no responder key (as agent VMs are), each healthy after one round."""
    vms = [f"agent-{i}" for i in range(count)]
    for vm in vms:
        agent_vm(world, vm)
    first = world.probe()
    batch(world, HOST_A, [agent_answer(world, vm, first) for vm in vms], finished=first)
    world.make_due(first)
    world.monitor.tick()
    assert all(world.state(vm) == VmState.HEALTHY.value for vm in vms)
    return vms


@pytest.mark.parametrize(("silent", "held"), [(4, True), (3, False)], ids=["4 of 10: storm", "3 of 10: no storm"])
def test_the_storm_guard_counts_agent_vms_that_have_no_key(world: World, silent: int, held: bool) -> None:
    vms = agent_fleet(world, 10)
    assert world.store.keyring.monitored_count() == 0
    second = world.probe()
    batch(world, HOST_A, [agent_answer(world, vm, second) for vm in vms[silent:]], finished=second)
    world.make_due(second)
    report = world.monitor.tick()
    assert sorted(report.flagged) == sorted(vms[:silent])
    if held:  # more than 30 % of the ten silent at once: suspect the cluster, restart nothing
        assert report.dispatched == []
        assert all("storm guard: 4 of 10 VMs silent" in e["reasons"] for e in world.events("faulty"))
    else:  # 30 % is not more than 30 %: each judged on its own (two at once: the per-host limit)
        assert len(report.dispatched) == 2 and set(report.dispatched) <= set(vms[:silent])
        assert not [e for e in world.events("faulty") if "storm guard" in e["reasons"]]


def test_the_placements_read_for_relayed_answers_agree_with_the_records(world: World) -> None:
    relayed(world, "web-1", ProbePath.AGENT)
    world.register("web-2", HOST_B)
    world.register("web-3", HOST_A)
    world.store.vms.set_fields("web-3", {"probe_path_detected": ProbePath.CHANNEL.value})
    vms = ["web-1", "web-2", "web-3", "no-such-vm"]
    placed = [tuple(p) for p in world.store.vms.placements(vms)]
    assert placed == [(r.vm, r.exists, r.host, r.probe_path) for r in world.store.vms.records(vms)]
    assert [p[3] for p in placed[:3]] == [ProbePath.AGENT, ProbePath.REDIS, ProbePath.CHANNEL]
    assert placed[1][2] == HOST_B and not placed[3][1]
    assert world.store.vms.placements([]) == []
