"""The naive design stack_bench.py measures as its baseline: one Celery task per VM per probe and one per VM
per timeout (what a first implementation on Celery looks like).

``naive.probe(vm, round)`` publishes that VM's probe on its own channel and records the round;
``naive.timeout(vm, round, due_ms)`` runs T2 later (a countdown), reads the VM's last answered round and, if
it is older, marks the VM faulty. Each task also records how late it started against its intended time, in
``naive:lag`` (a list of ms), which is what "sustained" is judged by.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

URL = os.environ["NAIVE_REDIS_URL"]
app = Celery("naive", broker=URL)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_prefetch_multiplier=4, broker_connection_retry_on_startup=True,
                task_default_queue="naive")
_client = redis.Redis.from_url(URL)


def _now_ms() -> int:
    seconds, micros = _client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@app.task(name="naive.probe")
def probe(vm: str, round_id: int, due_ms: int) -> None:
    pipe = _client.pipeline(transaction=False)
    pipe.publish(f"naive:probe:{vm}", round_id)
    pipe.hset("naive:sent", vm, round_id)
    pipe.rpush("naive:lag", _now_ms() - due_ms)
    pipe.execute()


@app.task(name="naive.timeout")
def timeout(vm: str, round_id: int, due_ms: int) -> None:
    answered = _client.hget("naive:answered", vm)
    pipe = _client.pipeline(transaction=False)
    if answered is None or int(answered) < round_id:
        pipe.hset("naive:faulty", vm, round_id)
    pipe.rpush("naive:lag", _now_ms() - due_ms)
    pipe.execute()
