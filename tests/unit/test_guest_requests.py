"""vmq.guest_requests and the responder's side of it: what a reply's params ask, read with bad input everywhere
(a health result that lies about its type asks nothing), and the guest's own maintenance file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmq.guest_requests import app_unhealthy_checks, maintenance_request_ms
from vmq.responder import ConfigProblem, declare_maintenance, maintenance_remaining_ms


def message(params: object) -> bytes:
    return json.dumps({"v": 1, "vm": "web-1", "round": 3, "params": params}).encode()


@pytest.mark.parametrize(("params", "checks"), [
    ({"app_unhealthy": ["db", "web"]}, ["db", "web"]),
    ({"app_unhealthy": [1, {"x": 2}]}, ["1", "{'x': 2}"]),  # odd names are shown as text, still a failure
    ({"app_unhealthy": "db"}, []), ({"app_unhealthy": True}, []), ({"app_unhealthy": {"db": 1}}, []),
    ({"app_unhealthy": []}, []), ({}, []), ("not a mapping", []), (None, []),
])
def test_app_unhealthy_is_a_list_of_names_or_nothing(params: object, checks: list[str]) -> None:
    assert app_unhealthy_checks(message(params)) == checks
    assert app_unhealthy_checks(b"{not json") == []


def test_a_huge_list_of_checks_is_cut() -> None:
    assert len(app_unhealthy_checks(message({"app_unhealthy": ["x" * 500] * 100}))) == 20
    assert app_unhealthy_checks(message({"app_unhealthy": ["x" * 500]}))[0] == "x" * 64


@pytest.mark.parametrize(("value", "ms"), [
    (7_200_000, 7_200_000), (0, 0), (-5, 0), (1.5, 0), ("3600", 0), (True, 0), (None, 0), ([1], 0)])
def test_maintenance_requests_are_positive_integers_or_nothing(value: object, ms: int) -> None:
    assert maintenance_request_ms(message({"maintenance_for_ms": value})) == ms


def test_the_guest_declares_and_lifts_its_maintenance_in_a_file(tmp_path: Path) -> None:
    path = str(tmp_path / "vmq" / "maintenance-until")
    assert maintenance_remaining_ms(path) == 0
    assert "maintenance for 7200 s" in declare_maintenance(path, "2h")
    assert 7_190_000 < maintenance_remaining_ms(path) <= 7_200_000
    assert maintenance_remaining_ms(path, now_s=1e12) == 0, "over"
    declare_maintenance(path, "90m")
    assert 5_390_000 < maintenance_remaining_ms(path) <= 5_400_000
    assert "maintenance off" in declare_maintenance(path, "off")
    assert maintenance_remaining_ms(path) == 0
    declare_maintenance(path, "off")  # twice: harmless
    with pytest.raises(ConfigProblem, match="not a duration"):
        declare_maintenance(path, "soon")
    Path(path).write_text("garbage")
    assert maintenance_remaining_ms(path) == 0
