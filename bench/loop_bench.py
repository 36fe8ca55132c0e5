#!/usr/bin/env python3
"""End-to-end benchmark of vmq's probe -> signed reply -> judge loop on a real redis-server.

For each N: register N VMs, start 1-3 responder processes (bench/guests.py) that answer every probe with
real signed replies, drive the real ``vmq.monitor.Monitor`` the way the Celery tasks do (probe every T1,
tick half a T1 after each probe and at each deadline + 20 ms), inject hangs at a steady rate and measure
judge cost, detection latency, false/missed faults and Redis cost; then time a naive per-VM judge at the
same N. See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import json
import logging
import math
import os
import pstats
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/guests.py (also for spawned children)

import guests
import redis
from measure import host_busy_s, naive_judge, pct, print_table, proc_cpu_s, redis_cpu_mem

from vmq.codec import new_secret
from vmq.config import load_settings
from vmq.model import RestartRequest
from vmq.monitor import Monitor, TickReport
from vmq.sim.localcluster import LocalRedis
from vmq.store.redis import RedisStore

log = logging.getLogger("loop_bench")
JUDGE_SLACK_S = 0.02  # workers/monitor.py: the judge task runs 20 ms after the deadline
DRAIN_AT = 0.5  # workers/monitor.py: drain_replies runs half a T1 after each round goes out
HOSTS = [f"bench-host-{i}" for i in range(4)]
HEARTBEAT_TTL_MS, HEARTBEAT_EVERY_S = 15_000, 0.25  # like a host worker: renewed often


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
    judge_s: list[tuple[float, float]] = field(default_factory=list)  # Monitor._judge (cpu s, wall s)
    late_probes: int = 0
    send_delays: list[float] = field(default_factory=list)  # probe() called -> round sent (Redis time), s

    def __post_init__(self) -> None:
        # Instance attributes shadow the methods, so Monitor.probe's own tick() is recorded too.
        tick, judge = self.monitor.tick, self.monitor._judge

        def recorded_tick() -> TickReport:
            report = tick()
            if self.recording:
                self.reports.append(report)
            return report

        def timed_judge(*args: Any) -> None:
            cpu, wall = time.process_time(), time.perf_counter()
            judge(*args)
            if self.recording:
                self.judge_s.append((time.process_time() - cpu, time.perf_counter() - wall))

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
        """Probe every T1, tick half a T1 later and at each round's deadline + 20 ms, inject faults, until ``until``."""
        next_inject = time.monotonic() + random.uniform(0.5, 1.5) * inject_every_s if inject else math.inf
        while (now := time.monotonic()) < until:
            next_tick = self.ticks[0] if self.ticks else math.inf
            due = min(self.next_probe, next_tick, self.next_heartbeat, next_inject)
            if due > now:
                time.sleep(min(due, until) - now)
            elif self.next_probe <= now:
                due_at, self.next_probe = self.next_probe, self.next_probe + self.t1  # beat keeps its phase
                if now - due_at >= self.t1:  # the task's `expires` = T1: a probe that late is dropped
                    self.late_probes += self.recording
                    continue
                _, sent_ms = self._timed(self.monitor.probe, self.probes)
                if self.recording:  # due -> published: waiting for earlier calls, then probe() ticks first
                    self.send_delays.append(sent_ms / 1000 - self.clock_offset_s - due_at)
                deadline = (sent_ms + self.t2 * 1000) / 1000 - self.clock_offset_s  # Redis ms -> monotonic
                heapq.heappush(self.ticks, deadline + JUDGE_SLACK_S)
                heapq.heappush(self.ticks, time.monotonic() + DRAIN_AT * self.t1)  # the drain_replies task
            elif next_tick <= now:
                heapq.heappop(self.ticks)
                self._timed(self.monitor.tick, self.tick_calls)
            elif self.next_heartbeat <= now:
                for host in HOSTS:
                    info = {"queue": f"host.{host}", "pid": os.getpid(), "seen_ms": self.store.clock.time_ms()}
                    self.store.hosts.heartbeat(host, info, HEARTBEAT_TTL_MS)
                self.next_heartbeat = now + HEARTBEAT_EVERY_S
            else:
                inject()
                next_inject += random.uniform(0.5, 1.5) * inject_every_s  # random phase against the rounds


