"""Reply ingestion: verify each reply in the stream, record the valid ones, heal VMs that answered.

Called by the Monitor under its judge lock, up to a round's deadline (then the replies are final for that
round) or up to now. A reply that fails verification counts as no reply and is counted by reason. The
monitor's hot path (docs/performance.md has the cost of each step).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vmq import lifecycle
from vmq.codec import RawEntry, ReplyVerifier, Verified
from vmq.errors import CodecError
from vmq.guest_requests import note_app_health, note_maintenance_requests
from vmq.model import Transition, VmPlacement, VmRecord, VmState
from vmq.ports import Lease, Replies, Store
from vmq.relayed import AgentBatchResult, Decoded, decode_batches

log = logging.getLogger(__name__)

BATCH = 5000  # guest replies per read
RELAY_BATCH = 50  # relayed batches per read (each holds up to vmq.store.relays.MAX_ANSWERS_PER_ENTRY answers)


Verify = Callable[[list[RawEntry]], Decoded]


@dataclass
class IngestResult:
    """What one ingest read and did; ``complete`` False: the judge lease ran out, the rest is left unread."""

    complete: bool = True
    ingested: int = 0
    valid: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    healed: list[str] = field(default_factory=list)
    lost: int = 0  # replies trimmed from the stream before they were read


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        """Log ``exc`` unless its VM and reason were logged less than ``interval_s`` ago."""
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
    ``save_every_ms`` per VM (0: every reply): the state parameters are evidence for a verdict, needed fresh
    only by the judge, which reads them from here (``freshest``). Each VM's first save is spread over the
    interval so saves do not all land in the same round."""

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
        for vm, reply in accepted.items():
            arrival_ms, message = reply.arrival_ms, reply.message
            latest[vm] = (reply.round, message)
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

    def __init__(self, store: Store, max_reply_bytes: int, reject_log: RejectLog, latest: LatestReplies,
                 guest_maintenance_max_ms: int = 0) -> None:
        self.store = store
        self.max_reply_bytes = max_reply_bytes
        self.guest_maintenance_max_ms = guest_maintenance_max_ms  # 0: guests cannot ask (vmq.guest_requests)
        self.reject_log = reject_log
        self.latest = latest
        self.verifier = ReplyVerifier()
        self.relay_verifier = ReplyVerifier()  # its own MAC cache: the two streams interleave

    def ingest(self, up_to_ms: int, lease: Lease | None = None) -> IngestResult:
        """Verify and record every answer that arrived up to ``up_to_ms`` (Redis time): the guests' replies,
        then the hosts' relayed batches. Under the judge lock (``lease``) the lease is renewed before each
        batch and a cursor only moves while it is held: once it ran out the result is incomplete and the rest
        is left unread for the next holder."""
        result = IngestResult()
        if self._drain(self.store.replies, self._verify_replies, BATCH, up_to_ms, lease, result):
            self._drain(self.store.relayed, self._verify_relayed, RELAY_BATCH, up_to_ms, lease, result)
        return result

    def _drain(self, source: Replies, verify: Verify, batch: int, up_to_ms: int, lease: Lease | None,
               result: IngestResult) -> bool:
        """Read ``source`` up to ``up_to_ms`` in batches of ``batch`` entries into ``result``; False (and
        ``result.complete`` False) once the lease ran out."""
        cursor = source.reply_cursor()
        while True:
            if lease is not None and not lease.renew():
                result.complete = False
                return False
            # Were answers trimmed before we got to them? (a MAXLEN-0 guest, a monitor behind the stream)
            entries, lost = source.read_replies(cursor, up_to_ms, batch)
            if lost:
                result.lost += lost
                log.warning("%d answers were trimmed from a stream before vmq read them: the rounds they may "
                            "have answered are not judged (no evidence)", lost)
            if entries:
                if not self._accept(source, verify(entries), entries, result, lease.token if lease is not None else b""):
                    result.complete = False
                    return False
                cursor = _text(entries[-1][0])
            if len(entries) < batch:
                return True

    def _verify_replies(self, entries: list[RawEntry]) -> Decoded:
        store = self.store
        verified, rejected = self.verifier.verify(entries, store.keyring.secrets(), store.rounds.round_book(),
                                                  self.max_reply_bytes, store.keyring.previous_secrets())
        return Decoded(verified, rejected)

    def _verify_relayed(self, entries: list[RawEntry]) -> Decoded:
        store = self.store

        def records(vms: Sequence[str]) -> dict[str, VmPlacement]:  # host and path only: the hot path
            return {placed.vm: placed for placed in store.vms.placements(vms)}

        return decode_batches(entries, records, self.relay_verifier, store.keyring.secrets(),
                              store.rounds.round_book(), self.max_reply_bytes, store.keyring.previous_secrets())

    def _reject(self, rejects: Counter[str], exc: CodecError) -> None:
        rejects[exc.reason] += 1
        self.reject_log.rejected(exc, time.monotonic())

    def _accept(self, source: Replies, decoded: Decoded, entries: list[RawEntry], result: IngestResult,
                lock_token: bytes) -> bool:
        """Record one verified batch of ``source`` into ``result``; False (nothing counted) when the judge
        lock's fence refused it."""
        store = self.store
        verified, rejected = decoded.accepted, decoded.rejected
        rejects: Counter[str] = Counter()
        for exc in rejected:
            self._reject(rejects, exc)
        old_keys = 0  # replies still signed with a rotated-out key (in its grace period)
        accepted: dict[str, Verified] = {}
        for reply in verified:
            previous = accepted.get(reply.vm)
            if previous is not None and reply.round <= previous.round:
                self._reject(rejects, CodecError("replayed", f"round {reply.round} again in one batch", reply.vm))
                continue
            accepted[reply.vm] = reply
            old_keys += reply.previous_key
        # A reply to a round the VM already answered (or older) is a replay of a captured message.
        vms = list(accepted)
        rounds: dict[str, int] = {}
        arrivals: dict[str, int] = {}
        stored_rounds, covered = source.answer_rounds(vms)
        for vm, stored in zip(vms, stored_rounds, strict=True):
            reply = accepted[vm]
            if stored is not None and reply.round <= stored:
                self._reject(rejects, CodecError("replayed", f"round {reply.round} was already answered", vm))
                del accepted[vm]
                continue
            rounds[vm] = reply.round
            arrivals[vm] = reply.arrival_ms
        if covered:  # answered on another path than their host's cover: their own account again
            source.release_covered([vm for vm in covered if vm in rounds])
        agent = source.apply_agent_batches(decoded.agent) if decoded.agent else AgentBatchResult()
        if decoded.cover:
            agent.merge(source.apply_cover_batches(decoded.cover))
        for reason, (count, vm) in agent.rejects.items():
            rejects[reason] += count
            known = vm if reason in ("wrong_host", "wrong_path", "oversized") else ""  # an existing VM's slot only
            self.reject_log.rejected(CodecError(reason, f"{count} compact agent answers or cover entries refused, "
                                                        f"the first for {vm[:64]!r}", known), time.monotonic())
        if agent.stale:
            rejects["replayed"] += agent.stale
        if not source.record_replies(
            rounds=rounds,
            arrivals=arrivals,
            payloads=self.latest.note(accepted),
            rejects=rejects,
            valid_count=len(accepted) + agent.accepted,
            cursor=_text(entries[-1][0]),
            read=len(entries),
            lock_token=lock_token,
            finished=decoded.finished,
            unasked=decoded.unasked,
        ):
            return False
        result.ingested += len(entries)
        result.valid += len(accepted) + agent.accepted
        result.rejected.update(rejects)
        if old_keys:
            store.stats.incr_stat("replies_previous_key", old_keys)
        sick = note_app_health(store, accepted)
        if self.guest_maintenance_max_ms:
            note_maintenance_requests(store, accepted, self.guest_maintenance_max_ms)
        healing = list((store.vms.attention() & accepted.keys()) - sick) if accepted else []
        for vm, round_id, arrival_ms in agent.healing:  # found in attention by the script itself
            if vm not in accepted:
                accepted[vm] = Verified(vm, round_id, arrival_ms, "", b"", False)
                healing.append(vm)
        if healing:
            result.healed += _heal(store, sorted(healing), accepted)
        return True


