"""What silence is evidence of (pure): the gaps in probing that void it, and the evidence a verdict records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise

from vmq.model import VmView
from vmq.responder import BACKOFF_CAP_S


@dataclass(frozen=True)
class ProbingGap:
    """What a gap in probing leaves of a round's evidence (see ``probing_gap``)."""

    reason: str = ""  # empty: no gap near this round, judge it as usual
    reconnected_since_ms: int = 0  # > 0: judge only VMs that answered since then; 0: judge nobody


def probing_gap(round_id: int, sent_ms: Mapping[int, int], now_ms: int, t1_ms: int, t2_ms: int) -> ProbingGap:
    """How much of ``round_id``'s silence is evidence, given the gaps in probing around it.

    No round goes out while Redis is down or unreachable, so a gap in the send times of the recent rounds
    (``sent_ms``, Redis' clock; ``now_ms`` stands in for the next round while none has gone out) longer than
    max(T2 - T1, 2 x T1) means Redis, beat or every monitor was away. A round whose window [sent, sent + T2]
    meets the gap is not judged at all: its replies may never have been delivered. After the gap the guests
    reconnect, each after its back-off (vmq.responder: up to min(gap, 10 s)): in a round sent within that
    allowance (+ T1) only the VMs that have answered since the gap are judged.
    """
    if round_id not in sent_ms:
        return ProbingGap()
    times = sorted(sent_ms.items())
    times.append((0, max(now_ms, times[-1][1])))
    threshold_ms = max(t2_ms - t1_ms, 2 * t1_ms)
    start_ms = sent_ms[round_id]
    held = ProbingGap()
    for (before, gap_from), (after, gap_to) in pairwise(times):
        gap_ms = gap_to - gap_from
        if gap_ms <= threshold_ms or gap_from >= start_ms + t2_ms:
            continue
        reconnect_ms = min(gap_ms, int(BACKOFF_CAP_S * 1000)) + t1_ms
        what = (f"no probe round went out for {gap_ms / 1000:.1f} s (round {before} to "
                f"{f'round {after}' if after else 'now'}): Redis, beat or the monitors were away")
        if gap_to > start_ms:
            return ProbingGap(f"no evidence: {what}")
        if gap_to + reconnect_ms > start_ms:
            held = ProbingGap(f"{what}; guests get {reconnect_ms / 1000:.1f} s to reconnect", gap_to)
    return held


def silence_evidence(view: VmView, round_id: int, deadline_ms: int, last_answered_round: int, storm: str,
                     last_reply: str | None, max_restarts: int) -> dict[str, object]:
    """What a verdict on a silent VM records: the round it missed, its domain, budget and guards, and its last
    valid reply (JSON text, or None) decoded."""
    return {
        "round": round_id, "deadline_ms": deadline_ms, "last_valid_ms": view.last_valid_ms,
        "rounds_missed": round_id - last_answered_round,
        "domain": {"status": view.domain_status.value, "reason": view.domain_reason},
        "budget": {"used": view.restarts_in_window, "max": max_restarts,
                   "attempts_this_incident": view.incident_attempts},
        "guards": {"host_alive": view.host_alive, "host_degraded": view.host_degraded,
                   "kill_switch": view.restarts_suspended, "storm": storm,
                   "host_restarts_in_flight": view.host_restarts_in_flight},
        "last_reply": json.loads(last_reply) if last_reply else None}


def crash_evidence(view: VmView, event: str, detail: str, max_restarts: int) -> dict[str, object]:
    """What a verdict on a crash reported by libvirt records: the event, the last reply's time, budget."""
    return {"hypervisor_event": {"event": event, "detail": detail},
            "last_valid_ms": view.last_valid_ms,
            "budget": {"used": view.restarts_in_window, "max": max_restarts}}
