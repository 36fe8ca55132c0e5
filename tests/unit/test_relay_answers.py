"""vmq.relay_answers and HostAgent's wiring of the relay: answer building, the outbox's batching and stale
drops, rate-limited logging, percentiles (pure: explicit times)."""

from __future__ import annotations

import json
from typing import Any

import fakeredis

from vmq.config import load_settings
from vmq.hostagent import HostAgent
from vmq.hypervisor.fake import FakeHypervisor
from vmq.keys import Keys
from vmq.model import AGENT_CHANNEL, DomainInfo, DomainStatus, ProbePath
from vmq.relay_answers import (
    LatencyWindow,
    OncePer,
    Outbox,
    RelayStats,
    agent_answer,
    channel_answer,
    channel_reply_check,
)
from vmq.store.redis import RedisStore


def test_an_agent_answer_carries_round_nonce_latency_and_guest_time_and_info_only_when_given() -> None:
    answer = agent_answer("web-1", 7, "ab" * 16, 1.23456, 1_700_000_000_000)
    assert answer == {"vm": "web-1", "p": "agent", "round": 7, "nonce": "ab" * 16, "latency_ms": 1.235,
                      "guest_ms": 1_700_000_000_000}
    with_info = agent_answer("web-1", 7, "ab" * 16, 1.0, None, {"os_id": "debian"})
    assert with_info["info"] == {"os_id": "debian"} and with_info["guest_ms"] is None
    assert json.loads(json.dumps(with_info)) == with_info


def test_a_channel_answer_keeps_the_signed_message_and_signature_as_text() -> None:
    assert channel_answer("web-1", b'{"vm":"web-1"}', b"ff" * 32) == {
        "vm": "web-1", "p": "channel", "m": '{"vm":"web-1"}', "s": "ff" * 32}


def test_a_channel_reply_naming_another_vm_or_none_is_rejected_before_relaying() -> None:
    assert channel_reply_check("web-1", b'{"vm":"web-1","round":4}') == (None, 4)
    assert channel_reply_check("web-1", b'{"vm":"web-2","round":4}') == ("wrong_vm", None)
    assert channel_reply_check("web-1", b'{"round":4}') == ("malformed", None)
    assert channel_reply_check("web-1", b"[1]") == ("malformed", None)
    assert channel_reply_check("web-1", b"not json") == ("malformed", None)
    assert channel_reply_check("web-1", b'{"vm":"web-1","round":true}') == (None, None)


def test_the_outbox_is_due_after_the_flush_interval_or_at_once_when_the_round_is_complete() -> None:
    outbox = Outbox(flush_interval_s=0.05, max_age_s=1.0)
    assert not outbox.due(10.0, round_complete=True)  # nothing to write
    outbox.add({"vm": "a"}, 10.0)
    assert not outbox.due(10.049)
    assert outbox.due(10.049, round_complete=True)
    assert outbox.due(10.05)
    outbox.add({"vm": "b"}, 10.04)
    assert [answer["vm"] for _, answer in outbox.take()] == ["a", "b"] and len(outbox) == 0


def test_a_failed_batch_goes_back_ahead_of_newer_answers_and_stale_answers_are_dropped() -> None:
    outbox = Outbox(flush_interval_s=0.05, max_age_s=1.0)
    outbox.add({"vm": "old"}, 10.0)
    outbox.add({"vm": "mid"}, 10.5)
    batch = outbox.take()
    outbox.add({"vm": "new"}, 11.0)
    assert outbox.put_back(batch, 11.1) == 1  # "old" waited more than T1: a stale batch is worse than none
    assert [answer["vm"] for _, answer in outbox.take()] == ["mid", "new"]


def test_once_per_lets_a_key_through_once_per_period_and_stays_bounded() -> None:
    once = OncePer(1.0, max_keys=3)
    assert once(("vm", "timeout"), 0.0)
    assert not once(("vm", "timeout"), 0.9)
    assert once(("vm", "busy"), 0.9)
    assert once(("vm", "timeout"), 1.0)
    for index in range(10):
        once(index, 5.0 + index * 2)
    assert len(once._last) <= 3


def test_percentiles_are_nearest_rank_over_the_window() -> None:
    window = LatencyWindow(size=100)
    assert window.percentile(0.5) is None
    for value in range(1, 201):
        window.add(float(value))  # only the last 100 are kept
    assert (window.percentile(0.5), window.percentile(0.99), window.percentile(1.0)) == (150.0, 199.0, 200.0)


def test_stats_summary_is_one_line_with_drops_by_reason() -> None:
    stats = RelayStats()
    stats.counts["probes"] += 2
    stats.drops["agent_timeout"] += 3
    stats.flushed(4, [10.0, 20.0, 30.0, 40.0])
    line = stats.summary()
    assert "\n" not in line and "agent_timeout=3" in line and "flushes=1" in line
    assert stats.snapshot()["flush_delay_ms"] == {"p50": 20.0, "p99": 40.0}


class RecordingRelay:
    def __init__(self) -> None:
        self.started = self.stopped = False
        self.refreshes = 0

    def refresh_soon(self) -> None:
        self.refreshes += 1

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


class GoneStore:
    """Enough of a store for HostAgent.stop (its inventory thread's failures are logged, not raised)."""

    class hosts:
        @staticmethod
        def drop_heartbeat(host: str) -> None: ...


def test_the_host_agent_starts_its_relay_with_it_and_stops_it_on_stop() -> None:
    relay = RecordingRelay()
    made: list[Any] = []

    def make(agent: HostAgent) -> Any:
        made.append(agent)
        return relay

    agent = HostAgent(load_settings({"host_name": "node1"}), lambda: GoneStore(),  # type: ignore[arg-type,return-value]
                      lambda: FakeHypervisor(), lambda *args: None, relay=make)
    agent._start_listener = lambda: None  # type: ignore[method-assign]
    agent.start()
    assert relay.started and made == [agent] and agent.relay is relay
    agent.stop()
    assert relay.stopped and agent.relay is None


def test_an_inventory_pass_that_places_or_moves_vms_makes_the_relay_refresh_at_once() -> None:
    store = RedisStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), Keys("t"))
    hypervisor = FakeHypervisor(domains=[DomainInfo("vm-1", "u-1", DomainStatus.RUNNING)])
    agent = HostAgent(load_settings({"host_name": "node1", "probe_path_detect": True}), lambda: store,
                      lambda: hypervisor, lambda *args: None)
    relay = RecordingRelay()
    agent.relay = relay  # type: ignore[assignment]
    agent.sync_once()
    assert relay.refreshes == 1, "a new VM: the relay re-reads its VMs now, not an interval later"
    agent.sync_once()
    assert relay.refreshes == 1, "nothing changed: no extra refresh"
    hypervisor.set_channels("vm-1", {AGENT_CHANNEL: None})
    agent.sync_once()
    assert relay.refreshes == 2 and store.vms.record("vm-1").probe_path is ProbePath.AGENT
