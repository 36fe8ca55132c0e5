#!/usr/bin/env python3
"""vmq through its real Celery stack, beside a naive one-task-per-VM design, on a real redis-server.

vmq, per N: real beat (the real schedule and probe task), real monitor/timeout worker process(es), the
real restart dispatch into ``host.<name>`` queues consumed by stub host workers (bench/stub_host.py: the real
task name and queue, no libvirt), and 1-3 guest processes answering every probe with real signed replies
(bench/guests.py). Hangs are injected at a steady rate; the guest of a VM whose restart task ran answers
again with a new boot id. Measured: detection latency, flag -> restart task running, monitor CPU and RSS,
Redis CPU and memory, false and missed faults.

Naive, per N: one Celery task per VM per probe and one per VM per timeout (bench/naive_tasks.py) on a
prefork worker, driven at T1; measured: how late the tasks start (lag), sender and worker CPU. Sustained
means the lag p99 stays under T1 and the sender keeps up. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import redis
from measure import host_busy_s, pct, proc_cpu_s, redis_command_usec, redis_cpu_mem, top_commands
from stack_parts import (
    PATHS,
    Processes,
    fleet_names,
    host_names,
    register,
    rss_mib,
    start_fleet,
    tree_cpu_s,
    verdicts,
    vmq_env,
)

from vmq.sim.localcluster import SOURCE_ROOT, LocalRedis
from vmq.store.redis import RedisStore


def bench_vmq(n: int, via: str, args: argparse.Namespace, url: str, workdir: Path) -> dict[str, Any]:
    """One vmq row: N VMs on probe path ``via`` through the real Celery stack (module docstring)."""
    ns = f"stack{n}{via}"
    env = vmq_env(url, ns, args)
    from vmq.config import load_settings

    settings = load_settings({k[4:].lower(): v for k, v in env.items() if k.startswith("VMQ_")})
    k = settings.keys
    store = RedisStore.from_url(url, k, settings.events_maxlen)
    client = redis.Redis.from_url(url)
    injected_key, started_key = f"{ns}:bench:injected", f"{ns}:bench:restart_started"
    hosts = host_names(args.hosts)
    vms, secrets = fleet_names(n, via)
    step = args.warmup_step if args.warmup_step > 0 and via != "redis" else n
    t0 = time.monotonic()
    register(store, vms[:step], secrets, hosts, via)
    setup_s = time.monotonic() - t0
    print(f"[{time.strftime('%H:%M:%S')}]   registered {step} in {setup_s:.0f} s", file=sys.stderr, flush=True)
    fleet = start_fleet(via, url, settings, vms, secrets, hosts, injected_key, args)

    done = threading.Event()
    revived: set[str] = set()

    def background() -> None:
        """Host heartbeats (the stub host workers have no inventory agent) and guest reboots."""
        next_beat = 0.0
        while not done.is_set():
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + 0.5
                now_ms = store.clock.time_ms()
                for host in hosts:
                    store.hosts.heartbeat(host, {"queue": f"host.{host}", "seen_ms": now_ms}, 15_000)
            for vm in {v.decode() for v in client.hkeys(started_key)} - revived:
                revived.add(vm)
                fleet.revive(vm)
            done.wait(0.1)

    keeper = threading.Thread(target=background, daemon=True)
    keeper.start()
    run = Processes(workdir, env)
    monitors = [run.start(f"monitor-{i}", "-A", "workers.app", "worker", "-Q", "vmq.monitor,vmq.timeouts",
                          "-P", "threads", "-c", "4", "-n", f"monitor{i}@%h", "--without-gossip",
                          "--without-mingle", "--loglevel", "WARNING") for i in range(args.monitors)]
    run.start("stub-hosts", "-A", "stub_host", "worker", "-Q", ",".join(f"host.{h}" for h in hosts),
              "-P", "threads", "-c", "4", "-n", "stubhosts@%h", "--without-gossip", "--without-mingle",
              "--loglevel", "WARNING")
    beat = run.start("beat", "-A", "workers.app", "beat", "-s", str(workdir / f"beat-schedule-{via}"),
                     "--loglevel", "WARNING")
    try:
        min_rounds = math.ceil(args.reply_timeout / args.probe_interval) + 3
        deadline = time.monotonic() + (args.warmup_s or 120 + n / 100)
        registered = step
        for first in range(step, n, step):  # the fleet grows as hosts would join: each step healthy first
            while client.scard(k.attention) > 0:
                run.check()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"warm-up: {client.scard(k.attention)} VMs not healthy (logs: {workdir})")
                time.sleep(0.5)
            register(store, vms[first:first + step], secrets, hosts, via, first)
            registered = first + len(vms[first:first + step])
            print(f"[{time.strftime('%H:%M:%S')}]   registered {first + len(vms[first:first + step])}",
                  file=sys.stderr, flush=True)
        while not (client.scard(k.attention) == 0 and int(client.get(k.round_seq) or 0) >= min_rounds):
            run.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up: {client.scard(k.attention)} of {registered} VMs registered not "
                                   f"healthy (logs: {workdir})")
            time.sleep(0.5)
        last = client.xrevrange(k.events, count=1)
        mark = last[0][0].decode() if last else "0-0"
        pool, injected = vms[:], []
        random.shuffle(pool)
        cpu0 = [proc_cpu_s(p.pid) for p in monitors] + [proc_cpu_s(beat.pid)]
        redis_cpu0, _ = redis_cpu_mem(client)
        commands0 = redis_command_usec(client)
        rounds0 = int(client.get(k.round_seq) or 0)
        machine0 = host_busy_s()
        start = time.monotonic()
        next_inject = start + random.uniform(0.5, 1.5) * args.fault_every
        while (now := time.monotonic()) < start + args.seconds:
            run.check()
            if now >= next_inject and pool:
                vm = pool.pop()
                if store.vms.record(vm).state == "healthy":
                    injected.append(vm)
                    fleet.silence(vm)
                next_inject += random.uniform(0.5, 1.5) * args.fault_every
            time.sleep(0.02)
        measured_s = time.monotonic() - start
        machine_busy = host_busy_s() - machine0
        cpu1 = [proc_cpu_s(p.pid) for p in monitors] + [proc_cpu_s(beat.pid)]
        redis_cpu1, redis_mem = redis_cpu_mem(client)
        commands1 = redis_command_usec(client)
        rounds = int(client.get(k.round_seq) or 0) - rounds0
        rss = [rss_mib(p.pid) for p in monitors]
        time.sleep(args.probe_interval + args.reply_timeout + 1.5)  # drain: the last hangs are judged
    finally:
        done.set()
        run.stop()
        fleet.stop()

    inj_ms = {vm.decode(): int(ms) for vm, ms in client.hgetall(injected_key).items()}
    started = {vm.decode(): int(ms) for vm, ms in client.hgetall(started_key).items()}
    seen = verdicts(store, mark, injected, inj_ms, started)
    detect, to_task, false, missed = seen["detect"], seen["to_task"], seen["false"], seen["missed"]
    monitor_cpu = sum(cpu1[:-1]) - sum(cpu0[:-1])
    bound = args.probe_interval + args.reply_timeout + 0.5
    row = {
        "design": "vmq", "via": via, "n": n, "hosts": len(hosts), "t1_s": args.probe_interval,
        "t2_s": args.reply_timeout, "monitors": args.monitors, "setup_s": round(setup_s, 1),
        "measured_s": round(measured_s, 1), "rounds": rounds, "injected": len(injected), "detected": len(detect),
        "detect_s_p50": seen["detect_s_p50"], "detect_s_p99": seen["detect_s_p99"],
        "overhead_s_p99": round(pct(detect, 99) - args.probe_interval - args.reply_timeout, 3),
        "flag_to_task_s_p50": seen["flag_to_task_s_p50"], "flag_to_task_s_p99": seen["flag_to_task_s_p99"],
        "false_faults": false, "missed_faults": missed,
        "monitor_cpu_ms_round": round(1000 * monitor_cpu / max(1, rounds), 1),
        "monitor_cpu_pct": round(100 * monitor_cpu / measured_s, 1),
        "monitor_cpu_pct_per_1000": round(100 * monitor_cpu / measured_s / (n / 1000), 3),
        "beat_cpu_pct": round(100 * (cpu1[-1] - cpu0[-1]) / measured_s, 1),
        "monitor_rss_mib": round(sum(rss), 1),
        "redis_cpu_pct": round(100 * (redis_cpu1 - redis_cpu0) / measured_s, 1),
        "redis_used_memory_mib": round(redis_mem / 2**20, 1), "bound_s": bound,
        # Where Redis' CPU went: µs per VM per round of its five costliest commands (scripts' inner calls
        # are counted both under their own name and inside EVALSHA).
        "redis_top_us_per_vm_round": top_commands(commands0, commands1, n * max(1, rounds)),
        # All cores, everything (guests included): how busy the box was, to judge a run's representativeness.
        "machine_busy_pct": round(100 * machine_busy / measured_s, 1), "cores": os.cpu_count(),
    }
    row["pass"] = (false == 0 and missed == 0 and len(detect) > 0 and row["detect_s_p99"] <= bound
                   and len(to_task) >= len(detect))
    if args.max_flag_to_task_ms is not None:
        row["pass"] = row["pass"] and row["flag_to_task_s_p99"] * 1000 <= args.max_flag_to_task_ms
    client.close()
    store.client.close()
    return row


def bench_naive(n: int, args: argparse.Namespace, url: str, workdir: Path) -> dict[str, Any]:
    env = {**os.environ, "NAIVE_REDIS_URL": url, "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), str(BENCH)])}
    os.environ["NAIVE_REDIS_URL"] = url
    import importlib

    import naive_tasks

    naive_tasks = importlib.reload(naive_tasks)  # a fresh Celery app on this run's Redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    run = Processes(workdir, env)
    worker = run.start("naive-worker", "-A", "naive_tasks", "worker", "-Q", "naive", "-P", "prefork", "-c", "2",
                       "-n", "naive@%h", "--without-gossip", "--without-mingle", "--loglevel", "WARNING")
    vms = [f"vm-{i:05d}" for i in range(n)]
    sender_cpu, send_walls = 0.0, []
    try:
        time.sleep(3)
        run.check()
        worker_cpu0, redis_cpu0 = tree_cpu_s(worker.pid), redis_cpu_mem(client)[0]
        start = time.monotonic()
        round_id, next_round = 0, start
        while (now := time.monotonic()) < start + args.naive_seconds:
            if now < next_round:
                time.sleep(next_round - now)
                continue
            round_id += 1
            due_ms = int(time.time() * 1000)
            cpu, wall = time.process_time(), time.perf_counter()
            for vm in vms:
                naive_tasks.probe.apply_async(args=[vm, round_id, due_ms])
                naive_tasks.timeout.apply_async(args=[vm, round_id, due_ms + int(args.reply_timeout * 1000)],
                                                countdown=args.reply_timeout)
            sender_cpu += time.process_time() - cpu
            send_walls.append(time.perf_counter() - wall)
            next_round += args.probe_interval
        measured_s = time.monotonic() - start
        expected = 2 * n * round_id
        drain_until = time.monotonic() + args.reply_timeout + 30
        while client.llen("naive:lag") < expected and time.monotonic() < drain_until:
            time.sleep(0.2)
        busy_s = time.monotonic() - start  # sending, then draining: the worker's CPU is spread over both
        worker_cpu = tree_cpu_s(worker.pid) - worker_cpu0
        redis_cpu = redis_cpu_mem(client)[0] - redis_cpu0
    finally:
        run.stop()
    # naive clocks: time.time() on one machine, and Redis TIME; the same clock here (loopback, no skew)
    lags = [int(x) / 1000 for x in client.lrange("naive:lag", 0, -1)]
    done = len(lags)
    client.close()
    row = {
        "design": "naive", "n": n, "t1_s": args.probe_interval, "t2_s": args.reply_timeout, "rounds": round_id,
        "tasks_per_s_needed": round(2 * n / args.probe_interval),
        "tasks_done": done, "tasks_sent": 2 * n * round_id,
        "lag_s_p50": round(pct(lags, 50), 3), "lag_s_p99": round(pct(lags, 99), 3),
        "send_s_per_round_p50": round(pct(send_walls, 50), 3),
        "sender_cpu_pct": round(100 * sender_cpu / measured_s, 1),
        "worker_cpu_pct": round(100 * worker_cpu / busy_s, 1),
        "worker_cpu_ms_per_task": round(1000 * worker_cpu / max(1, done), 2),
        "redis_cpu_pct": round(100 * redis_cpu / busy_s, 1), "drain_s": round(busy_s - measured_s, 1),
    }
    row["sustained"] = (done >= row["tasks_sent"] and row["lag_s_p99"] <= args.probe_interval
                        and row["send_s_per_round_p50"] < args.probe_interval)
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    vmq_rows = [r for r in rows if r["design"] == "vmq"]
    naive_rows = [r for r in rows if r["design"] == "naive"]
    if vmq_rows:
        first = vmq_rows[0]
        print(f"vmq (real beat, monitor worker, host queues; T1 = {first['t1_s']:g} s, T2 = {first['t2_s']:g} s)")
        cols = [("via", "via"), ("N", "n"), ("hosts", "hosts"), ("rounds", "rounds"), ("hangs", "injected"), ("detect p50", "detect_s_p50"),
                ("p99", "detect_s_p99"), ("over T1+T2 p99", "overhead_s_p99"),
                ("flag->task p50", "flag_to_task_s_p50"), ("p99", "flag_to_task_s_p99"),
                ("false", "false_faults"), ("missed", "missed_faults"), ("mon ms/rnd", "monitor_cpu_ms_round"),
                ("mon %core", "monitor_cpu_pct"), ("%/1000 VMs", "monitor_cpu_pct_per_1000"),
                ("mon RSS MiB", "monitor_rss_mib"), ("redis %", "redis_cpu_pct"),
                ("redis MiB", "redis_used_memory_mib"), ("box busy %", "machine_busy_pct"), ("pass", "pass")]
        _table(cols, vmq_rows)
        for row in vmq_rows:
            if "cpu_ratio_to_redis" in row:
                print(f"N={row['n']}: monitor CPU per 1000 VMs, {row['via']} / redis = "
                      f"{row['monitor_cpu_pct_per_1000']} / {row['redis_row_cpu_pct_per_1000']} = "
                      f"{row['cpu_ratio_to_redis']}; monitor + Redis: {row['central_ratio_to_redis']}")
        for row in vmq_rows:
            print(f"N={row['n']} {row['via']}: Redis µs per VM per round by command: "
                  f"{row['redis_top_us_per_vm_round']}")
    if naive_rows:
        print("\nnaive baseline (one Celery task per VM per probe + one per VM per timeout, prefork 2)")
        cols = [("N", "n"), ("tasks/s needed", "tasks_per_s_needed"), ("sent", "tasks_sent"),
                ("done", "tasks_done"), ("lag p50 s", "lag_s_p50"), ("lag p99 s", "lag_s_p99"),
                ("send s/rnd", "send_s_per_round_p50"), ("sender %", "sender_cpu_pct"),
                ("worker %", "worker_cpu_pct"), ("worker ms/task", "worker_cpu_ms_per_task"),
                ("drain s", "drain_s"),
                ("redis %", "redis_cpu_pct"), ("sustained", "sustained")]
        _table(cols, naive_rows)
        ok = [r["n"] for r in naive_rows if r["sustained"]]
        print(f"largest N the naive design sustained at T1 = {naive_rows[0]['t1_s']:g} s: "
              f"{max(ok) if ok else 'none of those tried'}")


def _table(cols: list[tuple[str, str]], rows: list[dict[str, Any]]) -> None:
    cells = [[h for h, _ in cols]] + [[str(r[key]) for _, key in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", default="1000,10000", help="vmq: comma-separated N (default 1000,10000)")
    parser.add_argument("--naive-vms", default="100,200,300,500", help="naive: comma-separated N ('' skips)")
    parser.add_argument("--seconds", type=float, default=30.0, help="vmq: measured seconds per N")
    parser.add_argument("--naive-seconds", type=float, default=15.0, help="naive: measured seconds per N")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="T1 in s (default 1)")
    parser.add_argument("--reply-timeout", type=float, default=3.0, help="T2 in s (default 3)")
    parser.add_argument("--fault-every", type=float, default=2.0, help="mean s between hangs (default 2)")
    parser.add_argument("--monitors", type=int, default=1, help="monitor/timeout worker processes")
    parser.add_argument("--responders", type=int, default=2, help="guest processes, 1-3 (default 2)")
    parser.add_argument("--batch", type=int, default=500, help="XADDs per guest pipeline")
    parser.add_argument("--redis-server", default="", help="as in loop_bench.py (default: find_redis_server)")
    parser.add_argument("--guest-nice", type=int, default=0,
                        help="niceness of the simulated guests (they stand for other machines; on a quiet box "
                             "10 keeps them from starving the system under test; on a busy one they then fall "
                             "behind and every VM looks silent)")
    parser.add_argument("--via", default="redis",
                        help="vmq: comma-separated probe paths, one row each per N: redis (guests reply through "
                             "Redis), agent, channel (simulated host relays, bench/relay_hosts.py)")
    parser.add_argument("--hosts", type=int, default=4, help="simulated hosts the VMs are placed on (default 4)")
    parser.add_argument("--warmup-step", type=int, default=0,
                        help="host paths: register the VMs this many at a time, each step healthy before the next "
                             "(hosts joining one by one); 0 (default): all at once")
    parser.add_argument("--warmup-s", type=float, default=0.0,
                        help="give up (no row, exit 1) if the fleet is not healthy within this many s (default "
                             "120 + N/100)")
    parser.add_argument("--max-cpu-ratio", type=float, default=None,
                        help="fail a host-path row whose monitor CPU per 1000 VMs exceeds this share of the "
                             "redis row's at the same N (needs redis in --via)")
    parser.add_argument("--max-flag-to-task-ms", type=float, default=None,
                        help="fail a vmq row whose flag -> restart task p99 exceeds this (ms)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row, no table")
    args = parser.parse_args(argv)
    os.environ["VMQ_BENCH_GUEST_NICE"] = str(args.guest_nice)  # read by bench/guests.py in each guest process
    rows: list[dict[str, Any]] = []
    paths = [p.strip() for p in args.via.split(",") if p.strip()]
    if not set(paths) <= set(PATHS):
        parser.error(f"--via: choose among {','.join(PATHS)}")
    plans = [("vmq", via, int(x)) for x in args.vms.split(",") if x.strip() for via in paths]
    plans += [("naive", "", int(x)) for x in args.naive_vms.split(",") if x.strip()]
    for design, via, n in plans:
        with tempfile.TemporaryDirectory(prefix=f"vmq-stack-{design}-") as tmp:
            server = LocalRedis(Path(tmp) / "redis", binary=args.redis_server or None).start()
            try:
                print(f"[{time.strftime('%H:%M:%S')}] {design} {via} N={n} ...", file=sys.stderr, flush=True)
                if design == "vmq":
                    row = bench_vmq(n, via, args, server.url, Path(tmp))
                else:
                    row = bench_naive(n, args, server.url, Path(tmp))
            finally:
                server.stop()
        baseline = next((r for r in rows if r["design"] == "vmq" and r["via"] == "redis" and r["n"] == n), None)
        if design == "vmq" and via != "redis" and baseline is not None:
            row["redis_row_cpu_pct_per_1000"] = baseline["monitor_cpu_pct_per_1000"]
            row["cpu_ratio_to_redis"] = round(row["monitor_cpu_pct_per_1000"]
                                              / max(1e-9, baseline["monitor_cpu_pct_per_1000"]), 3)
            # The control plane as a whole (monitor + Redis), so that work moved into Redis is not hidden.
            row["central_ratio_to_redis"] = round((row["monitor_cpu_pct"] + row["redis_cpu_pct"])
                                                  / max(1e-9, baseline["monitor_cpu_pct"] + baseline["redis_cpu_pct"]), 3)
            if args.max_cpu_ratio is not None:
                row["pass"] = row["pass"] and row["cpu_ratio_to_redis"] <= args.max_cpu_ratio
        rows.append(row)
        if args.json:
            print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}),
                  flush=True)
    if not args.json:
        print_rows(rows)
    vmq_ok = all(r["pass"] for r in rows if r["design"] == "vmq")
    return 0 if rows and vmq_ok else 1


if __name__ == "__main__":
    sys.exit(main())
