#!/usr/bin/env python3
"""End-to-end benchmark of vmq's probe -> signed reply -> judge loop on a real redis-server.

For each N: register N VMs, start 1-3 responder processes (bench/guests.py) that answer every probe with
real signed replies, drive the real ``vmq.monitor.Monitor`` the way the Celery tasks do (probe every T1,
tick at each deadline + 20 ms), inject hangs at a steady rate and measure judge cost, detection latency,
false/missed faults and Redis cost; then time a naive per-VM judge at the same N. See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import json
import logging
import math
import multiprocessing as mp
import os
import pstats
import queue
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/guests.py (also for spawned children)

import redis  # noqa: E402

import guests  # noqa: E402
from vmq.codec import new_secret  # noqa: E402
from vmq.config import load_settings  # noqa: E402
from vmq.localcluster import LocalRedis  # noqa: E402
from vmq.monitor import Monitor, RestartRequest, TickReport  # noqa: E402
from vmq.store.redis import RedisStore  # noqa: E402
from workers.monitor import JUDGE_SLACK_S  # noqa: E402  (the judge task's 20 ms after the deadline)

log = logging.getLogger("loop_bench")
HOSTS = [f"bench-host-{i}" for i in range(4)]
HEARTBEAT_TTL_MS, HEARTBEAT_EVERY_S = 15_000, 5.0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def proc_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_mem(client: redis.Redis) -> tuple[float, int]:
    info = client.info()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"]), int(info["used_memory"])


@dataclass
class Loop:
    """The Celery-like driver of one Monitor, plus everything it records."""

    monitor: Monitor
    store: RedisStore
    t1: float
    t2: float
    clock_offset_s: float  # Redis time (s) - time.monotonic()
    next_probe: float = 0.0
    ticks: list[float] = field(default_factory=list)  # heap of monotonic times of deadline ticks
    next_heartbeat: float = 0.0
    recording: bool = False
    profile: cProfile.Profile | None = None
    probes: list[tuple[float, float, float]] = field(default_factory=list)  # (mono start, cpu s, wall s)
    tick_calls: list[tuple[float, float, float]] = field(default_factory=list)
    reports: list[TickReport] = field(default_factory=list)
    judge_s: list[float] = field(default_factory=list)  # CPU of Monitor._judge per judged round
    late_probes: int = 0

    def __post_init__(self) -> None:
        # Instance attributes shadow the methods, so Monitor.probe's own tick() is recorded too.
        tick, judge = self.monitor.tick, self.monitor._judge

        def recorded_tick() -> TickReport:
            report = tick()
            if self.recording:
                self.reports.append(report)
            return report

        def timed_judge(*args: Any) -> None:
            start = time.process_time()
            judge(*args)
            if self.recording:
                self.judge_s.append(time.process_time() - start)

        self.monitor.tick = recorded_tick  # type: ignore[method-assign]
        self.monitor._judge = timed_judge  # type: ignore[method-assign]

    def _timed(self, call: Any, into: list[tuple[float, float, float]]) -> Any:
        mono, cpu, wall = time.monotonic(), time.process_time(), time.perf_counter()
        if self.profile and self.recording:
            self.profile.enable()
        result = call()
        if self.profile and self.recording:
            self.profile.disable()
        if self.recording:
            into.append((mono, time.process_time() - cpu, time.perf_counter() - wall))
        return result

    def run(self, until: float, inject: Any = None, inject_every_s: float = 0.0) -> None:
        """Probe every T1, tick at each round's deadline + 20 ms, inject faults, until monotonic ``until``."""
        next_inject = time.monotonic() + random.uniform(0.5, 1.5) * inject_every_s if inject else math.inf
        while (now := time.monotonic()) < until:
            due = min(self.next_probe, self.ticks[0] if self.ticks else math.inf, self.next_heartbeat, next_inject)
            if due > now:
                time.sleep(min(due, until) - now)
            elif self.next_probe <= now:
                _, sent_ms = self._timed(self.monitor.probe, self.probes)
                heapq.heappush(self.ticks, (sent_ms + self.t2 * 1000) / 1000 - self.clock_offset_s + JUDGE_SLACK_S)
                self.next_probe += self.t1
                if self.next_probe < time.monotonic():  # beat's `expires`: a stale probe is dropped
                    self.late_probes += 1
                    self.next_probe = time.monotonic() + self.t1
            elif self.ticks and self.ticks[0] <= now:
                heapq.heappop(self.ticks)
                self._timed(self.monitor.tick, self.tick_calls)
            elif self.next_heartbeat <= now:
                for host in HOSTS:
                    self.store.heartbeat(host, {"queue": f"host.{host}", "pid": os.getpid()}, HEARTBEAT_TTL_MS)
                self.next_heartbeat = now + HEARTBEAT_EVERY_S
            else:
                inject()
                next_inject += random.uniform(0.5, 1.5) * inject_every_s  # random phase against the rounds


