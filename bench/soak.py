#!/usr/bin/env python3
"""Soak: a whole local vmq cluster with N VMs for D minutes, hangs injected at a known rate; prints the counts.

Real parts: redis-server, Celery beat, the monitor/timeout worker and one real host worker per host
(vmq.sim.localcluster.LocalCluster: real restart tasks on ``host.<name>``, real claims, real libvirt ``test:///``
resets). Only the guests are batched: 1,000 responder processes would not fit on a 2-core machine, so
bench/guests.py answers every probe for a slice of the VMs per process, with real signed replies. A hang
silences one VM; when the audit stream says a host worker restarted it, its guest answers again with a new
boot id (what a reboot looks like to vmq).

Printed (and checked, exit status 1 otherwise): injected, detected, restarted exactly once, false restarts
(must be 0), missed (must be 0), plus false faults (flagged, never restarted: must be 0 too) and detection
latency. ``tests/integration/test_soak_short.py`` runs a short version in CI.

    python3 bench/soak.py                          # 1,000 VMs, 30 minutes, one hang every 5 s
    python3 bench/soak.py --vms 200 --minutes 1 --fault-every 2 --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import guests
import redis
from measure import pct

from vmq.operator_views import event_json
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis


def _settings_env(args: argparse.Namespace) -> dict[str, str]:
    return {
        "VMQ_NAMESPACE": "soak", "VMQ_PROBE_INTERVAL_S": str(args.probe_interval),
        "VMQ_REPLY_TIMEOUT_S": str(args.reply_timeout), "VMQ_BOOT_GRACE_S": "2",
        "VMQ_RECOVERY_TIMEOUT_S": "30", "VMQ_RESTART_TIMEOUT_S": "30", "VMQ_ACTIVITY_WINDOW_S": "0.2",
        "VMQ_INVENTORY_INTERVAL_S": "5", "VMQ_HOST_HEARTBEAT_INTERVAL_S": "1", "VMQ_HOST_HEARTBEAT_TTL_S": "15",
        "VMQ_METRICS_PORT": "0", "VMQ_LOG_LEVEL": "WARNING",
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One soak run; returns the counts."""
    server = LocalRedis(workdir / "redis").start()
    hosts = [f"node{i + 1}" for i in range(args.hosts)]
    vms = [f"vm-{i:05d}" for i in range(args.vms)]
    placement = {h: vms[i::len(hosts)] for i, h in enumerate(hosts)}
    cluster = LocalCluster(workdir / "cluster", server.url,
                           ClusterSpec(placement=placement, env=_settings_env(args), guests=False))
    keys, settings = cluster.settings.keys, cluster.settings
    client: Any = redis.Redis.from_url(server.url)
    injected_key = "soak:bench:injected"
    procs_n = max(1, min(args.vms, args.responders))
    fleet: guests.Fleet | None = None  # built once cluster.start() has installed the keys
    done = threading.Event()
    revived: list[str] = []

    def reboot_restarted_guests() -> None:
        """The guest of a VM its host worker restarted comes back with a new boot id."""
        watch: Any = redis.Redis.from_url(server.url)
        last = "$"
        while not done.is_set():
            try:
                got = watch.xread({keys.events: last}, block=200, count=500)
            except redis.RedisError:
                done.wait(0.5)
                continue
            for _, entries in got or []:
                for entry_id, raw in entries:
                    last = entry_id.decode()
                    if raw.get(b"type") == b"restarted":
                        vm = raw[b"vm"].decode()
                        revived.append(vm)
                        if fleet is not None:
                            fleet.revive(vm)
        watch.close()

    try:
        cluster.start()  # keys, monitor, host workers, beat
        fleet = guests.Fleet(server.url, keys.probe_channel, keys.reply_stream, settings.reply_stream_maxlen,
                             500, [vms[p::procs_n] for p in range(procs_n)], cluster.secrets, injected_key)
        fleet.start()
        watcher = threading.Thread(target=reboot_restarted_guests, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        cluster.wait_healthy(timeout_s=120 + args.vms / 20)
        warmup_s = time.monotonic() - t0
        mark = client.xrevrange(keys.events, count=1)[0][0].decode()
        rounds0 = cluster.store.rounds.current_round()
        _log(f"{args.vms} VMs healthy after {warmup_s:.0f} s; injecting one hang every ~{args.fault_every:g} s "
             f"for {args.minutes:g} min")
        pool = vms[:]
        random.shuffle(pool)
        injected: list[str] = []
        start = time.monotonic()
        next_inject = start + args.fault_every * random.uniform(0.5, 1.5)
        next_note = start + 60
        while (now := time.monotonic()) < start + args.minutes * 60:
            for name, proc in cluster.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): see {cluster.workdir}/{name}.log")
            if now >= next_inject and pool:
                vm = pool.pop()
                if cluster.store.vms.record(vm).state == "healthy":
                    injected.append(vm)
                    fleet.silence(vm)
                next_inject += args.fault_every * random.uniform(0.5, 1.5)
            if now >= next_note:
                _log(f"{(now - start) / 60:.0f} min: {len(injected)} hangs injected, {len(revived)} restarts seen")
                next_note += 60
            time.sleep(0.05)
        rounds = cluster.store.rounds.current_round() - rounds0
        # Drain: the last hangs are detected, restarted and answer again.
        drain_until = time.monotonic() + args.probe_interval + args.reply_timeout + 30
        while time.monotonic() < drain_until:
            states = dict(zip(injected, (r.state.value for r in cluster.store.vms.records(injected))))
            if all(s == "healthy" for s in states.values()):
                break
            time.sleep(0.5)
        time.sleep(args.probe_interval + args.reply_timeout + 1)  # nothing else happens after the drain
        counts = _count(cluster, client, mark, injected, injected_key, vms)
        counts.update(vms=args.vms, hosts=args.hosts, minutes=args.minutes, rounds=rounds,
                      t1_s=args.probe_interval, t2_s=args.reply_timeout, warmup_s=round(warmup_s, 1))
        return counts
    finally:
        done.set()
        if fleet is not None:
            fleet.stop()
        cluster.stop()
        client.close()
        server.stop()


