"""ReplyVerifier (the monitor's hot path) gives exactly decode_reply's verdicts: the same replies accepted with
the same values, the same reasons for the rest, whatever the input. Its fast path must never accept what
the strict decoder refuses (a guest could then get garbage stored, or a replay counted as an answer)."""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_bad_input import JSON
from tests.unit.test_codec import (
    ARRIVAL_MS,
    BOOK,
    ENTRY_ID,
    KEY_WEB1,
    KEY_WEB2,
    MAX_BYTES,
    NONCE_7,
    SECRETS,
    SENT_7_MS,
    good_body,
    guest_fields,
    signed,
)
from vmq.codec import ReplyVerifier, Verified, decode_reply, reply_signature
from vmq.errors import CodecError
from vmq.ingest import LatestReplies

ROTATED = {"web-2": (bytes.fromhex("33" * 32), ARRIVAL_MS + 1)}  # web-2's old key, still in its grace


def raw(fields: dict[bytes, bytes] | list[bytes], entry_id: bytes = ENTRY_ID) -> list[Any]:
    """An XRANGE entry as Redis sends it: [id, [field, value, ...]]."""
    flat = fields if isinstance(fields, list) else [x for pair in fields.items() for x in pair]
    return [entry_id, flat]


def strict(entry: list[Any]) -> tuple[Any, ...] | str:
    """decode_reply's outcome for one raw entry: the verified tuple or the reject reason."""
    fields = dict(zip(entry[1][::2], entry[1][1::2], strict=False))
    try:
        r = decode_reply(entry[0], fields, SECRETS, BOOK, MAX_BYTES, ROTATED)
    except CodecError as exc:
        return exc.reason
    return (r.vm, r.round, r.arrival_ms, r.boot_id, r.message, r.previous_key)


def fast(entries: list[list[Any]], verifier: ReplyVerifier | None = None) -> list[tuple[Any, ...] | str]:
    """ReplyVerifier's outcome per entry, in order (accepted tuples and reasons interleaved back)."""
    accepted, rejected = (verifier or ReplyVerifier()).verify(entries, SECRETS, BOOK, MAX_BYTES, ROTATED)
    out: list[tuple[Any, ...] | str] = []
    good, bad = iter(accepted), iter(rejected)
    for entry in entries:  # the order of each list follows the stream; strict() tells which list it is in
        out.append(next(good) if isinstance(strict(entry), tuple) else next(bad).reason)
    return out


def assert_same(entries: list[list[Any]]) -> None:
    assert fast(entries) == [strict(e) for e in entries]


def test_a_guests_reply_is_accepted_with_the_values_decode_reply_gives() -> None:
    entries = [raw(guest_fields()), raw(guest_fields(vm="web-2", key=KEY_WEB2))]
    accepted, rejected = ReplyVerifier().verify(entries, SECRETS, BOOK, MAX_BYTES)
    assert rejected == []
    assert accepted[0] == ("web-1", 7, ARRIVAL_MS, good_body()["boot_id"], guest_fields()[b"m"], False)
    assert_same(entries)


def test_each_kind_of_bad_reply_gets_decode_replys_reason() -> None:
    body = good_body()
    message = json.dumps(body, separators=(",", ":")).encode()
    cases = [
        raw(signed(good_body(vm="nobody"))),  # unknown_vm
        raw(signed(body, key=KEY_WEB2)),  # bad_signature
        raw(signed(good_body(round=99))),  # stale_nonce: not a recent round
        raw(signed(good_body(nonce="f" * 32))),  # stale_nonce: wrong nonce
        raw(signed(good_body()), entry_id=f"{SENT_7_MS - 1}-0".encode()),  # arrived before it was sent
        raw(signed(good_body(round=True))),  # malformed: a bool is not a round
        raw(signed(good_body(nonce=NONCE_7.upper()))),  # malformed nonce
        raw(signed(good_body(boot_id=""))),
        raw(signed(good_body(params=[1, 2]))),
        raw(signed(good_body(v=2))),
        raw(signed(good_body(v=True))),
        raw({b"m": b"x" * (MAX_BYTES + 1), b"s": b"0" * 64}),  # oversized
        raw({b"m": message}),  # no signature
        raw([b"s", reply_signature(KEY_WEB1, message).encode(), b"m", message]),  # fields swapped: still fine
        raw([b"m", message, b"s", reply_signature(KEY_WEB1, message).encode(), b"x", b"y"]),  # an extra field
        raw([b"m", b"junk", b"m", message, b"s", reply_signature(KEY_WEB1, message).encode()]),  # repeated field
        raw({b"m": message, b"s": reply_signature(KEY_WEB1, message).upper().encode()}),
        raw({b"m": message, b"s": b"\xff" * 64}),
        raw({b"m": b"[1]", b"s": b"0" * 64}),
        raw({b"m": b"\xff\xfe{}", b"s": b"0" * 64}),
    ]
    outcomes = [strict(e) for e in cases]
    assert {o for o in outcomes if isinstance(o, str)} >= {"unknown_vm", "bad_signature", "stale_nonce",
                                                           "malformed", "oversized"}
    assert_same(cases)


