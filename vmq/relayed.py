"""Decoding the host agents' batches of relayed answers (``<ns>:relayed``) into verified answers (pure).

A batch is trusted as far as its host is: only host workers may write the stream (the guests' ACL cannot), and a
host vouches only for VMs whose record places them on it and whose probe path is the one it relayed on. A
``channel`` answer is still the guest's own signed reply, verified exactly as on the ``redis`` path; an
``agent`` answer carries the round and nonce the host asked with. Every answer in a batch arrived when the
batch did: its stream id, in Redis time.

Agent answers come compact (``q`` round, ``n`` nonce, ``k`` the VMs that answered, ``s`` state parameters of
some): the round and nonce are checked here once per batch, and the VMs are vouched for and recorded by Redis
itself (vmq/lua/relay_apply.lua), so the monitor's cost is per batch, not per VM (docs/performance.md). The
older form, one object per agent answer in ``a``, is still read (hosts not yet upgraded).

A host's relay now writes its agent VMs as one cover entry per round instead (``c``, ``x`` and at times ``f``):
the VMs it asked that did not answer, relative to its latest full listing; Redis keeps the others covered
(vmq/lua/relay_cover.lua), so a round costs O(hosts + changes) centrally (docs/protocol.md, "Cover entries").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from vmq.codec import RawEntry, ReplyVerifier, RoundBook, Verified
from vmq.errors import CodecError
from vmq.keys import Keys, valid_name
from vmq.model import WIRE_VERSION_RELAYED, ProbePath, RejectReason, VmPlacement, VmRecord

#: A batch larger than this is refused whole (a host splits its batches well below it: vmq.store.relays).
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: An agent answer's ``info`` larger than this (JSON bytes) is dropped from the answer, which still counts.
MAX_INFO_BYTES = 4096
#: A compact batch's saved answer document (state parameters included) larger than this is not saved.
MAX_AGENT_DOC_BYTES = MAX_INFO_BYTES + 512
#: A covered VM's ``last_round``: its host's applied round stands for it (vmq.store.covers resolves it). Far above
#: any round, so ZADD GT of a real round never lowers it and ``silent_since`` never lists it.
COVERED_ROUND = float(1 << 50)

_new_verified = tuple.__new__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v if isinstance(v, bytes) else str(v).encode()
                for k, v in raw.items()}
    return dict(zip(raw[::2], raw[1::2], strict=False))


@dataclass(frozen=True)
class AgentBatch:
    """A compact batch's agent answers: ``names`` (space-separated, as written) answered ``round``, all arriving
    at ``arrival_ms``; ``params`` the state parameters of some of them (a JSON object vm -> params, or b"")."""

    host: str
    round: int
    arrival_ms: int
    names: bytes
    params: bytes = b""


@dataclass
class AgentBatchResult:
    """What recording compact agent batches did: answers that counted, answers to a round not newer than the
    VM's last, refusals per reason (count, first VM), and (vm, round, arrival) of VMs in attention that answered."""

    accepted: int = 0
    stale: int = 0
    rejects: dict[str, tuple[int, str]] = field(default_factory=dict)
    healing: list[tuple[str, int, int]] = field(default_factory=list)

    def merge(self, other: AgentBatchResult) -> None:
        """Add ``other``'s counts, refusals and VMs to heal to these."""
        self.accepted += other.accepted
        self.stale += other.stale
        for reason, (count, vm) in other.rejects.items():
            mine = self.rejects.get(reason)
            self.rejects[reason] = (count, vm) if mine is None else (mine[0] + count, mine[1])
        self.healing += other.healing


@dataclass(frozen=True)
class CoverBatch:
    """A cover entry: ``host`` finished ``round`` (nonce checked); of the agent VMs it asks, ``silent`` (space-
    separated) did not answer and ``unasked`` could not be asked; the others answered, arriving at
    ``arrival_ms``. ``listing`` is the full list of the VMs it asks (then ``base`` is ``round``) or None: the
    entry is relative to the listing of round ``base``."""

    host: str
    round: int
    arrival_ms: int
    base: int
    listing: bytes | None
    silent: bytes
    unasked: tuple[str, ...] = ()
    params: bytes = b""
    final: bool = True  # it carries the round's finish mark (False: a partial entry, calls still running)


