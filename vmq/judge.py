"""The judge's view of VMs: what the restart condition (vmq.policy) is given about each one, and with which knobs.

One ``Judge`` serves the tick, the domain-event path and the operator's restart alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from vmq.config import Settings
from vmq.intent import enrolment
from vmq.intent import knobs as intent_knobs
from vmq.model import DomainStatus, HostContext, ProbePath, VmRecord, VmView
from vmq.policy import PolicyConfig, with_overrides
from vmq.ports import Store

log = logging.getLogger(__name__)


def policy_config(settings: Settings) -> PolicyConfig:
    """The restart condition's knobs from Settings."""
    return PolicyConfig(
        boot_grace_s=settings.boot_grace_s,
        recovery_timeout_s=settings.recovery_timeout_s,
        restart_timeout_s=settings.restart_timeout_s,
        max_restarts=settings.max_restarts,
        restart_window_s=settings.restart_window_s,
        backoff_base_s=settings.backoff_base_s,
        backoff_max_s=settings.backoff_max_s,
        max_concurrent_restarts_per_host=settings.max_concurrent_restarts_per_host,
        app_liveness_restart=settings.app_liveness == "restart",
    )


def view_of(rec: VmRecord, **extra: object) -> VmView:
    """The policy's view of a VM from its stored record plus context (host, budget, guards)."""
    return VmView(
        vm=rec.vm,
        state=rec.state,
        host=rec.host,
        state_since_ms=rec.state_since_ms,
        domain_status=rec.domain_status or DomainStatus.ABSENT,
        domain_reason=rec.domain_reason,
        booted_at_ms=rec.grace_anchor_ms,
        **extra,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Judged:
    """One VM as the judge sees it: its record, the policy's view, and its last reply saved in Redis."""

    record: VmRecord
    view: VmView
    last_reply: str | None


@dataclass(frozen=True)
class JudgeInputs:
    """The views of VMs being judged (removed VMs left out), the restarts in flight per host and the hosts."""

    judged: list[Judged]
    in_flight: dict[str, int]
    hosts: dict[str, HostContext]


class Judge:
    """Reads what the restart condition needs, in a few round trips, and the knobs that apply to each VM.

    ``lease_s`` is how long one judging pass holds the judge lock before renewing it: a timeout worker killed
    while judging blocks the others for at most that long (overrunning it is safe, only wasteful).
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.policy = policy_config(settings)
        self.lease_s = max(2.0, 2 * settings.probe_interval_s)

    def policy_for(self, rec: VmRecord) -> PolicyConfig:
        """The cluster's knobs with this VM's own applied: its libvirt metadata's, then its overrides (``vmq
        set``), which win; refused ones are logged."""
        if not rec.overrides and not rec.intent:
            return self.policy
        cfg, refused = with_overrides(self.policy, {**intent_knobs(rec.intent), **rec.overrides})
        if refused:
            log.warning("vm=%s overrides refused: %s", rec.vm, refused)
        return cfg

    def inputs(self, records: Sequence[VmRecord], now_ms: int, round_id: int | None = None) -> JudgeInputs:
        """The views of ``records`` with their budget, guards and host context. With ``round_id`` (judging a
        round's silence), a relayed VM counts as asked only if its host's relay reported that round finished,
        in a batch read by now, without leaving it unasked."""
        store = self.store
        vms = [rec.vm for rec in records]
        window_start = now_ms - int(self.settings.restart_window_s * 1000)
        context = store.vms.judge_context(vms, window_start)
        hosts = store.hosts.host_context((r.host for r in records if r.host), now_ms, self.settings.host_fresh_ms,
                                         round_id)
        in_flight = store.vms.restarting_by_host()
        seen = store.replies.last_seen_many(vms)
        judged: list[Judged] = []
        for i, rec in enumerate(records):
            if not rec.exists:
                continue  # listed in last_round but no record: removed VM
            host = hosts.get(rec.host)
            relay_alive = (round_id is None or not rec.relayed or (
                host is not None and host.relay_finished and context.unasked_rounds[i] < round_id))
            view = view_of(
                rec, not_enrolled=enrolment(rec.intent, self.settings.enroll),
                has_key=rec.vm in context.keyed or rec.probe_path is ProbePath.AGENT, host_alive=bool(host and host.alive),
                relay_alive=relay_alive,
                host_degraded=bool(host and host.degraded),
                host_maintenance=bool(host and host.in_maintenance(now_ms)),
                last_valid_ms=int(seen[i] or 0), restarts_in_window=context.restarts[i], restarts_suspended=context.suspended,
                incident_attempts=rec.attempts, last_restart_ms=rec.last_restart_ms,
                host_restarts_in_flight=in_flight.get(rec.host, 0))
            judged.append(Judged(rec, view, context.last_replies[i]))
        return JudgeInputs(judged, in_flight, hosts)

    def view(self, rec: VmRecord, now_ms: int) -> VmView:
        """One VM's view (``rec`` must exist)."""
        return self.inputs([rec], now_ms).judged[0].view
