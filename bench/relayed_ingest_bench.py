#!/usr/bin/env python3
"""The monitor's ingest of relayed agent answers in its three forms, on a real redis-server: the same VMs, hosts
and rounds, the same vmq Ingestor, measured in one run. ``per-answer`` (one object per answer, relays before the
compact form), ``compact`` (one entry per host and round naming the VMs that answered) and ``cover`` (one entry
per host and round naming those that did not, relative to the host's full listing: today's relays).

Per form and round: the hosts' entries are written first (not measured), then ``Ingestor.ingest`` reads and
records them as the monitor does under its judge lock. Printed per form: the monitor's CPU (this process,
redis-py included) and Redis' CPU (``used_cpu_sys + used_cpu_user``), each in µs per VM per round, Redis'
costliest commands, and each form's ratios to the per-answer one. Every VM must be recorded as having
answered every round (checked). Usage:
``python3 bench/relayed_ingest_bench.py [--vms 10000] [--hosts 20] [--rounds 30] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import redis_command_usec, redis_cpu_mem, top_commands

from vmq.config import load_settings
from vmq.ingest import Ingestor, LatestReplies, RejectLog
from vmq.keys import Keys
from vmq.relay import info_due, info_every_rounds
from vmq.relay_answers import agent_answer
from vmq.relay_cover import CoverKeeper
from vmq.sim.localcluster import LocalRedis
from vmq.store.redis import RedisStore, connect

#: As a host relay at T1 = 1 s with the default VMQ_RELAY_INFO_INTERVAL_S.
INFO_EVERY = info_every_rounds(load_settings({"probe_interval_s": 1}))

#: Fields a VM's record has besides its placement (a realistic hash size for the vouching HMGET).
FILLER = {f"field{i}": "x" * 20 for i in range(16)}
INFO = {"os_id": "debian", "os_version_id": "12", "hostname": "vm", "filesystems": [
    {"mountpoint": "/", "type": "ext4", "used_bytes": 123456789, "total_bytes": 987654321}]}


def setup(store: RedisStore, vms: list[str], hosts: int) -> None:
    now = store.clock.time_ms()
    for vm in vms:
        store.vms.register_vm(vm, now)
    store.vms.write_many({vm: {"host": f"host-{i % hosts}", "domain_status": "running", "probe_path_set": "agent",
                               "state": "healthy", **FILLER} for i, vm in enumerate(vms)})
    store.client.delete(store.keys.attention)
    store.client.sadd(store.keys.attention, "some-other-vm")  # attention is rarely empty in a real cluster


def write_round(store: RedisStore, vms: list[str], hosts: int, round_id: int, nonce: str, form: str,
                keepers: dict[int, CoverKeeper]) -> None:
    """Each host's answers for ``round_id``, as a ProbeRelay writes them (cover), as relays did before (compact),
    or as the oldest ones did (per-answer)."""
    for h in range(hosts):
        answers = [agent_answer(vm, round_id, nonce, 1.3, 1_765_000_000_000,
                                INFO if info_due(vm, round_id, INFO_EVERY) else None)
                   for vm in vms[h::hosts]]
        if form == "cover":
            keeper = keepers.setdefault(h, CoverKeeper(f"host-{h}"))
            keeper.start(round_id, nonce, vms[h::hosts])
            for answer in answers:
                keeper.answered(str(answer["vm"]), round_id, answer)
            fields = keeper.fields(round_id)
            assert fields is not None
            store.relays.append(f"host-{h}", [], round_id, [], cover=fields)
            keeper.written(fields)
        elif form == "compact":
            store.relays.append(f"host-{h}", answers)
        else:
            store.client.xadd(store.keys.relay_stream, {"h": f"host-{h}", "a": json.dumps(answers)})


def measure(url: str, n: int, hosts: int, rounds: int, form: str) -> dict[str, Any]:
    store = RedisStore(connect(url), Keys(f"b{os.getpid()}{form}"))
    keepers: dict[int, CoverKeeper] = {}
    vms = [f"vm-{i}" for i in range(n)]
    setup(store, vms, hosts)
    ingestor = Ingestor(store, 65536, RejectLog(1.0), LatestReplies(10_000))
    book: dict[int, tuple[str, int]] = {}
    cpu_s, commands_before = 0.0, redis_command_usec(store.client)
    redis_s = 0.0
    for round_id in range(1, rounds + 1):
        nonce = os.urandom(16).hex()
        book[round_id] = (nonce, store.clock.time_ms())
        store.client.hset(store.keys.rounds, round_id, f"{nonce}:{book[round_id][1]}")
        write_round(store, vms, hosts, round_id, nonce, form, keepers)
        time.sleep(0.002)
        up_to = store.clock.time_ms() - 1
        redis0, cpu0 = redis_cpu_mem(store.client)[0], time.process_time()
        result = ingestor.ingest(up_to)
        cpu_s += time.process_time() - cpu0
        redis_s += redis_cpu_mem(store.client)[0] - redis0
        assert result.complete and result.valid == n and not result.rejected, result
    answered = sum(1 for r in store.replies.last_rounds(vms) if r is not None and r >= rounds)
    assert answered == n, f"{answered} of {n} VMs recorded as answering round {rounds}"
    per = n * rounds
    return {"form": form, "vms": n, "hosts": hosts, "rounds": rounds,
            "monitor_us_per_vm_round": round(1e6 * cpu_s / per, 2),
            "redis_us_per_vm_round": round(1e6 * redis_s / per, 2),
            "redis_top": top_commands(commands_before, redis_command_usec(store.client), per)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmq-ingest-bench-") as workdir:
        server = LocalRedis(Path(workdir)).start()
        try:
            rows = [measure(server.url, args.vms, args.hosts, args.rounds, form)
                    for form in ("per-answer", "compact", "cover")]
        finally:
            server.stop()
    old = rows[0]
    summary = {row["form"]: {
        "monitor_ratio": round(row["monitor_us_per_vm_round"] / old["monitor_us_per_vm_round"], 4),
        "monitor_plus_redis_ratio": round((row["monitor_us_per_vm_round"] + row["redis_us_per_vm_round"])
                                          / (old["monitor_us_per_vm_round"] + old["redis_us_per_vm_round"]), 4)}
        for row in rows[1:]}
    if args.json:
        print(json.dumps({"rows": rows, "ratios": summary}))
        return 0
    print(f"relayed agent answers, {args.vms} VMs on {args.hosts} hosts, {args.rounds} rounds (µs per VM per round)")
    for row in rows:
        print(f"  {row['form']:>10}: monitor {row['monitor_us_per_vm_round']:6.2f}   Redis "
              f"{row['redis_us_per_vm_round']:6.2f}   Redis by command: {row['redis_top']}")
    for form, ratio in summary.items():
        print(f"{form} / per-answer: monitor {ratio['monitor_ratio']}, monitor + Redis "
              f"{ratio['monitor_plus_redis_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
