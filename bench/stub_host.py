"""A stub host worker for stack_bench.py: the real task name and queues, no hypervisor.

``celery -A stub_host worker -Q host.bench-host-0,...`` consumes the restart tasks the real monitor routes to
``host.<name>`` and records, per VM, the Redis time (``TIME``) at which the task started running, in
``<ns>:bench:restart_started``. The benchmark reads that hash to time "flag -> restart task running" and to
"reboot" the simulated guest (it answers again with a new boot id). No libvirt, no claim, no transition:
the VM heals through its next valid reply, as an unclaimed restart does.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Task

from vmq.config import load_settings
from workers.app import create_app

settings = load_settings()
app = create_app(settings)
app.conf.include = []  # not workers.host: no inventory agent, no libvirt listener
_client = redis.Redis.from_url(settings.redis_url)
STARTED_KEY = f"{settings.namespace}:bench:restart_started"


@app.task(bind=True, name="vmq.host.restart_vm", ignore_result=True)
def restart_vm(self: Task, request: dict[str, Any]) -> None:
    seconds, micros = _client.time()
    _client.hset(STARTED_KEY, str(request["vm"]), int(seconds) * 1000 + int(micros) // 1000)
