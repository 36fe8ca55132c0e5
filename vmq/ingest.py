"""Reply ingestion: verify each reply in the stream, record the valid ones, heal VMs that answered.

Called by the Monitor under its judge lock, up to a round's deadline (then the replies are final for that
round) or up to now. A reply that fails verification counts as no reply and is counted by reason. This is
the monitor's hot path: see docs/performance.md for what each step costs per reply.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vmq.codec import RawEntry, ReplyVerifier, Verified
from vmq.errors import CodecError
from vmq.model import VmState
from vmq.policy import ANSWER_HEALS
from vmq.store.common import text as _text
from vmq.store.redis import JudgeLease, RedisStore, Transition

if TYPE_CHECKING:
    from vmq.monitor import TickReport

log = logging.getLogger(__name__)

BATCH = 5000


class RejectLog:
    """Logs a rejected reply at most once per VM and reason per interval: a forging or broken guest, or a
    flood, is counted in full (``<ns>:stats:rejects``) but cannot flood the log. Replies that name no keyed
    VM share one slot per reason, so made-up VM names cannot multiply the lines either."""

    MAX_SLOTS = 100_000

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def rejected(self, exc: CodecError, now_s: float) -> None:
        slot = (exc.vm or "?", exc.reason)
        if now_s - self._last.get(slot, float("-inf")) < self.interval_s:
            self._held[slot] = self._held.get(slot, 0) + 1
            return
        if len(self._last) >= self.MAX_SLOTS:
            self._last.clear()
        self._last[slot] = now_s
        held = self._held.pop(slot, 0)
        log.warning("reply rejected vm=%s reason=%s: %s%s", slot[0], exc.reason, exc.detail[:200],
                    f" (+{held} more since the last line)" if held else "")



class LatestReplies:
    """Each VM's latest verified reply, kept in memory and saved to Redis (``last:reply``) at most once per
    ``save_every_ms`` per VM: the state parameters are evidence for a verdict, needed fresh only by the
    judge, which reads them from here (``freshest``); writing 10,000 of them every second cost the monitor
    ≈ 3 µs per reply and Redis ≈ 4 MB/s. Each VM's first save is spread over the interval so saves do not
    all land in the same round. ``save_every_ms`` 0 saves every reply."""

    MAX_VMS = 1_000_000

    def __init__(self, save_every_ms: int) -> None:
        self.save_every_ms = save_every_ms
        self._latest: dict[str, tuple[int, bytes]] = {}  # vm -> (round, message)
        self._due: dict[str, int] = {}  # vm -> arrival ms from which its next reply is saved

    def note(self, accepted: Mapping[str, Verified]) -> dict[str, bytes]:
        """Keep the batch's verified replies; returns those to save now (vm -> message)."""
        if len(self._latest) + len(accepted) > self.MAX_VMS:
            self._latest.clear()  # removed VMs pile up only after a million names: start again
            self._due.clear()
        latest, next_save, every = self._latest, self._due, self.save_every_ms
        due: dict[str, bytes] = {}
        for vm, (_, round_id, arrival_ms, _, message, _) in accepted.items():
            latest[vm] = (round_id, message)
            next_ms = next_save.get(vm)
            if next_ms is None:  # first sight: save now, and spread the next save over the interval
                due[vm] = message
                next_save[vm] = arrival_ms + (zlib.crc32(vm.encode()) % every if every else 0)
            elif arrival_ms >= next_ms:
                due[vm] = message
                next_save[vm] = arrival_ms + every
        return due

    def freshest(self, vm: str, saved: str | None) -> str | None:
        """The newer of this process' latest reply from ``vm`` and the one saved in Redis (by round)."""
        mine = self._latest.get(vm)
        if mine is None:
            return saved
        if saved is not None:
            try:
                if int(json.loads(saved).get("round", -1)) > mine[0]:
                    return saved  # another monitor ingested a later one
            except (ValueError, TypeError, AttributeError):
                pass
        return mine[1].decode("utf-8", "replace")


