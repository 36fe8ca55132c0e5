"""Lua sources as Redis gets them (vmq.store.client.load_lua): the shared pieces are included, once each."""

from __future__ import annotations

from vmq.store.client import load_lua


def test_the_scripts_that_vouch_share_one_path_rule_and_one_refusal_count() -> None:
    for name, pieces in {"placements.lua": ["path_in_force"], "relay_apply.lua": ["path_in_force", "reject"],
                         "relay_cover.lua": ["path_in_force", "reject"]}.items():
        source = load_lua(name)
        assert not any(line.startswith("-- include: ") for line in source.splitlines()), name
        for piece in pieces:
            assert source.count(f"local function {piece}(") == 1, (name, piece)
