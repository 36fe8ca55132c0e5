"""Simulated host relays for stack_bench.py's ``--via agent,channel``: a few processes, each playing many hosts.

What each simulated host does per probe round is what its ``vmq.relay.ProbeRelay`` would write to Redis: the
answers of its VMs built by vmq's own ``agent_answer``/``channel_answer`` and appended with vmq's own
``store.relays.append``, the round-finish mark (the round, no VM left unasked) and the relay heartbeat
``relay_seen_ms`` in the host's hash. Agent answers go as ProbeRelay writes them by default (``form`` cover: one
cover entry per host and round built by vmq's own ``CoverKeeper``, a partial one at once and the final one at the
hung VM's timeout when the host has a hung VM), or as compact entries (``form`` compact, vmq before 2026-12-07).
Per host and round (compact form, and channel answers):

- the answers go out in flushes of ``ANSWERS_PER_FLUSH`` (8 agent threads x 50 ms / 1.3 ms per guest-ping,
  FIELD-NOTES), written back to back: the real relay spreads them over ≈ 50 ms, which only moves arrivals;
- with every VM answered, the last flush carries the finish mark (the relay flushes at once when its round
  is complete); with a hung VM on the host, the finish mark follows alone when the hung VM's call times out,
  ``timeout_s`` after the probe (``min(0.8 T1, VMQ_RELAY_AGENT_TIMEOUT_S)``, as ProbeRelay), and the hung
  VM is not "unasked": it was asked and timed out, which is evidence.

Agent answers carry the round, nonce, a plausible latency and guest clock, and every 10th round per VM (spread
over rounds by ``vmq.relay.info_due``, as ProbeRelay) the reduced guest info. Channel answers carry a real guest-signed reply: the bytes
``vmq.responder.encode_reply`` writes, with that round's nonce and the VM's key (bench/guests.ReplyMaker,
checked byte for byte against ``encode_reply``). The control queue is bench/guests.py's: ``silence`` stops
a VM's answers and records the instant (Redis time) in ``<injected_key>``; ``revive`` makes it answer again
(a channel VM with a new boot id).
"""

from __future__ import annotations

import heapq
import json
import os
import queue
import time
import uuid
from collections.abc import Mapping
from multiprocessing.synchronize import Event
from typing import Any

from guests import ProcessFleet, ReplyMaker, state_params

from vmq.config import load_settings
from vmq.relay import info_due
from vmq.relay_answers import Answer, agent_answer, channel_answer
from vmq.relay_cover import CoverKeeper
from vmq.responder import parse_probe
from vmq.store.redis import RedisStore

REFRESH_AT_ONCE = 5000  # VMs not relayed yet looked up per refresh while the fleet grows
ANSWERS_PER_FLUSH = 300  # answers one relay gathers in one 50 ms flush (8 threads x 50 ms / 1.3 ms per ping)


def guest_info(vm: str) -> dict[str, object]:
    """A reduced ``guestInfo`` as vmq.hypervisor.types.reduce_guest_info gives it."""
    return {"os_id": "debian", "os_version_id": "12", "hostname": vm,
            "filesystems": [{"mountpoint": "/", "fstype": "ext4", "used_bytes": 2_147_483_648,
                             "total_bytes": 10_737_418_240}]}


class SimulatedHost:
    """One host's relay as Redis sees it: the VMs it relays on ``path`` and their answers per round."""

    def __init__(self, name: str, path: str, vms: list[str], secrets: Mapping[str, str], first: int,
                 every: int) -> None:
        self.name, self.path, self.vms = name, path, vms
        self.every = every  # rounds between two guest-info readings of a VM (vmq.relay.info_every_rounds)
        self.silent: set[str] = set()
        self.active: set[str] = set()  # what its inventory relays: VMs whose record places them here on ``path``
        self.seqs = dict.fromkeys(vms, 0)
        self.keeper = CoverKeeper(name)
        self.makers: dict[str, ReplyMaker] = {}
        if path == "channel":
            for i, vm in enumerate(vms, first):
                self.makers[vm] = ReplyMaker(vm, str(uuid.uuid4()), state_params(i), bytes.fromhex(secrets[vm]))
                self.makers[vm].check()

    def revive(self, vm: str) -> None:
        """Answer again; a channel guest comes back with a new boot id (a restart)."""
        self.silent.discard(vm)
        if vm in self.makers:
            old = self.makers[vm]
            self.makers[vm] = ReplyMaker(vm, str(uuid.uuid4()), old.params, old.key)
            self.makers[vm].check()

    def answers(self, round_id: int, nonce: str, guest_ms: int) -> list[Answer]:
        """This round's answers of the VMs that are not hung."""
        out: list[Answer] = []
        if self.path == "agent":
            for i, vm in enumerate(self.vms):
                if vm in self.active and vm not in self.silent:
                    with_info = info_due(vm, round_id, self.every)
                    out.append(agent_answer(vm, round_id, nonce, 1.1 + (i % 9) * 0.05, guest_ms,
                                            guest_info(vm) if with_info else None))
            return out
        nonce_json = json.dumps(nonce).encode()
        for vm in self.vms:
            if vm in self.active and vm not in self.silent:
                self.seqs[vm] += 1
                message, signature = self.makers[vm].make(round_id, nonce_json, self.seqs[vm], guest_ms)
                out.append(channel_answer(vm, message, signature))
        return out