def _heal(store: Store, vms: list[str], answers: Mapping[str, Verified]) -> list[str]:
    """A valid reply ends silence: unknown/faulty/recovering (and unclaimed restarting) -> healthy. All
    transitions of a batch go in one pipeline, so after a mass outage every VM heals in one tick. Returns the
    VMs healed."""
    batch: list[Transition] = []
    records = store.vms.records(vms)
    _answering_elsewhere(store, [rec for rec in records if rec.state is VmState.UNREACHABLE])
    for rec in records:
        answer = answers[rec.vm]
        spec = lifecycle.heal(rec, answer.round, answer.arrival_ms, answer.boot_id)
        if spec is not None:
            batch.append(spec)
    healed: list[str] = []
    recovered_s: list[float] = []  # time to recover of the incidents this batch closes (vmq.metrics)
    for spec, outcome in zip(batch, store.vms.transition_many(batch)):
        if outcome.applied:
            healed.append(spec.vm)
            log.info("vm=%s %s", spec.vm, spec.event["type"])
            if "recovered_after_s" in spec.event:
                recovered_s.append(float(spec.event["recovered_after_s"]))
    store.stats.record_recoveries(recovered_s)
    return healed


def _answering_elsewhere(store: Store, unreachable: list[VmRecord]) -> None:
    """`unreachable` VMs that answer while their record names a host that is up (started there while their old
    host was down, the record moved with the listing) are judged again there: -> `unknown`, after the grace.
    Those whose record still names the down host stay unreachable until it returns (vmq.housekeeping)."""
    if not unreachable:
        return
    alive = {name for name, up, _info in store.hosts.hosts_overview() if up}
    now_ms = store.clock.time_ms()
    for rec in unreachable:
        if rec.host in alive:
            lifecycle.mark_reachable(store.vms, rec, now_ms, rec.host,
                                     f"answers on {rec.host}, which is up: judged there again")
