"""vmq.notifications, the pure parts: classes of audit events, the subscription setting, the two payload formats,
and no credential in any payload."""

from __future__ import annotations

import pytest

from vmq.config import load_settings
from vmq.errors import ConfigError
from vmq.model import AuditEvent
from vmq.notifications import (
    CLASSES,
    SEVERITY,
    alertmanager_payload,
    event_class,
    parse_classes,
    payload,
    scrub,
)

FAILED = {"id": "1-0", "type": "escalated", "vm": "web-1", "host": "node1", "time": "2026-12-07T01:00:00.000+00:00",
          "time_ms": 1796000000000, "reasons": ["no valid reply for 9.0 s", "restart budget exhausted: 3 of 3"],
          "evidence": {"round": 7}}


def test_every_class_has_a_severity_and_no_audit_event_is_in_two_classes() -> None:
    assert set(SEVERITY) == set(CLASSES)
    every = [event for events in CLASSES.values() for event in events]
    assert len(every) == len(set(every))
    assert event_class(AuditEvent.ESCALATED.value) == "failed" and event_class(AuditEvent.HOST_SUSPECT) == "storm"
    assert event_class("decision") is None and event_class("nonsense") is None


def test_the_subscription_setting_names_unknown_classes() -> None:
    assert parse_classes("failed, host_down") == {"failed", "host_down"}
    assert parse_classes("all") == set(CLASSES)
    with pytest.raises(ConfigError, match=r"unknown class\(es\) \['hostdown'\]"):
        parse_classes("failed,hostdown")
    with pytest.raises(ConfigError, match="VMQ_WEBHOOK_CLASSES"):
        load_settings({"webhook_classes": "failed,typo"})
    assert load_settings({"webhook_classes": "all"}).webhook_classes == "all"


def test_credentials_in_urls_are_masked_everywhere_in_a_payload() -> None:
    event = {**FAILED, "reason": "redis://vmq:s3cret@redis:6379/0 refused", "nested": {"uri": ["qemu+ssh://root:pw@h/x"]}}
    out = payload(event, "failed")
    text = repr(out)
    assert "s3cret" not in text and "pw@" not in text
    assert out["reason"] == "redis://***@redis:6379/0 refused" and out["nested"] == {"uri": ["qemu+ssh://***@h/x"]}
    assert scrub("qemu+ssh://root@node1/system") == "qemu+ssh://***@node1/system"
    assert scrub("http://example.com/hook") == "http://example.com/hook"


def test_the_vmq_format_is_the_event_with_its_class() -> None:
    assert payload(FAILED, "failed") == {**FAILED, "class": "failed"}


def test_the_alertmanager_format_fires_and_resolves_under_the_same_alertname() -> None:
    faulty = {**FAILED, "type": "faulty", "reasons": ["no valid reply for 4.0 s", "reset (rung 1 of 2)"]}
    recovered = {**FAILED, "type": "recovered", "reasons": None, "time": "2026-12-07T01:00:09.000+00:00"}
    body = alertmanager_payload([(faulty, "faulty"), (recovered, "recovered")])
    assert body["version"] == "4" and body["status"] == "firing"
    fired, resolved = body["alerts"]
    assert fired["status"] == "firing" and resolved["status"] == "resolved"
    assert fired["labels"] == {"alertname": "VmqFaulty", "vm": "web-1", "host": "node1", "severity": "info",
                               "class": "faulty"}
    assert resolved["labels"]["alertname"] == "VmqFaulty" and resolved["endsAt"] == recovered["time"]
    assert fired["annotations"]["summary"] == "VM web-1 on node1: faulty: no valid reply for 4.0 s; reset (rung 1 of 2)"
    assert fired["annotations"]["event"]["type"] == "faulty"
    down = alertmanager_payload([({"type": "host_down", "vm": "", "host": "node2", "time": "t"}, "host_down")])
    assert down["alerts"][0]["labels"]["severity"] == "page"
    assert down["alerts"][0]["annotations"]["summary"] == "host node2: host_down"
