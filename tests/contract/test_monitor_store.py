"""Monitor, restart and inventory use cases over RedisStore, run on fakeredis (Lua via lupa) and a real Redis.

Time: a real Redis' TIME cannot be faked, so a round is made due by rewriting its deadline in the pending
sorted set to "now" (every reply already added arrived at or before it) and waiting a few milliseconds.
Arrival times are the stream ids Redis stamps, exactly as in production.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis

from vmq.codec import encode_reply, reply_signature
from vmq.config import Settings, load_settings
from vmq.errors import HypervisorError
from vmq.host_restart import ActivityCheck, restart_vm
from vmq.hypervisor.fake import FakeHypervisor
from vmq.ingest import Ingestor, LatestReplies, RejectLog
from vmq.inventory import mark_degraded, sync_inventory
from vmq.keys import Keys
from vmq.model import DomainInfo, DomainStatus, RestartAction, RestartRequest, VmState
from vmq.monitor import Monitor, TickReport
from vmq.routing import host_queue
from vmq.sim.localcluster import free_port
from vmq.store.redis import RedisStore, connect

REDIS_SERVER = next((path for path in ("/usr/bin/redis-server", shutil.which("redis-server")) if path
                     and os.path.exists(path)), "")
NAMESPACE = "t"
HOST_A, HOST_B = "node1", "node2"
SECRET = {"web-1": "a1" * 32, "web-2": "b2" * 32, "web-3": "c3" * 32}
BOOT_ID = "boot-0001"


# ---------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A throw-away redis-server for this module: free port, no persistence, killed at teardown."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed")
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=2) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


@dataclass
class Backend:
    """Makes clients that all see the same data."""

    name: str
    make_client: Callable[[], redis.Redis]
    clients: list[redis.Redis] = field(default_factory=list)

    def client(self) -> redis.Redis:
        client = self.make_client()
        self.clients.append(client)
        return client


@pytest.fixture(params=["fakeredis", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        made = Backend("fakeredis", lambda: fakeredis.FakeRedis(server=server))
    else:
        port = request.getfixturevalue("redis_server")
        made = Backend("redis", lambda: connect(f"redis://127.0.0.1:{port}/0"))  # vmq's own client options
        made.client().flushall()
    yield made
    for client in made.clients:
        client.close()


# ---------------------------------------------------------------- the world a test drives
def make_settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {"namespace": NAMESPACE, "probe_interval_s": 1, "reply_timeout_s": 3,
                            "boot_grace_s": 0, "max_restarts": 3, "restart_window_s": 3600,
                            "host_heartbeat_interval_s": 20}
    return load_settings({**base, **changes})



class Broker:
    """The restart tasks' broker as the monitor sees it: records each request, or refuses while ``down``."""

    def __init__(self) -> None:
        self.sent: list[RestartRequest] = []
        self.down = False

    def dispatch(self, request: RestartRequest) -> None:
        if self.down:
            raise ConnectionError(f"broker down, cannot route {request.vm}")
        self.sent.append(request)


