"""The Celery rim: JSON only, one exchange per queue, restart tasks routed to host.<name> with expiry,
and the dependency direction (the core imports neither celery nor libvirt)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from vmq.config import load_settings
from vmq.model import RestartRequest
from workers import host as host_tasks
from workers.app import create_app
from workers.context import monitor_of


def test_the_app_speaks_json_only() -> None:
    app = create_app(load_settings({"host_name": "node1"}))
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    assert app.conf.result_accept_content == ["json"]


def test_every_queue_has_its_own_direct_exchange_so_host_queues_cannot_mix() -> None:
    app = create_app(load_settings({"host_name": "node1"}))
    queues = {q.name: q for q in app.conf.task_queues}
    assert set(queues) == {"vmq.monitor", "vmq.timeouts", "host.node1"}
    for name, queue in queues.items():
        assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (name, "direct", name)


def test_the_restart_task_is_acked_late_and_redelivered_if_its_worker_dies() -> None:
    task = host_tasks.restart_vm
    assert task.name == "vmq.host.restart_vm"
    assert task.acks_late is True and task.reject_on_worker_lost is True


def test_a_restart_request_is_sent_to_the_vms_host_queue_with_its_expiry_in_redis_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(load_settings())
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(app, "send_task", lambda name, **kw: sent.append((name, kw)))
    request = RestartRequest("web-1", "node7", 42, "web-1:9:abcd", 9, 1_000, expires_ms=13_500)
    monitor_of(app).verdicts.dispatch(request)
    # No Celery `expires`: the host worker would check it on its own clock. The task checks expires_ms
    # against Redis' clock (vmq.host_restart.restart_vm).
    assert sent == [("vmq.host.restart_vm", {"args": [{"vm": "web-1", "host": "node7", "generation": 42,
                                                        "incident": "web-1:9:abcd", "round": 9,
                                                        "issued_ms": 1_000, "hard": False,
                                                        "crashed": False, "manual": False,
                                                        "expires_ms": 13_500}],
                                              "queue": "host.node7"})]


def test_a_host_worker_refuses_a_restart_addressed_to_another_host() -> None:
    app = create_app(load_settings({"host_name": "node1"}))
    task = app.tasks["vmq.host.restart_vm"]
    result = task.run({"vm": "web-1", "host": "node2", "generation": 1, "incident": "x"})
    assert result == {"acted": False, "result": "misrouted"}


@pytest.mark.parametrize("module", ["vmq.monitor", "vmq.policy", "vmq.codec", "vmq.host_restart", "vmq.inventory",
                                    "vmq.routing", "vmq.hostagent", "vmq.taskclient", "vmq.model"])
def test_the_core_imports_neither_celery_nor_libvirt(module: str) -> None:
    code = (f"import sys, {module}; bad = [m for m in ('celery', 'kombu', 'libvirt') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_policy_imports_only_the_model() -> None:
    code = ("import sys, vmq.policy; mods = sorted(m for m in sys.modules if m.startswith('vmq')); print(mods); "
            "sys.exit(0 if set(mods) <= {'vmq', 'vmq.policy', 'vmq.model'} else 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
