#!/usr/bin/env python3
"""Failover of a dead host's VMs (issue 18) at the issue's scale: 20 hosts x 50 VMs, one host loses power.

Real parts (vmq.sim.localcluster.LocalCluster): a private redis-server, Celery beat, the monitor worker and
one real host worker per host on its own libvirt ``test:///`` node; VMs on the ``agent`` probe path
(simulated QEMU guest agents relayed by their host worker: no process per guest); Debian's real
``fence_dummy`` as the lost host's BMC. ``--enabled`` VMs per host carry ``<vmq:failover>yes</vmq:failover>``
with priorities N..1; the others say nothing (VMQ_FAILOVER_DEFAULT: off).

Once the fleet is healthy (and ``--steady`` s of CPU were measured), one host loses power: its worker is
SIGKILLed, its guests fall silent. Measured per failover-enabled VM of that host, from the audit stream's ids
(Redis ms): power lost -> host_down -> fenced -> failover_started -> failover_done -> healthy (answering on
the new host; includes the simulated guest's 1 s boot). Checked: each such VM started exactly once and active
on exactly one live host (the hosts' domain listings in Redis, and its record); the lost host's other VMs
refused and still unreachable; no restart_dispatched; started elsewhere within heartbeat TTL + fence time +
5 s. Baseline, same run: the detection wait (power lost -> host_down, about the TTL), which no failover beats.

    python3 bench/failover_bench.py                       # 20 x 50 on the agent path, TTL 6 s (~70 s)
    python3 bench/failover_bench.py --hosts 4 --vms-per-host 10 --enabled 3 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from measure import host_busy_s, pct, proc_cpu_s, redis_cpu_mem

from vmq.intent import intent_xml
from vmq.model import DomainStatus, ProbePath
from vmq.operator_views import event_json
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis

T1_S, T2_S = 1.0, 3.0  # the probe interval and reply timeout
HEARTBEAT_INTERVAL_S = 0.3  # as the integration tests (tests/integration/conftest.py)
WARMUP_S = 600.0  # the whole fleet healthy within this, or the run fails
ACTIVE = {DomainStatus.RUNNING.value, DomainStatus.PAUSED.value, DomainStatus.OTHER.value}
STEPS = ("loss->host_down", "host_down->fenced", "fenced->started", "started->done", "done->healthy",
         "loss->done", "loss->healthy")
CPU_PARTS = {"monitor": "monitor", "host workers": "host-", "beat": "beat", "redis": "=redis",
             "machine": "=machine"}  # part -> prefix of names in cpu_snapshot
Event = dict[str, Any]


def fence_dummy() -> str:
    """Debian's fence_dummy as ./dev install unpacks it (its library goes on PYTHONPATH, which LocalCluster
    hands to the monitor worker that runs the fence task), else from PATH."""
    unpacked = BENCH.parent / ".venv" / "fence-agents" / "usr"
    if (unpacked / "sbin" / "fence_dummy").exists():
        os.environ["PATH"] = f"{unpacked / 'sbin'}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(unpacked / "share" / "fence"),
                                                               os.environ.get("PYTHONPATH")) if p)
    found = shutil.which("fence_dummy")
    if not found:
        sys.exit("fence_dummy not found: run ./dev install (it unpacks Debian's fence-agents into .venv/)")
    return found


class AuditLog:
    """The audit stream, read incrementally into JSON events."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.audit = cluster.store.audit
        self.last = "-"
        self.events: list[Event] = []

    def of(self, **match: str) -> list[Event]:
        """Every event so far whose fields equal ``match``, in stream order (reads only what is new)."""
        while rows := self.audit.read(after=self.last, count=5000):
            self.events += [event_json(i, f) for i, f in rows]
            self.last = rows[-1][0]
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]


def ms(event: Event) -> int:
    """When an event was written: its stream id, Redis ms."""
    return int(str(event["id"]).split("-")[0])


def first_ms(events: list[Event]) -> int | None:
    """When the first of ``events`` was written; None if there is none."""
    return ms(events[0]) if events else None


def num(value: float, digits: int = 3) -> float | None:
    """Rounded for the JSON; None for NaN (nothing measured)."""
    return None if math.isnan(value) else round(value, digits)


def cpu_snapshot(cluster: LocalCluster) -> dict[str, float]:
    """CPU s per live process (by its cluster name), of Redis and of the machine; wall s."""
    out = {name: proc_cpu_s(p.pid) for name, p in cluster.processes.items() if p.poll() is None}
    return out | {"=redis": redis_cpu_mem(cluster.store.client)[0], "=machine": host_busy_s(),
                  "=wall": time.monotonic()}


