"""Per-host cover of agent VMs in Redis (docs/protocol.md, "Cover entries"; vmq/lua/relay_cover.lua).

A covered VM's ``last_round`` is COVERED_ROUND: the round its host's latest cover entry was applied for stands
for it. So a round costs Redis and the monitor O(hosts + changes), not O(VMs). Whatever reads a VM's last answered
round or arrival resolves a covered VM through its owner here; a host whose entry for a round has not arrived
by that round's deadline leaves its covered VMs silent for that round (``late``), with its relay not finished,
so their silence is no evidence (host liveness decides, vmq.judge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import redis

from vmq.keys import Keys
from vmq.model import WIRE_VERSION_RELAYED, ProbePath, RejectReason
from vmq.relayed import COVERED_ROUND, MAX_AGENT_DOC_BYTES, AgentBatchResult, CoverBatch
from vmq.store.client import StorePart, translate_errors
from vmq.store.client import text as _text

#: Rounds of relay finish marks kept behind the newest one written (as vmq.store.replies.RELAY_ROUNDS_KEPT).
MARKS_KEPT = 256


def parse_covers(raw: Any) -> tuple[int, int, int]:
    """(round, arrival ms, base round) of one ``relay_covers`` value ("<round> <arrival> <base> <final>"); zeros
    when absent or unreadable."""
    parts = _text(raw).split() if raw else []
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return 0, 0, 0


def saved_documents(batch: CoverBatch, refused: dict[str, tuple[int, str]]) -> bytes:
    """The answer documents to save (``<ns>:last:reply``) from a cover entry's state parameters, as "<vm> <JSON>"
    lines for relay_cover.lua (which saves those of VMs the host vouches answered); a malformed ``s`` or an
    oversized document is counted in ``refused`` (reason -> count, first VM)."""

    def refuse(reason: str, vm: str) -> None:
        count, first = refused.get(reason, (0, vm))
        refused[reason] = (count + 1, first)

    try:
        by_vm = orjson.loads(batch.params)
    except orjson.JSONDecodeError:
        by_vm = None
    if not isinstance(by_vm, dict):
        refuse(RejectReason.MALFORMED.value, "")
        return b""
    lines = []
    # {"v":1,"via":"agent","host":…,"round":…,"vm":…,"params":{…}}, put together around each VM's parameters (a
    # valid name needs no escaping): one encoding per VM instead of a dict and its encoding.
    head = b'{"v":%d,"via":"%s","host":%s,"round":%d,"vm":"' % (
        WIRE_VERSION_RELAYED, ProbePath.AGENT.value.encode(), orjson.dumps(batch.host), batch.round)
    for vm, params in by_vm.items():
        # The name only has to keep the line format (no space, no line break): Redis saves the document only for
        # a VM this host covers, whose name is a valid one.
        if not isinstance(params, dict) or not vm or " " in vm or "\n" in vm or "\r" in vm:
            refuse(RejectReason.MALFORMED.value, "")
            continue
        doc = head + vm.encode() + b'","params":' + orjson.dumps(params) + b"}"
        if len(doc) > MAX_AGENT_DOC_BYTES:
            refuse(RejectReason.OVERSIZED.value, vm)
            continue
        lines.append(vm.encode() + b" " + doc)
    return b"\n".join(lines)


class RedisCovers(StorePart):
    """The cover state: applying hosts' cover entries, releasing VMs from it, resolving covered VMs."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__(client, keys)
        self._apply = self._script("relay_cover.lua")
        self._release = self._script("cover_release.lua")

    def apply(self, batches: Sequence[CoverBatch]) -> AgentBatchResult:
        """Apply cover entries (round and nonce already checked) in stream order, in one script call: accepted
        counts the covered VMs that answered, stale the entries not newer than their host's applied round."""
        if not batches:
            return AgentBatchResult()
        k = self.keys
        cover, pending, silent = k.relay_cover_prefixes()
        args: list[Any] = [k.vm_prefix, cover, pending, silent, int(COVERED_ROUND), MARKS_KEPT]
        refused: dict[str, tuple[int, str]] = {}
        for b in batches:
            docs = saved_documents(b, refused) if b.params else b""
            args += [b.host, b.round, b.arrival_ms, b.base, "1" if b.listing is not None else "0",
                     b.listing or b"", b.silent, " ".join(b.unasked), docs, "1" if b.final else "0"]
        with translate_errors("apply cover entries"):
            _applied, stale, answers, lua_refused, healing = self._apply(
                keys=[k.last_round, k.last_seen, k.last_reply, k.attention, k.relay_covers, k.relay_cover_owner,
                      k.relay_rounds, k.relay_unasked], args=args)
        result = AgentBatchResult(accepted=int(answers), stale=int(stale), rejects=refused)
        for i in range(0, len(lua_refused), 3):
            reason, count, first = _text(lua_refused[i]), int(lua_refused[i + 1]), _text(lua_refused[i + 2])
            mine = result.rejects.get(reason)
            result.rejects[reason] = (count, first) if mine is None else (mine[0] + count, mine[1])
        for i in range(0, len(healing), 3):
            result.healing.append((_text(healing[i]), int(healing[i + 1]), int(healing[i + 2])))
        return result

    def release(self, vms: Sequence[str], mark: float | None = None, client: Any = None) -> Any:
        """Take ``vms`` out of their hosts' cover: each gets ``mark`` as its last round (a restart's fresh
        start), or without one the round its host last vouched for. Their host's next entry vouches for them
        again. ``client``: a pipeline to queue on."""
        k = self.keys
        cover, pending, silent = k.relay_cover_prefixes()
        args: list[Any] = [pending, cover, silent, int(COVERED_ROUND), "" if mark is None else repr(float(mark)),
                           *vms]
        with translate_errors("release cover"):
            return self._release(keys=[k.last_round, k.last_seen, k.relay_covers, k.relay_cover_owner], args=args,
                                 client=client)

    def resolve(self, vms: Sequence[str], rounds: Sequence[float | None]) -> dict[str, tuple[int, int]]:
        """For the VMs whose ``rounds`` (their ``last_round`` scores) say covered: (round, arrival ms) their host
        last vouched for."""
        covered = [vm for vm, r in zip(vms, rounds, strict=True) if r is not None and r >= COVERED_ROUND]
        if not covered:
            return {}
        k = self.keys
        with translate_errors("resolve covered VMs"):
            owners = [_text(o) if o else "" for o in self.r.hmget(k.relay_cover_owner, covered)]
            hosts = sorted({o for o in owners if o})
            states = dict(zip(hosts, self.r.hmget(k.relay_covers, hosts))) if hosts else {}
        out: dict[str, tuple[int, int]] = {}
        for vm, host in zip(covered, owners, strict=True):
            r, arrival, _ = parse_covers(states.get(host))
            out[vm] = (r, arrival)
        return out

    def host_states(self, hosts: Sequence[str]) -> dict[str, dict[str, int | bool]]:
        """Per host with a cover (``vmq hosts``): its latest applied round and listing base, whether that entry
        was final, and how many VMs it covers, of which silent, and how many it lists that Redis could not vouch
        for (pending)."""
        k = self.keys
        names = list(hosts)
        if not names:
            return {}
        with translate_errors("cover states"):
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(k.relay_covers, names)
            for host in names:
                pipe.scard(k.relay_cover(host))
                pipe.scard(k.relay_cover_silent(host))
                pipe.scard(k.relay_cover_pending(host))
            out = pipe.execute()
        states: dict[str, dict[str, int | bool]] = {}
        for i, host in enumerate(names):
            raw = out[0][i]
            if not raw:
                continue
            r, _, base = parse_covers(raw)
            covered, silent, pending = out[1 + 3 * i: 4 + 3 * i]
            states[host] = {"round": r, "base": base, "final": _text(raw).endswith(" 1"),
                            "covered": int(covered), "silent": int(silent), "pending": int(pending)}
        return states

    def late(self, round_id: int) -> dict[str, int]:
        """Covered VMs whose host's applied round is older than ``round_id``: silent for it, with the round their
        host last vouched for (their silence is no evidence unless their relay finished the round: vmq.judge)."""
        k = self.keys
        with translate_errors("late covers"):
            states = {_text(h): parse_covers(v) for h, v in self.r.hgetall(k.relay_covers).items()}
            late = sorted(h for h, (r, _, _) in states.items() if r < round_id)
            if not late:
                return {}
            pipe = self.r.pipeline(transaction=False)
            for host in late:
                pipe.smembers(k.relay_cover(host))
                pipe.smembers(k.relay_cover_silent(host))
            rows = pipe.execute()
            out: dict[str, int] = {}
            for i, host in enumerate(late):
                silent = rows[2 * i + 1]
                candidates = [_text(vm) for vm in rows[2 * i] if vm not in silent]
                if not candidates:
                    continue
                owners = self.r.hmget(k.relay_cover_owner, candidates)
                for vm, owner in zip(candidates, owners, strict=True):
                    if owner and _text(owner) == host:
                        out[vm] = states[host][0]
        return out
