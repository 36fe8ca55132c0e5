"""``vmq demo``: the whole loop live on this machine, with an injected fault, then a JSON verdict.

Starts a private redis-server (unless VMQ_REDIS_URL is set), beat, the monitor/timeout worker, one host
worker per simulated host on its own libvirt test:/// node, and one real responder per VM; freezes one
guest and follows the audit stream until it is detected, restarted on its own host and answers again.

``via`` chooses the VMs' probe paths (vmq.sim.localcluster): ``redis``, ``channel`` or ``agent`` for every VM,
or ``mixed``: redis, channel, agent in turn over vm-1, vm-2, ...
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from vmq.model import AuditEvent, ProbePath
from vmq.operator_views import event_json
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis

STYLE = {AuditEvent.FAULTY.value: "bold red", AuditEvent.RESTART_DISPATCHED.value: "yellow",
         AuditEvent.RESTARTED.value: "bold yellow", AuditEvent.RECOVERED.value: "bold green",
         AuditEvent.HEALTHY.value: "green", AuditEvent.FAILED.value: "bold magenta",
         AuditEvent.RESTART_FAILED.value: "red"}

#: ``vmq demo --via`` choices: one path for every VM, or ``mixed``.
VIA_CHOICES = (*(path.value for path in ProbePath), "mixed")
MIXED_ORDER = (ProbePath.REDIS, ProbePath.CHANNEL, ProbePath.AGENT)


@dataclass
class DemoResult:
    """The summary ``vmq demo --json`` prints."""

    fault_vm: str
    host: str
    via: str = ProbePath.REDIS.value
    paths: dict[str, str] = field(default_factory=dict)  # VM -> its probe path
    detected_after_s: float | None = None
    restarted_on: str | None = None
    recovered_after_s: float | None = None
    false_restarts: int = 0
    restart_action: str | None = None
    new_boot_id: bool = False
    probe_interval_s: float = 0.0
    reply_timeout_s: float = 0.0
    bound_s: float = 0.0
    other_restarts: list[str] = field(default_factory=list)
    ok: bool = False
    error: str = ""


def probe_paths(vm_names: list[str], via: str) -> dict[str, ProbePath]:
    """VM -> probe path for ``--via``: the one path for all, or ``mixed`` (redis, channel, agent in turn);
    raises ValueError for anything else."""
    if via == "mixed":
        return {vm: MIXED_ORDER[i % len(MIXED_ORDER)] for i, vm in enumerate(vm_names)}
    path = ProbePath(via)
    return {vm: path for vm in vm_names}


def _spec(hosts: int, vms: int, probe_interval_s: float, reply_timeout_s: float,
          via: str = ProbePath.REDIS.value) -> ClusterSpec:
    names = [f"node{i + 1}" for i in range(hosts)]
    placement: dict[str, list[str]] = {h: [] for h in names}
    for i in range(vms):
        placement[names[i % hosts]].append(f"vm-{i + 1}")
    paths = probe_paths([f"vm-{i + 1}" for i in range(vms)], via)
    env = {
        "VMQ_NAMESPACE": "vmq",
        "VMQ_PROBE_INTERVAL_S": str(probe_interval_s),
        "VMQ_REPLY_TIMEOUT_S": str(reply_timeout_s),
        "VMQ_BOOT_GRACE_S": str(max(2.0, probe_interval_s)),
        "VMQ_RECOVERY_TIMEOUT_S": str(max(20.0, 4 * reply_timeout_s)),
        "VMQ_INVENTORY_INTERVAL_S": "2",
        "VMQ_HOST_HEARTBEAT_TTL_S": "10",
        "VMQ_HOST_HEARTBEAT_INTERVAL_S": str(min(1.0, reply_timeout_s / 4)),
    }
    return ClusterSpec(placement=placement, env=env, boot_delay_s=2.0, paths=paths)


def run_demo(hosts: int, vms: int, fault: str | None, probe_interval_s: float, reply_timeout_s: float,
             as_json: bool, timeout_s: float = 120.0, via: str = ProbePath.REDIS.value) -> tuple[int, DemoResult]:
    """Run the demo; returns (exit status, result). Every process it starts is stopped before return."""
    console = Console(stderr=as_json, soft_wrap=True)
    workdir = Path(tempfile.mkdtemp(prefix="vmq-demo-"))
    spec = _spec(hosts, vms, probe_interval_s, reply_timeout_s, via)
    all_vms = [vm for group in spec.placement.values() for vm in group]
    fault_vm = fault or random.choice(all_vms)
    if fault_vm not in all_vms:
        raise SystemExit(f"vmq demo: --fault {fault_vm!r} is not one of {all_vms}")
    fault_host = next(h for h, group in spec.placement.items() if fault_vm in group)
    result = DemoResult(fault_vm=fault_vm, host=fault_host, via=via,
                        paths={vm: path.value for vm, path in spec.paths.items()}, probe_interval_s=probe_interval_s,
                        reply_timeout_s=reply_timeout_s, bound_s=probe_interval_s + reply_timeout_s + 1.0)
    local_redis: LocalRedis | None = None
    cluster: LocalCluster | None = None
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        url = os.environ.get("VMQ_REDIS_URL")
        if not url:
            local_redis = LocalRedis(workdir / "redis").start()
            url = local_redis.url
        console.print(f"[bold]vmq demo[/]: {hosts} hosts, {vms} VMs, T1={probe_interval_s:g}s "
                      f"T2={reply_timeout_s:g}s, redis {url}, logs in {workdir}")
        console.print("probe paths: " + ", ".join(f"{vm} [bold]{path}[/]" for vm, path in result.paths.items()))
        cluster = LocalCluster(workdir, url, spec)
        cluster.start()
        console.print("waiting for every guest to answer ...")
        cluster.wait_healthy(timeout_s=60)
        _run_fault(cluster, console, result, timeout_s)
    except KeyboardInterrupt:
        result.error = "interrupted"
    except (TimeoutError, RuntimeError) as exc:
        result.error = str(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if cluster is not None:
            cluster.stop()
        if local_redis is not None:
            local_redis.stop()
    result.ok = (not result.error and result.detected_after_s is not None and result.restarted_on == fault_host
                 and result.recovered_after_s is not None and result.false_restarts == 0)
    if as_json:
        print(json.dumps(asdict(result)))
    else:
        verdict = "[bold green]PASS[/]" if result.ok else f"[bold red]FAIL[/] {result.error}"
        console.print(f"{verdict}: {fault_vm} on {fault_host}: detected after {result.detected_after_s} s "
                      f"(bound T1+T2+1 = {result.bound_s:g} s), restarted on {result.restarted_on} "
                      f"({result.restart_action}), answered again after {result.recovered_after_s} s, "
                      f"false restarts {result.false_restarts}")
    return (0 if result.ok else 1), result


def _run_fault(cluster: LocalCluster, console: Console, result: DemoResult, timeout_s: float) -> None:
    store = cluster.store
    assert cluster.fleet is not None
    cursor = store.audit.read(count=1_000_000)[-1][0] if store.audit.read(count=1) else "0-0"
    how = "guest agent silent" if result.paths.get(result.fault_vm) == ProbePath.AGENT.value else "guest frozen"
    console.print(f"all VMs healthy; [bold red]injecting a hang into {result.fault_vm}[/] ({how})")
    t_fault = store.clock.time_ms()
    cluster.fleet.hang(result.fault_vm)
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    while time.monotonic() < deadline:
        if settle_until is not None and time.monotonic() > settle_until:
            return
        for entry_id, fields in store.audit.read(after=cursor, count=500, block_ms=250):
            cursor = entry_id
            event = event_json(entry_id, fields)
            _show(console, event, t_fault)
            _account(event, result, t_fault)
            if event["type"] == AuditEvent.RECOVERED and event["vm"] == result.fault_vm and settle_until is None:
                # Keep watching one more T2 so a wrong restart elsewhere would still be counted.
                settle_until = time.monotonic() + result.reply_timeout_s
    raise TimeoutError(f"{result.fault_vm} did not recover within {timeout_s:g} s")


def _account(event: dict[str, Any], result: DemoResult, t_fault: int) -> None:
    after_s = round((event["time_ms"] - t_fault) / 1000.0, 3)
    kind, vm = event["type"], event["vm"]
    if vm != result.fault_vm:
        if kind == AuditEvent.RESTART_DISPATCHED:
            result.false_restarts += 1
            result.other_restarts.append(vm)
        return
    if kind == AuditEvent.FAULTY and result.detected_after_s is None:
        result.detected_after_s = after_s
    elif kind == AuditEvent.RESTARTED:
        result.restarted_on = event["host"]
        result.restart_action = event.get("action")
    elif kind == AuditEvent.RECOVERED and result.recovered_after_s is None:
        result.recovered_after_s = after_s
        result.new_boot_id = bool(event.get("boot_id")) and event.get("boot_id") != event.get("previous_boot_id")


def _show(console: Console, event: dict[str, Any], t_fault: int) -> None:
    offset = (event["time_ms"] - t_fault) / 1000.0
    kind = event["type"]
    detail = ""
    if event.get("reasons"):
        detail = "; ".join(event["reasons"])
    elif event.get("action"):
        detail = f"{event['action']} {event.get('result', '')}"
    if kind == AuditEvent.RECOVERED:
        detail = f"answered again after {event.get('recovered_after_s')} s, boot id {event.get('boot_id', '')[:8]}"
    style = STYLE.get(kind, "white")
    console.print(f"[dim]{offset:+7.2f}s[/] [{style}]{kind:<18}[/] {event['vm']:<6} "
                  f"host={event.get('host', '')} {detail}")
