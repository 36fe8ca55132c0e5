"""Reply ingestion: verify each reply in the stream, record the valid ones, heal VMs that answered.

Called by the Monitor under its judge lock, up to a round's deadline (then the replies are final for that
round) or up to now. A reply that fails verification counts as no reply and is counted by reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from vmq.codec import decode_reply
from vmq.errors import CodecError
from vmq.model import VmState
from vmq.policy import ANSWER_HEALS
from vmq.store.redis import RedisStore, Transition

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



def ingest_replies(store: RedisStore, max_reply_bytes: int, up_to_ms: int, report: TickReport,
                   reject_log: RejectLog | None = None) -> None:
    """Verify and record every reply that arrived up to ``up_to_ms`` (Redis time), in batches."""
    cursor = store.reply_cursor()
    while True:
        entries = store.read_replies(cursor, up_to_ms, BATCH)
        if entries:
            _ingest_batch(store, max_reply_bytes, entries, report, reject_log or RejectLog(0.0))
            cursor = entries[-1][0].decode()
        if len(entries) < BATCH:
            break
    # After reading: were replies trimmed before we got to them? (a MAXLEN-0 guest, a stalled monitor)
    lost = store.check_trimmed(cursor)
    if lost:
        report.lost += lost
        log.warning("%d replies were trimmed from the stream before vmq read them: the rounds they may have "
                    "answered are not judged (no evidence)", lost)

def _ingest_batch(store: RedisStore, max_reply_bytes: int, entries: list[tuple[bytes, dict[bytes, bytes]]],
                  report: TickReport, reject_log: RejectLog) -> None:
    secrets, rotated = store.secrets(), store.previous_secrets()
    book = store.round_book()
    rejects: Counter[str] = Counter()
    old_keys = 0  # replies still signed with a rotated-out key (in its grace period)
    accepted: dict[str, tuple[int, int, str, bytes]] = {}  # vm -> round, arrival, boot_id, message
    for entry_id, fields in entries:
        try:
            reply = decode_reply(entry_id, fields, secrets, book, max_reply_bytes, rotated)
        except CodecError as exc:
            rejects[exc.reason] += 1
            reject_log.rejected(exc, time.monotonic())
            continue
        previous = accepted.get(reply.vm)
        if previous is not None and reply.round <= previous[0]:
            rejects["replayed"] += 1
            reject_log.rejected(CodecError("replayed", f"round {reply.round} again in one batch", reply.vm),
                                time.monotonic())
            continue
        accepted[reply.vm] = (reply.round, reply.arrival_ms, reply.boot_id, reply.message)
        old_keys += reply.previous_key
    # A reply to a round the VM already answered (or older) is a replay of a captured message.
    vms = list(accepted)
    for vm, stored in zip(vms, store.last_rounds(vms)):
        if stored is not None and accepted[vm][0] <= stored:
            rejects["replayed"] += 1
            reject_log.rejected(CodecError("replayed", f"round {accepted[vm][0]} was already answered", vm),
                                time.monotonic())
            del accepted[vm]
    store.record_replies(
        rounds={vm: a[0] for vm, a in accepted.items()},
        arrivals={vm: a[1] for vm, a in accepted.items()},
        payloads={vm: a[3] for vm, a in accepted.items()},
        rejects=rejects,
        valid_count=len(accepted),
        cursor=entries[-1][0].decode(),
        read=len(entries),
    )
    report.ingested += len(entries)
    report.valid += len(accepted)
    for reason, count in rejects.items():
        report.rejected[reason] = report.rejected.get(reason, 0) + count
    if old_keys:
        store.incr_stat("replies_previous_key", old_keys)
    healing = sorted(store.attention() & accepted.keys())
    if healing:
        _heal(store, healing, {vm: accepted[vm] for vm in healing}, report)

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