@dataclass
class World:
    backend: Backend
    client: redis.Redis
    keys: Keys
    store: RedisStore
    settings: Settings
    monitor: Monitor
    broker: Broker

    @property
    def dispatched(self) -> list[RestartRequest]:
        return self.broker.sent

    # -- setup
    def register(self, vm: str, host: str = HOST_A, status: DomainStatus = DomainStatus.RUNNING) -> None:
        """A VM as inventory + `vmq key set` leave it: unknown, keyed, placed on a live host."""
        assert self.store.vms.register_vm(vm, self.store.clock.time_ms())
        self.store.keyring.set_secret(vm, SECRET[vm])
        self.store.vms.write_many({vm: {"host": host, "domain_status": status.value}})
        self.heartbeat(host)

    def heartbeat(self, host: str) -> None:
        self.store.hosts.heartbeat(host, {"queue": host_queue(host), "seen_ms": self.store.clock.time_ms()}, 60_000)

    def other_monitor(self) -> Monitor:
        """A second timeout worker: its own connection, the same data and the same dispatch recorder."""
        store = RedisStore(self.backend.client(), self.keys)
        return Monitor(store, self.settings, self.broker.dispatch)

    # -- rounds and replies
    def probe(self) -> int:
        round_id, _ = self.monitor.probe()
        return round_id

    def nonce(self, round_id: int) -> str:
        raw = self.client.hget(self.keys.rounds, round_id)
        assert raw is not None, f"round {round_id} is not in the round book"
        return raw.decode().partition(":")[0]

    def signed_reply(self, vm: str, round_id: int, key_of: str | None = None,
                     nonce: str | None = None) -> tuple[bytes, str]:
        return encode_reply(vm, round_id, nonce or self.nonce(round_id), BOOT_ID, round_id, {"uptime_s": 1.0},
                            bytes.fromhex(SECRET[key_of or vm]))

    def send(self, fields: dict[str, bytes | str]) -> int:
        """XADD one entry to the reply stream as a guest would; returns its arrival ms (Redis time)."""
        entry_id = self.client.xadd(self.keys.reply_stream, fields)  # type: ignore[arg-type]
        return int(entry_id.decode().split("-")[0])

    def reply(self, vm: str, round_id: int) -> int:
        message, signature = self.signed_reply(vm, round_id)
        return self.send({"m": message, "s": signature})

    def wait_past(self, ms: int) -> None:
        while self.store.clock.time_ms() <= ms:
            time.sleep(0.002)

    def make_due(self, round_id: int, deadline_ms: int | None = None) -> int:
        """Set the round's deadline to ``deadline_ms`` (default: now) and wait until it has passed."""
        deadline = self.store.clock.time_ms() if deadline_ms is None else deadline_ms
        self.client.zadd(self.keys.rounds_pending, {str(round_id): deadline})
        self.wait_past(deadline)
        return deadline

    def tick_after_arrivals(self) -> TickReport:
        """Tick once every reply added so far lies strictly in the past (so the tick ingests it)."""
        self.wait_past(self.store.clock.time_ms())
        return self.monitor.tick()

    # -- reading
    def record(self, vm: str) -> dict[str, str]:
        """The VM's hash as stored (every field, as text)."""
        raw = self.client.hgetall(self.keys.vm(vm))
        return {name.decode(): value.decode() for name, value in raw.items()}

    def state(self, vm: str) -> str:
        return self.record(vm).get("state", "")

    def events(self, event_type: str | None = None, vm: str | None = None) -> list[dict[str, str]]:
        return [event for _, event in self.store.audit.read()
                if (event_type is None or event.get("type") == event_type) and (vm is None or event.get("vm") == vm)]

    def rejects(self) -> dict[str, int]:
        return self.store.stats.counters()[1]

    # -- scenarios
    def healthy(self, *vms: str, host: str = HOST_A) -> int:
        """Register ``vms`` and let them answer one judged round; returns that round."""
        for vm in vms:
            self.register(vm, host)
        round_id = self.probe()
        for vm in vms:
            self.reply(vm, round_id)
        self.make_due(round_id)
        self.monitor.tick()
        assert [self.state(vm) for vm in vms] == [VmState.HEALTHY.value] * len(vms)
        return round_id

    def restarting(self, vm: str, host: str = HOST_A) -> RestartRequest:
        """A VM that answered once, then missed a round: faulty, restart dispatched; returns the request."""
        self.healthy(vm, host=host)
        round_id = self.probe()
        self.make_due(round_id)
        report = self.monitor.tick()
        assert report.dispatched == [vm]
        assert self.state(vm) == VmState.RESTARTING.value
        return self.dispatched[-1]


@pytest.fixture
def world(backend: Backend) -> World:
    client = backend.client()
    keys = Keys(NAMESPACE)
    settings = make_settings()
    store = RedisStore(client, keys)
    broker = Broker()
    return World(backend, client, keys, store, settings, Monitor(store, settings, broker.dispatch), broker)


# ---------------------------------------------------------------- monitor: healing and judging
def test_an_unknown_vm_becomes_healthy_on_its_first_valid_reply(world: World) -> None:
    world.register("web-1")
    assert world.state("web-1") == VmState.UNKNOWN.value
    round_id = world.probe()
    arrival = world.reply("web-1", round_id)
    report = world.tick_after_arrivals()
    assert report.healed == ["web-1"]
    assert world.state("web-1") == VmState.HEALTHY.value
    [event] = world.events("healthy")
    assert (event["vm"], event["from"], event["to"]) == ("web-1", "unknown", "healthy")
    assert (event["round"], event["time"], event["boot_id"]) == (str(round_id), str(arrival), BOOT_ID)
    assert "web-1" not in world.store.vms.attention()


def test_a_healthy_vm_that_answers_every_round_is_never_flagged_over_ten_rounds(world: World) -> None:
    world.healthy("web-1")
    judged: list[int] = []
    for _ in range(10):
        round_id = world.probe()
        world.reply("web-1", round_id)
        world.make_due(round_id)
        judged += world.monitor.tick().judged_rounds
    assert len(judged) == 10
    assert world.events("faulty") == [] and world.dispatched == []
    assert world.state("web-1") == VmState.HEALTHY.value
    assert world.store.stats.counters()[0]["replies_valid"] == 11


