"""The wire format seen from the monitor: encode probes, verify signed replies into Reply or a reject reason."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from vmq.codec import (
    WIRE_VERSION,
    RoundBook,
    decode_reply,
    encode_probe,
    encode_reply,
    new_nonce,
    new_secret,
    reply_signature,
    stream_id_ms,
    valid_secret,
)
from vmq.errors import CodecError
from vmq.model import Probe, RejectReason, Reply
from vmq.responder import parse_probe

KEY_WEB1 = bytes.fromhex("11" * 32)
KEY_WEB2 = bytes.fromhex("22" * 32)
SECRETS = {"web-1": KEY_WEB1, "web-2": KEY_WEB2}
NONCE_7 = "0123456789abcdef0123456789abcdef"
NONCE_8 = "fedcba9876543210fedcba9876543210"
SENT_7_MS = 1_764_102_345_000
SENT_8_MS = SENT_7_MS + 2_000
BOOK = RoundBook({7: (NONCE_7, SENT_7_MS), 8: (NONCE_8, SENT_8_MS)})
ARRIVAL_MS = SENT_7_MS + 150
ENTRY_ID = f"{ARRIVAL_MS}-3".encode()
MAX_BYTES = 1024
BOOT_ID = "0c6e5b1e-2f0e-4c1b-9f4a-1d2e3f405060"
PARAMS = {"load": [0.5, 0.25, 0.125], "uptime_s": 81.5, "health": {"sshd": {"status": 0, "age_s": 1.2}}}


def good_body(**changes: Any) -> dict[str, Any]:
    """The JSON object a correct guest sends for round 7; ``...`` as a value drops that field."""
    body = {"v": WIRE_VERSION, "vm": "web-1", "round": 7, "nonce": NONCE_7, "boot_id": BOOT_ID, "seq": 3,
            "guest_ms": SENT_7_MS + 90, "params": PARAMS}
    body.update(changes)
    return {name: value for name, value in body.items() if value is not ...}


def signed(body: dict[str, Any], key: bytes = KEY_WEB1) -> dict[bytes, bytes]:
    """Stream fields for ``body``, validly signed with ``key`` (so only the checked property is wrong)."""
    message = json.dumps(body, separators=(",", ":")).encode()
    return {b"m": message, b"s": reply_signature(key, message).encode()}


def guest_fields(vm: str = "web-1", round_id: int = 7, nonce: str = NONCE_7, key: bytes = KEY_WEB1,
                 params: dict[str, Any] | None = None) -> dict[bytes, bytes]:
    """What the guest-side encoder (the responder's own function) puts into the reply stream."""
    message, signature = encode_reply(vm, round_id, nonce, BOOT_ID, 3, PARAMS if params is None else params,
                                      key, guest_ms=SENT_7_MS + 90)
    return {b"m": message, b"s": signature.encode()}


def decode(fields: dict[bytes, bytes], entry_id: bytes | str = ENTRY_ID, book: RoundBook = BOOK,
           max_bytes: int = MAX_BYTES) -> Reply:
    return decode_reply(entry_id, fields, SECRETS, book, max_bytes)


def rejection(fields: dict[bytes, bytes], **kwargs: Any) -> str:
    with pytest.raises(CodecError) as caught:
        decode(fields, **kwargs)
    return caught.value.reason


# ---------------------------------------------------------------- valid replies
def test_a_valid_reply_decodes_to_a_reply_whose_arrival_is_the_stream_id_time() -> None:
    fields = guest_fields()
    reply = decode(fields)
    assert reply == Reply(vm="web-1", round=7, nonce=NONCE_7, boot_id=BOOT_ID, arrival_ms=ARRIVAL_MS,
                          params=PARAMS, message=fields[b"m"])


def test_the_guest_clock_does_not_change_the_arrival_time() -> None:
    far_future = good_body(guest_ms=SENT_7_MS + 10_000_000)
    assert decode(signed(far_future)).arrival_ms == ARRIVAL_MS


def test_a_valid_reply_is_accepted_with_a_str_stream_id_too() -> None:
    assert decode(guest_fields(), entry_id=f"{ARRIVAL_MS}-0").arrival_ms == ARRIVAL_MS


def test_a_reply_to_the_newer_of_two_recent_rounds_decodes_with_that_round() -> None:
    reply = decode(guest_fields(round_id=8, nonce=NONCE_8), entry_id=f"{SENT_8_MS + 1}-0")
    assert (reply.round, reply.nonce, reply.arrival_ms) == (8, NONCE_8, SENT_8_MS + 1)


def test_a_reply_arriving_in_the_very_millisecond_the_round_was_sent_counts() -> None:
    assert decode(guest_fields(), entry_id=f"{SENT_7_MS}-0").round == 7


def test_a_reply_without_params_decodes_with_empty_params() -> None:
    assert decode(signed(good_body(params=...))).params == {}


def test_another_vm_with_its_own_key_is_accepted_as_itself() -> None:
    assert decode(guest_fields(vm="web-2", key=KEY_WEB2)).vm == "web-2"


def test_a_reply_of_exactly_max_bytes_is_not_oversized() -> None:
    fields = guest_fields()
    size = len(fields[b"m"])
    assert decode(fields, max_bytes=size).vm == "web-1"
    assert rejection(fields, max_bytes=size - 1) == RejectReason.OVERSIZED.value


# ---------------------------------------------------------------- signatures
def test_a_tampered_message_byte_is_a_bad_signature() -> None:
    fields = guest_fields()
    tampered = fields[b"m"].replace(b'"uptime_s":81.5', b'"uptime_s":91.5')
    assert tampered != fields[b"m"]
    assert rejection({**fields, b"m": tampered}) == RejectReason.BAD_SIGNATURE.value


def test_a_tampered_signature_character_is_a_bad_signature() -> None:
    fields = guest_fields()
    sig = fields[b"s"]
    flipped = (b"0" if sig[:1] != b"0" else b"1") + sig[1:]
    assert rejection({**fields, b"s": flipped}) == RejectReason.BAD_SIGNATURE.value


@pytest.mark.parametrize(
    "key",
    [KEY_WEB2, bytes.fromhex("33" * 32)],
    ids=["signed with another vm's key (a guest claiming to be web-1)", "signed with a key nobody has"],
)
def test_a_reply_for_web_1_not_signed_with_web_1s_key_is_a_bad_signature(key: bytes) -> None:
    assert rejection(guest_fields(vm="web-1", key=key)) == RejectReason.BAD_SIGNATURE.value


def test_an_uppercase_hex_signature_is_a_bad_signature() -> None:
    fields = guest_fields()
    assert rejection({**fields, b"s": fields[b"s"].upper()}) == RejectReason.BAD_SIGNATURE.value


def test_a_non_ascii_signature_is_a_bad_signature_not_a_crash() -> None:
    fields = guest_fields()
    assert rejection({**fields, b"s": b"\xff" * 64}) == RejectReason.BAD_SIGNATURE.value


def test_a_signature_over_the_message_without_the_domain_prefix_is_a_bad_signature() -> None:
    fields = guest_fields()
    bare = hmac.new(KEY_WEB1, fields[b"m"], hashlib.sha256).hexdigest().encode()
    assert rejection({**fields, b"s": bare}) == RejectReason.BAD_SIGNATURE.value


def test_a_reply_from_a_vm_without_a_key_is_unknown_vm() -> None:
    assert rejection(guest_fields(vm="web-9", key=KEY_WEB1)) == RejectReason.UNKNOWN_VM.value


# ---------------------------------------------------------------- shape and types
def test_truncated_json_is_malformed() -> None:
    fields = guest_fields()
    cut = fields[b"m"][:-7]
    assert rejection({b"m": cut, b"s": reply_signature(KEY_WEB1, cut).encode()}) == RejectReason.MALFORMED.value


def test_a_message_that_is_not_utf8_is_malformed() -> None:
    raw = b'{"v":1,"vm":"web-1","boot_id":"\xff\xfe"}'
    assert rejection({b"m": raw, b"s": reply_signature(KEY_WEB1, raw).encode()}) == RejectReason.MALFORMED.value


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_validly_signed_message_in_another_unicode_encoding_is_malformed(encoding: str) -> None:
    raw = json.dumps(good_body(), separators=(",", ":")).encode(encoding)
    assert rejection({b"m": raw, b"s": reply_signature(KEY_WEB1, raw).encode()}) == RejectReason.MALFORMED.value


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(["v", 1], id="the message is a JSON array, not an object"),
        pytest.param("web-1", id="the message is a JSON string"),
        pytest.param(good_body(round="7"), id="round is a string"),
        pytest.param(good_body(round=True), id="round is a bool"),
        pytest.param(good_body(round=7.0), id="round is a float"),
        pytest.param(good_body(round=...), id="round is missing"),
        pytest.param(good_body(params=[1, 2]), id="params is a list, not an object"),
        pytest.param(good_body(params="ok"), id="params is a string"),
        pytest.param(good_body(nonce="0123456789ABCDEF0123456789ABCDEF"), id="nonce is uppercase hex"),
        pytest.param(good_body(nonce="zz23456789abcdef0123456789abcdef"), id="nonce is not hex"),
        pytest.param(good_body(nonce=NONCE_7[:-1]), id="nonce is 31 characters"),
        pytest.param(good_body(nonce=NONCE_7 + "0"), id="nonce is 33 characters"),
        pytest.param(good_body(nonce=7), id="nonce is a number"),
        pytest.param(good_body(boot_id=""), id="boot_id is empty"),
        pytest.param(good_body(boot_id=...), id="boot_id is missing"),
        pytest.param(good_body(boot_id="b" * 129), id="boot_id is longer than 128 characters"),
        pytest.param(good_body(vm=...), id="vm is missing"),
        pytest.param(good_body(vm=17), id="vm is a number"),
        pytest.param(good_body(v=2), id="version 2 is unsupported"),
        pytest.param(good_body(v=0), id="version 0 is unsupported"),
        pytest.param(good_body(v="1"), id="version is the string 1"),
        pytest.param(good_body(v=...), id="version is missing"),
    ],
)
def test_a_validly_signed_reply_of_the_wrong_shape_is_malformed(body: Any) -> None:
    assert rejection(signed(body)) == RejectReason.MALFORMED.value


