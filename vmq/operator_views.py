"""Read models for operators: the cluster status and audit events as plain JSON-ready dicts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from vmq.config import Settings
from vmq.failover_flow import explain_incident
from vmq.intent import enrolment, failover_enabled, priority
from vmq.ports import Store


def failover_words(store: Store, name: str, alive: bool, info: Mapping[str, str]) -> str:
    """A dead host's failover incident in words ("" for a live host; "failover: none" for a dead one without an
    incident of its current down episode, e.g. with VMQ_FAILOVER off)."""
    if alive or not info.get("down_since_ms", "0").strip("0"):
        return ""
    incident = store.failovers.incident(name)
    return explain_incident(incident) if incident.get("episode") == info.get("down_since_ms") else "failover: none"


def cluster_status(store: Store, settings: Settings) -> dict[str, Any]:
    """Hosts (name, alive, VM count) and VMs (id, host, state, seconds since last valid reply, restarts, whether
    vmq watches it by the operators' intent and its restart priority)."""
    now_ms = store.clock.time_ms()
    vms = store.vms.all_vms()
    records = store.vms.records(vms)
    window_start = now_ms - int(settings.restart_window_s * 1000)
    context = store.vms.judge_context(vms, window_start)
    restarts, keyed, suspended = context.restarts, context.keyed, context.suspended
    seen = store.replies.last_seen_many(vms)
    hosts = store.hosts.hosts_overview()
    per_host: dict[str, int] = {}
    for rec in records:
        per_host[rec.host] = per_host.get(rec.host, 0) + 1
    stats, rejects = store.stats.counters()
    return {
        "time_ms": now_ms,
        "restarts_suspended": suspended,
        "hosts": [{"name": name, "alive": alive, "vms": per_host.get(name, 0), "queue": info.get("queue", ""),
                   "libvirt_uri": info.get("libvirt_uri", ""), "failover": failover_words(store, name, alive, info)}
                  for name, alive, info in hosts],
        "vms": [
            {
                "id": vm,
                "host": rec.host,
                "state": rec.state.value,
                "since_last_reply_s": None if not seen[i] else round((now_ms - float(seen[i] or 0)) / 1000, 3),
                "restarts_in_window": restarts[i],
                "has_key": vm in keyed,
                "domain_status": rec.domain_status.value if rec.domain_status else "",
                "probe_path": rec.probe_path.value,
                "incident": rec.incident,
                "decision": rec.decision,
                "enrolled": not enrolment(rec.intent, settings.enroll),
                "priority": priority(rec.intent),
                "failover": failover_enabled(rec.intent, settings.failover_default),
            }
            for i, (vm, rec) in enumerate(zip(vms, records))
        ],
        "counters": stats,
        "rejected_replies": rejects,
    }


def event_json(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One audit entry as a JSON object with at least type, vm, host and time (ISO 8601, UTC)."""
    out: dict[str, Any] = {"id": entry_id}
    for name, raw in fields.items():
        if name in {"type", "vm", "host", "from", "to", "incident", "queue", "action", "result", "reason",
                    "boot_id", "previous_boot_id", "domain_status", "error", "previous_host"}:
            out[name] = raw
            continue
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    time_ms = int(fields.get("time", entry_id.split("-")[0]))
    out["time_ms"] = time_ms
    out["time"] = datetime.fromtimestamp(time_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    out.setdefault("host", "")
    out.setdefault("vm", "")
    return out