class Ingestor:
    """Verifies and records every reply that arrived up to a given instant, in batches (``ingest``)."""

    def __init__(self, store: RedisStore, max_reply_bytes: int, reject_log: RejectLog,
                 latest: LatestReplies) -> None:
        self.store = store
        self.max_reply_bytes = max_reply_bytes
        self.reject_log = reject_log
        self.latest = latest
        self.verifier = ReplyVerifier()

    def ingest(self, up_to_ms: int, report: TickReport, lease: JudgeLease | None = None) -> bool:
        """Verify and record every reply that arrived up to ``up_to_ms`` (Redis time). Under the judge
        lock (``lease``), the lease is renewed before each batch and the cursor only moves while it is held:
        returns False, with the rest left unread, once it ran out (another judge may be reading them; at
        50,000 replies a round outlasted the 2 s lease, two threads read the same entries and the count of
        entries read that tells replies trimmed unread was inflated: rounds were judged without evidence)."""
        store = self.store
        cursor = store.reply_cursor()
        while True:
            if lease is not None and not lease.renew():
                return False
            # Were replies trimmed before we got to them? (a MAXLEN-0 guest, a monitor behind the stream)
            entries, lost = store.read_replies(cursor, up_to_ms, BATCH)
            if lost:
                _lost(report, lost)
            if entries:
                if not self._batch(entries, report, lease.token if lease is not None else b""):
                    return False
                cursor = _text(entries[-1][0])
            if len(entries) < BATCH:
                return True

    def _batch(self, entries: list[RawEntry], report: TickReport, lock_token: bytes) -> bool:
        """Verify and record one batch; False (report untouched) when the judge lock's fence refused it."""
        store, reject_log = self.store, self.reject_log
        verified, rejected = self.verifier.verify(entries, store.secrets(), store.round_book(),
                                                  self.max_reply_bytes, store.previous_secrets())
        rejects: Counter[str] = Counter()
        for exc in rejected:
            rejects[exc.reason] += 1
            reject_log.rejected(exc, time.monotonic())
        old_keys = 0  # replies still signed with a rotated-out key (in its grace period)
        accepted: dict[str, Verified] = {}
        for reply in verified:
            vm = reply[0]
            previous = accepted.get(vm)
            if previous is not None and reply[1] <= previous[1]:
                rejects["replayed"] += 1
                reject_log.rejected(CodecError("replayed", f"round {reply[1]} again in one batch", vm),
                                    time.monotonic())
                continue
            accepted[vm] = reply
            old_keys += reply[5]
        # A reply to a round the VM already answered (or older) is a replay of a captured message.
        vms = list(accepted)
        rounds: dict[str, int] = {}
        arrivals: dict[str, int] = {}
        for vm, stored in zip(vms, store.last_rounds(vms), strict=True):
            reply = accepted[vm]
            if stored is not None and reply[1] <= stored:
                rejects["replayed"] += 1
                reject_log.rejected(CodecError("replayed", f"round {reply[1]} was already answered", vm),
                                    time.monotonic())
                del accepted[vm]
                continue
            rounds[vm] = reply[1]
            arrivals[vm] = reply[2]
        if not store.record_replies(
            rounds=rounds,
            arrivals=arrivals,
            payloads=self.latest.note(accepted),
            rejects=rejects,
            valid_count=len(accepted),
            cursor=_text(entries[-1][0]),
            read=len(entries),
            lock_token=lock_token,
        ):
            return False
        report.ingested += len(entries)
        report.valid += len(accepted)
        for reason, count in rejects.items():
            report.rejected[reason] = report.rejected.get(reason, 0) + count
        if old_keys:
            store.incr_stat("replies_previous_key", old_keys)
        healing = sorted(store.attention() & accepted.keys())
        if healing:
            _heal(store, healing, {vm: accepted[vm][1:5] for vm in healing}, report)
        return True


def _lost(report: TickReport, count: int) -> None:
    report.lost += count
    log.warning("%d replies were trimmed from the stream before vmq read them: the rounds they may have answered "
                "are not judged (no evidence)", count)


def _heal(store: RedisStore, vms: list[str], answers: dict[str, tuple[int, int, str, bytes]],
          report: TickReport) -> None:
    """A valid reply ends silence: unknown/faulty/recovering (and unclaimed restarting) -> healthy.

    All transitions of a batch go in one pipeline: after a mass outage every VM heals in one tick.
    """
    batch: list[Transition] = []
    for vm, rec in zip(vms, store.vm_records(vms)):
        state = VmState(rec.get("state", VmState.UNKNOWN.value))
        if state not in ANSWER_HEALS:
            continue
        round_id, arrival_ms, boot_id, _ = answers[vm]
        incident = rec.get("incident", "")
        event: dict[str, object] = {"type": "recovered" if incident else "healthy",
                                    "host": rec.get("host", ""), "round": round_id, "boot_id": boot_id,
                                    "previous_boot_id": rec.get("boot_id", "")}
        if incident:
            opened = int(rec.get("incident_opened_ms") or arrival_ms)
            event["incident"] = incident
            event["recovered_after_s"] = round((arrival_ms - opened) / 1000.0, 3)
            # An unclaimed `restarting` attempt that heals never reached libvirt; a claimed one whose worker
            # never reported (its claim's hold ended) did if the guest booted again.
            event["restarted"] = state is VmState.RECOVERING or (
                state is VmState.RESTARTING and bool(rec.get("claim")) and boot_id != rec.get("boot_id"))
        batch.append(Transition(
            vm, (state,), VmState.HEALTHY, arrival_ms, event,
            fields={"incident": "", "boot_id": boot_id, "decision": "", "decision_action": "",
                    "decision_grounds": "", "attempts": 0},
            expected_generation=int(rec.get("generation") or 0),
        ))
    recovered_s: list[float] = []  # time to recover of the incidents this batch closes (vmq.metrics)
    for spec, (ok, _, _) in zip(batch, store.transition_many(batch)):
        if ok:
            report.healed.append(spec.vm)
            log.info("vm=%s %s", spec.vm, spec.event["type"])
            if "recovered_after_s" in spec.event:
                recovered_s.append(float(spec.event["recovered_after_s"]))
    store.record_recoveries(recovered_s)