@pytest.mark.parametrize("version", [True, 1.0], ids=["version true", "version 1.0"])
def test_a_version_that_only_compares_equal_to_1_is_malformed(version: object) -> None:
    assert rejection(signed(good_body(v=version))) == RejectReason.MALFORMED.value


def test_a_stream_entry_without_m_is_malformed() -> None:
    fields = guest_fields()
    assert rejection({b"s": fields[b"s"]}) == RejectReason.MALFORMED.value


def test_a_stream_entry_without_s_is_malformed() -> None:
    fields = guest_fields()
    assert rejection({b"m": fields[b"m"]}) == RejectReason.MALFORMED.value


# ---------------------------------------------------------------- size
def test_a_message_over_max_bytes_is_oversized_before_anything_else_is_checked() -> None:
    raw = b"x" * (MAX_BYTES + 1)  # not even JSON, and unsigned: size is checked first
    assert rejection({b"m": raw, b"s": b"00"}) == RejectReason.OVERSIZED.value


def test_a_validly_signed_reply_with_huge_params_is_oversized() -> None:
    fields = guest_fields(params={"blob": "a" * MAX_BYTES})
    assert rejection(fields) == RejectReason.OVERSIZED.value


def test_a_small_message_with_a_huge_extra_field_is_oversized() -> None:
    fields = {**guest_fields(), b"pad": b"p" * (MAX_BYTES + 300)}
    assert rejection(fields) == RejectReason.OVERSIZED.value


