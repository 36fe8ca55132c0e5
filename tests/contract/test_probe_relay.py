"""vmq.relay.ProbeRelay over RedisStore on fakeredis and a real redis-server, with FakeHypervisor's fake agents
and fake guests on unix sockets for the channel path. The tests drive ``step`` and publish probes themselves."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.test_channel_relay import FakeGuest, signed_line
from tests.contract.test_monitor_store import Backend, make_settings
from vmq.hypervisor.fake import FakeHypervisor
from vmq.inventory import sync_inventory
from vmq.keys import Keys
from vmq.model import RESPONDER_CHANNEL, DomainInfo, DomainStatus
from vmq.ports import Store
from vmq.relay import ProbeRelay
from vmq.relayed import RelayedAnswers
from vmq.sim.localcluster import free_port
from vmq.store.redis import RedisStore, connect

HOST = "node1"
NS = "t"


class RelayWorld:
    """A store with this host's inventory, a fake hypervisor, one relay, and a way to publish probes."""

    def __init__(self, backend: Backend, domains: dict[str, tuple[DomainStatus, str]], **settings: Any) -> None:
        self.client = backend.client()
        self.keys = Keys(NS)
        self.store: Store = RedisStore(self.client, self.keys)
        self.settings = make_settings(host_name=HOST, inventory_interval_s=60, **settings)
        self.hypervisor = FakeHypervisor(domains=[DomainInfo(vm, f"uuid-{vm}", status)
                                                  for vm, (status, _) in domains.items()])
        self.paths = {vm: path for vm, (_, path) in domains.items()}
        self.store_getter: Callable[[], Store] = lambda: self.store
        self.round = 0
        self.relay: ProbeRelay | None = None

    def place(self) -> None:
        sync_inventory(self.store, self.hypervisor, HOST, 15)
        for vm, path in self.paths.items():
            if path != "redis":
                self.store.vms.set_fields(vm, {"probe_path_set": path})

    def start(self, **options: Any) -> ProbeRelay:
        self.place()
        self.relay = ProbeRelay(self.settings, HOST, lambda: self.store_getter(), lambda: self.hypervisor,
                                **options)
        self.relay.step(0.0)  # reads the inventory and subscribes
        return self.relay

    def probe(self) -> int:
        self.round += 1
        body = {"v": 1, "type": "probe", "round": self.round, "nonce": os.urandom(16).hex(),
                "sent_ms": int(time.time() * 1000)}
        self.client.publish(self.keys.probe_channel, json.dumps(body, separators=(",", ":")))
        return self.round

    def batches(self) -> list[tuple[int, str, list[dict[str, Any]]]]:
        """(arrival ms, host, answers) of every relayed batch."""
        out = []
        reader = RelayedAnswers()  # cover entries expanded against their host's full listing
        for entry_id, fields in self.client.xrange(self.keys.relay_stream):
            ms = int(entry_id.decode().split("-")[0])
            out.append((ms, fields[b"h"].decode(), reader.answers((entry_id, fields))))
        return out

    def answers(self) -> list[dict[str, Any]]:
        return [answer for _, _, batch in self.batches() for answer in batch]

    def run_until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        assert self.relay is not None
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out; stats {self.relay.stats.snapshot()}"
            self.relay.step(0.01)


@pytest.fixture
def make_world(backend: Backend) -> Iterator[Callable[..., RelayWorld]]:
    made: list[RelayWorld] = []

    def make(domains: dict[str, tuple[DomainStatus, str]], **settings: Any) -> RelayWorld:
        made.append(RelayWorld(backend, domains, **settings))
        return made[-1]

    yield make
    for world in made:
        if world.relay is not None:
            world.relay.close()


RUNNING, PAUSED, SHUTOFF = DomainStatus.RUNNING, DomainStatus.PAUSED, DomainStatus.SHUTOFF


