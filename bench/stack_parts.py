"""Helpers of stack_bench.py: the Celery processes, the fleet's setup on each probe path, the verdicts' analysis."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import guests
from loop_bench import sid
from measure import pct, proc_cpu_s
from relay_hosts import HostFleet

from vmq.codec import new_secret
from vmq.config import Settings
from vmq.relay import info_every_rounds
from vmq.sim.localcluster import SOURCE_ROOT, _stop_process
from vmq.store.redis import RedisStore

BENCH = Path(__file__).resolve().parent
#: --via values: the probe paths, and ``compact``: the agent path as hosts wrote it before cover entries.
PATHS = ("redis", "agent", "compact", "channel")


def probe_path(via: str) -> str:
    """The probe path a --via value runs on."""
    return "agent" if via == "compact" else via


def host_names(count: int) -> list[str]:
    """The simulated hosts' names (bench-host-0 ... the first four are loop_bench's)."""
    return [f"bench-host-{i}" for i in range(count)]


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
        self.workdir, self.env = workdir, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

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


def fleet_names(n: int, path: str) -> tuple[list[str], dict[str, str]]:
    """N VM names and their keys (for the paths whose guests sign: ``redis``, ``channel``; an ``agent`` VM has
    no responder, hence no key)."""
    vms = [f"vm-{i:06d}" for i in range(n)]
    return vms, ({vm: new_secret() for vm in vms} if probe_path(path) != "agent" else {})


def register(store: RedisStore, vms: list[str], secrets: dict[str, str], hosts: list[str], path: str,
             first: int = 0) -> None:
    """Register ``vms`` (the ``first``-th VM onwards) placed round-robin on ``hosts``, running, on probe path
    ``path`` (as `vmq path` sets it), with their keys if any."""
    now_ms = store.clock.time_ms()
    for vm in vms:  # the real per-VM APIs (3-4 round trips each); bulk HSET for the inventory fields
        store.vms.register_vm(vm, now_ms)
        if vm in secrets:
            store.keyring.set_secret(vm, secrets[vm])
    path_field = {} if path == "redis" else {"probe_path_set": probe_path(path)}
    for start in range(0, len(vms), 5000):
        store.vms.write_many({vm: {"host": hosts[i % len(hosts)], "domain_status": "running", **path_field}
                              for i, vm in enumerate(vms[start:start + 5000], first + start)})


def start_fleet(path: str, url: str, settings: Settings, vms: list[str], secrets: dict[str, str],
                hosts: list[str], injected_key: str, args: argparse.Namespace) -> guests.Fleet | HostFleet:
    """The guests answering through Redis (``redis``), or the simulated host relays (``agent``, ``channel``)."""
    k = settings.keys
    procs_n = max(1, min(3, args.responders))
    if path == "redis":
        fleet: guests.Fleet | HostFleet = guests.Fleet(
            url, k.probe_channel, k.reply_stream, settings.reply_stream_maxlen, args.batch,
            guests.contiguous(vms, procs_n), secrets, injected_key)
    else:
        placement = {host: vms[i::len(hosts)] for i, host in enumerate(hosts)}  # as register() places them
        timeout_s = min(settings.probe_interval_s * 0.8, settings.relay_agent_timeout_s)  # as ProbeRelay
        fleet = HostFleet(url, settings.namespace, probe_path(path), placement, secrets, injected_key, timeout_s,
                          procs_n, "compact" if path == "compact" else "cover", info_every_rounds(settings))
    fleet.start()
    return fleet


def verdicts(store: RedisStore, mark: str, injected: list[str], inj_ms: dict[str, int],
             started: dict[str, int]) -> dict[str, Any]:
    """Read the audit stream after ``mark``: detection latency, flag -> restart task, false and missed faults."""
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
    detect = [(faulty[vm][0] - inj_ms[vm]) / 1000 for vm in injected if vm in faulty and vm in inj_ms]
    # flag (the faulty verdict written) -> the host worker running the restart task, both in Redis time
    to_task = [(started[vm] - faulty[vm][0]) / 1000 for vm in dispatched if vm in started and vm in faulty]
    false = sum(len(t) for vm, t in faulty.items() if vm not in inj_ms)
    false += sum(1 for vm in inj_ms for t in faulty.get(vm, []) if t < inj_ms[vm])
    false += sum(len(faulty[vm]) - 1 for vm in inj_ms if len(faulty.get(vm, [])) > 1)
    missed = sum(1 for vm in injected if vm not in faulty)
    return {"detect": detect, "to_task": to_task, "false": false, "missed": missed,
            "detect_s_p50": round(pct(detect, 50), 3), "detect_s_p99": round(pct(detect, 99), 3),
            "flag_to_task_s_p50": round(pct(to_task, 50), 4), "flag_to_task_s_p99": round(pct(to_task, 99), 4)}
