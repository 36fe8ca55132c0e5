"""The host side of cover entries (vmq.relay_cover.CoverKeeper): when a listing goes out, what an entry names."""

from __future__ import annotations

from vmq.relay_cover import CoverKeeper, cover_fields


def entry(keeper: CoverKeeper, round_id: int, asked: list[str], answered: list[str]) -> dict[str, str]:
    keeper.start(round_id, f"n{round_id}", asked)
    for vm in answered:
        assert keeper.answered(vm, round_id, {"vm": vm})
    fields = keeper.fields(round_id)
    assert fields is not None
    keeper.written(fields)
    return fields


def test_the_first_entry_lists_every_vm_and_the_next_ones_only_the_silent() -> None:
    keeper = CoverKeeper("node1")
    first = entry(keeper, 100, ["b", "a", "c"], ["a", "b"])
    assert first == {"q": "100", "n": "n100", "c": "100", "x": "c", "f": "a b c"}
    second = entry(keeper, 101, ["a", "b", "c"], ["a", "b", "c"])
    assert second == {"q": "101", "n": "n101", "c": "100", "x": ""}


def test_a_change_in_the_vms_asked_is_listed_at_once() -> None:
    keeper = CoverKeeper("node1")
    entry(keeper, 100, ["a", "b"], ["a", "b"])
    assert entry(keeper, 101, ["a"], ["a"])["f"] == "a"
    assert "f" not in entry(keeper, 102, ["a"], ["a"])


def test_listings_repeat_every_10_to_19_rounds_in_a_round_that_depends_on_the_host() -> None:
    fulls: dict[str, list[int]] = {}
    for host in ("node1", "node2", "node3", "node4"):
        keeper = CoverKeeper(host)
        fulls[host] = [r for r in range(100, 160) if "f" in entry(keeper, r, ["a"], ["a"])]
        gaps = [b - a for a, b in zip(fulls[host], fulls[host][1:])]
        assert fulls[host][0] == 100 and all(10 <= gap < 20 for gap in gaps), (host, fulls[host])
    assert len({tuple(f[1:]) for f in fulls.values()}) > 1, "hosts started together do not all list together"


def test_an_entry_not_written_is_not_a_base_and_late_answers_are_ignored() -> None:
    keeper = CoverKeeper("node1")
    keeper.start(100, "n100", ["a"])
    assert keeper.fields(100) is not None and keeper.base == 0  # never written: the next one lists again
    keeper.start(101, "n101", ["a"])
    assert not keeper.answered("a", 100, {"vm": "a"}), "an answer to the round before is too late"
    assert keeper.fields(101) == {"q": "101", "n": "n101", "c": "101", "x": "a", "f": "a"}
    assert keeper.fields(100) is None


def test_state_parameters_ride_along_only_for_answers_that_carry_guest_info() -> None:
    keeper = CoverKeeper("node1")
    keeper.start(100, "n100", ["a", "b"])
    keeper.answered("a", 100, {"vm": "a", "latency_ms": 1.2, "guest_ms": 5, "info": {"os_id": "debian"}})
    keeper.answered("b", 100, {"vm": "b", "latency_ms": 1.1})
    fields = keeper.fields(100)
    assert fields is not None
    assert fields["s"] == '{"a":{"latency_ms":1.2,"guest_ms":5,"info":{"os_id":"debian"}}}'
    assert cover_fields(7, "n", 3, None, {"b", "a"}) == {"q": "7", "n": "n", "c": "3", "x": "a b"}


def test_each_answers_state_parameters_are_sent_once_in_a_round_not_again_by_its_later_entries() -> None:
    keeper = CoverKeeper("node1")
    keeper.start(100, "n100", ["a", "b", "c"])
    keeper.answered("a", 100, {"vm": "a", "latency_ms": 1.2, "guest_ms": 5, "info": {"os_id": "debian"}})
    partial = keeper.fields(100)
    assert partial is not None and '"a"' in partial["s"]
    keeper.written(partial)
    keeper.answered("b", 100, {"vm": "b", "latency_ms": 1.1, "guest_ms": 6, "info": {"os_id": "alpine"}})
    unwritten = keeper.fields(100)  # built, but Redis did not take it: its parameters are offered again
    assert unwritten is not None and '"b"' in unwritten["s"] and '"a"' not in unwritten["s"]
    final = keeper.fields(100)
    assert final is not None and final["s"] == '{"b":{"latency_ms":1.1,"guest_ms":6,"info":{"os_id":"alpine"}}}'
    keeper.written(final)
    last = keeper.fields(100)
    assert last is not None and "s" not in last and last["x"] == "c"  # the silent VM is still named