def test_agent_answers_arrive_as_batches_and_only_running_relayed_vms_are_asked(
        make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent"), "a-2": (RUNNING, "agent"), "a-paused": (PAUSED, "agent"),
                        "a-off": (SHUTOFF, "agent"), "r-1": (RUNNING, "redis")})
    relay = world.start(info_every_rounds=1)  # every answer carries its state parameters
    assert sorted(relay.agent_vms) == ["a-1", "a-2"]
    round_id = world.probe()
    world.run_until(lambda: len(world.answers()) == 2)
    answers = sorted(world.answers(), key=lambda a: a["vm"])
    assert [a["vm"] for a in answers] == ["a-1", "a-2"]
    for answer in answers:
        assert set(answer) == {"vm", "p", "round", "nonce", "latency_ms", "guest_ms", "info"}
        assert (answer["p"], answer["round"]) == ("agent", round_id)
        assert len(answer["nonce"]) == 32 and answer["latency_ms"] > 0
        assert abs(answer["guest_ms"] - time.time() * 1000) < 5000
    assert {host for _, host, _ in world.batches()} == {HOST}
    asked = {name for op, name in world.hypervisor.calls if op == "agent_ping"}
    assert asked == {"a-1", "a-2"}  # paused, shut off and redis-path VMs are not asked
    assert relay.stats.counts["answers_agent"] == 2 and relay.stats.flushes >= 1