def test_a_key_in_its_rotation_grace_still_verifies_and_is_flagged() -> None:
    old_key = ROTATED["web-2"][0]
    entries = [raw(guest_fields(vm="web-2", key=old_key))]
    accepted, _ = ReplyVerifier().verify(entries, SECRETS, BOOK, MAX_BYTES, ROTATED)
    assert accepted[0][0] == "web-2" and accepted[0][5] is True
    assert_same(entries)


def test_a_new_key_table_replaces_the_cached_mac_states() -> None:
    verifier = ReplyVerifier()
    entry = raw(guest_fields())
    assert len(verifier.verify([entry], SECRETS, BOOK, MAX_BYTES)[0]) == 1
    rotated = {**SECRETS, "web-1": bytes.fromhex("44" * 32)}  # what store.keyring.secrets() returns after a rotation
    accepted, rejected = verifier.verify([entry], rotated, BOOK, MAX_BYTES)
    assert accepted == [] and [e.reason for e in rejected] == ["bad_signature"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["v", "vm", "round", "nonce", "boot_id", "seq", "guest_ms", "params", "extra"]), JSON,
       st.sampled_from([KEY_WEB1, KEY_WEB2]))
def test_any_value_in_any_field_signed_by_a_real_key_gets_the_same_verdict(name: str, value: Any,
                                                                             key: bytes) -> None:
    assert_same([raw(signed(good_body(**{name: value}), key=key))])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=MAX_BYTES + 10), st.binary(min_size=60, max_size=66),
       st.lists(st.sampled_from([b"m", b"s", b"x"]), min_size=0, max_size=4))
def test_arbitrary_bytes_get_the_same_verdict(message: bytes, signature: bytes, names: list[bytes]) -> None:
    correctly_signed = reply_signature(KEY_WEB1, message).encode()
    entries = [raw({b"m": message, b"s": signature}), raw({b"m": message, b"s": correctly_signed}),
               raw([x for name in names for x in (name, message)])]
    assert_same(entries)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_signed_by_the_vms_key_gets_the_same_verdict(text: str) -> None:
    message = text.encode("utf-8", "surrogatepass")
    assert_same([raw({b"m": message, b"s": reply_signature(KEY_WEB1, message).encode()})])


# ---------------------------------------------------------------- LatestReplies
def verified(vm: str, round_id: int, arrival_ms: int, message: bytes) -> dict[str, Verified]:
    return {vm: Verified(vm, round_id, arrival_ms, "boot", message, False)}


def test_latest_replies_saves_each_vm_at_once_then_at_most_once_per_interval() -> None:
    latest = LatestReplies(save_every_ms=10_000)
    saved: list[int] = []
    for second in range(60):  # one reply per second for a minute
        if latest.note(verified("web-1", second, 1_000_000 + 1000 * second, f"reply {second}".encode())):
            saved.append(second)
    assert saved[0] == 0 and 5 <= len(saved) <= 7
    assert saved[1] <= 10  # the second save is spread over the first interval (VMs do not save in step)
    assert all(b - a == 10 for a, b in pairwise(saved[1:]))


def test_latest_replies_with_no_interval_saves_every_reply() -> None:
    latest = LatestReplies(save_every_ms=0)
    saves = [latest.note(verified("web-1", second, 1000 * second, f'{{"round":{second}}}'.encode()))
             for second in range(3)]
    assert saves == [{"web-1": b'{"round":0}'}, {"web-1": b'{"round":1}'}, {"web-1": b'{"round":2}'}]


def test_vms_first_seen_together_do_not_all_save_again_in_the_same_round() -> None:
    latest = LatestReplies(save_every_ms=10_000)
    batch = {f"vm-{i}": Verified(f"vm-{i}", 1, 0, "", b"{}", False) for i in range(1000)}
    assert len(latest.note(batch)) == 1000  # all saved on first sight
    per_second = [len(latest.note({vm: Verified(vm, 1 + s, 1000 * s, "", b"{}", False) for vm in batch}))
                  for s in range(1, 11)]
    assert sum(per_second) == 1000 and max(per_second) < 200  # spread over the interval, each once


def test_the_judge_gets_the_newer_of_its_own_latest_reply_and_the_saved_one() -> None:
    latest = LatestReplies(save_every_ms=10_000)
    latest.note(verified("web-1", 7, 1000, b'{"round":7,"params":{"load":[9,9,9]}}'))
    assert latest.freshest("web-1", '{"round":5}') == '{"round":7,"params":{"load":[9,9,9]}}'
    assert latest.freshest("web-1", '{"round":8}') == '{"round":8}'  # another monitor ingested a later one
    assert latest.freshest("web-1", "not json") == '{"round":7,"params":{"load":[9,9,9]}}'
    assert latest.freshest("web-2", '{"round":3}') == '{"round":3}'  # never seen here: Redis' copy
    assert latest.freshest("web-2", None) is None