@dataclass(frozen=True)
class Batch:
    """One host's batch as read: its answers, and the round it finished (0: none) with the VMs left unasked;
    ``agent`` the compact agent answers it carries, with their nonce."""

    host: str
    arrival_ms: int
    answers: list[dict[str, Any]]
    finished_round: int = 0
    unasked: tuple[str, ...] = ()
    agent: AgentBatch | None = None
    agent_nonce: str = ""
    cover: CoverBatch | None = None


@dataclass
class Decoded:
    """What a read of the relayed stream yields: answers that count, rejects, the (host, round) pairs the hosts'
    relays finished, and per VM the latest round its host could not ask it."""

    accepted: list[Verified] = field(default_factory=list)
    rejected: list[CodecError] = field(default_factory=list)
    finished: dict[str, int] = field(default_factory=dict)  # "<host>|<round>" -> round
    unasked: dict[str, int] = field(default_factory=dict)
    agent: list[AgentBatch] = field(default_factory=list)  # compact agent answers, round and nonce checked
    cover: list[CoverBatch] = field(default_factory=list)  # cover entries, round and nonce checked


def parse_batch(entry: RawEntry, max_bytes: int = MAX_BATCH_BYTES) -> Batch:
    """One stream entry as a Batch; raises CodecError(malformed/oversized)."""
    entry_id, raw = entry[0], entry[1]
    fields = _fields(raw)
    host, body, names, base = fields.get(b"h"), fields.get(b"a"), fields.get(b"k"), fields.get(b"c")
    if not host or (body is None and names is None and base is None) or not valid_name(_text(host)):
        raise CodecError(RejectReason.MALFORMED.value, "relayed batch without a valid host (h) and answers (a/k/c)")
    size = sum(len(value) for value in fields.values())
    if size > max_bytes:
        raise CodecError(RejectReason.OVERSIZED.value, f"relayed batch of {size} bytes")
    answers: Any = []
    if body is not None:
        try:
            answers = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise CodecError(RejectReason.MALFORMED.value, f"relayed batch is not JSON: {exc}") from None
        if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
            raise CodecError(RejectReason.MALFORMED.value, "relayed batch is not a list of objects")
    arrival_ms = int(_text(entry_id).partition("-")[0])
    agent, nonce = None, ""
    if names is not None:
        round_field, nonce_field = fields.get(b"q"), fields.get(b"n")
        try:
            agent_round = int(round_field) if round_field is not None else 0
        except ValueError:
            agent_round = 0
        if agent_round <= 0 or not nonce_field:
            raise CodecError(RejectReason.MALFORMED.value, "compact agent answers without a round (q) and nonce (n)")
        agent = AgentBatch(_text(host), agent_round, arrival_ms, names, fields.get(b"s", b""))
        nonce = _text(nonce_field)
    finished, unasked = fields.get(b"r"), fields.get(b"u")
    round_id: int = 0
    left: list[Any] = []
    if finished is not None:
        try:
            round_id = int(finished)
            left = orjson.loads(unasked) if unasked is not None else []
        except (ValueError, orjson.JSONDecodeError):
            raise CodecError(RejectReason.MALFORMED.value, "relayed batch with a bad round mark (r/u)") from None
        if round_id <= 0 or not isinstance(left, list) or not all(isinstance(v, str) for v in left):
            raise CodecError(RejectReason.MALFORMED.value, "relayed batch with a bad round mark (r/u)")
    cover = None
    if base is not None:
        cover, nonce = _cover(fields, _text(host), arrival_ms, base, round_id, tuple(left))
        round_id, left = 0, []  # the cover's round is marked finished by Redis when it applies it
    return Batch(_text(host), arrival_ms, answers, round_id, tuple(left), agent, nonce, cover)


