"""vmq.taskclient: the CLI's producer speaks JSON only, uses the workers' broker settings, and declares a
queue as the workers do; importing it does not load Celery."""

from __future__ import annotations

import subprocess
import sys

from vmq.config import load_settings
from vmq.taskclient import _client, celery_conf
from workers.app import create_app


def test_the_client_and_the_workers_share_broker_backend_and_json_only() -> None:
    settings = load_settings({"redis_url": "redis://vmq:pw@10.0.0.5:6379/2",
                              "redis_sentinels": "10.0.0.1:26379", "redis_sentinel_master": "ha"})
    client, workers = _client(settings), create_app(settings)
    for conf in (client.conf, workers.conf):
        assert conf.broker_url == settings.celery_url and conf.result_backend == settings.celery_url
        assert conf.broker_transport_options["master_name"] == "ha"
        assert conf.accept_content == ["json"] and conf.task_serializer == "json"
        assert conf.result_accept_content == ["json"] and conf.result_serializer == "json"
    assert celery_conf(settings)["broker_transport_options"] == workers.conf.broker_transport_options


def test_the_client_declares_a_queue_exactly_as_the_workers_do() -> None:
    settings = load_settings({"host_name": "node1"})
    client, workers = _client(settings), create_app(settings)
    for name in ("vmq.monitor", "host.node1"):
        mine, theirs = client.amqp.queues[name], workers.amqp.queues[name]
        assert (mine.exchange.name, mine.exchange.type, mine.routing_key) == (
            theirs.exchange.name, theirs.exchange.type, theirs.routing_key) == (name, "direct", name)


def test_importing_the_client_and_the_restart_command_does_not_load_celery() -> None:
    code = ("import sys, vmq.taskclient, vmq.cli.restart; bad = [m for m in ('celery', 'kombu', 'workers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
