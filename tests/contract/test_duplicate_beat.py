"""A second beat is harmless: a beat's round that comes too soon after the latest is refused in Redis, in the
same Lua round trip that would have started it (fakeredis and a real redis-server)."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.contract.test_monitor_store import World, make_settings
from vmq.monitor import DUPLICATE_GAP, Monitor

T1 = 0.1  # s: the gap that makes a round a duplicate is DUPLICATE_GAP x T1 = 60 ms


def beat_monitor(world: World, t1: float = T1) -> Monitor:
    return Monitor(world.store, make_settings(probe_interval_s=t1, reply_timeout_s=3), world.dispatched.append)


def probes_published(world: World, action: Any) -> list[bytes]:
    """The probe messages a guest subscribed during ``action()`` receives."""
    pubsub = world.backend.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(world.keys.probe_channel)
    pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    action()
    out = []
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.05)
        if message is not None:
            out.append(message["data"])
    pubsub.close()
    return out


def test_a_beat_probe_right_after_a_round_sends_and_schedules_nothing(world: World) -> None:
    # T1 = 1 s: the second probe must come within 0.6 s of the first, subscribing a listener in between;
    # with 60 ms a cold first run (imports inside the pub/sub client) missed the window.
    monitor = beat_monitor(world, t1=1.0)
    first = monitor.probe_from_beat()
    assert first is not None
    results: list[tuple[int, int] | None] = []
    published = probes_published(world, lambda: results.append(monitor.probe_from_beat()))
    assert results == [None]
    assert published == []
    assert world.store.rounds.current_round() == first[0]
    assert world.store.rounds.due_rounds(2**62) == [(first[0], first[1] + 3000)]
    assert world.store.stats.counters()[0]["rounds_duplicate"] == 1


def test_a_beat_probe_once_the_gap_has_passed_starts_the_next_round(world: World) -> None:
    monitor = beat_monitor(world)
    first = monitor.probe_from_beat()
    assert first is not None
    world.wait_past(first[1] + int(DUPLICATE_GAP * T1 * 1000))
    results: list[tuple[int, int] | None] = []
    published = probes_published(world, lambda: results.append(monitor.probe_from_beat()))
    assert results[0] is not None and results[0][0] == first[0] + 1
    assert len(published) == 1 and b'"round":%d' % (first[0] + 1) in published[0]
    assert "rounds_duplicate" not in world.store.stats.counters()[0]


def test_two_beats_probing_at_once_start_exactly_one_round(world: World) -> None:
    monitors = [beat_monitor(world), Monitor(world.other_monitor().store, beat_monitor(world).settings,
                                             world.dispatched.append)]
    barrier = threading.Barrier(2)
    results: list[tuple[int, int] | None] = []

    def beat(monitor: Monitor) -> None:
        barrier.wait()
        results.append(monitor.probe_from_beat())

    threads = [threading.Thread(target=beat, args=(m,)) for m in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(r is None for r in results) == [False, True]
    assert world.store.rounds.current_round() == 1


def test_a_latest_round_stamped_in_the_future_never_blocks_the_beat(world: World) -> None:
    # After a failover to a node whose clock is behind, the latest round looks sent "later than now".
    monitor = beat_monitor(world)
    first = monitor.probe_from_beat()
    assert first is not None
    nonce = world.nonce(first[0])
    world.client.hset(world.keys.rounds, first[0], f"{nonce}:{first[1] + 60_000}")
    second = monitor.probe_from_beat()
    assert second is not None and second[0] == first[0] + 1


def test_a_plain_probe_is_never_refused(world: World) -> None:
    rounds = [world.probe() for _ in range(3)]
    assert rounds == [rounds[0], rounds[0] + 1, rounds[0] + 2]