def sid(stream_id: str) -> tuple[int, ...]:
    """A stream id as a comparable tuple."""
    return tuple(int(x) for x in stream_id.split("-"))


def setup_vms(store: RedisStore, n: int) -> tuple[list[str], dict[str, str]]:
    """Register n VMs with keys, host and running domain; returns (vms, secrets)."""
    vms = [f"vm-{i:05d}" for i in range(n)]
    secrets = {vm: new_secret() for vm in vms}
    now_ms = store.clock.time_ms()
    for vm in vms:  # the real per-VM APIs (3-4 round trips each); bulk HSET for the inventory fields
        store.vms.register_vm(vm, now_ms)
        store.keyring.set_secret(vm, secrets[vm])
    for start in range(0, n, 5000):
        store.vms.write_many({vm: {"host": HOSTS[i % len(HOSTS)], "domain_status": "running"}
                          for i, vm in enumerate(vms[start:start + 5000], start)})
    return vms, secrets


def bench_one(n: int, args: argparse.Namespace, url: str) -> dict[str, Any]:
    ns = f"bench{n}-{os.getpid()}"
    settings = load_settings({"redis_url": url, "namespace": ns, "probe_interval_s": args.probe_interval,
                              "reply_timeout_s": args.reply_timeout, "boot_grace_s": 0,
                              "max_restarts": 1_000_000, "recovery_timeout_s": 86_400,
                              "restart_timeout_s": 86_400,
                              # A real host worker renews every 1 s from its own thread; this loop renews
                              # more often but from the busy judge loop, so declare the real interval.
                              "host_heartbeat_interval_s": 1.0,
                              "backoff_base_s": 0, "max_concurrent_restarts_per_host": 1_000_000})
    k = settings.keys
    store = RedisStore.from_url(url, k, settings.events_maxlen)
    client = redis.Redis.from_url(url)
    injected_key = f"{ns}:bench:injected"
    t0 = time.monotonic()
    vms, secrets = setup_vms(store, n)
    setup_s = time.monotonic() - t0
    log.info("N=%d: registered in %.1f s", n, setup_s)

    # -- responders
    procs_n = max(1, min(3, args.responders))
    fleet = guests.Fleet(url, k.probe_channel, k.reply_stream, settings.reply_stream_maxlen, args.batch,
                         guests.contiguous(vms, procs_n), secrets, injected_key)
    fleet.start()
    procs = fleet.procs

    dispatched: list[RestartRequest] = []

    def dispatch(request: RestartRequest) -> None:  # no Celery here: record, and "restart" the guest
        dispatched.append(request)
        fleet.revive(request.vm)

    monitor = Monitor(store, settings, dispatch)
    clock_offset = store.clock.time_ms() / 1000 - time.monotonic()
    loop = Loop(monitor, store, settings.probe_interval_s, settings.reply_timeout_s, clock_offset,
                next_probe=time.monotonic())
    if args.profile:
        loop.profile = cProfile.Profile(time.process_time)  # CPU time: not skewed by the guests' bursts

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
                if store.vms.record(vm).state == "healthy":
                    injected.append(vm)
                    fleet.silence(vm)
                    return

        redis_cpu0, _ = redis_cpu_mem(client)
        guest_cpu0 = [proc_cpu_s(p.pid) for p in procs if p.pid]
        host0, self0 = host_busy_s(), time.process_time()
        loop.recording = True
        start = time.monotonic()
        loop.run(start + args.seconds, inject, args.fault_every)
        measured_s = time.monotonic() - start
        loop.recording = False
        redis_cpu1, redis_mem = redis_cpu_mem(client)
        redis_version = client.info("server")["redis_version"]
        guest_cpu1 = [proc_cpu_s(p.pid) for p in procs if p.pid]
        host1, self1 = host_busy_s(), time.process_time()
        bound_s = args.probe_interval + args.reply_timeout + 0.5
        loop.run(time.monotonic() + bound_s + 1.0)  # drain: let the last injections be judged

        # -- naive per-VM judge, same N, same Redis, same data (responders idle by now)
        naive = [naive_judge(client, k.last_seen, vms, store.clock.time_ms() - args.reply_timeout * 1000)
                 for _ in range(args.naive_rounds)]
    finally:
        guest_stats = fleet.stop()

    # -- verdicts from the audit stream: 'faulty' events (written at their stream id, Redis ms) vs injections
    faulty: dict[str, list[int]] = {}
    warmup_faults, after, lags = 0, "0-0", []  # lags: verdict time - deadline of the missed round, ms
    while batch := store.audit.read(after=after, count=5000):
        for event_id, event in batch:
            if event.get("type") == "faulty":
                if sid(event_id) <= sid(mark):
                    warmup_faults += 1
                else:
                    faulty.setdefault(event["vm"], []).append(sid(event_id)[0])  # written at (Redis ms)
                    lags.append(sid(event_id)[0] - json.loads(event["evidence"])["deadline_ms"])
        after = batch[-1][0]
    inj_ms = {vm.decode(): int(ms) for vm, ms in client.hgetall(injected_key).items()}
    latencies = [(faulty[vm][0] - inj_ms[vm]) / 1000 for vm in injected if vm in faulty and vm in inj_ms]
    false_faults = sum(len(times) for vm, times in faulty.items() if vm not in inj_ms)  # never injected
    false_faults += sum(1 for vm in inj_ms for t in faulty.get(vm, []) if t < inj_ms[vm])  # before it
    false_faults += sum(len(faulty[vm]) - 1 for vm in inj_ms if len(faulty.get(vm, [])) > 1)  # again
    missed = sum(1 for vm in injected if vm not in faulty)
    _, rejects_stored = store.stats.counters()

    # -- per-round monitor CPU: everything the monitor ran from one probe to the next
    starts = [p[0] for p in loop.probes]
    per_round = [0.0] * len(starts)
    for mono, cpu, _ in loop.probes + loop.tick_calls:
        per_round[max(0, sum(1 for s in starts if s <= mono) - 1)] += cpu
    if loop.profile is not None:
        path = Path(args.profile) / f"monitor-{n}.prof"
        path.parent.mkdir(parents=True, exist_ok=True)
        loop.profile.dump_stats(str(path))
        print(f"\n--- cProfile (CPU time) of the monitor's calls at N={n}: {path} ---", file=sys.stderr)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats("cumulative").print_stats(30)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats("tottime").print_stats(15)
    ms, walls, probe_walls = 1000.0, [t[2] for t in loop.tick_calls], [t[2] for t in loop.probes]
    ours = (self1 - self0) + (redis_cpu1 - redis_cpu0) + sum(guest_cpu1) - sum(guest_cpu0)
    row = {
        "n": n, "t1_s": args.probe_interval, "t2_s": args.reply_timeout, "responders": procs_n,
        "setup_s": round(setup_s, 1), "measured_s": round(measured_s, 1),
        "rounds": len(loop.probes), "late_probes": loop.late_probes,
        "replies_per_s": round(sum(r.valid for r in loop.reports) / measured_s),
        "judge_cpu_ms_round_p50": round(pct(per_round, 50) * ms, 1),
        "judge_cpu_ms_round_p99": round(pct(per_round, 99) * ms, 1),
        "judge_cpu_ms_round_max": round(max(per_round, default=math.nan) * ms, 1),
        "monitor_cores": round(sum(per_round) / measured_s, 3),
        "tick_wall_ms_p50": round(pct(walls, 50) * ms, 1), "tick_wall_ms_p99": round(pct(walls, 99) * ms, 1),
        "probe_wall_ms_p50": round(pct(probe_walls, 50) * ms, 1),
        "probe_wall_ms_p99": round(pct(probe_walls, 99) * ms, 1),
        "deadline_scan_ms_p50": round(pct([j[1] for j in loop.judge_s], 50) * ms, 2),
        "deadline_scan_ms_p99": round(pct([j[1] for j in loop.judge_s], 99) * ms, 2),
        "deadline_scan_cpu_ms_p50": round(pct([j[0] for j in loop.judge_s], 50) * ms, 2),
        "injected": len(injected), "detected": len(latencies), "warmup_faults": warmup_faults,
        "detect_s_p50": round(pct(latencies, 50), 3), "detect_s_p99": round(pct(latencies, 99), 3),
        "detect_s_max": round(max(latencies, default=math.nan), 3), "bound_s": bound_s,
        "verdict_after_deadline_ms_p50": pct(lags, 50),
        "verdict_after_deadline_ms_max": max(lags, default=None),
        "probe_send_delay_ms_p50": round(pct(loop.send_delays, 50) * ms),
        "probe_send_delay_ms_p99": round(pct(loop.send_delays, 99) * ms),
        "false_faults": false_faults, "missed_faults": missed,
        "rejects": sum(sum(r.rejected.values()) for r in loop.reports),
        "rejects_stored": sum(rejects_stored.values()),
        "restarts_dispatched": len(dispatched),
        "redis_version": redis_version, "redis_used_memory_mib": round(redis_mem / 2**20, 1),
        "redis_cpu_pct": round(100 * (redis_cpu1 - redis_cpu0) / measured_s, 1),
        "guests_cpu_pct": round(100 * (sum(guest_cpu1) - sum(guest_cpu0)) / measured_s, 1),
        "other_cpu_pct": round(100 * max(0.0, host1 - host0 - ours) / measured_s, 1), "cores": os.cpu_count(),
        "guest_replies": sum(g["replies"] for g in guest_stats),
        "naive_rounds": len(naive),
        "naive_judge_wall_ms_round": round(pct([x[1] for x in naive], 50) * ms, 1),
        "naive_judge_cpu_ms_round": round(pct([x[0] for x in naive], 50) * ms, 1),
    }
    # Every detected hang must also be restarted: a guard holding restarts here would be a bench defect.
    row["pass"] = (row["false_faults"] == 0 and row["missed_faults"] == 0 and row["rejects"] == 0
                   and len(latencies) > 0 and row["detect_s_p99"] <= bound_s
                   and len(dispatched) >= len(latencies))
    if url.startswith("redis://") and args.redis_url:  # someone else's Redis: remove our namespace
        for key in client.scan_iter(f"{ns}:*", count=1000):
            client.unlink(key)
    client.close()
    store.client.close()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", default="1000,10000", help="comma-separated VM counts (default 1000,10000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per N (default 30)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="T1 in s (default 1)")
    parser.add_argument("--reply-timeout", type=float, default=3.0, help="T2 in s (default 3)")
    parser.add_argument("--fault-every", type=float, default=2.0, help="mean s between hangs (default 2)")
    parser.add_argument("--responders", type=int, default=2, help="responder processes, 1-3 (default 2)")
    parser.add_argument("--batch", type=int, default=500, help="XADDs per guest pipeline (default 500)")
    parser.add_argument("--naive-rounds", type=int, default=5, help="rounds of the naive judge (default 5)")
    parser.add_argument("--redis-url", default="", help="use this Redis instead of a private redis-server")
    parser.add_argument("--redis-server", default="",
                        help="binary of the private server (default: vmq.sim.localcluster.find_redis_server: "
                             "$VMQ_REDIS_SERVER, Debian's 7.x, then PATH)")
    parser.add_argument("--profile", metavar="DIR", help="cProfile the monitor into DIR/monitor-N.prof")
    parser.add_argument("--json", action="store_true", help="one JSON object per N, no table")
    parser.add_argument("-v", "--verbose", action="store_true", help="show vmq's own warnings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vmq").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    rows = []
    for n in (int(x) for x in args.vms.split(",") if x.strip()):
        with tempfile.TemporaryDirectory(prefix="vmq-bench-") as tmp:
            binary = args.redis_server or None
            server = None if args.redis_url else LocalRedis(Path(tmp), binary=binary).start()
            try:
                row = bench_one(n, args, args.redis_url or server.url)  # type: ignore[union-attr]
            finally:
                if server is not None:
                    server.stop()
        rows.append(row)
        if args.json:
            clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            print(json.dumps(clean), flush=True)
    if not args.json:
        print_table(rows)
    return 0 if rows and all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
