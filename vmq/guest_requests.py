"""What a guest's own verified reply asks of the monitor, beyond being alive (called by vmq.ingest per batch).

- **Application liveness**: ``params.app_unhealthy`` names the liveness checks over their failure threshold
  (the responder's ``[[health]]``, kind liveness). Such VMs are recorded (``<ns>:app:unhealthy``), audited once
  per episode, judged each round as silence is (vmq.monitor), and never healed by such a reply.
- **Maintenance declared by the guest** (``vmq_responder.py --maintenance 2h``): ``params.maintenance_for_ms``,
  the time left of the window. A healthy or unknown VM enters maintenance until the reply's arrival (Redis
  time) plus that, capped (``VMQ_GUEST_MAINTENANCE_MAX_S``). Safe to take from a guest: the reply is signed with
  the VM's own key, and a guest could always avoid its own restart by answering; it cannot leave `failed`,
  `disabled` or a restart in progress, nor touch another VM.

Both are found by a byte search first: only the rare replies that carry the marks are parsed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from vmq import lifecycle
from vmq.codec import Verified
from vmq.model import AuditEvent, VmState
from vmq.ports import Store

log = logging.getLogger(__name__)

APP_UNHEALTHY_MARK = b'"app_unhealthy"'
MAINTENANCE_MARK = b'"maintenance_for_ms"'
#: States a guest may move to maintenance from (never out of `failed`, `disabled` or a restart).
GUEST_MAINTENANCE_FROM = frozenset({VmState.HEALTHY, VmState.UNKNOWN})


def _params(message: bytes) -> dict[str, Any]:
    try:
        params = json.loads(message).get("params")
    except (ValueError, AttributeError):
        return {}
    return params if isinstance(params, dict) else {}


def app_unhealthy_checks(message: bytes) -> list[str]:
    """The liveness checks a verified reply says failed their threshold ([] when none, or not a list)."""
    checks = _params(message).get("app_unhealthy")
    return [str(c)[:64] for c in checks[:20]] if isinstance(checks, list) else []


def maintenance_request_ms(message: bytes) -> int:
    """The maintenance a verified reply asks for, in ms (0: none, or not a positive integer)."""
    value = _params(message).get("maintenance_for_ms")
    return value if type(value) is int and value > 0 else 0


def note_app_health(store: Store, accepted: Mapping[str, Verified]) -> set[str]:
    """Record the VMs whose reply says their application is unhealthy, forget those whose reply no longer says
    so; returns the unhealthy ones."""
    sick: dict[str, dict[str, Any]] = {}
    for vm, reply in accepted.items():
        if APP_UNHEALTHY_MARK in reply.message:
            checks = app_unhealthy_checks(reply.message)
            if checks:
                sick[vm] = {"round": reply.round, "checks": checks, "arrival_ms": reply.arrival_ms}
    known = store.vms.app_unhealthy() if accepted else {}  # one HGETALL of a (nearly always) empty hash
    well = [vm for vm in known if vm in accepted and vm not in sick]
    for vm, value in sick.items():
        if vm not in known:
            store.audit.append(AuditEvent.APP_UNHEALTHY, vm, "", value["arrival_ms"], checks=value["checks"],
                               round=value["round"])
            log.warning("vm=%s application unhealthy: liveness %s", vm, ", ".join(value["checks"]))
    if sick or well:
        store.vms.note_app_health({vm: {**v, "since_ms": known.get(vm, v).get("since_ms", v["arrival_ms"])}
                                   for vm, v in sick.items()}, well)
    return set(sick)


def note_maintenance_requests(store: Store, accepted: Mapping[str, Verified], max_ms: int) -> list[str]:
    """Move the VMs whose reply declares maintenance into it (capped at ``max_ms``); returns those moved."""
    asked = {vm: (ms, reply.arrival_ms) for vm, reply in accepted.items()
             if MAINTENANCE_MARK in reply.message and (ms := maintenance_request_ms(reply.message))}
    moved: list[str] = []
    for rec in store.vms.records(sorted(asked)) if asked else []:
        if not rec.exists or rec.state not in GUEST_MAINTENANCE_FROM:
            continue  # in maintenance already (the window runs), or a state the guest may not leave
        ms, arrival_ms = asked[rec.vm]
        until_ms = arrival_ms + min(ms, max_ms)
        if lifecycle.maintenance_on(store.vms, rec, arrival_ms, until_ms, reason="guest").applied:
            log.info("vm=%s maintenance declared by the guest until %d (asked %d ms)", rec.vm, until_ms, ms)
            moved.append(rec.vm)
    return moved
