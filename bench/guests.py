"""Simulated guests for loop_bench.py: one process answers every probe for a slice of the VMs.

Each process holds one redis-py pub/sub subscription to ``<ns>:probes`` and, per probe, XADDs one fresh
reply per VM it owns with that round's nonce, pipelined in batches with ``MAXLEN ~``. The replies are the
bytes the real ``vmq.responder.encode_reply`` writes, signed the same way, but produced cheaply: the guests
stand for other machines, and on a 2-core benchmark box every microsecond they spend is taken from the
system under test (the responder's json.dumps + HMAC + redis-py's XADD cost ≈ 20 µs per reply; this ≈ 4).
What it precomputes per VM: a byte template of the reply (everything but round, nonce, seq and guest time),
checked byte for byte against ``encode_reply`` for every VM at start and after every revive; the HMAC state
with the key and prefix absorbed; the state parameters (a guest's own values change slowly; reading /proc
10,000 times per second would benchmark the simulator, not vmq). Each XADD is packed by hiredis and a batch
goes out as one write on a redis-py connection.

Control (a multiprocessing queue, read between probes):
  ("silence", vm)  the VM stops answering from now on (a hang); the instant is recorded in Redis server time
                   (TIME) as ``<injected_key>[vm] = ms``, so detection latency uses Redis' clock throughout.
  ("revive", vm)   the VM answers again with a new boot id (what a restart looks like to the monitor).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing as mp
import os
import queue
import time
import uuid
from collections.abc import Mapping
from multiprocessing.synchronize import Event
from typing import Any

import hiredis
import redis

from vmq.responder import REPLY_MAC_PREFIX, WIRE_VERSION, encode_reply, parse_probe


def state_params(i: int) -> dict[str, Any]:
    """Plausible state parameters of protocol.md, a little different per VM (~330-byte replies)."""
    return {"load": [0.12, 0.08, 0.01], "mem_total_kb": 2048000,
            "mem_available_kb": 1500000 - 37 * (i % 1000), "disk_total_b": 10737418240,
            "disk_free_b": 5368709120 - 4096 * i, "uptime_s": 8123.4 + i,
            "health": {"sshd": {"status": 0, "age_s": 1.2}, "db": {"status": 0, "age_s": 3.4}}}


class ReplyMaker:
    """``encode_reply``'s bytes and signature for one VM, from a template (see the module's docstring)."""

    def __init__(self, vm: str, boot_id: str, params: dict[str, Any], key: bytes) -> None:
        def baked(value: Any) -> bytes:  # a JSON value as encode_reply writes it, safe inside a %-template
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode().replace(b"%", b"%%")

        self.vm, self.boot_id, self.params, self.key = vm, boot_id, params, key
        self.template = (b'{"v":%d,"vm":' % WIRE_VERSION + baked(vm) + b',"round":%d,"nonce":%s,"boot_id":'
                         + baked(boot_id) + b',"seq":%d,"guest_ms":%d,"params":' + baked(params) + b"}")
        self.mac = hmac.new(key, REPLY_MAC_PREFIX, hashlib.sha256)

    def make(self, round_id: int, nonce_json: bytes, seq: int, guest_ms: int) -> tuple[bytes, bytes]:
        """(message, hex signature); ``nonce_json`` is the nonce as a JSON string (quoted)."""
        message = self.template % (round_id, nonce_json, seq, guest_ms)
        mac = self.mac.copy()
        mac.update(message)
        return message, mac.hexdigest().encode()

    def check(self) -> None:
        """Raise unless this template gives exactly what vmq.responder.encode_reply gives."""
        nonce = "0123456789abcdef" * 2
        expected, signature = encode_reply(self.vm, 7, nonce, self.boot_id, 3, self.params, self.key, 1234)
        made = self.make(7, json.dumps(nonce).encode(), 3, 1234)
        if made != (expected, signature.encode()):
            raise RuntimeError(f"simulated reply of {self.vm} differs from encode_reply's: {made[0]!r}")


def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def serve(url: str, channel: str, stream: str, maxlen: int, batch: int, vms: list[str], secrets: list[str],
          injected_key: str, control: Any, ready: Event, stop: Event, results: Any) -> None:
    """Process entry point (spawn): answer probes for ``vms`` until ``stop`` is set, then report counters.

    ``VMQ_BENCH_GUEST_NICE`` (default 0) lowers this process' priority: the simulated guests stand for other
    machines, so on a small benchmark box they should not take CPU from the system under test.
    """
    os.nice(int(os.environ.get("VMQ_BENCH_GUEST_NICE", "0")))
    client = redis.Redis.from_url(url, socket_timeout=30)
    makers = [ReplyMaker(vm, str(uuid.uuid4()), state_params(i), bytes.fromhex(secret))
              for i, (vm, secret) in enumerate(zip(vms, secrets, strict=True))]
    for maker in makers:
        maker.check()
    seqs = [0] * len(vms)
    index = {vm: i for i, vm in enumerate(vms)}
    silent: set[int] = set()
    replies = rounds = bad_probes = 0
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    while (msg := pubsub.get_message(timeout=5.0)) is None or msg["type"] != "subscribe":
        pass
    ready.set()
    writer = client.connection_pool.get_connection()
    xadd = (b"XADD", stream.encode(), b"MAXLEN", b"~", str(maxlen).encode(), b"*", b"m")
    pack = hiredis.pack_command
    while not stop.is_set():
        while True:  # control first: a silence that arrives with a probe already applies to it
            try:
                command, vm = control.get_nowait()
            except queue.Empty:
                break
            i = index[vm]
            if command == "silence":
                silent.add(i)
                client.hset(injected_key, vm, _redis_ms(client))
            elif command == "revive":
                silent.discard(i)
                old = makers[i]
                makers[i] = ReplyMaker(old.vm, str(uuid.uuid4()), old.params, old.key)
                makers[i].check()
        msg = pubsub.get_message(timeout=0.02)
        if msg is None or msg["type"] != "message":
            continue
        try:
            round_id, nonce, _sent_ms = parse_probe(msg["data"])
        except ValueError:
            bad_probes += 1
            continue
        rounds += 1
        guest_ms = int(time.time() * 1000)
        nonce_json = json.dumps(nonce).encode()
        packed: list[bytes] = []
        for i, maker in enumerate(makers):
            if i in silent:
                continue
            seqs[i] += 1
            message, signature = maker.make(round_id, nonce_json, seqs[i], guest_ms)
            packed.append(pack((*xadd, message, b"s", signature)))
            if len(packed) == batch:
                replies += _send(writer, packed)
                packed = []
        if packed:
            replies += _send(writer, packed)
    client.connection_pool.release(writer)
    pubsub.close()
    results.put({"vms": len(vms), "rounds": rounds, "replies": replies, "bad_probes": bad_probes,
                 "cpu_s": time.process_time()})
    client.close()


def _send(connection: Any, packed: list[bytes]) -> int:
    """Write a batch of packed XADDs in one go and read their replies; raises on the first error reply."""
    connection.send_packed_command([b"".join(packed)])
    for _ in packed:
        response = connection.read_response()
        if isinstance(response, Exception):
            raise response
    return len(packed)


class ProcessFleet:
    """Simulation processes started and stopped together, each owning some VMs (``owner``: VM -> process).

    Each process gets, after its own arguments, its control queue, its ready event, the shared stop event and
    the shared results queue. ``silence(vm)`` and ``revive(vm)`` go to the process that owns the VM; ``stop()``
    returns the counters each process reported (processes that never started are skipped).
    """

    KIND = "simulation"  # names the processes in errors
    START_TIMEOUT_S = 60.0

    def __init__(self, parts: int, owner: dict[str, int]) -> None:
        self._ctx = mp.get_context("spawn")
        self.owner = owner
        self.controls = [self._ctx.Queue() for _ in range(parts)]
        self._stop, self._results = self._ctx.Event(), self._ctx.Queue()
        self._readies = [self._ctx.Event() for _ in range(parts)]
        self.procs: list[Any] = []

    def _add(self, target: Any, args: tuple[Any, ...]) -> None:
        """Add process number len(procs), running ``target(*args, control, ready, stop, results)``."""
        p = len(self.procs)
        self.procs.append(self._ctx.Process(target=target, daemon=True, name=f"{self.KIND}s-{p}", args=(
            *args, self.controls[p], self._readies[p], self._stop, self._results)))

    def start(self, timeout_s: float | None = None) -> None:
        """Start every process and wait until each has subscribed to the probes."""
        timeout_s = self.START_TIMEOUT_S if timeout_s is None else timeout_s
        for proc in self.procs:
            proc.start()
        for ready in self._readies:
            if not ready.wait(timeout_s):
                raise RuntimeError(f"a {self.KIND} process did not subscribe within {timeout_s:g} s")

    def silence(self, vm: str) -> None:
        self.controls[self.owner[vm]].put(("silence", vm))

    def revive(self, vm: str) -> None:
        self.controls[self.owner[vm]].put(("revive", vm))

    def stop(self) -> list[dict[str, Any]]:
        """Stop every process; returns the counters of those that reported within 15 s."""
        self._stop.set()
        started = [proc for proc in self.procs if proc.pid is not None]
        stats: list[dict[str, Any]] = []
        for _ in started:
            try:
                stats.append(self._results.get(timeout=15))
            except queue.Empty:
                break
        for proc in started:
            proc.join(15)
            if proc.is_alive():
                proc.terminate()
        return stats


class Fleet(ProcessFleet):
    """The guest processes of one benchmark run: one per slice of VMs."""

    KIND = "guest"

    def __init__(self, url: str, channel: str, stream: str, maxlen: int, batch: int, slices: list[list[str]],
                 secrets: Mapping[str, str], injected_key: str) -> None:
        super().__init__(len(slices), {vm: p for p, part in enumerate(slices) for vm in part})
        for part in slices:
            self._add(serve, (url, channel, stream, maxlen, batch, part, [secrets[vm] for vm in part], injected_key))


def contiguous(vms: list[str], parts: int) -> list[list[str]]:
    """``vms`` in ``parts`` contiguous slices of (nearly) equal size."""
    n = len(vms)
    return [vms[i * n // parts:(i + 1) * n // parts] for i in range(parts)]
