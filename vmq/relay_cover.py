"""The host side of cover entries (docs/protocol.md, "Cover entries"): what a relay writes for its ``agent`` VMs
once per round instead of naming every VM that answered.

Per round the host states which of the VMs it asked did not answer (``x``), relative to its latest full listing
of the VMs it asks (``f``, written in the round ``c`` names): at its first round, whenever the VMs it asks
change, and every ``full_every`` to ``2 full_every`` rounds, in a round that depends on the host (so a listing Redis
did not apply is repaired within that many rounds, and hosts started together do not list all at once).
While some calls are still running, partial entries (no finish mark) carry the answers in so far, at most one per
flush interval and only when answers came in, so a hung agent delays no other VM's answer; the final entry
follows when the round ends.
Redis vouches for each listed VM once per listing and keeps the others covered (vmq/lua/relay_cover.lua).
Pure bookkeeping: no Redis, no libvirt, no threads (ProbeRelay's loop thread calls it).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

__all__ = ["FULL_EVERY_ROUNDS", "CoverKeeper", "cover_fields"]

#: A host lists every VM it asks at least this often (rounds), even when nothing changed.
FULL_EVERY_ROUNDS = 10

_PARAMS = ("latency_ms", "guest_ms", "info")


def cover_fields(round_id: int, nonce: str, base: int, listing: Sequence[str] | None, silent: Collection[str],
                 params: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
    """A cover entry's fields: ``q`` round, ``n`` nonce, ``c`` base round, ``x`` the asked VMs that did not
    answer, ``f`` (a full entry, then ``base`` is ``round_id``) every VM asked, ``s`` state parameters (JSON vm ->
    params) of answers that carry guest info. The relay adds ``r`` (this round, finished) and ``u`` (unasked)."""
    fields = {"q": str(round_id), "n": nonce, "c": str(base), "x": " ".join(sorted(silent))}
    if listing is not None:
        fields["f"] = " ".join(listing)
    if params:
        fields["s"] = json.dumps(params, separators=(",", ":"))
    return fields


class CoverKeeper:
    """One relay's cover: the VMs the current round asked, those that answered it, and the listing Redis was
    last sent (its round is the base of the entries that follow)."""

    def __init__(self, host: str = "", full_every: int = FULL_EVERY_ROUNDS) -> None:
        self.full_every = full_every
        # Periodic listings fall in a round that depends on the host: hosts that started together spread theirs.
        self.phase = zlib.crc32(host.encode()) % full_every
        self.base = 0  # round of the latest full listing written (0: none yet)
        self.listed: frozenset[str] = frozenset()
        self._round, self._nonce = 0, ""
        self._asked: list[str] = []
        self._answered: set[str] = set()
        self._params: dict[str, dict[str, Any]] = {}  # state parameters not written yet in this round
        self._offered: frozenset[str] = frozenset()  # the VMs whose parameters the latest entry built carries
        self._full = False  # this round's entries list every VM asked
        self._ready: list[float] = []  # when each answer not written yet came in (monotonic s)

    def start(self, round_id: int, nonce: str, asked: Sequence[str]) -> None:
        """A probe round begins: ``asked`` are the agent VMs this host asks in it (busy ones included)."""
        self._round, self._nonce = round_id, nonce
        self._asked = sorted(set(asked))
        self._answered, self._params, self._ready, self._offered = set(), {}, [], frozenset()
        listed = frozenset(self._asked)
        since = round_id - self.base
        self._full = self.base == 0 or listed != self.listed or since >= 2 * self.full_every or (
            since >= self.full_every and (round_id + self.phase) % self.full_every == 0)

    def answered(self, vm: str, round_id: int, answer: Mapping[str, Any], ready_s: float = 0.0) -> bool:
        """Note ``vm``'s answer to ``round_id`` (in at ``ready_s``); False (ignored) when it answers another
        round (too late)."""
        if round_id != self._round:
            return False
        self._answered.add(vm)
        self._ready.append(ready_s)
        if "info" in answer:
            self._params[vm] = {name: answer[name] for name in _PARAMS if name in answer}
        return True

    def fields(self, round_id: int) -> dict[str, str] | None:
        """The cover entry for ``round_id`` with the answers in so far (None when that round was not started
        here); the relay adds the finish mark to the round's last one."""
        if round_id != self._round or not self._nonce:
            return None
        asked = frozenset(self._asked)
        silent = asked - self._answered
        params = {vm: p for vm, p in self._params.items() if vm in asked}
        self._offered = frozenset(params)
        return cover_fields(round_id, self._nonce, round_id if self._full else self.base,
                            self._asked if self._full else None, silent, params)

    def unwritten(self) -> int:
        """Answers noted since the last entry was written."""
        return len(self._ready)

    def delays(self, now_s: float) -> list[float]:
        """How long (ms) each answer noted since the last call waited to be written, as of ``now_s``."""
        ready, self._ready = self._ready, []
        return [(now_s - at) * 1000.0 for at in ready]

    def written(self, fields: Mapping[str, str]) -> None:
        """The entry ``fields`` reached Redis: a full one is the base of the next ones, and the state parameters
        it carried are not sent again by the round's later entries (each answer's are sent once)."""
        if "s" in fields:
            self._params = {vm: p for vm, p in self._params.items() if vm not in self._offered}
        if "f" in fields:
            self.base = int(fields["q"])
            self.listed = frozenset(fields["f"].split())
