"""Notifications by event class: the audit stream, read by a cursor of its own, turned into webhook payloads.

Every notification is an audit event (``vmq events``) of a class the operator subscribed to
(``VMQ_WEBHOOK_CLASSES``); the judge never waits for one. A beat task (workers/monitor.py ``notify_events``)
reads the events that arrived since its cursor (``<ns>:notify:cursor``), under a short lock so two monitor
workers never send the same event twice, queues one retried POST per event (the ``notify`` task), then moves
the cursor: at-least-once delivery, in order. The first run starts from the stream's end (no flood of history).

Two formats (``VMQ_WEBHOOK_FORMAT``): ``vmq``, the event as ``vmq events --json`` prints it plus its ``class``;
``alertmanager``, Alertmanager's webhook payload (version 4), which chat bridges and incident tools already
take. Credentials in URLs (``scheme://user:password@``) are masked in every string of a payload.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from vmq.errors import ConfigError
from vmq.model import AuditEvent
from vmq.operator_views import event_json
from vmq.ports import AuditLog

__all__ = ["CLASSES", "DEFAULT_CLASSES", "SEVERITY", "alertmanager_payload", "due_notifications", "event_class",
           "parse_classes", "payload", "scrub"]

#: Each class and the audit events it is made of.
CLASSES: dict[str, frozenset[AuditEvent]] = {
    "failed": frozenset({AuditEvent.ESCALATED}),  # a VM's budget or ladder is exhausted: left alone
    "faulty": frozenset({AuditEvent.FAULTY}),
    "app_unhealthy": frozenset({AuditEvent.APP_UNHEALTHY}),  # a liveness check failed its threshold
    "restarted": frozenset({AuditEvent.RESTARTED}),
    "restart_failed": frozenset({AuditEvent.RESTART_FAILED}),
    "recovered": frozenset({AuditEvent.RECOVERED}),
    "storm": frozenset({AuditEvent.STORM, AuditEvent.HOST_SUSPECT}),  # a guard holds restarts
    "storm_over": frozenset({AuditEvent.STORM_OVER}),
    "host_down": frozenset({AuditEvent.HOST_DOWN}),
    "host_up": frozenset({AuditEvent.HOST_UP}),
    "host_degraded": frozenset({AuditEvent.HOST_DEGRADED}),
    "unreachable": frozenset({AuditEvent.UNREACHABLE}),
    "evidence_lost": frozenset({AuditEvent.EVIDENCE_LOST}),
    "restarts_suspended": frozenset({AuditEvent.RESTARTS_SUSPENDED}),
    # a dead host's failover: not proven off or held (a human must look), or its VMs started elsewhere
    "failover_held": frozenset({AuditEvent.FENCE_FAILED, AuditEvent.FAILOVER_HELD, AuditEvent.FAILOVER_FAILED}),
    "failover": frozenset({AuditEvent.FENCED, AuditEvent.FAILOVER_STARTED, AuditEvent.FAILOVER_DONE,
                           AuditEvent.FAILOVER_REFUSED}),
}
DEFAULT_CLASSES = "failed"
_BY_TYPE: dict[str, str] = {event.value: name for name, events in CLASSES.items() for event in events}

#: How bad each class is, for Alertmanager's ``severity`` label (the rules file's words: page, warning, info).
SEVERITY: dict[str, str] = {
    "failed": "page", "host_down": "page", "storm": "page", "restart_failed": "warning",
    "evidence_lost": "warning", "host_degraded": "warning", "unreachable": "warning",
    "restarts_suspended": "warning", "app_unhealthy": "warning", "faulty": "info", "restarted": "info", "recovered": "info",
    "storm_over": "info", "host_up": "info", "failover_held": "page", "failover": "warning",
}
#: Classes that end a condition another class began: sent to Alertmanager as "resolved".
_RESOLVES: dict[str, str] = {"recovered": "faulty", "storm_over": "storm", "host_up": "host_down"}

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*(:[^/@\s]*)?@")


def event_class(event_type: str) -> str | None:
    """The class of an audit event type, None for events no class covers."""
    return _BY_TYPE.get(event_type)


def parse_classes(text: str) -> frozenset[str]:
    """``VMQ_WEBHOOK_CLASSES``: comma-separated class names, or ``all``; raises ConfigError naming unknown ones."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if names == {"all"}:
        return frozenset(CLASSES)
    unknown = names - set(CLASSES)
    if unknown:
        raise ConfigError(f"VMQ_WEBHOOK_CLASSES: unknown class(es) {sorted(unknown)}; known: all, "
                          f"{', '.join(CLASSES)}")
    return frozenset(names)


