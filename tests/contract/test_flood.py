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