def test_a_vm_that_answered_before_and_misses_a_round_is_faulty_and_restarted_once(world: World) -> None:
    world.healthy("web-1")
    generation_before = int(world.record("web-1")["generation"])
    round_id = world.probe()
    world.make_due(round_id)
    report = world.monitor.tick()
    again = world.monitor.tick()  # the round is judged: a second tick must not dispatch again

    assert report.flagged == ["web-1"] and report.dispatched == ["web-1"]
    assert again.judged_rounds == [] and again.dispatched == []
    record = world.record("web-1")
    [faulty] = world.events("faulty")
    [request] = world.dispatched
    assert request == RestartRequest(vm="web-1", host=HOST_A, generation=generation_before + 2,
                                     incident=record["incident"], round=round_id,
                                     issued_ms=request.issued_ms,
                                     expires_ms=request.issued_ms + 30_000)  # VMQ_RESTART_TASK_EXPIRES_S
    assert request.incident and faulty["incident"] == request.incident
    assert record["state"] == VmState.RESTARTING.value and record["generation"] == str(request.generation)
    assert json.loads(faulty["evidence"])["round"] == round_id
    [dispatch_event] = world.events("restart_dispatched")
    assert dispatch_event["queue"] == "host.node1"
    assert world.client.zcard(world.keys.vm_restarts("web-1")) == 1
    assert world.store.stats.counters()[0]["restarts_dispatched"] == 1


def test_two_monitors_ticking_the_same_due_round_at_once_judge_it_exactly_once(world: World) -> None:
    world.healthy("web-1")
    round_id = world.probe()
    world.make_due(round_id)
    monitors = [world.monitor, world.other_monitor()]
    start = threading.Barrier(len(monitors))
    reports: list[TickReport] = []
    errors: list[BaseException] = []

    def run(monitor: Monitor) -> None:
        try:
            start.wait(timeout=5)
            reports.append(monitor.tick())
        except BaseException as exc:  # noqa: BLE001  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(monitor,)) for monitor in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == [] and len(reports) == 2
    assert sorted(r for report in reports for r in report.judged_rounds) == [round_id]
    assert len(world.events("faulty")) == 1
    assert len(world.dispatched) == 1
    assert world.client.zcard(world.keys.vm_restarts("web-1")) == 1


def test_a_late_judge_judges_each_round_by_arrival_times_not_by_when_it_runs(world: World) -> None:
    world.healthy("web-1", "web-2")
    round_2 = world.probe()
    web1_in_time = world.reply("web-1", round_2)  # web-2 misses round 2 ...
    world.wait_past(web1_in_time)
    round_3 = world.probe()
    world.reply("web-1", round_3)
    web2_late = world.reply("web-2", round_3)  # ... and answers only round 3, after round 2's deadline
    world.make_due(round_2, deadline_ms=web1_in_time)  # exactly on the deadline still counts
    world.make_due(round_3, deadline_ms=web2_late)
    time.sleep(0.05)  # the judge runs late: every reply above is in the stream before it looks

    report = world.monitor.tick()
    assert report.judged_rounds == [round_2, round_3]
    assert [event["vm"] for event in world.events("faulty")] == ["web-2"]
    assert json.loads(world.events("faulty")[0]["evidence"])["round"] == round_2
    assert world.events("faulty", vm="web-1") == []
    assert [request.vm for request in world.dispatched] == ["web-2"]


def test_a_reply_arriving_after_the_deadline_does_not_count_for_that_round(world: World) -> None:
    world.healthy("web-1")
    round_id = world.probe()
    world.make_due(round_id)
    late = world.reply("web-1", round_id)
    world.wait_past(late)
    report = world.monitor.tick()
    assert report.flagged == ["web-1"] and report.dispatched == ["web-1"]
    [faulty] = world.events("faulty")
    assert json.loads(faulty["evidence"])["round"] == round_id


def test_a_replayed_reply_is_counted_as_replayed_and_does_not_heal(world: World) -> None:
    world.register("web-1")
    round_1 = world.probe()
    captured_message, captured_signature = world.signed_reply("web-1", round_1)
    world.send({"m": captured_message, "s": captured_signature})
    world.make_due(round_1)
    world.monitor.tick()
    round_2 = world.probe()
    world.make_due(round_2)
    world.monitor.tick()
    assert world.state("web-1") == VmState.RESTARTING.value  # unclaimed: a valid answer would heal it

    world.send({"m": captured_message, "s": captured_signature})
    world.send({"m": captured_message, "s": captured_signature})
    report = world.tick_after_arrivals()
    assert report.healed == [] and report.valid == 0
    assert world.rejects() == {"replayed": 2}
    assert world.state("web-1") == VmState.RESTARTING.value
    assert world.events("recovered") == []

    world.reply("web-1", round_2)  # the control: a fresh answer does heal it
    assert world.tick_after_arrivals().healed == ["web-1"]
    assert world.state("web-1") == VmState.HEALTHY.value


def test_the_same_reply_added_twice_in_one_batch_counts_once(world: World) -> None:
    world.register("web-1")
    round_id = world.probe()
    message, signature = world.signed_reply("web-1", round_id)
    world.send({"m": message, "s": signature})
    world.send({"m": message, "s": signature})
    report = world.tick_after_arrivals()
    assert (report.valid, report.rejected) == (1, {"replayed": 1})
    assert len(world.events("healthy")) == 1


