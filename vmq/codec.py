"""Versioned wire format of probes and replies (docs/protocol.md): encode probes, verify replies.

The guest side of the format (reply encoding and signing) lives in ``vmq.responder`` because that file
must run alone inside guests; this module imports it so both sides share one implementation, and adds
the strict decoder. Decoding raises :class:`vmq.errors.CodecError` whose ``reason`` is a
:class:`vmq.model.RejectReason` value.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets as _secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from vmq.errors import CodecError
from vmq.model import Probe, RejectReason, Reply
from vmq.responder import REPLY_MAC_PREFIX, WIRE_VERSION, encode_reply, reply_signature

__all__ = [
    "REPLY_MAC_PREFIX",
    "WIRE_VERSION",
    "ReplyVerifier",
    "RoundBook",
    "decode_reply",
    "encode_probe",
    "encode_reply",
    "new_nonce",
    "new_secret",
    "reply_signature",
    "stream_id_ms",
]

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def new_nonce() -> str:
    """A fresh 16-byte random nonce as 32 lowercase hex characters."""
    return _secrets.token_hex(16)


def new_secret() -> str:
    """A fresh per-VM HMAC key: 32 random bytes as 64 lowercase hex characters."""
    return _secrets.token_hex(32)


def valid_secret(text: str) -> bool:
    """True when ``text`` is a well-formed VM secret (64 lowercase hex characters)."""
    return bool(_HEX64.fullmatch(text))


def encode_probe(probe: Probe) -> bytes:
    """The JSON bytes published for one round."""
    body = {"v": WIRE_VERSION, "type": "probe", "round": probe.round, "nonce": probe.nonce,
            "sent_ms": probe.sent_ms}
    return json.dumps(body, separators=(",", ":")).encode()


def stream_id_ms(entry_id: bytes | str) -> int:
    """Millisecond part of a Redis stream id (the arrival time in Redis' clock)."""
    if isinstance(entry_id, bytes):
        return int(entry_id.partition(b"-")[0])  # int() parses ASCII digits in bytes: no decode on the hot path
    return int(entry_id.partition("-")[0])


class RoundBook:
    """Recent rounds' nonces and send times, as the monitor recorded them."""

    def __init__(self, rounds: Mapping[int, tuple[str, int]]) -> None:
        self._rounds = dict(rounds)

    @property
    def rounds(self) -> Mapping[int, tuple[str, int]]:
        """Round -> (nonce, sent_ms)."""
        return self._rounds

    def check(self, round_id: int, nonce: str, arrival_ms: int) -> None:
        """Raise CodecError(stale_nonce) unless ``nonce`` is the one sent for ``round_id`` before arrival."""
        known = self._rounds.get(round_id)
        if known is None:
            raise CodecError(RejectReason.STALE_NONCE.value, f"round {round_id} is not a recent round")
        expected, sent_ms = known
        if not hmac.compare_digest(expected, nonce):
            raise CodecError(RejectReason.STALE_NONCE.value, f"nonce does not match round {round_id}")
        if arrival_ms < sent_ms:
            raise CodecError(RejectReason.STALE_NONCE.value, f"reply arrived before round {round_id} was sent")


def _field(fields: Mapping[bytes, bytes], name: bytes) -> bytes:
    value = fields.get(name)
    if not isinstance(value, bytes):
        raise CodecError(RejectReason.MALFORMED.value, f"stream entry has no {name.decode()!r} field")
    return value


def decode_reply(
    entry_id: bytes | str,
    fields: Mapping[bytes, bytes],
    secrets: Mapping[str, bytes],
    rounds: RoundBook,
    max_bytes: int,
    previous: Mapping[str, tuple[bytes, int]] | None = None,
) -> Reply:
    """Verify one reply-stream entry and return it as a Reply; raises CodecError with the reason.

    Checks run cheapest first and never trust a field before the signature has been checked,
    except the VM name that selects the key.
    """
    # The hot path (every reply, every round): checks are inlined rather than helper calls where it pays.
    arrival_ms = stream_id_ms(entry_id)
    message = _field(fields, b"m")
    if len(message) > max_bytes or len(fields) > 4 or sum(map(len, fields.values())) > max_bytes + 256:
        raise CodecError(RejectReason.OVERSIZED.value, f"reply of {len(message)} bytes exceeds {max_bytes}")
    signature = _field(fields, b"s")
    try:
        # orjson: UTF-8 only (never UTF-16/32), no NaN/Infinity, ~4x faster than json on the hot path.
        body = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise CodecError(RejectReason.MALFORMED.value, f"not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CodecError(RejectReason.MALFORMED.value, "reply is not a JSON object")
    version = body.get("v")
    if type(version) is not int or version != WIRE_VERSION:  # not True, not 1.0
        raise CodecError(RejectReason.MALFORMED.value, f"unsupported version {body.get('v')!r}")
    vm = body.get("vm")
    if type(vm) is not str or not vm or len(vm) > 128:
        raise CodecError(RejectReason.MALFORMED.value, "'vm' must be a non-empty string")
    key = secrets.get(vm)
    if key is None:
        raise CodecError(RejectReason.UNKNOWN_VM.value, f"no key for vm {vm!r}")
    try:
        return _verified(vm, key, arrival_ms, message, signature, body, rounds, previous)
    except CodecError as exc:
        exc.vm = vm
        raise


def _verified(vm: str, key: bytes, arrival_ms: int, message: bytes, signature: bytes, body: dict[str, Any],
              rounds: RoundBook, previous: Mapping[str, tuple[bytes, int]] | None) -> Reply:
    """The checks of a reply from a VM that has a key: signature (current or rotated-out), fields, round."""
    try:
        claimed = signature.decode("ascii")
    except UnicodeDecodeError:
        raise CodecError(RejectReason.BAD_SIGNATURE.value, f"vm {vm}: signature is not hex") from None
    previous_key = False
    if not hmac.compare_digest(reply_signature(key, message), claimed):
        # Key rotation: the rotated-out key still verifies until its grace ends (in Redis time).
        old = (previous or {}).get(vm)
        if old is None or arrival_ms > old[1] or not hmac.compare_digest(reply_signature(old[0], message), claimed):
            raise CodecError(RejectReason.BAD_SIGNATURE.value, f"vm {vm}: signature does not verify")
        previous_key = True
    round_id = body.get("round")
    if type(round_id) is not int:  # not a bool, not a float
        raise CodecError(RejectReason.MALFORMED.value, "'round' must be an integer")
    nonce = body.get("nonce")
    if type(nonce) is not str or not _HEX32.fullmatch(nonce):
        raise CodecError(RejectReason.MALFORMED.value, "nonce must be 32 lowercase hex characters")
    boot_id = body.get("boot_id")
    if type(boot_id) is not str or not boot_id or len(boot_id) > 128:
        raise CodecError(RejectReason.MALFORMED.value, "'boot_id' must be a non-empty string")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise CodecError(RejectReason.MALFORMED.value, "'params' must be an object")
    rounds.check(round_id, nonce, arrival_ms)
    return Reply(vm=vm, round=round_id, nonce=nonce, boot_id=boot_id, arrival_ms=arrival_ms, params=params,
                 message=message, previous_key=previous_key)


def _keyed_mac(key: bytes) -> Any:
    """HMAC-SHA256 state with ``key`` and ``REPLY_MAC_PREFIX`` absorbed: CPython's inner OpenSSL object
    (``_hmac``) when it has copy/update/hexdigest (no Python-level wrapper per reply), else the wrapper."""
    mac = hmac.new(key, REPLY_MAC_PREFIX, hashlib.sha256)
    inner = getattr(mac, "_hmac", None)
    return inner if inner is not None and hasattr(inner, "copy") and hasattr(inner, "hexdigest") else mac


_NO_PARAMS: dict[str, Any] = {}  # read only


class Verified(NamedTuple):
    """One verified reply on the hot path; ``arrival_ms`` is Redis' stamp, ``message`` the verified bytes."""

    vm: str
    round: int
    arrival_ms: int
    boot_id: str
    message: bytes
    previous_key: bool  # signed with the VM's rotated-out key, inside its grace period


_new_verified = tuple.__new__  # builds a Verified without NamedTuple's keyword handling (the hot path)
RawEntry = tuple[bytes, list[bytes]] | list[Any]  # an XRANGE entry as Redis sends it: id, [field, value, ...]


class ReplyVerifier:
    """Verifies reply-stream entries in bulk: the monitor's hot path (every reply, every round).

    Each VM's HMAC state is kept with its key and ``REPLY_MAC_PREFIX`` already absorbed, so a reply costs a
    copy, an update and a digest, and entries are taken as Redis sends them (no field dict). The fast path
    accepts an entry only when every check of ``decode_reply`` passes; anything else (a wrong field, a key
    in rotation, garbage) goes through ``decode_reply``, which accepts it or says why not: same verdicts,
    same reasons.
    """

    def __init__(self) -> None:
        self._keys: Mapping[str, bytes] | None = None  # the key table the MAC states below were built from
        self._macs: dict[str, Any] = {}

    def verify(self, entries: list[RawEntry], secrets: Mapping[str, bytes], book: RoundBook, max_bytes: int,
               previous: Mapping[str, tuple[bytes, int]] | None = None,
               ) -> tuple[list[Verified], list[CodecError]]:
        """The entries that verify, in stream order, and a CodecError per entry that does not."""
        if secrets is not self._keys:  # a key was added, removed or rotated: start again, lazily
            self._keys, self._macs = secrets, {}
        macs, rounds = self._macs, book.rounds
        accepted: list[Verified] = []
        rejected: list[CodecError] = []
        loads, same = orjson.loads, hmac.compare_digest
        for entry_id, fields in entries:
            try:  # every check of decode_reply; any doubt (or exception) leaves it to decode_reply below
                if len(fields) == 4 and fields[0] == b"m" and fields[2] == b"s":
                    message, signature = fields[1], fields[3]
                    if len(message) <= max_bytes and len(signature) == 64:
                        body = loads(message)
                        if type(body) is dict and type(body.get("v")) is int and body["v"] == WIRE_VERSION:
                            vm = body["vm"]  # KeyError or an unhashable name: decode_reply below
                            mac = macs.get(vm)  # only names decode_reply accepts get one (below)
                            if mac is None and type(vm) is str and 0 < len(vm) <= 128 and vm in secrets:
                                mac = macs[vm] = _keyed_mac(secrets[vm])
                            if mac is not None:
                                check = mac.copy()
                                check.update(message)
                                round_id, nonce, boot_id = body["round"], body["nonce"], body["boot_id"]
                                known = rounds.get(round_id) if type(round_id) is int else None
                                arrival_ms = int(entry_id.partition(b"-")[0])
                                if (known is not None and same(check.hexdigest(), signature.decode("ascii"))
                                        and nonce == known[0] and arrival_ms >= known[1]  # vmq's own nonce: 32 hex
                                        and type(boot_id) is str and 0 < len(boot_id) <= 128
                                        and type(body.get("params", _NO_PARAMS)) is dict):
                                    accepted.append(_new_verified(Verified, (vm, round_id, arrival_ms, boot_id, message, False)))
                                    continue
            except Exception:  # noqa: BLE001,S110 - the strict decoder below gives the reason
                pass
            try:
                as_dict = dict(zip(fields[::2], fields[1::2], strict=False)) if isinstance(fields, list) else fields
                reply = decode_reply(entry_id, as_dict, secrets, book, max_bytes, previous)
            except CodecError as exc:
                rejected.append(exc)
                continue
            accepted.append(Verified(reply.vm, reply.round, reply.arrival_ms, reply.boot_id, reply.message,
                                     reply.previous_key))
        return accepted, rejected