def scrub(value: Any) -> Any:
    """``value`` with credentials in URLs masked in every string, recursively (a copy)."""
    if isinstance(value, str):
        return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", value)
    if isinstance(value, Mapping):
        return {key: scrub(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(item) for item in value]
    return value


def payload(event: Mapping[str, Any], cls: str) -> dict[str, Any]:
    """The ``vmq`` format: the audit event as `vmq events --json` prints it, with its class, scrubbed."""
    scrubbed: dict[str, Any] = scrub({**event, "class": cls})
    return scrubbed


def due_notifications(audit: AuditLog, classes: frozenset[str], fmt: str, lease_s: float = 10.0,
                      count: int = 500) -> list[dict[str, Any]] | None:
    """The payloads to send for the audit events written since the notifier's cursor, which then moves past
    them; None when another run holds the lease. The caller queues each payload (a retried POST task)."""
    with audit.notifier_lease(lease_s) as held:
        if not held:
            return None
        cursor = audit.notification_cursor()
        if cursor is None:  # first run: start from now, no flood of history
            audit.set_notification_cursor(audit.last_id())
            return []
        entries = audit.read(cursor, count)
        chosen: list[tuple[dict[str, Any], str]] = []
        for entry_id, fields in entries:
            cls = event_class(fields.get("type", ""))
            if cls in classes:
                chosen.append((event_json(entry_id, fields), cls))
        if entries:
            audit.set_notification_cursor(entries[-1][0])
    if fmt == "alertmanager":
        return [alertmanager_payload([pair]) for pair in chosen]
    return [payload(event, cls) for event, cls in chosen]


def _summary(event: Mapping[str, Any], cls: str) -> str:
    reasons = event.get("reasons")
    words = "; ".join(reasons) if isinstance(reasons, list) else str(event.get("reason") or event.get("result") or "")
    subject = f"VM {event['vm']} on {event.get('host') or '?'}" if event.get("vm") else f"host {event.get('host')}"
    return f"{subject}: {cls}" + (f": {words}" if words else "")


def alertmanager_payload(events: Iterable[tuple[Mapping[str, Any], str]], receiver: str = "vmq") -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4) for ``(event, class)`` pairs, one alert each: labels
    ``alertname`` (Vmq + the class in CamelCase), ``vm``, ``host``, ``severity``, ``class``; annotations
    ``summary`` and ``event`` (the whole audit event, JSON); ``startsAt`` the event's time. A class that ends
    another's condition (recovered, storm_over, host_up) is sent resolved, under the alertname it ends."""
    alerts = []
    for event, cls in events:
        ends = _RESOLVES.get(cls)
        name = "Vmq" + "".join(part.title() for part in (ends or cls).split("_"))
        labels = {"alertname": name, "vm": str(event.get("vm") or ""), "host": str(event.get("host") or ""),
                  "severity": SEVERITY.get(ends or cls, "info"), "class": ends or cls}
        alert = {"status": "resolved" if ends else "firing", "labels": labels,
                 "annotations": {"summary": _summary(event, cls), "event": payload(event, cls)},
                 "startsAt": event.get("time", ""), "endsAt": event.get("time", "") if ends else
                 "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": f"{name}:{labels['vm']}:{labels['host']}"}
        alerts.append(scrub(alert))
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {"version": "4", "status": status, "receiver": receiver, "groupLabels": {},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "", "groupKey": "vmq", "truncatedAlerts": 0,
            "alerts": alerts}
