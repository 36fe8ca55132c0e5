"""The notifier reads the audit stream by a cursor of its own (vmq.notifications.due_notifications), on
fakeredis and a real redis-server: it starts from now, sends each subscribed event once and in order, skips the
others, and a second run holding no lease sends nothing."""

from __future__ import annotations

from tests.contract.test_monitor_store import World
from vmq.model import AuditEvent
from vmq.notifications import due_notifications


def test_the_first_run_starts_from_now_then_each_subscribed_event_is_sent_once_in_order(world: World) -> None:
    audit = world.store.audit
    audit.append(AuditEvent.ESCALATED, "old", "node1", 1, reasons=["before the notifier ran"])
    assert due_notifications(audit, frozenset({"failed", "host_down"}), "vmq") == [], "no flood of history"

    audit.append(AuditEvent.HOST_DOWN, "", "node2", 2, reason="heartbeat expired")
    audit.append(AuditEvent.DECISION, "web-1", "node1", 3, reasons=["boot grace"])  # no class
    audit.append(AuditEvent.FAULTY, "web-1", "node1", 4, reasons=["silent"])  # a class not subscribed
    audit.append(AuditEvent.ESCALATED, "web-2", "node1", 5, reasons=["budget exhausted"], evidence={"round": 9})
    sent = due_notifications(audit, frozenset({"failed", "host_down"}), "vmq")
    assert [(p["class"], p["type"], p["vm"], p["host"]) for p in sent or []] == [
        ("host_down", "host_down", "", "node2"), ("failed", "escalated", "web-2", "node1")]
    assert sent is not None and sent[1]["evidence"] == {"round": 9} and sent[1]["reasons"] == ["budget exhausted"]
    assert due_notifications(audit, frozenset({"failed", "host_down"}), "vmq") == [], "each event once"


def test_a_run_without_the_lease_sends_nothing_and_moves_nothing(world: World) -> None:
    audit = world.store.audit
    assert due_notifications(audit, frozenset({"failed"}), "vmq") == []
    audit.append(AuditEvent.ESCALATED, "web-1", "node1", 1, reasons=["x"])
    with audit.notifier_lease(10.0) as held:
        assert held
        assert due_notifications(audit, frozenset({"failed"}), "vmq") is None  # another run is at work
    [note] = due_notifications(audit, frozenset({"failed"}), "alertmanager") or []
    assert note["alerts"][0]["labels"]["alertname"] == "VmqFailed"
