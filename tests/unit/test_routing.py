"""vmq.routing: the queue and task names are the wire contract, so their values are pinned here, and every
task the workers register is named from it."""

from __future__ import annotations

import subprocess
import sys

from vmq import routing
from vmq.config import load_settings
from workers.app import create_app


def test_the_queue_names_are_the_wire_names() -> None:
    assert routing.MONITOR_QUEUE == "vmq.monitor"
    assert routing.TIMEOUT_QUEUE == "vmq.timeouts"
    assert routing.host_queue("node1") == "host.node1"
    assert routing.host_queue("node2") != routing.host_queue("node1")


def test_the_task_names_are_the_wire_names() -> None:
    assert {
        "PROBE_TASK": routing.PROBE_TASK,
        "DOMAIN_EVENT_TASK": routing.DOMAIN_EVENT_TASK,
        "NOTIFY_TASK": routing.NOTIFY_TASK,
        "MANUAL_RESTART_TASK": routing.MANUAL_RESTART_TASK,
        "DRAIN_TASK": routing.DRAIN_TASK,
        "JUDGE_TASK": routing.JUDGE_TASK,
        "RESTART_TASK": routing.RESTART_TASK,
        "DOMAIN_OP_TASK": routing.DOMAIN_OP_TASK,
    } == {
        "PROBE_TASK": "vmq.monitor.probe_round",
        "DOMAIN_EVENT_TASK": "vmq.monitor.domain_event",
        "NOTIFY_TASK": "vmq.monitor.notify",
        "MANUAL_RESTART_TASK": "vmq.monitor.manual_restart",
        "DRAIN_TASK": "vmq.timeouts.drain_replies",
        "JUDGE_TASK": "vmq.timeouts.judge_round",
        "RESTART_TASK": "vmq.host.restart_vm",
        "DOMAIN_OP_TASK": "vmq.host.domain_op",
    }


def test_every_task_the_workers_register_is_named_in_routing_and_routed_to_its_queue() -> None:
    app = create_app(load_settings({"host_name": "node1"}))
    app.loader.import_default_modules()
    ours = {name for name in app.tasks if name.startswith("vmq.")}
    named = {value for key, value in vars(routing).items() if key.endswith("_TASK")}
    assert ours == named
    routes = app.conf.task_routes
    assert routes == {"vmq.monitor.*": {"queue": "vmq.monitor"}, "vmq.timeouts.*": {"queue": "vmq.timeouts"}}


def test_the_beat_schedule_sends_the_probe_task_to_the_monitor_queue() -> None:
    app = create_app(load_settings())
    entry = app.conf.beat_schedule["vmq-probe-round"]
    assert (entry["task"], entry["options"]) == ("vmq.monitor.probe_round", {"queue": "vmq.monitor"})


def test_routing_imports_nothing_but_the_standard_library() -> None:
    code = ("import sys, vmq.routing; bad = [m for m in ('celery', 'kombu', 'redis', 'libvirt') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
