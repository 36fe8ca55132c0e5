"""The alerting and dashboard files operators load as they are: deploy/prometheus/ passes Debian's real `promtool`
(config, rules, and the rules' own unit tests in tests/prometheus/), every alert says how bad it is and what
happened, and docker-compose.yml's `observability` profile wires Prometheus and Grafana to those very files."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from tests.unit.test_deploy_files import PROMETHEUS_INSTALL, ROOT, services, tool_or_skip

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULE_TESTS = ROOT / "tests" / "prometheus" / "vmq-rules.test.yml"


def promtool(*args: str) -> str:
    proc = subprocess.run([tool_or_skip("promtool", install=PROMETHEUS_INSTALL), *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "vmq-rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_config_and_the_rules() -> None:
    assert "SUCCESS: 12 rules found" in promtool("check", "rules", str(PROMETHEUS / "vmq-rules.yml"))
    out = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "is valid prometheus config file syntax" in out and "1 rule files found" in out


def test_the_alerts_fire_when_they_should_by_promtools_own_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_severity_and_a_summary_and_the_docs_point_to_the_file() -> None:
    alerts = rules()
    assert len({rule["alert"] for rule in alerts}) == len(alerts) == 12
    for rule in alerts:
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        assert len(rule["annotations"]["summary"]) > 20, rule["alert"]
    metrics_doc = (ROOT / "docs" / "metrics.md").read_text()
    assert "deploy/prometheus/vmq-rules.yml" in metrics_doc
    assert "- alert: " not in metrics_doc, "the rules live in deploy/prometheus/ only, not copied into the docs"


def test_the_scrape_config_targets_the_monitors_metrics_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["vmq-rules.yml"]
    [job] = config["scrape_configs"]
    port = services()["monitor"]["environment"]["VMQ_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"monitor:{port}"]


def test_the_observability_profile_mounts_these_files_and_only_runs_when_asked() -> None:
    svc = services()
    prometheus, grafana = svc["prometheus"], svc["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["observability"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vmq.yml").read_text())["providers"][0]
    mounted = [v for v in grafana["volumes"] if v.startswith("./deploy/grafana/vmq-dashboard.json:")]
    assert len(mounted) == 1 and mounted[0].split(":")[1].startswith(provider["options"]["path"] + "/")
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert all(p.startswith("127.0.0.1:") for s in (prometheus, grafana) for p in s["ports"]), "loopback only"