def serve(url: str, namespace: str, path: str, placement: dict[str, list[str]], first: dict[str, int],
          secrets: dict[str, str], injected_key: str, timeout_s: float, form: str, info_every: int, control: Any,
          ready: Event, stop: Event, results: Any) -> None:
    """Process entry point (spawn): play the hosts of ``placement`` until ``stop`` is set, then report counters."""
    os.nice(int(os.environ.get("VMQ_BENCH_GUEST_NICE", "0")))
    settings = load_settings({"redis_url": url, "namespace": namespace})
    store = RedisStore.from_url(url, settings.keys, settings.events_maxlen)
    hosts = {name: SimulatedHost(name, path, vms, secrets, first[name], info_every)
             for name, vms in placement.items()}
    owner = {vm: host for host in hosts.values() for vm in host.vms}
    feed = store.relays.subscribe_probes()
    ready.set()
    every_s, next_refresh = settings.inventory_interval_s, 0.0
    marks: list[tuple[float, int, str]] = []  # (due monotonic s, round, host): finish marks after a timeout
    covering = path == "agent" and form == "cover"
    rounds = answers_n = batches = 0
    while not stop.is_set():
        while True:  # control first: a silence that arrives with a probe already applies to it
            try:
                command, vm = control.get_nowait()
            except queue.Empty:
                break
            host = owner[vm]
            if command == "silence":
                host.silent.add(vm)
                store.client.hset(injected_key, vm, store.clock.time_ms())
            elif command == "revive":
                host.revive(vm)
        if time.monotonic() >= next_refresh:  # ProbeRelay.refresh: the VMs the store places here, on this path
            # While VMs are still being registered (--warmup-step, in index order), look again soon at the next
            # ones not relayed yet, or they would be judged silent (boot grace 0); then every inventory interval.
            waiting = [vm for host in hosts.values() for vm in host.vms if vm not in host.active]
            waiting.sort()
            look = waiting[:REFRESH_AT_ONCE] if waiting else list(owner)
            for placed in store.vms.placements(look):
                host = owner[placed.vm]
                if placed.exists and placed.host == host.name and placed.probe_path.value == path:
                    host.active.add(placed.vm)
                else:
                    host.active.discard(placed.vm)
            next_refresh = time.monotonic() + (0.25 if waiting else every_s)
        while marks and marks[0][0] <= time.monotonic():
            _, round_id, name = heapq.heappop(marks)
            fields = hosts[name].keeper.fields(round_id) if covering else None
            if fields is not None or not covering:
                store.relays.append(name, [], round_id, [], cover=fields)
                batches += 1
        wait_s = 0.02 if not marks else max(0.0, min(0.02, marks[0][0] - time.monotonic()))
        raw = feed.get(wait_s)
        if raw is None:
            continue
        try:
            round_id, nonce, _sent_ms = parse_probe(raw)
        except ValueError:
            continue
        heard_s, rounds = time.monotonic(), rounds + 1
        now_ms = store.clock.time_ms()
        for host in hosts.values():
            answers = host.answers(round_id, nonce, now_ms)
            answers_n += len(answers)
            if covering:  # one cover entry: final now, or partial now and final at the hung VM's timeout
                host.keeper.start(round_id, nonce, sorted(host.active))
                for answer in answers:
                    host.keeper.answered(str(answer["vm"]), round_id, answer)
                fields = host.keeper.fields(round_id)
                assert fields is not None
                hung = bool(host.silent & host.active)
                store.relays.append(host.name, [], None if hung else round_id, [], cover=fields)
                host.keeper.written(fields)
                batches += 1
                if hung:
                    heapq.heappush(marks, (heard_s + timeout_s, round_id, host.name))
                continue
            chunks = [answers[i:i + ANSWERS_PER_FLUSH] for i in range(0, len(answers), ANSWERS_PER_FLUSH)] or [[]]
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                if last and not host.silent:
                    store.relays.append(host.name, chunk, round_id, [])
                elif chunk:
                    store.relays.append(host.name, chunk)
                batches += bool(chunk) or last
            if host.silent:
                heapq.heappush(marks, (heard_s + timeout_s, round_id, host.name))
        pipe = store.client.pipeline(transaction=False)  # each relay renews relay_seen_ms per round handled
        for name in hosts:
            pipe.hset(settings.keys.host(name), "relay_seen_ms", str(now_ms))
        pipe.execute()
    feed.close()
    results.put({"hosts": len(hosts), "rounds": rounds, "answers": answers_n, "batches": batches,
                 "cpu_s": time.process_time()})
    store.client.close()


class HostFleet(ProcessFleet):
    """The simulated hosts of one run, spread over ``procs`` processes."""

    KIND = "host"
    START_TIMEOUT_S = 120.0

    def __init__(self, url: str, namespace: str, path: str, placement: dict[str, list[str]],
                 secrets: Mapping[str, str], injected_key: str, timeout_s: float, procs: int,
                 form: str = "cover", info_every: int = 30) -> None:
        names = sorted(placement)
        parts = [names[p::procs] for p in range(procs) if names[p::procs]]
        index = {vm: i for vms in placement.values() for i, vm in enumerate(vms)}
        super().__init__(len(parts), {vm: p for p, part in enumerate(parts) for host in part for vm in placement[host]})
        for part in parts:
            mine = {host: placement[host] for host in part}
            first = {host: index[vms[0]] if vms else 0 for host, vms in mine.items()}
            keys = {vm: secrets[vm] for vms in mine.values() for vm in vms if vm in secrets}
            self._add(serve, (url, namespace, path, mine, first, keys, injected_key, timeout_s, form, info_every))
