"""The failover of a dead host's VMs, as the monitor runs it (issue 18): fence, plan, start elsewhere, once.

Each tick (under the judge lock) looks at the hosts the sweep found down (vmq.housekeeping). For a host down in
a new episode (its ``down_since_ms``) it opens that host's incident, once whatever the number of judges:

* ``fencing``: a fence device is configured (VMQ_FENCE_CONFIG); the fence task (vmq.monitor.fence_host, run
  off the judge's path: an agent may take a minute) powers the host off and proves it, then writes ``fenced``
  or ``unfenced``;
* ``fenced``: an operator already confirmed it off for this episode (`vmq hosts fence-confirm`);
* ``unfenced``: no method, or the fence failed: nothing of it starts elsewhere, an alert (``fence_failed``,
  ``failover_held``), today's behaviour; an operator's confirmation later moves it to ``fenced``.

A ``fenced`` incident is planned (vmq.failover.plan_failover, pure) at the next tick: held while more than half of
the hosts are silent (the control plane is the likelier one cut off), else each enabled VM is claimed once for
this episode (``SET NX``) and its start sent to the chosen host's own queue (vmq.host_failover on that host),
and the incident is ``done``. A partition without a fence is never taken for a dead host: cut off is not off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmq.config import Settings
from vmq.errors import DomainNotFound, HypervisorError
from vmq.failover import Candidate, Target, plan_failover
from vmq.fencing import FenceDevice, FenceResult, fence_off, load_fence_config
from vmq.host_failover import FailoverStart
from vmq.hypervisor.xmldesc import definition_facts
from vmq.intent import failover_enabled
from vmq.intent import priority as intent_priority
from vmq.model import AuditEvent, DomainStatus
from vmq.ports import Hypervisor, Store

__all__ = ["LIBVIRT_FENCE", "FailoverFlow", "explain_incident", "libvirt_fence", "run_fence_task"]

log = logging.getLogger(__name__)

#: The fence "agent" name that fences through the dead host's own libvirtd (its ``uri`` option).
LIBVIRT_FENCE = "libvirt"
#: A fence task that has not reported after twice its device's timeout plus this is taken as failed.
FENCE_REPORT_SLACK_S = 30.0

Overview = Sequence[tuple[str, bool, Mapping[str, str]]]


def _int(value: object, default: int = 0) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default


class FailoverFlow:
    """The monitor's side: opens incidents, asks for fences, plans and sends starts."""

    def __init__(self, store: Store, settings: Settings, request_fence: Callable[[str, int], None],
                 send_start: Callable[[FailoverStart], None]) -> None:
        self.store = store
        self.settings = settings
        self.request_fence = request_fence
        self.send_start = send_start
        self.devices: dict[str, FenceDevice] = (load_fence_config(Path(settings.fence_config))
                                                if settings.fence_config else {})

    def on_tick(self, overview: Overview, now_ms: int) -> None:
        """Move every dead host's incident one step (cheap when no host is down: nothing is read)."""
        if not self.settings.failover:
            return
        down = [(host, _int(info.get("down_since_ms"))) for host, alive, info in overview if not alive]
        taken: dict[str, tuple[int, int]] = {}  # capacity this tick's plans used: host -> (MiB, vCPUs)
        for host, episode in down:
            if episode:
                self._step(host, episode, overview, now_ms, taken)

    # ---------------------------------------------------------------- one incident
    def _step(self, host: str, episode: int, overview: Overview, now_ms: int,
              taken: dict[str, tuple[int, int]]) -> None:
        failovers, incident = self.store.failovers, self.store.failovers.incident(host)
        if incident.get("episode") != str(episode):
            self._open(host, episode, now_ms)
            return
        state = incident.get("state", "")
        if state == "fencing":
            device = self.devices.get(host)
            limit_ms = int(((device.timeout_s if device else 60.0) * 2 + FENCE_REPORT_SLACK_S) * 1000)
            if now_ms - _int(incident.get("opened_ms")) > limit_ms and failovers.update_incident(
                    host, episode, {"state": "unfenced", "reason": "the fence task did not report in time"},
                    expect_state="fencing"):
                _unfenced(self.store, host, episode, "the fence task did not report in time", now_ms)
        elif state == "unfenced":
            confirmation = failovers.fence_confirmation(host)
            if _int(confirmation.get("episode")) == episode and failovers.update_incident(
                    host, episode, {"state": "fenced", "method": "operator", "fenced_ms": now_ms},
                    expect_state="unfenced"):
                _fenced(self.store, host, episode, "operator", _confirmed_by(confirmation), now_ms)
        elif state == "fenced":
            self._plan(host, episode, incident, overview, now_ms, taken)

    def _open(self, host: str, episode: int, now_ms: int) -> None:
        failovers = self.store.failovers
        confirmation = failovers.fence_confirmation(host)
        if _int(confirmation.get("episode")) == episode:
            if failovers.open_incident(host, episode, {"state": "fenced", "method": "operator", "opened_ms": now_ms,
                                                       "fenced_ms": now_ms}):
                _fenced(self.store, host, episode, "operator", _confirmed_by(confirmation), now_ms)
        elif host in self.devices:
            if failovers.open_incident(host, episode, {"state": "fencing", "opened_ms": now_ms,
                                                       "method": self.devices[host].agent}):
                log.error("host=%s down: fencing it with %s before its VMs start elsewhere", host,
                          self.devices[host].agent)
                self.request_fence(host, episode)
        else:
            reason = (f"no fence method configured for {host} (VMQ_FENCE_CONFIG); once it is powered off, "
                      f"`vmq hosts fence-confirm {host}`")
            if failovers.open_incident(host, episode, {"state": "unfenced", "opened_ms": now_ms, "reason": reason}):
                _unfenced(self.store, host, episode, reason, now_ms)

    # ---------------------------------------------------------------- the plan
    def _plan(self, host: str, episode: int, incident: Mapping[str, str], overview: Overview, now_ms: int,
              taken: dict[str, tuple[int, int]]) -> None:
        store, s = self.store, self.settings
        records = store.vms.records(store.hosts.vms_on_host(host))
        kept = store.failovers.definitions(host, [rec.vm for rec in records])
        candidates, digests = [], {}
        for rec in records:
            facts = _kept_facts(rec.vm, kept.get(rec.vm))
            if facts is not None:
                digests[rec.vm] = facts[2]
            candidates.append(Candidate(rec.vm, rec.state.value, failover_enabled(rec.intent, s.failover_default),
                                        intent_priority(rec.intent), facts is not None,
                                        facts[0] if facts else 0, facts[1] if facts else 0))
        targets = [self._target(name, alive, info, now_ms, taken) for name, alive, info in overview]
        silent = sum(1 for _name, alive, _info in overview if not alive)
        plan = plan_failover(host, True, incident.get("method", ""), True, candidates, targets, len(overview), silent)
        if plan.held:
            if incident.get("held") != plan.held and store.failovers.update_incident(host, episode, {"held": plan.held}):
                store.audit.append(AuditEvent.FAILOVER_HELD, "", host, now_ms, episode=episode, reason=plan.held)
                store.stats.incr_stat("failover_held")
                log.error("host=%s failover held: %s", host, plan.held)
            return
        if not store.failovers.update_incident(host, episode, {"state": "done", "planned_ms": now_ms,
                                                               "starts": len(plan.starts),
                                                               "refused": len(plan.refused)}, expect_state="fenced"):
            return  # another judge planned it
        by_vm = {c.vm: c for c in candidates}
        for start in plan.starts:
            c = by_vm[start.vm]
            used = taken.get(start.host, (0, 0))
            taken[start.host] = (used[0] + c.memory_mib, used[1] + c.vcpus)
            if not store.failovers.claim_start(start.vm, episode, start.host):
                continue  # sent already for this episode
            self.send_start(FailoverStart(start.vm, host, start.host, episode, digests[start.vm], c.priority))
            store.audit.append(AuditEvent.FAILOVER_STARTED, start.vm, start.host, now_ms, from_host=host,
                               episode=episode, priority=c.priority,
                               since_host_down_s=round((now_ms - episode) / 1000, 3))
            store.stats.incr_stat("failover_started")
            log.warning("vm=%s of dead host %s: start sent to %s", start.vm, host, start.host)
        for refusal in plan.refused:
            store.audit.append(AuditEvent.FAILOVER_REFUSED, refusal.vm, host, now_ms, episode=episode,
                               reason=refusal.reason)
            store.stats.incr_stat("failover_refused")

    def _target(self, name: str, alive: bool, info: Mapping[str, str], now_ms: int,
                taken: dict[str, tuple[int, int]]) -> Target:
        s = self.settings
        until = _int(info.get("maintenance_until_ms"))
        used = taken.get(name, (0, 0))
        free_mib = _int(info.get("memory_mib")) - _int(info.get("memory_used_mib")) - used[0]
        free_vcpus = int(_int(info.get("cpus")) * s.failover_cpu_overcommit) - _int(info.get("vcpus_used")) - used[1]
        return Target(name, alive, free_mib, free_vcpus, maintenance=until == -1 or until > now_ms,
                      degraded=info.get("libvirt_ok") == "0",
                      failover_safe=info.get("lock_ok") == "1" or not s.failover_require_locks)


