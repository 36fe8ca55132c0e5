"""Bad input never crashes the decoder and never floods the log: a property-based fuzz of decode_reply and
the rate limit of rejected-reply log lines."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_codec import ARRIVAL_MS, BOOK, ENTRY_ID, KEY_WEB1, MAX_BYTES, SECRETS, good_body, signed
from vmq.codec import decode_reply
from vmq.errors import CodecError
from vmq.ingest import RejectLog
from vmq.model import RejectReason

REASONS = {reason.value for reason in RejectReason}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4),
                    max_leaves=12)


def outcome(fields: dict[bytes, bytes]) -> str:
    """"ok" or the reject reason; any other exception fails the property."""
    try:
        decode_reply(ENTRY_ID, fields, SECRETS, BOOK, MAX_BYTES)
    except CodecError as exc:
        assert exc.reason in REASONS
        return exc.reason
    return "ok"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.binary(max_size=3), st.binary(max_size=300), max_size=5))
def test_arbitrary_stream_entries_are_rejected_with_a_reason_never_an_exception(fields: dict[bytes, bytes]) -> None:
    assert outcome(fields) != "ok" or (b"m" in fields and b"s" in fields)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2 * MAX_BYTES), st.binary(max_size=80))
def test_arbitrary_message_and_signature_bytes_never_verify(message: bytes, signature: bytes) -> None:
    assert outcome({b"m": message, b"s": signature}) != "ok"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["v", "vm", "round", "nonce", "boot_id", "seq", "guest_ms", "params"]), JSON)
def test_a_correctly_signed_body_with_any_value_in_any_field_is_accepted_only_if_well_typed(
        name: str, value: Any) -> None:
    fields = signed(good_body(**{name: value}))  # signed with web-1's key: only the field's value is wrong
    result = outcome(fields)
    if result == "ok":
        reply = decode_reply(ENTRY_ID, fields, SECRETS, BOOK, MAX_BYTES)
        assert isinstance(reply.round, int) and not isinstance(reply.round, bool)
        assert isinstance(reply.params, dict) and isinstance(reply.boot_id, str)
        assert reply.vm == "web-1" and reply.arrival_ms == ARRIVAL_MS


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_any_text_as_the_message_is_refused_not_crashed_on(text: str) -> None:
    message = text.encode("utf-8", "surrogatepass")
    assert outcome({b"m": message, b"s": b"00" * 32}) != "ok"


def test_non_utf8_and_utf16_bodies_are_malformed() -> None:
    body = json.dumps(good_body()).encode("utf-16")
    assert outcome({b"m": body, b"s": b"0" * 64}) == RejectReason.MALFORMED.value
    assert outcome({b"m": b"\xff\xfe{}", b"s": b"0" * 64}) == RejectReason.MALFORMED.value


# ---------------------------------------------------------------- no log flood
def reject(vm: str, reason: str = "bad_signature") -> CodecError:
    return CodecError(reason, f"vm {vm}: signature does not verify", vm)


def test_a_flood_from_one_vm_is_logged_once_per_interval_with_the_count_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    limiter = RejectLog(interval_s=1.0)
    with caplog.at_level(logging.WARNING, logger="vmq.ingest"):
        for i in range(1000):
            limiter.rejected(reject("web-1"), now_s=100.0 + i * 0.001)  # 1,000 in one second
        limiter.rejected(reject("web-1"), now_s=101.5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "vm=web-1 reason=bad_signature" in lines[0] and "+999 more" in lines[1]


def test_each_vm_and_reason_has_its_own_slot_but_unknown_names_share_one(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RejectLog(interval_s=1.0)
    with caplog.at_level(logging.WARNING, logger="vmq.ingest"):
        limiter.rejected(reject("web-1"), 0.0)
        limiter.rejected(reject("web-2"), 0.0)
        limiter.rejected(reject("web-1", "stale_nonce"), 0.0)
        for i in range(500):  # made-up VM names: CodecError.vm is empty until the VM is known to have a key
            limiter.rejected(CodecError("unknown_vm", f"no key for vm 'forged-{i}'"), 0.0)
    assert len(caplog.records) == 4
    assert sum("vm=? reason=unknown_vm" in r.getMessage() for r in caplog.records) == 1


def test_the_vm_is_named_on_a_rejection_only_once_it_is_known_to_have_a_key() -> None:
    with pytest.raises(CodecError) as forged:
        decode_reply(ENTRY_ID, signed(good_body(vm="nobody")), SECRETS, BOOK, MAX_BYTES)
    assert (forged.value.reason, forged.value.vm) == ("unknown_vm", "")
    with pytest.raises(CodecError) as wrong_key:
        decode_reply(ENTRY_ID, signed(good_body(), key=bytes(32)), SECRETS, BOOK, MAX_BYTES)
    assert (wrong_key.value.reason, wrong_key.value.vm) == ("bad_signature", "web-1")
    with pytest.raises(CodecError) as stale:
        decode_reply(ENTRY_ID, signed(good_body(round=99), key=KEY_WEB1), SECRETS, BOOK, MAX_BYTES)
    assert (stale.value.reason, stale.value.vm) == ("stale_nonce", "web-1")