def test_a_small_message_with_a_huge_signature_field_is_oversized() -> None:
    fields = guest_fields()
    assert rejection({**fields, b"s": fields[b"s"] * 100}) == RejectReason.OVERSIZED.value


def test_a_reply_with_more_than_four_stream_fields_is_oversized() -> None:
    fields = {**guest_fields(), b"a": b"1", b"b": b"2", b"c": b"3"}
    assert rejection(fields) == RejectReason.OVERSIZED.value


def test_a_reply_with_one_small_extra_field_is_still_accepted() -> None:
    assert decode({**guest_fields(), b"x": b"1"}).vm == "web-1"


# ---------------------------------------------------------------- rounds and nonces
def test_a_reply_to_a_round_the_book_does_not_know_is_a_stale_nonce() -> None:
    assert rejection(guest_fields(round_id=6)) == RejectReason.STALE_NONCE.value


def test_a_reply_with_another_rounds_nonce_is_a_stale_nonce() -> None:
    assert rejection(guest_fields(round_id=7, nonce=NONCE_8)) == RejectReason.STALE_NONCE.value


def test_a_reply_arriving_before_its_round_was_sent_is_a_stale_nonce() -> None:
    assert rejection(guest_fields(), entry_id=f"{SENT_7_MS - 1}-0") == RejectReason.STALE_NONCE.value


