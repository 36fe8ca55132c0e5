#!/usr/bin/env python3
"""The monitor's per-batch writes, packed by redis-py's own packer (the baseline) and by vmq's
``CommandPacker``, in the same run, on a real redis-server.

Per round of N replies the ingest sends ``ZMSCORE last_round`` (the replay check) and ``ZADD GT`` to
``last_round`` and ``last_seen`` (≈ 5 N arguments). For each packer: the CPU this process spends packing
them (p50/p99 over interleaved repetitions), and the CPU of a whole round trip of the three commands to a
private redis-server through a client using that packer (p50/p99). The bytes on the wire are checked equal
first. Usage: ``python3 bench/packer_bench.py [--vms 10000] [--repeat 60]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from measure import pct
from redis.connection import HiredisRespSerializer

from vmq.sim.localcluster import LocalRedis
from vmq.store.client import CommandPacker
from vmq.store.redis import connect


def round_commands(n: int, round_id: int) -> list[tuple[Any, ...]]:
    """The three commands one ingest of ``n`` replies sends, as redis-py builds their arguments."""
    vms = [f"vm-{i:05d}" for i in range(n)]
    last_round: list[Any] = ["ZADD", "bench:last_round", "GT"]
    last_seen: list[Any] = ["ZADD", "bench:last_seen", "GT"]
    for i, vm in enumerate(vms):
        last_round += [round_id, vm]
        last_seen += [1_795_678_489_639 + 1000 * round_id + i % 1000, vm]
    return [("ZMSCORE", "bench:last_round", *vms), tuple(last_round), tuple(last_seen)]


def cpu_ms(action: Callable[[], object]) -> float:
    started = time.process_time()
    action()
    return (time.process_time() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10_000, help="replies per round (default 10000)")
    parser.add_argument("--repeat", type=int, default=60, help="interleaved repetitions (default 60)")
    args = parser.parse_args()

    commands = round_commands(args.vms, 7)
    packers: dict[str, Any] = {"redis-py (baseline)": HiredisRespSerializer(), "vmq CommandPacker": CommandPacker()}
    wire = {name: [b"".join(p.pack(*c)) for c in commands] for name, p in packers.items()}
    if len(set(map(tuple, wire.values()))) != 1:
        print("FAIL: the packers disagree on the bytes", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="vmq-packer-") as tmp:
        server = LocalRedis(Path(tmp)).start()
        url = server.url
        clients = {"redis-py (baseline)": redis.Redis.from_url(url), "vmq CommandPacker": connect(url)}
        packs: dict[str, list[float]] = {name: [] for name in packers}
        trips: dict[str, list[float]] = {name: [] for name in packers}

        by_round = [round_commands(args.vms, 7), round_commands(args.vms, 8)]  # ZADD GT: alternate the scores

        def send(client: redis.Redis, round_id: int) -> None:
            pipe = client.pipeline(transaction=False)
            for command in by_round[round_id % 2]:
                pipe.execute_command(*command)
            pipe.execute()

        for i in range(args.repeat):
            for name, packer in packers.items():
                packs[name].append(cpu_ms(lambda p=packer: [p.pack(*c) for c in commands]))
                trips[name].append(cpu_ms(lambda c=clients[name], r=i: send(c, r)))
        for client in clients.values():
            client.close()
        server.stop()

    print(f"{args.vms} replies per round: ZMSCORE + 2 x ZADD GT, {sum(len(c) for c in commands):,} arguments; "
          f"{args.repeat} interleaved repetitions; CPU of this process, ms per round")
    print(f"{'packer':22s} {'pack p50':>9s} {'p99':>7s} {'round trip p50':>15s} {'p99':>7s}")
    for name in packers:
        print(f"{name:22s} {pct(packs[name], 50):9.2f} {pct(packs[name], 99):7.2f} "
              f"{pct(trips[name], 50):15.2f} {pct(trips[name], 99):7.2f}")
    base, ours = (statistics.median(trips[name]) for name in packers)
    print(f"saved per round trip (p50): {base - ours:.2f} ms ({100 * (base - ours) / base:.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