# -------------------------------------------------------------------- the fence task's use case
def libvirt_fence(hypervisor: Hypervisor, vms: Sequence[str]) -> FenceResult:
    """Fence through the dead host's own libvirtd (its worker died, libvirtd still answers): destroy each of
    ``vms`` active there, then prove none is; any error is "not fenced"."""
    off = (DomainStatus.SHUTOFF, DomainStatus.CRASHED, DomainStatus.ABSENT)

    def status(vm: str) -> DomainStatus:
        try:
            return hypervisor.domain_info(vm).status
        except DomainNotFound:
            return DomainStatus.ABSENT  # not defined there: not running there

    try:
        for vm in vms:
            if status(vm) not in off:
                hypervisor.destroy(vm)
        still = [vm for vm in vms if status(vm) not in off]
    except HypervisorError as exc:
        return FenceResult(False, f"libvirt fence on {hypervisor.uri} failed: {exc}")
    if still:
        return FenceResult(False, f"libvirt fence on {hypervisor.uri}: still active after destroy: {still}")
    return FenceResult(True, f"libvirt fence on {hypervisor.uri}: {len(vms)} domain(s) destroyed or off")


def run_fence_task(store: Store, settings: Settings, host: str, episode: int,
                   open_hypervisor: Callable[[str], Hypervisor]) -> dict[str, Any]:
    """Fence ``host`` for incident ``episode`` (the task vmq.monitor.fence_host); writes ``fenced`` or
    ``unfenced`` into the incident and audits it. Does nothing for an incident no longer fencing."""
    failovers = store.failovers
    incident = failovers.incident(host)
    if incident.get("episode") != str(episode) or incident.get("state") != "fencing":
        return {"host": host, "fenced": None, "reason": "not fencing this episode any more"}
    devices = load_fence_config(Path(settings.fence_config)) if settings.fence_config else {}
    device = devices.get(host)
    if device is None:
        result = FenceResult(False, f"no fence device for {host} in {settings.fence_config or 'VMQ_FENCE_CONFIG'}")
    elif device.agent == LIBVIRT_FENCE:
        uri = device.options.get("uri", "")
        hypervisor = open_hypervisor(uri)
        try:
            result = libvirt_fence(hypervisor, store.hosts.vms_on_host(host))
        finally:
            hypervisor.close()
    else:
        result = fence_off(device)
    now_ms = store.clock.time_ms()
    steps = [{"action": step.action, "exit": step.exit_code, "s": round(step.seconds, 3)} for step in result.steps]
    if result.fenced:
        if failovers.update_incident(host, episode, {"state": "fenced", "fenced_ms": now_ms, "reason": result.reason},
                                     expect_state="fencing"):
            _fenced(store, host, episode, device.agent if device else "?", f"{result.reason}; steps {steps}", now_ms)
    elif failovers.update_incident(host, episode, {"state": "unfenced", "reason": result.reason},
                                   expect_state="fencing"):
        _unfenced(store, host, episode, result.reason, now_ms)
    return {"host": host, "fenced": result.fenced, "reason": result.reason, "steps": steps}


