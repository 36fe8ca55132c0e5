"""The mid-round drain is scheduled only when the guests' reply stream has a burst to verify early
(vmq.monitor.Monitor.drain_due): a cluster of relayed VMs saves one Celery task per round. On fakeredis and a real
redis-server."""

from __future__ import annotations

from tests.contract.test_monitor_store import World
from vmq.monitor import DRAIN_MIN_REPLIES


def test_a_drain_is_due_after_a_burst_of_guest_replies_and_not_without_one(world: World) -> None:
    assert world.monitor.drain_due(), "a process that never looked drains (it cannot know the burst)"
    assert not world.monitor.drain_due(), "nothing added since: no drain"
    pipe = world.client.pipeline(transaction=False)
    for i in range(DRAIN_MIN_REPLIES - 1):
        pipe.xadd(world.keys.reply_stream, {"m": "x", "s": str(i)})
    pipe.execute()
    assert not world.monitor.drain_due()
    for i in range(DRAIN_MIN_REPLIES):
        world.client.xadd(world.keys.reply_stream, {"m": "x", "s": str(i)})
    assert world.monitor.drain_due()
    world.client.xadd(world.keys.relay_stream, {"h": "node1", "a": "[]"})  # hosts' entries do not count
    assert not world.monitor.drain_due()
