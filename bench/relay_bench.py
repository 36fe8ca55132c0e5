#!/usr/bin/env python3
"""One host's probe relay (vmq.relay.ProbeRelay) answering for N ``agent`` VMs on a real redis-server.

The VMs' fake guest agents (FakeHypervisor) answer with qemu-ga's measured latency (log-normal, p50 1.3 ms,
p99 2.6 ms), except a share of hung ones. A beat thread publishes a probe every T1; the relay runs on its own
thread as in a host worker. Printed: answers per round, answers of healthy VMs missing or later than T1
after the probe (must be 0), the delay from an answer to its batch's write (p50/p99), the process's CPU per
VM per round, the relay's drops by reason. Usage:
``python3 bench/relay_bench.py [--vms 200] [--hung 0.05] [--t1 1] [--seconds 30] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmq.config import load_settings
from vmq.hypervisor.fake import FakeHypervisor
from vmq.inventory import sync_inventory
from vmq.keys import Keys
from vmq.model import DomainInfo, DomainStatus
from vmq.relay import ProbeRelay
from vmq.relayed import RelayedAnswers
from vmq.sim.localcluster import LocalRedis
from vmq.store.redis import RedisStore, connect

HOST = "bench-host"
P50_S, P99_S = 0.0013, 0.0026  # qemu-ga's guest-ping through libvirtd (FIELD-NOTES)
SIGMA = math.log(P99_S / P50_S) / 2.326  # the log-normal with that p50 and p99


def qemu_ga_latency() -> float:
    return random.lognormvariate(math.log(P50_S), SIGMA)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def run(vms: int, hung_share: float, t1_s: float, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmq-relay-bench-") as workdir:
        server = LocalRedis(Path(workdir)).start()
        try:
            return measure(server.url, vms, hung_share, t1_s, seconds)
        finally:
            server.stop()


def measure(url: str, vms: int, hung_share: float, t1_s: float, seconds: float) -> dict[str, Any]:
    settings = load_settings({"redis_url": url, "namespace": "bench", "host_name": HOST,
                              "probe_interval_s": t1_s, "reply_timeout_s": 3 * t1_s})
    keys = Keys("bench")
    client = connect(url)
    store = RedisStore(client, keys)
    names = [f"vm-{i:04d}" for i in range(vms)]
    hypervisor = FakeHypervisor(domains=[DomainInfo(n, f"uuid-{n}", DomainStatus.RUNNING) for n in names])
    hung = set(random.Random(15).sample(names, round(vms * hung_share)))
    for name in names:
        hypervisor.set_agent(name, "hang" if name in hung else "answer", latency_s=qemu_ga_latency)
    sync_inventory(store, hypervisor, HOST, 60)
    for name in names:
        store.vms.set_fields(name, {"probe_path_set": "agent"})

    relay = ProbeRelay(settings, HOST, lambda: store, lambda: hypervisor)
    relay.start()
    time.sleep(0.3)  # subscribed and inventory read
    sent: dict[int, int] = {}
    cpu_started, wall_started = time.process_time(), time.monotonic()
    rounds = max(1, int(seconds / t1_s))
    for round_id in range(1, rounds + 1):
        sent_ms = int(store.clock.time_ms())
        sent[round_id] = sent_ms
        body = {"v": 1, "type": "probe", "round": round_id, "nonce": os.urandom(16).hex(), "sent_ms": sent_ms}
        client.publish(keys.probe_channel, json.dumps(body, separators=(",", ":")))
        time.sleep(max(0.0, wall_started + round_id * t1_s - time.monotonic()))
    cpu_s = time.process_time() - cpu_started
    relay.stop()

    arrivals: dict[tuple[str, int], int] = {}
    batches = 0
    reader = RelayedAnswers()  # cover entries expanded against the host's listing (compact ones as well)
    for entry_id, fields in client.xrange(keys.relay_stream):
        batches += 1
        arrival_ms = int(entry_id.decode().split("-")[0])
        for answer in reader.answers((entry_id, fields)):
            arrivals.setdefault((answer["vm"], answer["round"]), arrival_ms)
    per_round = [sum(1 for (_, r) in arrivals if r == round_id) for round_id in sent]
    healthy = [n for n in names if n not in hung]
    missed = sum(1 for round_id, sent_ms in sent.items() for n in healthy
                 if arrivals.get((n, round_id), math.inf) > sent_ms + t1_s * 1000)
    answer_ms = [arrivals[(n, r)] - sent[r] for (n, r) in arrivals if r in sent]
    snapshot = relay.stats.snapshot()
    client.close()
    return {"vms": vms, "hung": len(hung), "t1_s": t1_s, "rounds": rounds, "batches": batches,
            "answers_per_round_min": min(per_round), "answers_per_round_max": max(per_round),
            "healthy_missed": missed, "hung_answered": sum(1 for (n, _) in arrivals if n in hung),
            "probe_to_arrival_ms_p50": pct(answer_ms, 50), "probe_to_arrival_ms_p99": pct(answer_ms, 99),
            "flush_delay_ms_p50": snapshot["flush_delay_ms"]["p50"],
            "flush_delay_ms_p99": snapshot["flush_delay_ms"]["p99"],
            "agent_latency_ms_p50": snapshot["agent_latency_ms"]["p50"],
            "agent_latency_ms_p99": snapshot["agent_latency_ms"]["p99"],
            "cpu_us_per_vm_round": cpu_s * 1e6 / (rounds * vms), "cpu_share": cpu_s / (rounds * t1_s),
            "drops": snapshot["drops"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=200, help="agent VMs on the host (default 200)")
    parser.add_argument("--hung", type=float, default=0.05, help="share of hung agents (default 0.05)")
    parser.add_argument("--t1", type=float, default=1.0, help="probe interval T1, s (default 1)")
    parser.add_argument("--seconds", type=float, default=30.0, help="run time, s (default 30)")
    parser.add_argument("--json", action="store_true", help="one JSON object, no table")
    args = parser.parse_args()
    result = run(args.vms, args.hung, args.t1, args.seconds)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['vms']} agent VMs ({result['hung']} hung), T1 {result['t1_s']:g} s, "
              f"{result['rounds']} rounds, {result['batches']} batches")
        rows = [("answers per round (min/max)", f"{result['answers_per_round_min']}/{result['answers_per_round_max']}"),
                ("healthy answers missed or later than T1", str(result["healthy_missed"])),
                ("hung VMs' answers", str(result["hung_answered"])),
                ("probe -> batch arrival p50/p99 (ms)",
                 f"{result['probe_to_arrival_ms_p50']:.0f}/{result['probe_to_arrival_ms_p99']:.0f}"),
                ("answer -> flush delay p50/p99 (ms)",
                 f"{result['flush_delay_ms_p50']:.1f}/{result['flush_delay_ms_p99']:.1f}"),
                ("agent call latency p50/p99 (ms)",
                 f"{result['agent_latency_ms_p50']:.2f}/{result['agent_latency_ms_p99']:.2f}"),
                ("CPU per VM per round (µs)", f"{result['cpu_us_per_vm_round']:.0f}"),
                ("CPU share of one core", f"{100 * result['cpu_share']:.1f} %"),
                ("drops by reason", ", ".join(f"{k}={v}" for k, v in sorted(result["drops"].items())) or "none")]
        for label, value in rows:
            print(f"  {label:42s} {value}")
    return 0 if result["healthy_missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
