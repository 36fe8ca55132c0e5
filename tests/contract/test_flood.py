"""A flood of bad replies from one guest, on fakeredis and a real Redis: counted in full, logged once, and
the other guests' answers in the same batch still count."""

from __future__ import annotations

import logging
import time

import pytest

from tests.contract.test_monitor_store import World
from vmq.model import VmState


def test_a_flood_of_forged_replies_is_counted_logged_once_and_does_not_hide_the_valid_ones(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.healthy("web-1", "web-2")
    round_id = world.probe()
    message, _ = world.signed_reply("web-1", round_id)
    pipe = world.client.pipeline(transaction=False)
    for i in range(6000):  # more than one ingest batch (5,000)
        pipe.xadd(world.keys.reply_stream, {"m": message, "s": f"{i:064x}"})
    pipe.execute()
    world.reply("web-1", round_id)
    world.reply("web-2", round_id)
    started = time.process_time()
    with caplog.at_level(logging.WARNING, logger="vmq.ingest"):
        report = world.tick_after_arrivals()
    cpu_s = time.process_time() - started
    assert (report.valid, report.rejected) == (2, {"bad_signature": 6000})
    assert world.rejects()["bad_signature"] == 6000
    flood_lines = [r for r in caplog.records if "reason=bad_signature" in r.getMessage()]
    assert len(flood_lines) == 1 and "vm=web-1" in flood_lines[0].getMessage()
    world.make_due(round_id)
    world.monitor.tick()
    assert {world.state("web-1"), world.state("web-2")} == {VmState.HEALTHY.value}
    print(f"6,000 forged replies ingested in {cpu_s * 1000:.0f} ms of CPU ({world.backend.name})")


# ---------------------------------------------------------------- replies trimmed before they were read
def test_replies_trimmed_unread_by_a_maxlen_0_guest_leave_the_round_unjudged_not_restarted(world: World) -> None:
    world.healthy("web-1", "web-2", "web-3")
    round_id = world.probe()
    world.reply("web-1", round_id)
    world.reply("web-2", round_id)
    message, signature = world.signed_reply("web-3", round_id)
    # web-3's guest answers with MAXLEN 0: Redis appends, then trims every entry, web-1's and web-2's too.
    world.client.xadd(world.keys.reply_stream, {"m": message, "s": signature}, maxlen=0)
    world.make_due(round_id)
    report = world.monitor.tick()
    assert report.unjudged == [round_id] and report.lost == 3
    assert world.dispatched == [] and world.events("faulty") == []
    [lost] = world.events("evidence_lost")
    assert lost["round"] == str(round_id) and lost["silent"] == "3"
    assert world.store.stats.counters()[0]["replies_lost"] == 3
    # The next round is judged as usual: whoever answers is healthy, whoever is silent is flagged.
    next_round = world.probe()
    world.reply("web-1", next_round)
    world.reply("web-2", next_round)
    world.make_due(next_round)
    report = world.monitor.tick()
    assert report.judged_rounds == [next_round] and report.unjudged == []
    assert [r.vm for r in world.dispatched] == ["web-3"]


def test_ordinary_trimming_of_replies_already_read_is_not_a_loss(world: World) -> None:
    world.healthy("web-1", "web-2")
    for _ in range(3):
        round_id = world.probe()
        world.reply("web-1", round_id)
        world.reply("web-2", round_id)
        world.make_due(round_id)
        assert world.monitor.tick().unjudged == []
    world.client.xtrim(world.keys.reply_stream, maxlen=1, approximate=False)  # what MAXLEN ~ does, later
    round_id = world.probe()
    world.reply("web-1", round_id)
    world.reply("web-2", round_id)
    world.make_due(round_id)
    report = world.monitor.tick()
    assert (report.lost, report.unjudged) == (0, [])
    assert "replies_lost" not in world.store.stats.counters()[0]


def test_replies_trimmed_between_two_batches_of_one_ingest_leave_the_round_unjudged(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A monitor that falls behind (50,000 VMs at T1 = 1 s on 2 cores) sees the stream trimmed while it reads:
    checked only after the whole ingest, the loss went unseen (the head was behind the cursor again by then)
    and thousands of VMs whose replies were trimmed were flagged. Each batch's read now sees it."""
    world.healthy("web-1", "web-2", "web-3")
    round_id = world.probe()
    for vm in ("web-1", "web-2", "web-3"):
        world.reply(vm, round_id)
    monkeypatch.setattr("vmq.ingest.BATCH", 1)
    read = world.store.replies.read_replies
    calls = 0

    def read_then_trim(*args: object) -> tuple[list[object], int]:
        nonlocal calls
        calls += 1
        if calls == 2:  # between the first batch and the second, Redis trims web-1's (read) and web-2's replies
            world.client.xtrim(world.keys.reply_stream, maxlen=1, approximate=False)
        return read(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(world.store.replies, "read_replies", read_then_trim)
    world.make_due(round_id)
    report = world.monitor.tick()
    assert report.lost == 1 and report.unjudged == [round_id]
    assert world.dispatched == [] and world.events("faulty") == []
