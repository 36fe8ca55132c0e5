"""Measuring helpers for loop_bench.py: percentiles, CPU counters, the naive per-VM judge, the table."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import redis


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values. With ~30 samples p99 is the max."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def proc_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_busy_s() -> float:
    """CPU seconds all cores of this machine spent busy (not idle/iowait) since boot, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def redis_cpu_mem(client: redis.Redis) -> tuple[float, int]:
    """(used_cpu_sys + used_cpu_user seconds, used_memory bytes) from INFO."""
    info = client.info()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"]), int(info["used_memory"])


def redis_command_usec(client: redis.Redis) -> dict[str, float]:
    """Redis' own CPU per command name (INFO commandstats ``usec``, µs since start or the last reset)."""
    return {name.removeprefix("cmdstat_"): float(stats["usec"]) for name, stats in client.info("commandstats").items()}


def top_commands(before: dict[str, float], after: dict[str, float], per: float, count: int = 5) -> str:
    """The ``count`` commands Redis spent most CPU on between two ``redis_command_usec`` snapshots, as
    ``name=µs`` per ``per`` (e.g. per VM per round), most first."""
    spent = {name: usec - before.get(name, 0.0) for name, usec in after.items()}
    ranked = sorted(spent.items(), key=lambda item: -item[1])[:count]
    return " ".join(f"{name}={usec / per:.2f}" for name, usec in ranked if usec > 0)


def naive_judge(client: redis.Redis, key: str, vms: list[str],
                deadline_ms: float) -> tuple[float, float, int]:
    """The judge a monitor written per VM would run each round: one unpipelined read of the VM's
    last-seen value (ZSCORE of vmq's real last-seen set) and one comparison per VM.
    Returns (cpu s, wall s, overdue count)."""
    cpu, wall, overdue = time.process_time(), time.perf_counter(), 0
    for vm in vms:
        seen = client.zscore(key, vm)
        if seen is None or seen < deadline_ms:
            overdue += 1
    return time.process_time() - cpu, time.perf_counter() - wall, overdue


COLUMNS = [("N", "n", "{}"), ("T1", "t1_s", "{:g}"), ("T2", "t2_s", "{:g}"), ("rounds", "rounds", "{}"),
           ("replies/s", "replies_per_s", "{}"), ("cpu/rnd p50", "judge_cpu_ms_round_p50", "{:.0f}"),
           ("p99 ms", "judge_cpu_ms_round_p99", "{:.0f}"), ("tick p99 ms", "tick_wall_ms_p99", "{:.0f}"),
           ("detect p50", "detect_s_p50", "{:.2f}"), ("p99", "detect_s_p99", "{:.2f}"),
           ("max s", "detect_s_max", "{:.2f}"), ("bound", "bound_s", "{:g}"), ("false", "false_faults", "{}"),
           ("missed", "missed_faults", "{}"), ("rejects", "rejects", "{}"),
           ("redis MiB", "redis_used_memory_mib", "{:.0f}"), ("redis cpu%", "redis_cpu_pct", "{:.0f}"),
           ("naive judge ms/rnd", "naive_judge_wall_ms_round", "{:.0f}")]


def print_table(rows: list[dict[str, Any]]) -> None:
    """The summary table, then one line of detail per N."""
    cells = [[h for h, _, _ in COLUMNS]] + [[f.format(row[key]) for _, key, f in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for r in rows:
        print(f"\nN={r['n']}: {'PASS' if r['pass'] else 'FAIL'}. {r['injected']} hangs injected, "
              f"{r['detected']} detected, {r['restarts_dispatched']} restarts dispatched "
              f"({r['warmup_faults']} faulty during warm-up, not counted).\n"
              f"  monitor {r['monitor_cores']:.2f} cores, "
              f"cpu/round max {r['judge_cpu_ms_round_max']:.0f} ms, "
              f"tick wall p50 {r['tick_wall_ms_p50']:.0f} ms, "
              f"probe wall p99 {r['probe_wall_ms_p99']:.0f} ms, "
              f"probes dropped (> T1 late) {r['late_probes']}.\n"
              f"  round published after it was due: p50 {r['probe_send_delay_ms_p50']} ms, "
              f"p99 {r['probe_send_delay_ms_p99']} ms; verdict after the missed round's deadline: "
              f"p50 {r['verdict_after_deadline_ms_p50']} ms, max {r['verdict_after_deadline_ms_max']} ms.\n"
              f"  judge only: vmq deadline scan (Monitor._judge) {r['deadline_scan_ms_p50']:.1f} ms wall p50 "
              f"({r['deadline_scan_ms_p99']:.1f} p99) vs naive per-VM judge "
              f"{r['naive_judge_wall_ms_round']:.0f} ms wall, {r['naive_judge_cpu_ms_round']:.0f} ms cpu "
              f"per round (median of {r['naive_rounds']}).\n"
              f"  cpu (% of one core): monitor {100 * r['monitor_cores']:.0f}, "
              f"guests {r['guests_cpu_pct']:.0f} ({r['responders']} procs), redis {r['redis_cpu_pct']:.0f}, "
              f"rest of the machine {r['other_cpu_pct']:.0f} (of {100 * r['cores']}); "
              f"redis {r['redis_version']}; setup {r['setup_s']} s.")