def test_guest_info_rides_along_every_nth_round(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent")})
    world.start(info_every_rounds=2)
    world.probe()
    world.run_until(lambda: len(world.answers()) == 1)
    world.probe()
    world.run_until(lambda: len(world.answers()) == 2)
    with_info = [answer for answer in world.answers() if "info" in answer]
    assert len(with_info) == 1, "every second round per VM (which one depends on the VM: spread over rounds)"
    assert with_info[0]["info"]["os_id"] == "debian" and with_info[0]["info"]["filesystems"][0]["mountpoint"] == "/"
    assert with_info[0]["latency_ms"] > 0, "the state parameters ride along with the info"
    assert [set(a) for a in world.answers() if "info" not in a] == [{"vm", "p", "round", "nonce"}]


def test_a_hung_agent_costs_only_its_own_vm_and_is_skipped_while_its_call_runs(
        make_world: Callable[..., RelayWorld]) -> None:
    vms = {f"a-{i}": (RUNNING, "agent") for i in range(6)}
    world = make_world(vms)
    world.hypervisor.set_agent("a-0", "hang")
    relay = world.start()
    world.probe()
    world.run_until(lambda: len(world.answers()) == 5)
    assert "a-0" not in {a["vm"] for a in world.answers()}
    delays = relay.stats.snapshot()["flush_delay_ms"]
    print(f"flush delay of the healthy VMs' answers beside a hung one: p50 {delays['p50']:.1f} ms, "
          f"p99 {delays['p99']:.1f} ms")
    assert delays["p99"] < 100  # ~50 ms flush interval; 2 shared cores
    world.probe()  # a-0's call (fast lane: 0.25 s) may still run: then it is skipped, not queued
    world.run_until(lambda: len(world.answers()) == 10)
    world.run_until(lambda: relay.stats.drops["agent_timeout"] >= 1)
    assert relay.stats.drops["agent_busy"] + relay.stats.drops["agent_timeout"] >= 2
    assert "a-0" not in {a["vm"] for a in world.answers()}


def test_busy_vm_is_skipped_not_queued(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent"), "a-2": (RUNNING, "agent")})
    world.hypervisor.set_agent("a-1", latency_s=0.2)
    relay = world.start()
    world.probe()
    world.run_until(lambda: len(world.answers()) == 1)  # a-2; a-1 still in its call
    world.probe()
    world.run_until(lambda: relay.stats.drops["agent_busy"] == 1)
    world.run_until(lambda: len(world.answers()) == 3)
    pings = [name for op, name in world.hypervisor.calls if op == "agent_ping"]
    assert pings.count("a-1") == 1 and pings.count("a-2") == 2


def test_unavailable_or_garbage_agents_give_no_answer_and_are_counted(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent"), "a-absent": (RUNNING, "agent"), "a-bad": (RUNNING, "agent")})
    world.hypervisor.set_agent("a-absent", "absent")
    world.hypervisor.set_agent("a-bad", "garbage")
    relay = world.start()
    world.probe()
    world.run_until(lambda: relay.stats.drops["agent_unavailable"] == 1 and relay.stats.drops["agent_invalid"] == 1
                    and len(world.answers()) == 1)
    assert [a["vm"] for a in world.answers()] == ["a-1"]
    world.run_until(lambda: bool(marks(world)))
    assert marks(world)[0][1] == [], "no agent, or nonsense from it, is the guest's own silence: evidence"


def test_a_domain_paused_since_the_last_inventory_gives_no_answer(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent")})
    relay = world.start()
    world.hypervisor.suspend("a-1")
    round_id = world.probe()
    world.run_until(lambda: relay.stats.drops["not_running"] == 1 and bool(marks(world)))
    assert marks(world)[0] == (round_id, ["a-1"]), "not asked: the lifecycle events and inventory judge it"
    world.place()  # the next inventory pass sees it paused
    relay.refresh()
    assert relay.agent_vms == [] and world.answers() == []


def test_the_relay_heartbeat_is_renewed_each_round(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent")})
    world.start()

    def seen() -> int:
        value = world.client.hget(world.keys.host(HOST), "relay_seen_ms")
        return int(value) if value else 0

    world.probe()
    world.run_until(lambda: seen() > 0)
    first = seen()
    time.sleep(0.005)
    world.probe()
    world.run_until(lambda: seen() > first)


def test_garbage_and_repeated_probes_are_skipped_and_counted(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent")})
    relay = world.start()
    world.client.publish(world.keys.probe_channel, b'{"v":1,"type":"probe","round":"x"}')
    world.client.publish(world.keys.probe_channel, b"\xff\xfe")
    world.run_until(lambda: relay.stats.counts["probe_invalid"] == 2)
    world.probe()
    world.round -= 1
    world.probe()  # the same round number again
    world.run_until(lambda: relay.stats.counts["probe_duplicate"] == 1 and len(world.answers()) == 1)


def test_the_relay_survives_redis_gone_and_answers_again_when_it_is_back(
        make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent")})
    gone = RedisStore(connect(f"redis://127.0.0.1:{free_port()}/0"), world.keys)
    world.place()
    world.store_getter = lambda: gone
    relay = ProbeRelay(world.settings, HOST, lambda: world.store_getter(), lambda: world.hypervisor)
    world.relay = relay
    for _ in range(5):
        relay.step(0.05)
    assert relay.stats.counts["subscribe_failed"] >= 1 and relay.stats.counts["inventory_failed"] >= 1
    world.store_getter = lambda: world.store  # Redis is back
    world.run_until(lambda: relay.agent_vms == ["a-1"] and relay.feeds.feed is not None, timeout_s=10)
    world.probe()
    world.run_until(lambda: len(world.answers()) == 1)


@pytest.mark.parametrize("form", ["compact", "cover"])
def test_answers_that_cannot_be_written_wait_for_the_next_flush(make_world: Callable[..., RelayWorld],
                                                                form: str) -> None:
    world = make_world({"a-1": (RUNNING, "agent")}, relay_form=form)
    world.hypervisor.set_agent("a-1", latency_s=0.2)  # its answer comes after the store is gone
    relay = world.start()
    gone = RedisStore(connect(f"redis://127.0.0.1:{free_port()}/0"), world.keys)
    world.probe()
    world.run_until(lambda: relay.stats.counts["probes"] == 1)
    world.store_getter = lambda: gone  # the flush (and the heartbeat) fail
    if form == "compact":
        world.run_until(lambda: relay.stats.counts["flush_failed"] >= 1)
        assert len(relay.outbox) == 1
    else:  # the partial entry (50 ms) fails, then the round's final one, which is kept and retried
        world.run_until(lambda: relay.stats.counts["answers_agent"] == 1 and relay.stats.counts["flush_failed"] >= 2)
        assert world.answers() == []
    world.store_getter = lambda: world.store
    world.run_until(lambda: len(world.answers()) == 1)


def test_channel_vms_answers_are_relayed_and_a_reply_for_another_vm_is_rejected(
        make_world: Callable[..., RelayWorld], guests: Callable[..., FakeGuest]) -> None:
    good = guests("vm-1")
    liar = guests("vm-2", lambda guest, conn, probe: conn.sendall(signed_line("vm-3", probe)))
    world = make_world({"vm-1": (RUNNING, "channel"), "vm-2": (RUNNING, "channel"),
                        "vm-4": (RUNNING, "channel")})
    world.hypervisor.set_channels("vm-1", {RESPONDER_CHANNEL: str(good.path)})
    world.hypervisor.set_channels("vm-2", {RESPONDER_CHANNEL: str(liar.path)})
    world.hypervisor.set_channels("vm-4", {RESPONDER_CHANNEL: str(Path(good.path).parent / "none.sock")})
    relay = world.start()
    assert sorted(relay.channel_vms) == ["vm-1", "vm-2", "vm-4"]  # vm-4's socket missing: not connected
    round_id = world.probe()
    world.run_until(lambda: len(world.answers()) == 1 and relay.stats.drops["wrong_vm"] == 1)
    [answer] = world.answers()
    assert set(answer) == {"vm", "p", "m", "s"} and (answer["vm"], answer["p"]) == ("vm-1", "channel")
    message = json.loads(answer["m"])
    assert (message["vm"], message["round"]) == ("vm-1", round_id) and len(answer["s"]) == 64


def marks(world: RelayWorld) -> list[tuple[int, list[str]]]:
    """(round, unasked VMs) of every batch that ends a round, in stream order."""
    return [(int(fields[b"r"]), json.loads(fields[b"u"]))
            for _, fields in world.client.xrange(world.keys.relay_stream) if b"r" in fields]


def test_each_round_ends_with_a_mark_after_its_answers_so_silence_in_it_becomes_evidence(
        make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent"), "a-2": (RUNNING, "agent")})
    world.hypervisor.set_agent("a-2", "hang")
    world.start()
    first = world.probe()
    world.run_until(lambda: bool(marks(world)))
    assert marks(world) == [(first, [])], "a-2 was asked (and hung): its silence is evidence"
    entries = world.client.xrange(world.keys.relay_stream)
    # Cover entries: a-1's answer goes out in a partial entry while a-2's call still runs, the mark after it.
    answered_at = next(i for i, (_, f) in enumerate(entries) if b"c" in f and b"a-1" not in f[b"x"].split())
    marked_at = next(i for i, (_, f) in enumerate(entries) if b"r" in f)
    assert answered_at < marked_at, "a hung agent does not hold back the others' answers until its timeout"
    assert entries[marked_at][1][b"x"] == b"a-2" and b"r" not in entries[answered_at][1]
    second = world.probe()
    world.run_until(lambda: len(marks(world)) == 2)
    assert marks(world)[-1][0] == second


def test_a_vm_whose_call_never_started_in_its_round_is_named_unasked_in_the_mark(
        make_world: Callable[..., RelayWorld]) -> None:
    vms = [f"a-{i}" for i in range(8)]
    world = make_world({vm: (RUNNING, "agent") for vm in vms})
    relay = world.start(agent_workers=1, slow_workers=1)
    for vm in vms:  # one thread, 0.2 s a call, a round of 0.8 s: the last ones never start in time
        world.hypervisor.set_agent(vm, latency_s=0.2)
    world.probe()
    world.run_until(lambda: bool(marks(world)), timeout_s=10)
    [(_, unasked)] = marks(world)
    answered = {a["vm"] for a in world.answers()}
    assert unasked, "calls queued past their round are reported, so their silence is not judged"
    assert set(unasked) & answered == set() and set(unasked) | answered <= set(vms)
    assert relay.stats.counts["unasked"] == len(unasked)


def test_channel_vms_the_relay_cannot_reach_are_named_unasked_and_a_silent_connected_one_is_not(
        make_world: Callable[..., RelayWorld], guests: Callable[..., FakeGuest]) -> None:
    mute = guests("vm-1", lambda guest, conn, probe: None)  # connected, reads the probe, never answers
    world = make_world({"vm-1": (RUNNING, "channel"), "vm-2": (RUNNING, "channel"),
                        "vm-3": (RUNNING, "channel")})
    world.hypervisor.set_channels("vm-1", {RESPONDER_CHANNEL: str(mute.path)})
    world.hypervisor.set_channels("vm-2", {RESPONDER_CHANNEL: str(Path(mute.path).parent / "none.sock")})
    # vm-3's domain has no responder channel at all
    relay = world.start()
    assert relay.channel_vms == ["vm-1", "vm-2"] and relay.unlinked_vms == ["vm-3"]
    world.run_until(lambda: mute.connections == 1)
    round_id = world.probe()
    world.run_until(lambda: bool(marks(world)), timeout_s=5)
    assert marks(world) == [(round_id, ["vm-2", "vm-3"])] and mute.probes == 1, (
        "a host that cannot reach a channel asked nobody: only vm-1's silence is evidence")
    assert world.answers() == []


def test_agent_vms_of_a_host_whose_libvirt_fails_are_named_unasked(make_world: Callable[..., RelayWorld]) -> None:
    world = make_world({"a-1": (RUNNING, "agent"), "a-2": (RUNNING, "agent")})
    relay = world.start()
    world.hypervisor.set_unavailable()
    round_id = world.probe()
    world.run_until(lambda: bool(marks(world)))
    assert marks(world) == [(round_id, ["a-1", "a-2"])], "libvirt failing on the host is no evidence against a VM"
    assert relay.stats.drops["hypervisor_error"] == 2 and world.answers() == []