def _cover(fields: Mapping[bytes, bytes], host: str, arrival_ms: int, base: bytes, finished: int,
           unasked: tuple[str, ...]) -> tuple[CoverBatch, str]:
    """The cover entry of a batch's fields, with its nonce; raises CodecError(malformed)."""
    round_field, nonce = fields.get(b"q"), fields.get(b"n")
    try:
        round_id, base_round = int(round_field or b"0"), int(base)
    except ValueError:
        round_id = base_round = 0
    listing = fields.get(b"f")
    if round_id <= 0 or base_round <= 0 or not nonce or finished not in (0, round_id) or (
            listing is not None and base_round != round_id) or base_round > round_id:
        raise CodecError(RejectReason.MALFORMED.value, "cover entry without a consistent round (q), nonce (n), "
                                                       "base (c) and finish mark (r, if any)")
    for names in (listing, fields.get(b"x")):
        if names is not None and not all(valid_name(vm) for vm in _text(names).split()):
            raise CodecError(RejectReason.MALFORMED.value, "cover entry naming an invalid VM")
    if not all(valid_name(vm) for vm in unasked):
        raise CodecError(RejectReason.MALFORMED.value, "cover entry naming an invalid VM")
    return CoverBatch(host, round_id, arrival_ms, base_round, listing, fields.get(b"x", b""), unasked,
                      fields.get(b"s", b""), finished == round_id), _text(nonce)


class RelayedAnswers:
    """Every answer of relayed entries read in stream order, as objects: compact agent answers expanded, and
    cover entries expanded against the latest full listing seen of their host (an entry relative to a listing not
    seen yields none), with their state parameters where the entry carries them. For tests, benchmarks and the
    operator's eye, not the hot path."""

    def __init__(self) -> None:
        self.listings: dict[str, tuple[int, list[str]]] = {}  # host -> (round, VMs) of its latest full listing

    def answers(self, entry: RawEntry) -> list[dict[str, Any]]:
        """The answers of the next entry."""
        batch = parse_batch(entry)
        out = list(batch.answers)
        if batch.agent is not None:
            out += _expanded(batch.agent.names.decode().split(), batch.agent.round, batch.agent_nonce,
                             batch.agent.params)
        cover = batch.cover
        if cover is not None:
            if cover.listing is not None:
                self.listings[cover.host] = (cover.round, cover.listing.decode().split())
            base = self.listings.get(cover.host)
            if base is not None and base[0] == cover.base:
                silent = set(cover.silent.decode().split()) | set(cover.unasked)
                out += _expanded([vm for vm in base[1] if vm not in silent], cover.round, batch.agent_nonce,
                                 cover.params)
        return out


def _expanded(vms: Sequence[str], round_id: int, nonce: str, raw_params: bytes) -> list[dict[str, Any]]:
    params = orjson.loads(raw_params) if raw_params else {}
    out = []
    for vm in vms:
        answer: dict[str, Any] = {"vm": vm, "p": ProbePath.AGENT.value, "round": round_id, "nonce": nonce}
        answer.update(params.get(vm, {}) if isinstance(params, dict) else {})
        out.append(answer)
    return out


def batch_answers(entry: RawEntry) -> list[dict[str, Any]]:
    """Every answer of one stream entry as an object (RelayedAnswers, without the listings of earlier entries)."""
    return RelayedAnswers().answers(entry)


def _agent_answer(host: str, answer: Mapping[str, Any], arrival_ms: int, book: RoundBook) -> Verified:
    vm, round_id, nonce = answer["vm"], answer.get("round"), answer.get("nonce")
    if type(round_id) is not int or not isinstance(nonce, str):
        raise CodecError(RejectReason.MALFORMED.value, "agent answer without round/nonce", vm)
    try:
        book.check(round_id, nonce, arrival_ms)
    except CodecError as exc:
        raise CodecError(exc.reason, exc.detail, vm) from None
    info = answer.get("info")
    params: dict[str, Any] = {}
    for name in ("latency_ms", "guest_ms"):
        if isinstance(answer.get(name), (int, float)) and not isinstance(answer.get(name), bool):
            params[name] = answer[name]
    if isinstance(info, dict):
        packed = orjson.dumps(info)
        if len(packed) <= MAX_INFO_BYTES:
            params["guest"] = info
    message = orjson.dumps({"v": WIRE_VERSION_RELAYED, "vm": vm, "round": round_id, "via": ProbePath.AGENT.value,
                            "host": host, "params": params})
    return _new_verified(Verified, (vm, round_id, arrival_ms, "", message, False))