def explain_incident(incident: Mapping[str, str]) -> str:
    """One line on a dead host's failover incident, for `vmq explain` and `vmq hosts`."""
    state = incident.get("state", "")
    words = {"fencing": "being fenced", "fenced": "fenced, failover being planned", "unfenced": "not proven off",
             "done": "fenced, failover sent"}.get(state, state or "none")
    extra = incident.get("held") or incident.get("reason") or ""
    return f"failover: {words}" + (f" ({extra})" if extra else "")


def _kept_facts(vm: str, doc: Mapping[str, Any] | None) -> tuple[int, int, str] | None:
    """(memory MiB, vCPUs, sha256) of the definition kept for ``vm``; None when there is none usable (it does not
    parse, or it defines another domain)."""
    if doc is None:
        return None
    try:
        name, _uuid, memory_mib, vcpus = definition_facts(str(doc["xml"]))
    except ValueError:
        return None
    return (memory_mib, vcpus, str(doc.get("sha", ""))) if name == vm else None


def _confirmed_by(confirmation: Mapping[str, Any]) -> str:
    """The ``fenced`` event's words for an operator's `vmq hosts fence-confirm`."""
    return f"confirmed off by {confirmation.get('by') or 'an operator'}"


def _fenced(store: Store, host: str, episode: int, method: str, detail: str, now_ms: int) -> None:
    store.audit.append(AuditEvent.FENCED, "", host, now_ms, episode=episode, method=method, detail=detail,
                       since_host_down_s=round((now_ms - episode) / 1000, 3))
    store.stats.incr_stat("failover_fenced")
    log.warning("host=%s fenced (%s): %s", host, method, detail)


def _unfenced(store: Store, host: str, episode: int, reason: str, now_ms: int) -> None:
    store.audit.append(AuditEvent.FENCE_FAILED, "", host, now_ms, episode=episode, reason=reason)
    store.audit.append(AuditEvent.FAILOVER_HELD, "", host, now_ms, episode=episode,
                       reason=f"{host} is not proven off: {reason}; nothing of it starts elsewhere")
    store.stats.incr_stat("failover_fence_failed")
    log.error("host=%s not fenced, its VMs stay down: %s", host, reason)
