"""Decoding the host agents' batches of relayed answers (``<ns>:relayed``) into verified answers (pure).

A batch is trusted as far as its host is: only host workers may write the stream (the guests' ACL cannot), and a
host vouches only for VMs whose record places them on it and whose probe path is the one it relayed on. A
``channel`` answer is still the guest's own signed reply, verified exactly as on the ``redis`` path; an
``agent`` answer carries the round and nonce the host asked with. Every answer in a batch arrived when the
batch did: its stream id, in Redis time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from vmq.codec import RawEntry, ReplyVerifier, RoundBook, Verified
from vmq.errors import CodecError
from vmq.keys import valid_name
from vmq.model import ProbePath, RejectReason, VmRecord, WIRE_VERSION_RELAYED

#: A batch larger than this is refused whole (a host splits its batches well below it: vmq.store.relays).
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: An agent answer's ``info`` larger than this (JSON bytes) is dropped from the answer, which still counts.
MAX_INFO_BYTES = 4096

_new_verified = tuple.__new__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v if isinstance(v, bytes) else str(v).encode()
                for k, v in raw.items()}
    return dict(zip(raw[::2], raw[1::2], strict=False))


def parse_batch(entry: RawEntry, max_bytes: int = MAX_BATCH_BYTES) -> tuple[str, int, list[dict[str, Any]]]:
    """(host, arrival_ms, answers) of one stream entry; raises CodecError(malformed/oversized)."""
    entry_id, raw = entry[0], entry[1]
    fields = _fields(raw)
    host, body = fields.get(b"h"), fields.get(b"a")
    if not host or body is None or not valid_name(_text(host)):
        raise CodecError(RejectReason.MALFORMED.value, "relayed batch without a valid host (h) and answers (a)")
    if len(body) > max_bytes:
        raise CodecError(RejectReason.OVERSIZED.value, f"relayed batch of {len(body)} bytes")
    try:
        answers = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CodecError(RejectReason.MALFORMED.value, f"relayed batch is not JSON: {exc}") from None
    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
        raise CodecError(RejectReason.MALFORMED.value, "relayed batch is not a list of objects")
    return _text(host), int(_text(entry_id).partition("-")[0]), answers


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


def decode_batches(entries: Sequence[RawEntry], records: Callable[[Sequence[str]], Mapping[str, VmRecord]],
                   verifier: ReplyVerifier, secrets: Mapping[str, bytes], book: RoundBook, max_reply_bytes: int,
                   previous: Mapping[str, tuple[bytes, int]] | None = None,
                   ) -> tuple[list[Verified], list[CodecError]]:
    """The answers of ``entries`` that count, in stream order, and a CodecError per answer (or batch) that
    does not. ``records`` gives the records of the VMs named (one call for the whole read)."""
    parsed: list[tuple[RawEntry, str, int, list[dict[str, Any]]]] = []
    rejected: list[CodecError] = []
    named: set[str] = set()
    for entry in entries:
        try:
            host, arrival_ms, answers = parse_batch(entry)
        except CodecError as exc:
            rejected.append(exc)
            continue
        parsed.append((entry, host, arrival_ms, answers))
        named.update(a["vm"] for a in answers if isinstance(a.get("vm"), str))
    by_vm = records(sorted(named)) if named else {}
    accepted: list[Verified] = []
    for entry, host, arrival_ms, answers in parsed:
        signed: list[RawEntry] = []  # channel answers: the guests' own replies, verified below
        signed_vms: list[str] = []
        for answer in answers:
            vm, path = answer.get("vm"), answer.get("p")
            if not isinstance(vm, str) or not valid_name(vm) or path not in (ProbePath.CHANNEL.value,
                                                                            ProbePath.AGENT.value):
                rejected.append(CodecError(RejectReason.MALFORMED.value, f"relayed by {host}: answer without vm/path"))
                continue
            rec = by_vm.get(vm)
            if rec is None or not rec.exists:
                rejected.append(CodecError(RejectReason.UNKNOWN_VM.value, f"{vm!r} relayed by {host}"))
            elif rec.host != host:
                rejected.append(CodecError(RejectReason.WRONG_HOST.value,
                                           f"relayed by {host}, but its record places it on {rec.host or 'no host'}", vm))
            elif rec.probe_path.value != path:
                rejected.append(CodecError(RejectReason.WRONG_PATH.value,
                                           f"relayed on the {path} path, but it is on {rec.probe_path.value}", vm))
            elif path == ProbePath.AGENT.value:
                try:
                    accepted.append(_agent_answer(host, answer, arrival_ms, book))
                except CodecError as exc:
                    rejected.append(exc)
            else:
                message, signature = answer.get("m"), answer.get("s")
                if not isinstance(message, str) or not isinstance(signature, str):
                    rejected.append(CodecError(RejectReason.MALFORMED.value, "channel answer without m/s", vm))
                    continue
                signed.append((entry[0], [b"m", message.encode(), b"s", signature.encode()]))
                signed_vms.append(vm)
        if signed:
            ok, bad = verifier.verify(signed, secrets, book, max_reply_bytes, previous)
            vouched = set(signed_vms)
            for reply in ok:
                if reply.vm in vouched:
                    accepted.append(reply)
                else:  # a guest's reply signed as another VM, relayed on this VM's socket
                    rejected.append(CodecError(RejectReason.WRONG_HOST.value, f"signed as {reply.vm} on {host}",
                                               reply.vm))
            rejected += bad
    return accepted, rejected