def test_stale_nonce_is_only_decided_after_the_signature_so_forgeries_stay_bad_signatures() -> None:
    assert rejection(guest_fields(round_id=6, key=KEY_WEB2)) == RejectReason.BAD_SIGNATURE.value


def test_the_round_book_alone_accepts_the_right_nonce_and_refuses_the_rest() -> None:
    BOOK.check(7, NONCE_7, SENT_7_MS)
    for round_id, nonce, arrival in [(9, NONCE_7, SENT_7_MS), (7, NONCE_8, SENT_7_MS), (7, NONCE_7, SENT_7_MS - 1)]:
        with pytest.raises(CodecError) as caught:
            BOOK.check(round_id, nonce, arrival)
        assert caught.value.reason == RejectReason.STALE_NONCE.value


# ---------------------------------------------------------------- probes, ids, secrets
def test_an_encoded_probe_is_parsed_back_by_the_guest_responder() -> None:
    probe = Probe(round=1234, nonce=NONCE_7, sent_ms=SENT_7_MS)
    assert parse_probe(encode_probe(probe)) == (1234, NONCE_7, SENT_7_MS)


def test_an_encoded_probe_carries_the_version_and_type_of_the_protocol() -> None:
    body = json.loads(encode_probe(Probe(round=1, nonce=NONCE_8, sent_ms=5)))
    assert body == {"v": 1, "type": "probe", "round": 1, "nonce": NONCE_8, "sent_ms": 5}


def test_a_fresh_nonce_is_accepted_by_the_guest_and_differs_each_time() -> None:
    first, second = new_nonce(), new_nonce()
    assert first != second
    assert parse_probe(encode_probe(Probe(round=2, nonce=first, sent_ms=0)))[1] == first


def test_a_fresh_secret_is_a_valid_secret_and_a_short_or_uppercase_one_is_not() -> None:
    assert valid_secret(new_secret())
    assert not valid_secret("ab" * 31)
    assert not valid_secret("AB" * 32)


@pytest.mark.parametrize(
    ("entry_id", "ms"),
    [(b"1764102345123-0", 1764102345123), ("1764102345123-17", 1764102345123), ("0-1", 0), (b"5-0", 5)],
)
def test_the_arrival_time_is_the_millisecond_part_of_the_stream_id(entry_id: bytes | str, ms: int) -> None:
    assert stream_id_ms(entry_id) == ms


# ---------------------------------------------------------------- key rotation
KEY_OLD = bytes.fromhex("99" * 32)


def test_a_reply_signed_with_the_rotated_out_key_is_accepted_until_its_grace_ends_and_marked() -> None:
    previous = {"web-1": (KEY_OLD, ARRIVAL_MS)}  # accepted up to and including this millisecond
    reply = decode_reply(ENTRY_ID, guest_fields(key=KEY_OLD), SECRETS, BOOK, MAX_BYTES, previous)
    assert reply.previous_key is True and reply.vm == "web-1"
    assert decode_reply(ENTRY_ID, guest_fields(), SECRETS, BOOK, MAX_BYTES, previous).previous_key is False


def test_a_reply_signed_with_the_rotated_out_key_after_its_grace_is_a_bad_signature() -> None:
    previous = {"web-1": (KEY_OLD, ARRIVAL_MS - 1)}
    with pytest.raises(CodecError) as caught:
        decode_reply(ENTRY_ID, guest_fields(key=KEY_OLD), SECRETS, BOOK, MAX_BYTES, previous)
    assert caught.value.reason == RejectReason.BAD_SIGNATURE.value


def test_another_vms_rotated_out_key_does_not_verify_a_reply() -> None:
    previous = {"web-2": (KEY_OLD, ARRIVAL_MS + 60_000)}
    with pytest.raises(CodecError) as caught:
        decode_reply(ENTRY_ID, guest_fields(key=KEY_OLD), SECRETS, BOOK, MAX_BYTES, previous)
    assert caught.value.reason == RejectReason.BAD_SIGNATURE.value