def cpu_percent(cluster: LocalCluster, start: dict[str, float]) -> dict[str, float]:
    """% of one core per part since ``start``; a process killed since (the lost host's worker) drops out."""
    end = cpu_snapshot(cluster)
    wall = end["=wall"] - start["=wall"]
    spent = {name: end[name] - start[name] for name in end if name in start}
    return {part: round(100 * sum(v for n, v in spent.items() if n.startswith(prefix)) / wall, 1)
            for part, prefix in CPU_PARTS.items()}


def build(args: argparse.Namespace, workdir: Path, redis_url: str, agent: str) -> tuple[LocalCluster, Event]:
    """The cluster (not started) and its layout."""
    hosts = [f"h{i + 1:02d}" for i in range(args.hosts)]
    placement = {h: [f"vm-{h[1:]}-{k + 1:02d}" for k in range(args.vms_per_host)] for h in hosts}
    enabled = {vm: args.enabled - k for vms in placement.values() for k, vm in enumerate(vms[:args.enabled])}
    lost = args.lose or hosts[0]
    power = workdir / f"{lost}-power"
    power.write_text("on")  # as fence_dummy writes it
    fence = workdir / "fence.toml"
    fence.write_text(f'[hosts.{lost}]\nagent = "{agent}"\ntimeout_s = 20\n'
                     f'options = {{ status_file = "{power}" }}\n')
    # test:/// nodes have 2 CPUs, the VMs 1 vCPU each: 50 VMs already hold 25 vCPUs per CPU, beyond the
    # default overcommit (4) that would refuse every start for want of vCPUs (memory: 4 GiB, 64 MiB a VM).
    overcommit = min(64, max(4, -(-(args.vms_per_host + args.enabled) // 2)))
    env = {"VMQ_NAMESPACE": "fobench", "VMQ_PROBE_INTERVAL_S": str(T1_S), "VMQ_REPLY_TIMEOUT_S": str(T2_S),
           "VMQ_BOOT_GRACE_S": "1", "VMQ_RECOVERY_TIMEOUT_S": "30", "VMQ_METRICS_PORT": "0",
           "VMQ_INVENTORY_INTERVAL_S": str(args.inventory_interval), "VMQ_LOG_LEVEL": "WARNING",
           "VMQ_HOST_HEARTBEAT_TTL_S": str(args.ttl),
           "VMQ_HOST_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
           "VMQ_FAILOVER": "true", "VMQ_FAILOVER_REQUIRE_LOCKS": "false",  # test driver: no lock manager
           "VMQ_FAILOVER_CPU_OVERCOMMIT": str(overcommit), "VMQ_FENCE_CONFIG": str(fence)}
    every_vm = itertools.chain(*placement.values())
    paths = {vm: ProbePath.AGENT for vm in every_vm} if args.via == "agent" else {}  # redis: unrecorded
    spec = ClusterSpec(placement=placement, env=env, boot_delay_s=1.0, monitors=args.monitors, paths=paths,
                       metadata={vm: intent_xml(priority=p, failover=True) for vm, p in enabled.items()})
    layout = {"hosts": hosts, "lost": lost, "movers": [vm for vm in placement[lost] if vm in enabled],
              "stayers": [vm for vm in placement[lost] if vm not in enabled], "power_file": power,
              "overcommit": overcommit}
    return LocalCluster(workdir / "cluster", redis_url, spec), layout


def lose_power(cluster: LocalCluster, host: str) -> None:
    """As tests/integration/test_failover.py: the worker dies without a goodbye, its guests stop answering."""
    cluster.kill_host(host)
    assert cluster.fleet is not None
    for vm in cluster.spec.placement.pop(host):
        cluster.fleet.power_off(vm)


def active_on(cluster: LocalCluster, hosts: list[str]) -> dict[str, list[str]]:
    """VM -> the hosts whose last domain listing in Redis shows it active."""
    out: dict[str, list[str]] = {}
    for host in hosts:
        for name, raw in cluster.store.client.hgetall(cluster.settings.keys.host_domains(host)).items():
            if json.loads(raw)["status"] in ACTIVE:
                out.setdefault(name.decode() if isinstance(name, bytes) else name, []).append(host)
    return out


def healthy_after_done(log: AuditLog, vm: str) -> Event | None:
    """The VM's first move to healthy after its failover_done."""
    done = log.of(type="failover_done", vm=vm)
    return next((e for e in log.of(vm=vm, to="healthy") if done and ms(e) >= ms(done[0])), None)


def run(args: argparse.Namespace, cluster: LocalCluster, layout: Event) -> Event:
    """Warm up, lose the host, follow the failover, check; returns the result."""
    t0 = time.monotonic()
    cluster.start()
    cluster.wait_for(lambda: list(cluster.states().values()).count("healthy") == len(cluster.vms), WARMUP_S,
                     "the whole fleet healthy", poll_s=1.0)
    warmup_s = time.monotonic() - t0
    print(f"fleet healthy after {warmup_s:.1f} s; {args.steady:g} s steady", file=sys.stderr)
    cpu = cpu_snapshot(cluster)
    time.sleep(args.steady)
    steady_cpu = cpu_percent(cluster, cpu)
    log, lost, movers, stayers = AuditLog(cluster), layout["lost"], layout["movers"], layout["stayers"]
    cpu, loss = cpu_snapshot(cluster), cluster.store.clock.time_ms()
    lose_power(cluster, lost)
    print(f"{lost} lost power; following its {len(movers)} failover-enabled VMs", file=sys.stderr)
    try:
        cluster.wait_for(lambda: all(healthy_after_done(log, vm) for vm in movers), args.timeout,
                         "every enabled VM answering elsewhere", poll_s=0.5)
    except TimeoutError as exc:
        print(f"TIMEOUT: {exc}", file=sys.stderr)
    failover_cpu = cpu_percent(cluster, cpu)
    time.sleep(args.settle)  # late double starts, restarts or refusals would show here
    events, final = log.of(), cluster.states()
    down = first_ms([e for e in log.of(type="host_down", host=lost) if ms(e) >= loss])
    fenced = first_ms([e for e in log.of(type="fenced", host=lost) if ms(e) >= loss])
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    done_on: dict[str, str] = {}
    for vm in movers:
        done, healthy = log.of(type="failover_done", vm=vm), healthy_after_done(log, vm)
        done_on.update({vm: str(done[0]["host"])} if done else {})
        marks = [loss, down, fenced, first_ms(log.of(type="failover_started", vm=vm)), first_ms(done),
                 ms(healthy) if healthy else None]
        for step, (a, b) in zip(STEPS, [*itertools.pairwise(marks), (loss, marks[4]), (loss, marks[5])]):
            if a is not None and b is not None:
                samples[step].append((b - a) / 1000)
    on = active_on(cluster, [h for h in layout["hosts"] if h != lost])  # the lost host's listing is stale
    fence_s = (fenced - down) / 1000 if down and fenced else math.nan
    bound_s = args.ttl + fence_s + 5
    refused = {vm: [e for e in log.of(type="failover_refused", vm=vm)
                    if "not enabled" in str(e.get("reason"))] for vm in stayers}
    order = [int(e.get("priority", 0)) for e in log.of(type="failover_started")]
    checks = {
        "each enabled VM: one failover_started, one failover_done": all(
            len(log.of(type=t, vm=vm)) == 1 for vm in movers for t in ("failover_started", "failover_done")),
        "no start of any other VM, no failover_failed": not log.of(type="failover_failed") and sum(
            e["type"] in ("failover_started", "failover_done") for e in events) == 2 * len(movers),
        "each moved VM active on one live host, its record's": all(
            on.get(vm) == [cluster.store.vms.record(vm).host] == [done_on.get(vm)] for vm in movers),
        "no VM active on two live hosts": all(len(where) == 1 for where in on.values()),
        "moved VMs still on their probe path, answering via the new host": all(
            cluster.store.vms.record(vm).probe_path is ProbePath(args.via) for vm in movers),
        "lost host fenced by fence_dummy (its power file off)": fenced is not None
        and layout["power_file"].read_text().strip() == "off",
        "not-enabled VMs refused and still unreachable": all(
            len(refused[vm]) == 1 and final.get(vm) == "unreachable" for vm in stayers),
        "no restart_dispatched in the run": not log.of(type="restart_dispatched"),
        "starts sent highest priority first": order == sorted(order, reverse=True),
        "no other host went down": all(e["host"] == lost for e in log.of(type="host_down")),
        "every enabled VM healthy on its new host": all(final.get(vm) == "healthy" for vm in movers),
        "started elsewhere within heartbeat TTL + fence time + 5 s": len(samples["loss->done"]) == len(movers)
        and max(samples["loss->done"], default=0.0) <= bound_s,
    }
    if args.trace:  # one moved VM's events after the loss: where its time goes
        for e in [e for e in events if ms(e) >= loss and e["vm"] == (movers or [""])[0]]:
            print(f"trace {(ms(e) - loss) / 1000:7.2f} s {e['type']} {e.get('to', '')} {e['host']}",
                  file=sys.stderr)
    detect_s = samples["loss->host_down"][0] if samples["loss->host_down"] else math.nan
    healthy_p50 = pct(samples["loss->healthy"], 50)
    return {
        "hosts": args.hosts, "vms_per_host": args.vms_per_host, "via": args.via, "lost": lost,
        "enabled_on_lost": len(movers), "not_enabled_on_lost": len(stayers), "ttl_s": args.ttl,
        "probe_interval_s": T1_S, "reply_timeout_s": T2_S, "cpu_overcommit": layout["overcommit"],
        "warmup_s": round(warmup_s, 1),
        "steps_s": {s: {"p50": num(pct(v, 50)), "max": num(max(v, default=math.nan)), "n": len(v)}
                    for s, v in samples.items()},
        "started_elsewhere": len(done_on), "spread": dict(sorted(Counter(done_on.values()).items())),
        "refused_not_enabled": sum(len(r) == 1 for r in refused.values()),
        "still_unreachable": sum(final.get(vm) == "unreachable" for vm in stayers),
        "fence_s": num(fence_s), "bound_s": num(bound_s), "baseline_detect_s": num(detect_s),
        "failover_over_detect": num(healthy_p50 / detect_s, 2),
        "after_detect_p50_s": num(healthy_p50 - detect_s),
        "cpu_percent_steady": steady_cpu, "cpu_percent_failover": failover_cpu,
        "checks": checks, "passed": all(checks.values()), "run_s": round(time.monotonic() - t0, 1),
    }


def report(r: Event) -> None:
    """The human-readable summary ("nan" where nothing was measured)."""
    def f(value: float | None) -> float:
        return math.nan if value is None else value

    print(f"failover bench: {r['hosts']} hosts x {r['vms_per_host']} VMs ({r['via']} path), T1 {T1_S:g} s, "
          f"T2 {T2_S:g} s, heartbeat TTL {r['ttl_s']:g} s; lost {r['lost']}: {r['enabled_on_lost']} VMs "
          f"failover-enabled, {r['not_enabled_on_lost']} not")
    print(f"{'step (s)':<20}{'p50':>8}{'max':>8}{'n':>5}")
    for step, v in r["steps_s"].items():
        print(f"{step:<20}{f(v['p50']):>8.2f}{f(v['max']):>8.2f}{v['n']:>5}")
    print(f"started elsewhere: {r['started_elsewhere']} of {r['enabled_on_lost']}, on {len(r['spread'])} "
          "hosts: " + " ".join(f"{h}:{n}" for h, n in r["spread"].items()))
    print(f"not enabled: {r['refused_not_enabled']} refused, {r['still_unreachable']} still unreachable "
          f"(of {r['not_enabled_on_lost']})")
    print(f"baseline, same run: power lost -> host_down {f(r['baseline_detect_s']):.2f} s, the detection "
          f"wait (TTL {r['ttl_s']:g} s) no failover can beat; power lost -> answering elsewhere (p50) is "
          f"{f(r['failover_over_detect']):.2f}x it: fence, plan, start, the guest's boot and first answers "
          f"add {f(r['after_detect_p50_s']):.2f} s (without failover they stay down until an operator acts)")
    for name in ("steady", "failover"):
        print(f"cpu, % of one core ({name}): "
              + ", ".join(f"{k} {v:g}" for k, v in r[f"cpu_percent_{name}"].items()))
    bound = f" (bound {f(r['bound_s']):.2f} s, loss->done max {f(r['steps_s']['loss->done']['max']):.2f} s)"
    for check, ok in r["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {check}" + (bound if check.startswith("started else") else ""))
    print(f"{'PASS' if r['passed'] else 'FAIL'} (warm-up {r['warmup_s']:g} s, run {r['run_s']:g} s)")


def main() -> int:
    """Parse flags, run once, print; exit status 0 only if every check passes."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=20)
    p.add_argument("--vms-per-host", type=int, default=50)
    p.add_argument("--enabled", type=int, default=10, help="failover-enabled VMs per host (priorities N..1)")
    p.add_argument("--via", choices=("agent", "redis"), default="agent", help="the VMs' probe path")
    p.add_argument("--lose", default="", help="the host that loses power (default: the first)")
    p.add_argument("--ttl", type=float, default=6.0, help="VMQ_HOST_HEARTBEAT_TTL_S")
    p.add_argument("--inventory-interval", type=float, default=5.0,
                   help="VMQ_INVENTORY_INTERVAL_S (its default; 1 s: ~50 %% of a core more at 20 hosts)")
    p.add_argument("--monitors", type=int, default=1, help="monitor/timeout workers (judges)")
    p.add_argument("--steady", type=float, default=10.0, help="s of steady state measured before the loss")
    p.add_argument("--timeout", type=float, default=120.0, help="max s from the loss to all answering")
    p.add_argument("--settle", type=float, default=5.0, help="s watched after the failover for surprises")
    p.add_argument("--trace", action="store_true", help="the first moved VM's events after the loss (stderr)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args()
    agent = fence_dummy()
    workdir = Path(tempfile.mkdtemp(prefix="vmq-failover-bench-"))
    server = LocalRedis(workdir / "redis").start()
    cluster, layout = build(args, workdir, server.url, agent)
    try:
        result = run(args, cluster, layout)
    finally:
        cluster.stop()
        server.stop()
        if args.keep:
            print(f"logs in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
