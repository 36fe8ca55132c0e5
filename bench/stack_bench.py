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
import subprocess
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
from loop_bench import HOSTS, setup_vms, sid
from measure import host_busy_s, pct, proc_cpu_s, redis_cpu_mem

from vmq.sim.localcluster import SOURCE_ROOT, LocalRedis, _stop_process
from vmq.store.redis import RedisStore


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live children (a prefork worker's pool)."""
    total = proc_cpu_s(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += proc_cpu_s(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class Processes:
    """Celery processes of one run, logs in ``workdir``; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env, self.procs = workdir, env, {}  # type: ignore[var-annotated]

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "celery", *argv], env=self.env, cwd=BENCH,
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): see {self.workdir}/{name}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop_process(proc)


def vmq_env(url: str, ns: str, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(VMQ_REDIS_URL=url, VMQ_NAMESPACE=ns, VMQ_PROBE_INTERVAL_S=str(args.probe_interval),
               VMQ_REPLY_TIMEOUT_S=str(args.reply_timeout), VMQ_BOOT_GRACE_S="0",
               VMQ_MAX_RESTARTS="1000000", VMQ_RECOVERY_TIMEOUT_S="86400", VMQ_RESTART_TIMEOUT_S="86400",
               VMQ_BACKOFF_BASE_S="0", VMQ_MAX_CONCURRENT_RESTARTS_PER_HOST="1000000",
               VMQ_HOST_HEARTBEAT_INTERVAL_S="1", VMQ_METRICS_PORT="0", VMQ_LOG_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(SOURCE_ROOT), str(BENCH)]))
    return env


def bench_vmq(n: int, args: argparse.Namespace, url: str, workdir: Path) -> dict[str, Any]:
    ns = f"stack{n}"
    env = vmq_env(url, ns, args)
    from vmq.config import load_settings

    settings = load_settings({k[4:].lower(): v for k, v in env.items() if k.startswith("VMQ_")})
    k = settings.keys
    store = RedisStore.from_url(url, k, settings.events_maxlen)
    client = redis.Redis.from_url(url)
    injected_key, started_key = f"{ns}:bench:injected", f"{ns}:bench:restart_started"
    t0 = time.monotonic()
    vms, secrets = setup_vms(store, n)
    setup_s = time.monotonic() - t0

    procs_n = max(1, min(3, args.responders))
    fleet = guests.Fleet(url, k.probe_channel, k.reply_stream, settings.reply_stream_maxlen, args.batch,
                         guests.contiguous(vms, procs_n), secrets, injected_key)
    fleet.start()

    done = threading.Event()
    revived: set[str] = set()

    def background() -> None:
        """Host heartbeats (the stub host workers have no inventory agent) and guest reboots."""
        while not done.is_set():
            now_ms = store.clock.time_ms()
            for host in HOSTS:
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
    run.start("stub-hosts", "-A", "stub_host", "worker", "-Q", ",".join(f"host.{h}" for h in HOSTS),
              "-P", "threads", "-c", "4", "-n", "stubhosts@%h", "--without-gossip", "--without-mingle",
              "--loglevel", "WARNING")
    beat = run.start("beat", "-A", "workers.app", "beat", "-s", str(workdir / "beat-schedule"),
                     "--loglevel", "WARNING")
    try:
        min_rounds = math.ceil(args.reply_timeout / args.probe_interval) + 3
        deadline = time.monotonic() + 120 + n / 100
        while not (client.scard(k.attention) == 0 and int(client.get(k.round_seq) or 0) >= min_rounds):
            run.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up: {client.scard(k.attention)} VMs not healthy (logs: {workdir})")
            time.sleep(0.5)
        last = client.xrevrange(k.events, count=1)
        mark = last[0][0].decode() if last else "0-0"
        pool, injected = vms[:], []
        random.shuffle(pool)
        cpu0 = [proc_cpu_s(p.pid) for p in monitors] + [proc_cpu_s(beat.pid)]
        redis_cpu0, _ = redis_cpu_mem(client)
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
        rounds = int(client.get(k.round_seq) or 0) - rounds0
        rss = [rss_mib(p.pid) for p in monitors]
        time.sleep(args.probe_interval + args.reply_timeout + 1.5)  # drain: the last hangs are judged
    finally:
        done.set()
        run.stop()
        fleet.stop()

    faulty: dict[str, list[int]] = {}
    dispatched: dict[str, int] = {}
    after = mark
    while batch := store.audit.read(after=after, count=5000):
        for event_id, event in batch:
            if sid(event_id) <= sid(mark):
                continue
            if event.get("type") == "faulty":
                faulty.setdefault(event["vm"], []).append(sid(event_id)[0])  # written at (Redis ms)
            elif event.get("type") == "restart_dispatched":
                dispatched.setdefault(event["vm"], sid(event_id)[0])
        after = batch[-1][0]
    inj_ms = {vm.decode(): int(ms) for vm, ms in client.hgetall(injected_key).items()}
    started = {vm.decode(): int(ms) for vm, ms in client.hgetall(started_key).items()}
    detect = [(faulty[vm][0] - inj_ms[vm]) / 1000 for vm in injected if vm in faulty and vm in inj_ms]
    # flag (the faulty verdict written) -> the host worker running the restart task, both in Redis time
    to_task = [(started[vm] - faulty[vm][0]) / 1000 for vm in dispatched if vm in started and vm in faulty]
    false = sum(len(t) for vm, t in faulty.items() if vm not in inj_ms)
    false += sum(1 for vm in inj_ms for t in faulty.get(vm, []) if t < inj_ms[vm])
    false += sum(len(faulty[vm]) - 1 for vm in inj_ms if len(faulty.get(vm, [])) > 1)
    missed = sum(1 for vm in injected if vm not in faulty)
    monitor_cpu = sum(cpu1[:-1]) - sum(cpu0[:-1])
    bound = args.probe_interval + args.reply_timeout + 0.5
    row = {
        "design": "vmq", "n": n, "t1_s": args.probe_interval, "t2_s": args.reply_timeout,
        "monitors": args.monitors, "setup_s": round(setup_s, 1), "measured_s": round(measured_s, 1),
        "rounds": rounds, "injected": len(injected), "detected": len(detect),
        "detect_s_p50": round(pct(detect, 50), 3), "detect_s_p99": round(pct(detect, 99), 3),
        "overhead_s_p99": round(pct(detect, 99) - args.probe_interval - args.reply_timeout, 3),
        "flag_to_task_s_p50": round(pct(to_task, 50), 4), "flag_to_task_s_p99": round(pct(to_task, 99), 4),
        "false_faults": false, "missed_faults": missed,
        "monitor_cpu_ms_round": round(1000 * monitor_cpu / max(1, rounds), 1),
        "monitor_cpu_pct": round(100 * monitor_cpu / measured_s, 1),
        "monitor_cpu_pct_per_1000": round(100 * monitor_cpu / measured_s / (n / 1000), 2),
        "beat_cpu_pct": round(100 * (cpu1[-1] - cpu0[-1]) / measured_s, 1),
        "monitor_rss_mib": round(sum(rss), 1),
        "redis_cpu_pct": round(100 * (redis_cpu1 - redis_cpu0) / measured_s, 1),
        "redis_used_memory_mib": round(redis_mem / 2**20, 1), "bound_s": bound,
        # All cores, everything (guests included): how busy the box was, to judge a run's representativeness.
        "machine_busy_pct": round(100 * machine_busy / measured_s, 1), "cores": os.cpu_count(),
    }
    row["pass"] = (false == 0 and missed == 0 and len(detect) > 0 and row["detect_s_p99"] <= bound
                   and len(to_task) >= len(detect))
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
        cols = [("N", "n"), ("rounds", "rounds"), ("hangs", "injected"), ("detect p50", "detect_s_p50"),
                ("p99", "detect_s_p99"), ("over T1+T2 p99", "overhead_s_p99"),
                ("flag->task p50", "flag_to_task_s_p50"), ("p99", "flag_to_task_s_p99"),
                ("false", "false_faults"), ("missed", "missed_faults"), ("mon ms/rnd", "monitor_cpu_ms_round"),
                ("mon %core", "monitor_cpu_pct"), ("%/1000 VMs", "monitor_cpu_pct_per_1000"),
                ("mon RSS MiB", "monitor_rss_mib"), ("redis %", "redis_cpu_pct"),
                ("redis MiB", "redis_used_memory_mib"), ("box busy %", "machine_busy_pct"), ("pass", "pass")]
        _table(cols, vmq_rows)
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
    parser.add_argument("--json", action="store_true", help="one JSON object per row, no table")
    args = parser.parse_args(argv)
    os.environ["VMQ_BENCH_GUEST_NICE"] = str(args.guest_nice)  # read by bench/guests.py in each guest process
    rows: list[dict[str, Any]] = []
    plans = [("vmq", int(x)) for x in args.vms.split(",") if x.strip()]
    plans += [("naive", int(x)) for x in args.naive_vms.split(",") if x.strip()]
    for design, n in plans:
        with tempfile.TemporaryDirectory(prefix=f"vmq-stack-{design}-") as tmp:
            server = LocalRedis(Path(tmp) / "redis", binary=args.redis_server or None).start()
            try:
                print(f"[{time.strftime('%H:%M:%S')}] {design} N={n} ...", file=sys.stderr, flush=True)
                bench = bench_vmq if design == "vmq" else bench_naive
                row = bench(n, args, server.url, Path(tmp))
            finally:
                server.stop()
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