def test_rejected_replies_are_counted_by_reason_and_do_not_heal(world: World) -> None:
    world.register("web-1")
    world.register("web-2")
    round_id = world.probe()
    forged, _ = world.signed_reply("web-1", round_id)
    world.send({"m": forged, "s": reply_signature(bytes.fromhex(SECRET["web-2"]), forged)})  # web-2 as web-1
    ghost, ghost_sig = encode_reply("ghost", round_id, world.nonce(round_id), BOOT_ID, 1, {},
                                    bytes.fromhex(SECRET["web-3"]))
    world.send({"m": ghost, "s": ghost_sig})
    world.send({"m": b"{not json", "s": "00"})
    world.send({"m": forged})
    world.send({"m": b"x" * (world.settings.max_reply_bytes + 1), "s": "00"})
    stale, stale_sig = world.signed_reply("web-1", round_id, nonce="0" * 32)
    world.send({"m": stale, "s": stale_sig})
    world.reply("web-2", round_id)  # one good reply among them

    report = world.tick_after_arrivals()
    expected = {"bad_signature": 1, "unknown_vm": 1, "malformed": 2, "oversized": 1, "stale_nonce": 1}
    assert world.rejects() == expected and report.rejected == expected
    assert report.healed == ["web-2"]
    assert world.state("web-1") == VmState.UNKNOWN.value


def test_a_vm_at_its_restart_budget_fails_without_a_restart(world: World) -> None:
    world.healthy("web-1")
    now = world.store.clock.time_ms()
    world.client.zadd(world.keys.vm_restarts("web-1"), {f"{g}:{now - g}": now - 1000 * g for g in (1, 2, 3)})
    round_id = world.probe()
    world.make_due(round_id)
    report = world.monitor.tick()
    assert world.state("web-1") == VmState.FAILED.value
    assert report.dispatched == [] and world.dispatched == []
    [failed] = world.events("failed")
    assert "restart budget exhausted: 3 of 3" in failed["reasons"]
    assert world.events("restart_dispatched") == []


def test_restarts_older_than_the_window_do_not_count_against_the_budget(world: World) -> None:
    world.healthy("web-1")
    long_ago = world.store.clock.time_ms() - 3_600_000 - 60_000
    world.client.zadd(world.keys.vm_restarts("web-1"), {f"{g}:old": long_ago - g for g in (1, 2, 3)})
    round_id = world.probe()
    world.make_due(round_id)
    assert world.monitor.tick().dispatched == ["web-1"]


def test_a_silent_vm_whose_host_heartbeat_expired_is_flagged_but_not_restarted(world: World) -> None:
    world.healthy("web-1")
    world.store.hosts.drop_heartbeat(HOST_A)
    round_id = world.probe()
    world.make_due(round_id)
    report = world.monitor.tick()
    assert report.flagged == ["web-1"] and world.dispatched == []
    assert world.state("web-1") == VmState.FAULTY.value
    assert "heartbeat is late or gone" in world.events("faulty")[0]["reasons"]


