"""vmq.monitor.probing_gap: a round whose window meets a gap in probing (Redis, beat or the monitors away) is
no evidence; in the rounds sent while guests may still be reconnecting after it, only the VMs that have
answered since the gap are judged."""

from __future__ import annotations

from vmq.evidence import ProbingGap, probing_gap

T1, T2 = 1000, 3000  # ms


def steady(first: int, last: int, start_ms: int = 0) -> dict[int, int]:
    return {r: start_ms + (r - first) * T1 for r in range(first, last + 1)}


def test_rounds_sent_every_t1_are_evidence() -> None:
    sent = steady(1, 20)
    assert all(probing_gap(r, sent, sent[20] + 10, T1, T2) == ProbingGap() for r in sent)


def test_a_late_probe_no_longer_than_the_threshold_is_no_gap() -> None:
    sent = {**steady(1, 5), **steady(6, 10, start_ms=4 * T1 + 2 * T1)}  # 2 x T1 between rounds 5 and 6
    assert all(probing_gap(r, sent, sent[10], T1, T2) == ProbingGap() for r in sent)


def test_around_a_20_s_outage_rounds_are_no_evidence_then_only_reconnected_vms_are_judged_for_10_s() -> None:
    sent = {**steady(1, 10), **steady(11, 40, start_ms=9 * T1 + 20_000)}
    now, gap_end = sent[40], sent[11]
    verdicts = {r: probing_gap(r, sent, now, T1, T2) for r in sent}
    # Before the outage: rounds whose deadline passed before the last round went out (round 10) are evidence.
    assert {r for r in range(1, 11) if verdicts[r] == ProbingGap()} == {r for r in range(1, 11)
                                                                        if sent[r] + T2 <= sent[10]}
    assert all(verdicts[r].reason.startswith("no evidence: no probe round went out for 20.0 s (round 10 to "
                                             "round 11)") and not verdicts[r].reconnected_since_ms
               for r in range(1, 11) if sent[r] + T2 > sent[10])
    # After it: the VMs that answered since round 11 went out are judged, until guests had 10 s + T1.
    held = {r for r in range(11, 41) if verdicts[r].reconnected_since_ms == gap_end}
    assert held == {r for r in range(11, 41) if sent[r] < gap_end + 10_000 + T1}
    assert all(verdicts[r] == ProbingGap() for r in range(11, 41) if r not in held)
    assert "guests get 11.0 s to reconnect" in verdicts[11].reason


def test_while_no_round_goes_out_the_rounds_before_are_not_judged() -> None:
    sent = steady(1, 10)
    stalled = sent[10] + 15_000  # beat or Redis away right now
    assert "round 10 to now" in probing_gap(9, sent, stalled, T1, T2).reason
    assert probing_gap(5, sent, stalled, T1, T2) == ProbingGap()  # its deadline passed before probing stopped


def test_a_short_gap_gives_guests_a_short_allowance() -> None:
    sent = {**steady(1, 10), **steady(11, 20, start_ms=9 * T1 + 2_500)}  # 2.5 s: back-off at most ~2.5 s
    assert probing_gap(13, sent, sent[20], T1, T2).reconnected_since_ms == sent[11]
    assert probing_gap(15, sent, sent[20], T1, T2) == ProbingGap()  # sent 4 s after: 2.5 s + T1 have passed


def test_an_unknown_round_is_judged_as_usual() -> None:
    assert probing_gap(99, steady(1, 3), 10_000, T1, T2) == ProbingGap()