def decode_batches(entries: Sequence[RawEntry],
                   records: Callable[[Sequence[str]], Mapping[str, VmRecord | VmPlacement]],
                   verifier: ReplyVerifier, secrets: Mapping[str, bytes], book: RoundBook, max_reply_bytes: int,
                   previous: Mapping[str, tuple[bytes, int]] | None = None) -> Decoded:
    """The answers of ``entries`` that count (stream order), a CodecError per answer (or batch) that does not,
    and the rounds the hosts finished. ``records`` gives the records of the VMs named (one call per read)."""
    out = Decoded()
    batches: list[tuple[RawEntry, Batch]] = []
    named: set[str] = set()
    for entry in entries:
        try:
            batch = parse_batch(entry)
        except CodecError as exc:
            out.rejected.append(exc)
            continue
        batches.append((entry, batch))
        named.update(a["vm"] for a in batch.answers if isinstance(a.get("vm"), str))
        named.update(batch.unasked)
    by_vm = records(sorted(named)) if named else {}
    for entry, batch in batches:
        host = batch.host
        signed: list[RawEntry] = []  # channel answers: the guests' own replies, verified below
        vouched: set[str] = set()
        for answer in batch.answers:
            vm, path = answer.get("vm"), answer.get("p")
            if not isinstance(vm, str) or not valid_name(vm) or path not in (ProbePath.CHANNEL.value,
                                                                            ProbePath.AGENT.value):
                out.rejected.append(CodecError(RejectReason.MALFORMED.value,
                                               f"relayed by {host}: answer without vm/path"))
                continue
            rec = by_vm.get(vm)
            if rec is None or not rec.exists:
                out.rejected.append(CodecError(RejectReason.UNKNOWN_VM.value, f"{vm!r} relayed by {host}"))
            elif rec.host != host:
                out.rejected.append(CodecError(RejectReason.WRONG_HOST.value, f"relayed by {host}, but its record "
                                               f"places it on {rec.host or 'no host'}", vm))
            elif rec.probe_path.value != path:
                out.rejected.append(CodecError(RejectReason.WRONG_PATH.value, f"relayed on the {path} path, but "
                                               f"it is on {rec.probe_path.value}", vm))
            elif path == ProbePath.AGENT.value:
                try:
                    out.accepted.append(_agent_answer(host, answer, batch.arrival_ms, book))
                except CodecError as exc:
                    out.rejected.append(exc)
            else:
                message, signature = answer.get("m"), answer.get("s")
                if not isinstance(message, str) or not isinstance(signature, str):
                    out.rejected.append(CodecError(RejectReason.MALFORMED.value, "channel answer without m/s", vm))
                    continue
                signed.append((entry[0], [b"m", message.encode(), b"s", signature.encode()]))
                vouched.add(vm)
        if signed:
            ok, bad = verifier.verify(signed, secrets, book, max_reply_bytes, previous)
            for reply in ok:
                if reply.vm in vouched:
                    out.accepted.append(reply)
                else:  # a guest's reply signed as another VM, relayed on this VM's socket
                    out.rejected.append(CodecError(RejectReason.WRONG_HOST.value,
                                                   f"signed as {reply.vm}, relayed by {host}", reply.vm))
            out.rejected += bad
        if batch.agent is not None:
            try:
                book.check(batch.agent.round, batch.agent_nonce, batch.arrival_ms)
                out.agent.append(batch.agent)
            except CodecError as exc:  # every VM it names refused, one log line for the batch
                count = len(batch.agent.names.split())
                out.rejected += [CodecError(exc.reason, f"{count} agent answers relayed by {host}: {exc.detail}")]
                out.rejected += [CodecError(exc.reason, exc.detail)] * (count - 1)
        if batch.cover is not None:
            try:
                book.check(batch.cover.round, batch.agent_nonce, batch.arrival_ms)
                out.cover.append(batch.cover)
            except CodecError as exc:
                out.rejected.append(CodecError(exc.reason, f"cover entry of {host}: {exc.detail}"))
        if batch.finished_round:
            out.finished[Keys.relay_round_member(host, batch.finished_round)] = batch.finished_round
            for vm in batch.unasked:  # only for its own VMs: a host cannot excuse another host's VM
                rec = by_vm.get(vm)
                if rec is not None and rec.exists and rec.host == host:
                    out.unasked[vm] = max(out.unasked.get(vm, 0), batch.finished_round)
    return out