def test_a_recovering_vm_that_answers_is_healthy_with_a_recovered_event(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    assert restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1").acted
    assert world.state("web-1") == VmState.RECOVERING.value
    opened_ms = int(world.record("web-1")["incident_opened_ms"])

    round_id = world.probe()
    arrival = world.reply("web-1", round_id)
    report = world.tick_after_arrivals()
    assert report.healed == ["web-1"]
    record = world.record("web-1")
    assert (record["state"], record["incident"]) == (VmState.HEALTHY.value, "")
    [event] = world.events("recovered")
    assert (event["from"], event["incident"], event["restarted"]) == ("recovering", request.incident, "true")
    assert float(event["recovered_after_s"]) == round((arrival - opened_ms) / 1000.0, 3)
    assert float(event["recovered_after_s"]) > 0


def test_a_reply_that_arrived_before_the_restart_does_not_make_the_vm_recovered(world: World) -> None:
    request = world.restarting("web-1")
    round_id = world.probe()
    arrived = world.reply("web-1", round_id)  # sent by the old boot, still unread when libvirt resets the domain
    world.wait_past(arrived)
    hypervisor = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    assert restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1").acted
    assert world.tick_after_arrivals().healed == []
    assert world.state("web-1") == VmState.RECOVERING.value and world.events("recovered") == []
    later = world.probe()
    world.reply("web-1", later)  # the new boot's answer
    assert world.tick_after_arrivals().healed == ["web-1"]


def test_a_second_incident_is_timed_from_its_own_opening(world: World) -> None:
    first = world.restarting("web-1")
    first_opened = int(world.record("web-1")["incident_opened_ms"])
    round_id = world.probe()
    world.reply("web-1", round_id)
    world.tick_after_arrivals()
    assert world.state("web-1") == VmState.HEALTHY.value
    time.sleep(0.05)

    second_round = world.probe()
    world.make_due(second_round)
    world.monitor.tick()
    second = world.dispatched[-1]
    assert second.incident != first.incident
    second_faulty = world.events("faulty")[-1]
    assert second_faulty["incident"] == second.incident
    opened = int(world.record("web-1")["incident_opened_ms"])
    assert opened > first_opened
    assert opened == int(second_faulty["time"])


def test_the_kill_switch_flags_a_silent_vm_without_restarting_it(world: World) -> None:
    world.healthy("web-1")
    world.client.set(world.keys.restarts_suspended, "1")
    round_2 = world.probe()
    world.make_due(round_2)
    assert world.monitor.tick().flagged == ["web-1"]
    assert world.dispatched == [] and world.state("web-1") == VmState.FAULTY.value
    assert "kill switch" in world.events("faulty")[0]["reasons"]


def test_a_faulty_vm_silent_for_another_round_is_judged_again_without_crashing_the_tick(world: World) -> None:
    world.healthy("web-1")
    world.store.hosts.drop_heartbeat(HOST_A)
    round_2 = world.probe()
    world.make_due(round_2)
    assert world.monitor.tick().flagged == ["web-1"]
    time.sleep(0.15)  # the next verdict's reasons differ ("no valid reply for N s")

    round_3 = world.probe()
    world.make_due(round_3)
    before = world.record("web-1")["decision"]
    assert world.monitor.tick().judged_rounds == [round_3]
    assert world.state("web-1") == VmState.FAULTY.value
    assert world.record("web-1")["decision"] != before  # the operator sees the silence grow
    assert world.events("decision") == []  # same grounds (host down): no audit event per round


def test_a_faulty_vm_whose_grounds_change_gets_one_decision_event(world: World) -> None:
    world.healthy("web-1")
    world.store.hosts.drop_heartbeat(HOST_A)
    round_2 = world.probe()
    world.make_due(round_2)
    assert world.monitor.tick().flagged == ["web-1"]
    world.client.set(world.keys.restarts_suspended, "1")
    world.heartbeat(HOST_A)
    for _ in range(2):
        round_n = world.probe()
        world.make_due(round_n)
        world.monitor.tick()
    decisions = world.events("decision")
    assert len(decisions) == 1 and "kill switch" in decisions[0]["reasons"]


def test_lifting_the_kill_switch_lets_the_next_round_restart_a_flagged_vm(world: World) -> None:
    world.healthy("web-1")
    world.client.set(world.keys.restarts_suspended, "1")
    round_2 = world.probe()
    world.make_due(round_2)
    world.monitor.tick()
    world.client.delete(world.keys.restarts_suspended)
    round_3 = world.probe()
    world.make_due(round_3)
    assert world.monitor.tick().dispatched == ["web-1"]
    assert world.dispatched[0].round == round_3


def test_a_restart_the_broker_refuses_goes_back_to_faulty(world: World) -> None:
    world.healthy("web-1")
    world.broker.down = True
    round_2 = world.probe()
    world.make_due(round_2)
    report = world.monitor.tick()
    assert report.flagged == ["web-1"] and report.dispatched == []
    assert world.state("web-1") == VmState.FAULTY.value
    assert "broker down" in world.events("dispatch_failed")[0]["error"]


def test_a_restart_the_broker_refused_is_retried_in_the_next_round(world: World) -> None:
    world.healthy("web-1")
    world.broker.down = True
    round_2 = world.probe()
    world.make_due(round_2)
    world.monitor.tick()
    world.broker.down = False
    round_3 = world.probe()
    world.make_due(round_3)
    assert world.monitor.tick().dispatched == ["web-1"]


def test_a_restart_the_broker_refused_does_not_use_up_the_restart_budget(world: World) -> None:
    world.healthy("web-1")
    world.broker.down = True
    round_2 = world.probe()
    world.make_due(round_2)
    world.monitor.tick()
    assert world.state("web-1") == VmState.FAULTY.value
    assert world.client.zcard(world.keys.vm_restarts("web-1")) == 0


def test_a_vm_that_answers_before_its_restart_is_claimed_is_not_recorded_as_restarted(world: World) -> None:
    world.restarting("web-1")
    round_id = world.probe()
    world.reply("web-1", round_id)
    world.tick_after_arrivals()
    [event] = world.events("recovered")
    assert event["from"] == VmState.RESTARTING.value
    assert event["restarted"] == "false"


def test_a_reply_while_a_claimed_restart_is_under_way_does_not_close_it(world: World) -> None:
    request = world.restarting("web-1")
    assert world.store.vms.claim_restart("web-1", request.generation, request.incident, "w1")
    round_id = world.probe()
    world.reply("web-1", round_id)
    report = world.tick_after_arrivals()
    assert report.valid == 1 and report.healed == []
    record = world.record("web-1")
    assert (record["state"], record["claim"]) == (VmState.RESTARTING.value, "w1")


# ---------------------------------------------------------------- restart on the host
def hypervisor_with(status: DomainStatus | None, reason: str = "booted") -> FakeHypervisor:
    domains = [] if status is None else [DomainInfo("web-1", "u-1", status, reason)]
    return FakeHypervisor(f"fake://{HOST_A}", domains)


@pytest.mark.parametrize(
    ("status", "action", "calls"),
    [
        (DomainStatus.RUNNING, RestartAction.RESET, ["reset"]),
        (DomainStatus.PAUSED, RestartAction.RESUME_RESET, ["resume", "reset"]),
        (DomainStatus.CRASHED, RestartAction.CREATE, ["start"]),
    ],
    ids=["a running domain is reset", "a paused domain is resumed then reset", "a crashed domain is started"],
)
def test_a_restart_acts_by_the_domain_state_and_leaves_the_vm_recovering(
        world: World, status: DomainStatus, action: RestartAction, calls: list[str]) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(status)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1")
    assert (outcome.acted, outcome.action) == (True, action.value)
    assert hypervisor.calls == [("domain_info", "web-1")] + [(call, "web-1") for call in calls]
    assert hypervisor.domain_info("web-1").status is DomainStatus.RUNNING
    record = world.record("web-1")
    assert (record["state"], record["last_action"]) == (VmState.RECOVERING.value, action.value)
    assert int(record["booted_at_ms"]) >= request.issued_ms
    [restarted] = world.events("restarted")
    assert (restarted["action"], restarted["incident"]) == (action.value, request.incident)


def test_a_domain_shut_off_on_purpose_is_left_alone_and_the_vm_goes_unknown(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.SHUTOFF, "shutdown")
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1")
    assert (outcome.acted, outcome.action) == (False, RestartAction.LEFT_ALONE.value)
    assert hypervisor.calls == [("domain_info", "web-1")]
    record = world.record("web-1")
    assert (record["state"], record["domain_status"]) == (VmState.UNKNOWN.value, "shutoff")
    assert len(world.events("restart_left_alone")) == 1


def test_a_domain_missing_from_the_host_sends_the_vm_back_to_faulty(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(None)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1")
    assert not outcome.acted
    assert hypervisor.calls == [("domain_info", "web-1")]
    assert world.state("web-1") == VmState.FAULTY.value
    assert "not defined on node1" in world.events("restart_failed")[0]["result"]


def test_a_vm_that_moved_to_another_host_is_not_touched_by_the_old_host(world: World) -> None:
    request = world.restarting("web-1")
    world.store.vms.write_many({"web-1": {"host": HOST_B}})
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1")
    assert not outcome.acted
    assert hypervisor.calls == []
    assert world.state("web-1") == VmState.FAULTY.value
    assert len(world.events("restart_misrouted")) == 1


def test_a_request_past_its_expiry_in_redis_time_is_skipped_without_touching_the_domain(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    now_ms = world.store.clock.time_ms()
    stale = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1",
                       expires_ms=now_ms - 1_000)
    assert (stale.acted, stale.action) == (False, RestartAction.LEFT_ALONE.value)
    assert stale.result.startswith("expired") and hypervisor.calls == []
    assert world.state("web-1") == VmState.RESTARTING.value  # unclaimed: judged afresh after the timeout
    assert "expired" in world.events("restart_skipped")[0]["reason"]
    fresh = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w2",
                       expires_ms=now_ms + 60_000)
    assert fresh.acted and [c for c in hypervisor.calls if c[0] != "domain_info"] == [("reset", "web-1")]


def test_a_request_delivered_twice_restarts_the_domain_once(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    args = ("web-1", request.generation, request.incident)
    first = restart_vm(world.store, hypervisor, HOST_A, *args, "w1")
    second = restart_vm(world.store, hypervisor, HOST_A, *args, "w2")
    assert (first.acted, second.acted) == (True, False)
    assert [call for call in hypervisor.calls if call[0] != "domain_info"] == [("reset", "web-1")]
    assert len(world.events("restart_skipped")) == 1


def test_a_request_delivered_twice_at_once_restarts_the_domain_once(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    stores = [world.store, RedisStore(world.backend.client(), world.keys)]
    start = threading.Barrier(len(stores))
    outcomes: list[bool] = []
    errors: list[BaseException] = []

    def deliver(store: RedisStore, claimant: str) -> None:
        try:
            start.wait(timeout=5)
            outcomes.append(restart_vm(store, hypervisor, HOST_A, "web-1", request.generation, request.incident,
                                       claimant).acted)
        except BaseException as exc:  # noqa: BLE001  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(store, f"w{i}")) for i, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert sorted(outcomes) == [False, True]
    assert [call for call in hypervisor.calls if call[0] != "domain_info"] == [("reset", "web-1")]
    assert world.state("web-1") == VmState.RECOVERING.value


def test_a_duplicate_delivery_that_cannot_reach_the_hypervisor_leaves_a_claimed_attempt_alone(world: World) -> None:
    request = world.restarting("web-1")
    assert world.store.vms.claim_restart("web-1", request.generation, request.incident, "w1")  # w1 is acting
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    hypervisor.set_unavailable()
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w2")
    assert not outcome.acted
    record = world.record("web-1")
    assert (record["state"], record["claim"]) == (VmState.RESTARTING.value, "w1")


def test_a_request_with_a_stale_generation_is_skipped(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation - 1, request.incident, "w1")
    assert not outcome.acted and "attempt closed" in outcome.result
    assert hypervisor.calls == []
    assert world.state("web-1") == VmState.RESTARTING.value
    assert len(world.events("restart_skipped")) == 1


def test_a_request_for_a_vm_that_healed_meanwhile_is_skipped(world: World) -> None:
    request = world.restarting("web-1")
    round_id = world.probe()
    world.reply("web-1", round_id)
    world.tick_after_arrivals()
    assert world.state("web-1") == VmState.HEALTHY.value
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1")
    assert not outcome.acted and hypervisor.calls == []


# ---------------------------------------------------------------- inventory
def test_a_first_sync_registers_the_hosts_domains_as_unknown_vms(world: World) -> None:
    hypervisor = FakeHypervisor(f"fake://{HOST_A}", [
        DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted"),
        DomainInfo("web-2", "u-2", DomainStatus.SHUTOFF, "shutdown"),
        DomainInfo("bad name", "u-3", DomainStatus.RUNNING, "booted"),
    ])
    report = sync_inventory(world.store, hypervisor, HOST_A, ttl_s=30)
    assert (report.new_vms, report.started, report.skipped_names) == (["web-1", "web-2"], ["web-1"], ["bad name"])
    assert world.store.vms.all_vms() == ["web-1", "web-2"]
    web1, web2 = world.record("web-1"), world.record("web-2")
    assert (web1["state"], web1["host"], web1["domain_status"]) == ("unknown", HOST_A, "running")
    assert (web2["state"], web2["host"], web2["domain_status"]) == ("unknown", HOST_A, "shutoff")
    assert "booted_at_ms" in web1 and "booted_at_ms" not in web2
    assert [(name, alive) for name, alive, _ in world.store.hosts.hosts_overview()] == [(HOST_A, True)]
    assert sync_inventory(world.store, hypervisor, HOST_A, ttl_s=30).new_vms == []


@pytest.mark.parametrize("old_host_first", [True, False],
                         ids=["the old host syncs first", "the new host syncs first"])
def test_a_vm_whose_domain_becomes_active_on_another_host_moves_there_and_stays(world: World,
                                                                              old_host_first: bool) -> None:
    before = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    sync_inventory(world.store, before, HOST_A, ttl_s=30)
    host_a = FakeHypervisor(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.SHUTOFF, "migrated")])
    host_b = FakeHypervisor(f"fake://{HOST_B}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "migrated")])

    if old_host_first:
        sync_inventory(world.store, host_a, HOST_A, ttl_s=30)
    report_b = sync_inventory(world.store, host_b, HOST_B, ttl_s=30)
    assert report_b.migrated == ["web-1"]
    [migrated] = world.events("migrated")
    assert (migrated["vm"], migrated["host"], migrated["previous_host"]) == ("web-1", HOST_B, HOST_A)
    record = world.record("web-1")
    assert (record["host"], record["domain_status"]) == (HOST_B, "running")

    for _ in range(2):  # the stale shut-off definition on A must not steal it back
        report_a = sync_inventory(world.store, host_a, HOST_A, ttl_s=30)
        assert report_a.migrated == []
    record = world.record("web-1")
    assert (record["host"], record["domain_status"]) == (HOST_B, "running")
    assert len(world.events("migrated")) == 1


def test_a_host_whose_heartbeat_is_late_gets_no_restart_even_before_its_key_expires(world: World) -> None:
    world.healthy("web-1")
    # Renewed long ago, but the key's TTL has not run out yet: a host that just died looks like this.
    world.store.hosts.heartbeat(HOST_A, {"seen_ms": world.store.clock.time_ms() - 61_000}, 60_000)
    round_2 = world.probe()
    world.make_due(round_2)
    assert world.monitor.tick().dispatched == []
    assert world.state("web-1") == VmState.FAULTY.value
    assert "heartbeat is late or gone" in world.events("faulty")[0]["reasons"]


class _BusyGuest(FakeHypervisor):
    """A silent guest whose disk keeps writing between the two samples (a long fsfreeze backup, say)."""

    def activity(self, name: str) -> Any:
        sample = super().activity(name)
        self.advance(name, disk_bytes=4096)
        return sample


def test_a_silent_but_active_guest_is_held_not_reset_and_keeps_its_budget(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = _BusyGuest(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1",
                         activity=ActivityCheck(window_s=0.05, blocks=True))
    assert not outcome.acted and "silent but active" in outcome.result
    assert [c for c in hypervisor.calls if c[0] in ("reset", "destroy", "start")] == []
    record = world.record("web-1")
    assert (record["state"], record["attempts"], record["last_restart_ms"]) == ("faulty", "0", "0")
    assert world.client.zcard(world.keys.vm_restarts("web-1")) == 0
    held = world.events("silent_but_active")
    assert len(held) == 1 and "disk_write_bytes" in held[0]["activity"]


def test_a_silent_guest_whose_counters_stand_still_is_reset_with_the_sample_as_evidence(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1",
                         activity=ActivityCheck(window_s=0.05, blocks=True))
    assert outcome.acted and outcome.action == "reset"
    assert '"moving":[]' in world.events("restarted")[0]["activity"]


def test_an_active_guest_is_reset_anyway_when_activity_does_not_block(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = _BusyGuest(f"fake://{HOST_A}", [DomainInfo("web-1", "u-1", DomainStatus.RUNNING, "booted")])
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1",
                         activity=ActivityCheck(window_s=0.05, blocks=False))
    assert outcome.acted and outcome.action == "reset"


def test_a_second_attempt_in_an_incident_destroys_and_creates(world: World) -> None:
    request = world.restarting("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    outcome = restart_vm(world.store, hypervisor, HOST_A, "web-1", request.generation, request.incident, "w1",
                         hard=True)
    assert outcome.action == "destroy+create"
    assert [c for c in hypervisor.calls if c[0] in ("reset", "destroy", "start")] == [("destroy", "web-1"),
                                                                                      ("start", "web-1")]


def test_a_vm_override_of_its_budget_is_honoured_by_the_judge(world: World) -> None:
    world.healthy("web-1")
    world.store.vms.set_policy_overrides("web-1", {"policy.max_restarts": "0"})
    round_2 = world.probe()
    world.make_due(round_2)
    world.monitor.tick()
    assert world.state("web-1") == VmState.FAILED.value
    assert world.dispatched == []


def test_a_host_whose_libvirt_fails_is_degraded_and_its_silent_vms_are_flagged_not_restarted(world: World) -> None:
    world.healthy("web-1")
    hypervisor = hypervisor_with(DomainStatus.RUNNING)
    hypervisor.set_unavailable()
    with pytest.raises(HypervisorError):
        sync_inventory(world.store, hypervisor, HOST_A, 60)
    mark_degraded(world.store, HOST_A, hypervisor.uri, 60, "libvirt did not answer within 30 s")
    assert [e["host"] for e in world.events("host_degraded")] == [HOST_A]
    round_2 = world.probe()
    world.make_due(round_2)
    assert world.monitor.tick().dispatched == []
    assert "degraded" in world.events("faulty")[0]["reasons"]


def test_a_judge_whose_lease_ran_out_stops_reading_and_moves_neither_cursor_nor_count(world: World) -> None:
    """At 50,000 VMs one ingest outlasted the lock's lease: a second judge read the same entries, the count
    of entries read doubled and hid replies trimmed unread, and rounds were judged without their evidence
    (thousands of false faults in bench/stack_bench.py). Only the lock's holder may advance the cursor."""
    world.register("web-1")
    round_id = world.probe()
    world.reply("web-1", round_id)
    world.wait_past(world.store.clock.time_ms())
    ingestor = Ingestor(world.store, world.settings.max_reply_bytes, RejectLog(1.0), LatestReplies(0))
    cursor, read = world.store.replies.reply_cursor(), world.client.hget(world.keys.stats, "replies_read")

    with world.store.rounds.judge_lock(lease_s=5, wait_s=1) as lease:
        assert lease
        world.client.set(world.keys.judge_lock, b"another judge's token")  # ours expired, another took it
        result = ingestor.ingest(world.store.clock.time_ms(), lease)
        assert result.complete is False
        assert world.store.replies.reply_cursor() == cursor
        assert world.client.hget(world.keys.stats, "replies_read") == read
        assert result.valid == 0
    world.client.delete(world.keys.judge_lock)  # the other judge is done

    with world.store.rounds.judge_lock(lease_s=5, wait_s=1) as lease:  # the control: the holder reads it all
        result = ingestor.ingest(world.store.clock.time_ms(), lease)
        assert result.complete is True
        assert result.valid == 1 and world.store.replies.reply_cursor() != cursor