def _count(cluster: LocalCluster, client: Any, mark: str, injected: list[str], injected_key: str,
           vms: list[str]) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    after = mark
    while batch := cluster.store.audit.read(after=after, count=5000):
        events += [event_json(i, e) for i, e in batch]
        after = batch[-1][0]
    inj_ms = {k.decode(): int(v) for k, v in client.hgetall(injected_key).items()}
    by_vm: dict[str, dict[str, list[int]]] = {}
    for e in events:
        if e.get("type") in ("faulty", "restart_dispatched", "restarted", "recovered"):
            by_vm.setdefault(e["vm"], {}).setdefault(e["type"], []).append(int(e["time_ms"]))
    hung = set(injected)
    detected = [vm for vm in injected if any(t >= inj_ms.get(vm, 0) for t in by_vm.get(vm, {}).get("faulty", []))]
    restarts = {vm: len(by_vm.get(vm, {}).get("restarted", [])) for vm in injected}
    false_restarts = sum(len(by_vm.get(vm, {}).get("restarted", [])) for vm in vms if vm not in hung)
    false_restarts += sum(1 for vm in injected for t in by_vm.get(vm, {}).get("restarted", [])
                          if t < inj_ms.get(vm, 0))
    false_faults = sum(len(by_vm.get(vm, {}).get("faulty", [])) for vm in vms if vm not in hung)
    latency = [(min(t for t in by_vm[vm]["faulty"] if t >= inj_ms[vm]) - inj_ms[vm]) / 1000
               for vm in detected if vm in inj_ms]
    recovered = [vm for vm in injected if by_vm.get(vm, {}).get("recovered")]
    return {
        "injected": len(injected), "detected": len(detected),
        "restarted_exactly_once": sum(1 for n in restarts.values() if n == 1),
        "restarted_more_than_once": sum(1 for n in restarts.values() if n > 1),
        "recovered": len(recovered),
        "false_restarts": false_restarts, "false_faults": false_faults,
        "missed": sum(1 for vm in injected if vm not in detected or restarts[vm] == 0),
        "detect_s_p50": round(pct(latency, 50), 3), "detect_s_p99": round(pct(latency, 99), 3),
        "storm_events": sum(1 for e in events if e.get("type") in ("storm", "host_suspect")),
    }


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def passed(counts: dict[str, Any]) -> bool:
    """Every fault detected and restarted exactly once, nothing else restarted or flagged."""
    n = counts["injected"]
    return (n > 0 and counts["detected"] == n and counts["restarted_exactly_once"] == n
            and counts["false_restarts"] == 0 and counts["false_faults"] == 0 and counts["missed"] == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=1000, help="VMs (default 1000)")
    parser.add_argument("--hosts", type=int, default=4, help="hosts, one real host worker each (default 4)")
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of injection (default 30)")
    parser.add_argument("--fault-every", type=float, default=5.0, help="mean s between hangs (default 5)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="T1 in s (default 1)")
    parser.add_argument("--reply-timeout", type=float, default=3.0, help="T2 in s (default 3)")
    parser.add_argument("--responders", type=int, default=2, help="guest processes (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmq-soak-") as tmp:
        counts = run(args, Path(tmp))
    counts["pass"] = passed(counts)
    if args.json:
        print(json.dumps(counts), flush=True)
    else:
        for name in ("vms", "hosts", "minutes", "rounds", "injected", "detected", "restarted_exactly_once",
                     "restarted_more_than_once", "false_restarts", "false_faults", "missed", "recovered",
                     "detect_s_p50", "detect_s_p99", "storm_events", "pass"):
            print(f"{name:>26}: {counts[name]}")
    return 0 if counts["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