def setup_vms(store: RedisStore, n: int) -> tuple[list[str], dict[str, str]]:
    """Register n VMs with keys, host and running domain; returns (vms, secrets)."""
    vms = [f"vm-{i:05d}" for i in range(n)]
    secrets = {vm: new_secret() for vm in vms}
    now_ms = store.time_ms()
    for vm in vms:  # the real per-VM APIs (3-4 round trips each); bulk HSET for the inventory fields
        store.register_vm(vm, now_ms)
        store.set_secret(vm, secrets[vm])
    for start in range(0, n, 5000):
        store.write_many({vm: {"host": HOSTS[i % len(HOSTS)], "domain_status": "running"}
                          for i, vm in enumerate(vms[start:start + 5000], start)})
    return vms, secrets


def naive_judge(client: redis.Redis, key: str, vms: list[str], deadline_ms: float) -> tuple[float, float, int]:
    """The per-VM judge a naive monitor would run: one unpipelined read + one comparison per VM."""
    cpu, wall, overdue = time.process_time(), time.perf_counter(), 0
    for vm in vms:
        seen = client.zscore(key, vm)
        if seen is None or seen < deadline_ms:
            overdue += 1
    return time.process_time() - cpu, time.perf_counter() - wall, overdue


def bench_one(n: int, args: argparse.Namespace, url: str) -> dict[str, Any]:
    ns = f"bench{n}-{os.getpid()}"
    settings = load_settings({"redis_url": url, "namespace": ns, "probe_interval_s": args.probe_interval,
                              "reply_timeout_s": args.reply_timeout, "boot_grace_s": 0, "max_restarts": 1_000_000,
                              "recovery_timeout_s": 86_400, "restart_timeout_s": 86_400})
    k = settings.keys
    store = RedisStore.from_url(url, k, settings.events_maxlen)
    client = redis.Redis.from_url(url)
    injected_key = f"{ns}:bench:injected"
    t0 = time.monotonic()
    vms, secrets = setup_vms(store, n)
    setup_s = time.monotonic() - t0
    log.info("N=%d: registered in %.1f s", n, setup_s)

    # -- responders
    ctx = mp.get_context("spawn")
    procs_n = max(1, min(3, args.responders))
    slices = [vms[i * n // procs_n:(i + 1) * n // procs_n] for i in range(procs_n)]
    owner = {vm: p for p, part in enumerate(slices) for vm in part}
    controls = [ctx.Queue() for _ in slices]
    stop, results = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in slices]
    procs = [ctx.Process(target=guests.serve, daemon=True, name=f"guests-{p}",
                         args=(url, k.probe_channel, k.reply_stream, settings.reply_stream_maxlen, args.batch,
                               part, [secrets[vm] for vm in part], injected_key, controls[p], readies[p], stop,
                               results)) for p, part in enumerate(slices)]
    for proc in procs:
        proc.start()
    for ready in readies:
        if not ready.wait(60):
            raise RuntimeError("a responder process did not subscribe within 60 s")

    dispatched: list[RestartRequest] = []

    def dispatch(request: RestartRequest) -> None:  # no Celery here: record, and "restart" the guest
        dispatched.append(request)
        controls[owner[request.vm]].put(("revive", request.vm))

    monitor = Monitor(store, settings, dispatch)
    clock_offset = store.time_ms() / 1000 - time.monotonic()
    loop = Loop(monitor, store, settings.probe_interval_s, settings.reply_timeout_s, clock_offset,
                next_probe=time.monotonic(), profile=cProfile.Profile() if args.profile else None)

    try:
        # -- warm-up: every VM healthy and a few rounds judged with nobody in attention
        min_rounds = math.ceil(args.reply_timeout / args.probe_interval) + 3
        deadline = time.monotonic() + 120 + n / 100
        while True:
            loop.run(time.monotonic() + args.probe_interval)
            rounds = int(client.get(k.round_seq) or 0)
            attention = client.scard(k.attention)
            if attention == 0 and rounds >= min_rounds:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up: {attention} VMs still not healthy after {rounds} rounds")
        log.info("N=%d: all healthy after %d rounds; measuring %g s", n, rounds, args.seconds)

        # -- measure, injecting one hang every --fault-every seconds on a VM never injected before
        last_event = client.xrevrange(k.events, count=1)
        mark = last_event[0][0].decode() if last_event else "0-0"
        pool = vms[:]
        random.shuffle(pool)
        injected: list[str] = []

        def inject() -> None:
            while pool:
                vm = pool.pop()
                if store.vm_record(vm).get("state") == "healthy":
                    injected.append(vm)
                    controls[owner[vm]].put(("silence", vm))
                    return

        redis_cpu0, _ = redis_cpu_mem(client)
        guest_cpu0 = [proc_cpu_s(p.pid) for p in procs if p.pid]
        loop.recording = True
        start = time.monotonic()
        loop.run(start + args.seconds, inject, args.fault_every)
        measured_s = time.monotonic() - start
        loop.recording = False
        redis_cpu1, redis_mem = redis_cpu_mem(client)
        guest_cpu1 = [proc_cpu_s(p.pid) for p in procs if p.pid]
        bound_s = args.probe_interval + args.reply_timeout + 0.5
        loop.run(time.monotonic() + bound_s + 1.0)  # drain: let the last injections be judged

        # -- naive per-VM judge, same N, same Redis, same data (responders idle by now)
        naive = [naive_judge(client, k.last_seen, vms, store.time_ms() - args.reply_timeout * 1000)
                 for _ in range(args.naive_rounds)]
    finally:
        stop.set()
        guest_stats = []
        for _ in procs:
            try:
                guest_stats.append(results.get(timeout=15))
            except queue.Empty:
                break
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.terminate()

    # -- verdicts from the audit stream
    faulty: dict[str, list[int]] = {}
    after = mark
    while batch := store.events(after=after, count=5000):
        for event_id, event in batch:
            if event.get("type") == "faulty":
                faulty.setdefault(event["vm"], []).append(int(event["time"]))
        after = batch[-1][0]
    inj_ms = {vm.decode(): int(ms) for vm, ms in client.hgetall(injected_key).items()}
    latencies = [(faulty[vm][0] - inj_ms[vm]) / 1000 for vm in injected if vm in faulty and vm in inj_ms]
    false_faults = sum(len(times) for vm, times in faulty.items() if vm not in inj_ms)
    false_faults += sum(1 for vm in inj_ms for t in faulty.get(vm, []) if t < inj_ms[vm])
    false_faults += sum(len(faulty[vm]) - 1 for vm in inj_ms if len(faulty.get(vm, [])) > 1)
    missed = sum(1 for vm in injected if vm not in faulty)
    _, rejects_stored = store.counters()

    # -- per-round monitor CPU: everything the monitor ran between one probe and the next
    starts = [p[0] for p in loop.probes]
    per_round = [0.0] * len(starts)
    for mono, cpu, _ in loop.probes + loop.tick_calls:
        i = max(0, sum(1 for s in starts if s <= mono) - 1)
        per_round[i] += cpu
    if args.profile:
        path = Path(args.profile) / f"monitor-{n}.prof"
        path.parent.mkdir(parents=True, exist_ok=True)
        loop.profile.dump_stats(str(path))  # type: ignore[union-attr]
        print(f"\n--- cProfile of the monitor at N={n} ({path}), by cumulative time ---", file=sys.stderr)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats("tottime").print_stats(15)
    ms = 1000.0
    row = {
        "n": n, "t1_s": args.probe_interval, "t2_s": args.reply_timeout, "responders": procs_n,
        "setup_s": round(setup_s, 1), "measured_s": round(measured_s, 1),
        "rounds": len(loop.probes), "late_probes": loop.late_probes,
        "replies_per_s": round(sum(r.valid for r in loop.reports) / measured_s),
        "judge_cpu_ms_round_p50": round(pct(per_round, 50) * ms, 1),
        "judge_cpu_ms_round_p99": round(pct(per_round, 99) * ms, 1),
        "judge_cpu_ms_round_max": round(max(per_round, default=math.nan) * ms, 1),
        "monitor_cores": round(sum(per_round) / measured_s, 3),
        "tick_wall_ms_p50": round(pct([t[2] for t in loop.tick_calls], 50) * ms, 1),
        "tick_wall_ms_p99": round(pct([t[2] for t in loop.tick_calls], 99) * ms, 1),
        "probe_wall_ms_p99": round(pct([t[2] for t in loop.probes], 99) * ms, 1),
        "deadline_scan_cpu_ms_p50": round(pct(loop.judge_s, 50) * ms, 2),
        "deadline_scan_cpu_ms_p99": round(pct(loop.judge_s, 99) * ms, 2),
        "injected": len(injected), "detected": len(latencies),
        "detect_s_p50": round(pct(latencies, 50), 3), "detect_s_p99": round(pct(latencies, 99), 3),
        "detect_s_max": round(max(latencies, default=math.nan), 3), "bound_s": bound_s,
        "false_faults": false_faults, "missed_faults": missed,
        "rejects": sum(sum(r.rejected.values()) for r in loop.reports), "rejects_stored": sum(rejects_stored.values()),
        "restarts_dispatched": len(dispatched),
        "redis_used_memory_mib": round(redis_mem / 2**20, 1),
        "redis_cpu_pct": round(100 * (redis_cpu1 - redis_cpu0) / measured_s, 1),
        "guests_cpu_pct": round(100 * (sum(guest_cpu1) - sum(guest_cpu0)) / measured_s, 1),
        "guest_replies": sum(g["replies"] for g in guest_stats),
        "naive_rounds": len(naive),
        "naive_judge_wall_ms_round": round(pct([x[1] for x in naive], 50) * ms, 1),
        "naive_judge_cpu_ms_round": round(pct([x[0] for x in naive], 50) * ms, 1),
    }
    row["pass"] = (row["false_faults"] == 0 and row["missed_faults"] == 0 and row["rejects"] == 0
                   and len(latencies) > 0 and row["detect_s_p99"] <= bound_s)
    if url.startswith("redis://") and args.redis_url:  # someone else's Redis: remove our namespace
        for key in client.scan_iter(f"{ns}:*", count=1000):
            client.unlink(key)
    client.close()
    store.r.close()
    return row


COLUMNS = [("N", "n", "{}"), ("T1", "t1_s", "{:g}"), ("T2", "t2_s", "{:g}"), ("rounds", "rounds", "{}"),
           ("replies/s", "replies_per_s", "{}"), ("cpu/rnd p50", "judge_cpu_ms_round_p50", "{:.1f}"),
           ("p99 ms", "judge_cpu_ms_round_p99", "{:.1f}"), ("tick p99 ms", "tick_wall_ms_p99", "{:.1f}"),
           ("detect p50", "detect_s_p50", "{:.2f}"), ("p99", "detect_s_p99", "{:.2f}"),
           ("max s", "detect_s_max", "{:.2f}"), ("bound", "bound_s", "{:g}"), ("false", "false_faults", "{}"),
           ("missed", "missed_faults", "{}"), ("rejects", "rejects", "{}"),
           ("redis MiB", "redis_used_memory_mib", "{:.0f}"), ("redis cpu%", "redis_cpu_pct", "{:.0f}"),
           ("naive judge ms/rnd", "naive_judge_wall_ms_round", "{:.0f}")]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[h for h, _, _ in COLUMNS]] + [[f.format(row[key]) for _, key, f in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print()
    for row in rows:
        print(f"N={row['n']}: {'PASS' if row['pass'] else 'FAIL'}; {row['injected']} hangs injected, "
              f"{row['detected']} detected, {row['restarts_dispatched']} restarts dispatched; monitor "
              f"{row['monitor_cores']:.2f} cores (cpu/round max {row['judge_cpu_ms_round_max']:.0f} ms), "
              f"deadline scan (Monitor._judge) {row['deadline_scan_cpu_ms_p50']:.2f}/"
              f"{row['deadline_scan_cpu_ms_p99']:.2f} ms cpu p50/p99 vs naive per-VM judge "
              f"{row['naive_judge_wall_ms_round']:.0f} ms wall, {row['naive_judge_cpu_ms_round']:.0f} ms cpu; "
              f"guests {row['guests_cpu_pct']:.0f}% cpu ({row['responders']} procs); setup {row['setup_s']} s; "
              f"late probes {row['late_probes']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", default="1000,10000", help="comma-separated VM counts (default 1000,10000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per N (default 30)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="T1 in s (default 1)")
    parser.add_argument("--reply-timeout", type=float, default=3.0, help="T2 in s (default 3)")
    parser.add_argument("--fault-every", type=float, default=2.0, help="mean s between injected hangs (default 2)")
    parser.add_argument("--responders", type=int, default=2, help="responder processes, 1-3 (default 2)")
    parser.add_argument("--batch", type=int, default=500, help="XADDs per pipeline in a responder (default 500)")
    parser.add_argument("--naive-rounds", type=int, default=5, help="rounds of the naive judge (default 5)")
    parser.add_argument("--redis-url", default="", help="use this Redis instead of a private redis-server")
    parser.add_argument("--profile", metavar="DIR", help="cProfile the monitor's calls; dump DIR/monitor-N.prof")
    parser.add_argument("--json", action="store_true", help="print one JSON object per N instead of the table")
    parser.add_argument("-v", "--verbose", action="store_true", help="show vmq's own warnings (faults, restarts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vmq").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    rows = []
    for n in (int(x) for x in args.vms.split(",") if x.strip()):
        with tempfile.TemporaryDirectory(prefix="vmq-bench-") as tmp:
            server = None if args.redis_url else LocalRedis(Path(tmp)).start()
            try:
                row = bench_one(n, args, args.redis_url or server.url)  # type: ignore[union-attr]
            finally:
                if server is not None:
                    server.stop()
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows)
    return 0 if rows and all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
