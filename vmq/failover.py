"""The failover plan (issue 18), a pure function: which VMs of a dead host start where, in what order, and what is
refused and why. No Redis, no libvirt: the caller reads the records, the hosts' capacity and the fence's result,
acts on the plan through each chosen host's own queue, and audits it.

The rule above all: nothing of a host starts elsewhere unless that host is proven off (fenced). A partition
looks like a dead host from the control plane; only a fence tells them apart, so without one the whole incident
is held. When more than half of the hosts fall silent at once, the control plane itself is the likelier one cut
off: held as well, whatever the fences say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["Candidate", "FailoverPlan", "Refusal", "Start", "Target", "plan_failover"]

#: The states a VM of a dead host may be failed over from (the host sweep marks its VMs `unreachable`).
FAILOVER_STATES = frozenset({"unreachable"})


@dataclass(frozen=True)
class Candidate:
    """A VM of the dead host as the plan needs it."""

    vm: str
    state: str
    failover: bool  # enabled for it (the cluster setting, then its libvirt metadata intent)
    priority: int = 0
    has_definition: bool = True  # vmq keeps its domain definition (refreshed by the inventory)
    memory_mib: int = 0
    vcpus: int = 0


@dataclass(frozen=True)
class Target:
    """A host a VM could start on: its liveness and what libvirt says it has free."""

    host: str
    alive: bool
    free_memory_mib: int
    free_vcpus: int
    maintenance: bool = False
    degraded: bool = False  # its libvirtd does not answer
    failover_safe: bool = True  # its lock manager runs (virtlockd): a disk started twice is refused there


@dataclass(frozen=True)
class Start:
    """Start ``vm`` on ``host`` (in plan order)."""

    vm: str
    host: str


@dataclass(frozen=True)
class Refusal:
    """``vm`` is not started anywhere, because ``reason``."""

    vm: str
    reason: str


@dataclass(frozen=True)
class FailoverPlan:
    """What to do for the dead ``host``: ``held`` (non-empty) holds everything, with why; else ``starts`` in order
    (highest priority first) and the VMs ``refused``."""

    host: str
    held: str = ""
    starts: tuple[Start, ...] = ()
    refused: tuple[Refusal, ...] = ()


def plan_failover(host: str, fenced: bool, fence_reason: str, enabled: bool, candidates: Sequence[Candidate],
                  targets: Sequence[Target], hosts_total: int, hosts_silent: int) -> FailoverPlan:
    """The plan for the dead ``host``'s VMs. ``fenced``: proven off (``fence_reason`` says how, or why not);
    ``hosts_total``/``hosts_silent``: the cluster's hosts and how many are down or late now (this one included)."""
    if not enabled:
        return FailoverPlan(host, held="failover is off for this cluster (VMQ_FAILOVER)")
    if not fenced:
        return FailoverPlan(host, held=f"{host} is not proven off: {fence_reason or 'no fence method configured'}; "
                                       "nothing of it starts elsewhere (a partition looks the same)")
    if hosts_total > 0 and hosts_silent * 2 > hosts_total:
        return FailoverPlan(host, held=f"{hosts_silent} of {hosts_total} hosts are silent at once: the control "
                                       "plane is the likelier one cut off; held until a human looks")
    usable = {t.host: t for t in targets if t.host != host and t.alive and not t.maintenance and not t.degraded}
    unsafe = sorted(h for h, t in usable.items() if not t.failover_safe)
    free = {h: t for h, t in usable.items() if t.failover_safe}
    starts: list[Start] = []
    refused: list[Refusal] = []
    for c in sorted(candidates, key=lambda c: (-c.priority, c.vm)):
        reason = _not_movable(c)
        if reason:
            refused.append(Refusal(c.vm, reason))
            continue
        fits = [t for t in free.values() if t.free_memory_mib >= c.memory_mib and t.free_vcpus >= c.vcpus]
        if not fits:
            why = f"no surviving host has {c.memory_mib} MiB and {c.vcpus} vCPUs free"
            if free:
                most_mib = max(free.values(), key=lambda t: (t.free_memory_mib, t.host))
                most_cpu = max(free.values(), key=lambda t: (t.free_vcpus, t.host))
                why += (f" (most memory free: {most_mib.free_memory_mib} MiB on {most_mib.host}; most vCPUs free: "
                        f"{most_cpu.free_vcpus} on {most_cpu.host}, VMQ_FAILOVER_CPU_OVERCOMMIT)")
            else:
                why += " (no live, failover-safe host outside maintenance)"
            if unsafe:
                why += f" (not failover-safe, lock manager not running: {', '.join(unsafe)})"
            refused.append(Refusal(c.vm, why))
            continue
        best = min(fits, key=lambda t: (-t.free_memory_mib, -t.free_vcpus, t.host))  # the emptiest host first
        free[best.host] = replace(best, free_memory_mib=best.free_memory_mib - c.memory_mib,
                                  free_vcpus=best.free_vcpus - c.vcpus)
        starts.append(Start(c.vm, best.host))
    return FailoverPlan(host, starts=tuple(starts), refused=tuple(refused))


def _not_movable(c: Candidate) -> str:
    if not c.failover:
        return "failover is not enabled for it"
    if c.state not in FAILOVER_STATES:
        return f"its state is {c.state}, not unreachable"
    if not c.has_definition:
        return "vmq keeps no domain definition of it"
    return ""
