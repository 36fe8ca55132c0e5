"""Every Redis key and channel name vmq uses, built from one namespace (``VMQ_NAMESPACE``).

Nothing else in vmq spells a key. The in-guest responder needs only ``probe_channel`` and
``reply_stream``; it rebuilds them with the same rule (``<ns>:probes``, ``<ns>:replies``) because it
must run without this package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def valid_name(name: str) -> bool:
    """True when ``name`` is usable as a VM, host or namespace name (no ':' or spaces, 1-128 chars)."""
    return bool(_NAME.fullmatch(name))


@dataclass(frozen=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str = "vmq"

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # -- probe and reply channels (the only keys guests touch)
    @property
    def probe_channel(self) -> str:
        """Pub/sub channel one probe per round is published on."""
        return self._k("probes")

    @property
    def reply_stream(self) -> str:
        """Stream guests XADD their signed replies to; its ids stamp arrival in Redis time."""
        return self._k("replies")

    # -- rounds
    @property
    def round_seq(self) -> str:
        """INCR counter of probe rounds."""
        return self._k("round", "seq")

    @property
    def rounds(self) -> str:
        """Hash round id -> "nonce:sent_ms" of recent rounds (trimmed)."""
        return self._k("rounds")

    @property
    def rounds_pending(self) -> str:
        """Sorted set of rounds not yet judged, scored by their deadline (sent_ms + T2)."""
        return self._k("rounds", "pending")

    @property
    def judge_lock(self) -> str:
        """Lock serialising reply ingestion and judging across timeout workers."""
        return self._k("judge", "lock")

    @property
    def replies_lost(self) -> str:
        """Sorted set holding "until" -> the newest Redis ms at which replies were trimmed unread (GT-only)."""
        return self._k("replies", "lost")

    @property
    def reply_cursor(self) -> str:
        """Last reply-stream id ingested."""
        return self._k("replies", "cursor")

    @property
    def relay_stream(self) -> str:
        """Stream host agents XADD their batches of relayed answers to (``channel``/``agent`` VMs); guests' ACL
        cannot touch it. Its ids stamp the arrival of every answer in a batch, in Redis time."""
        return self._k("relayed")

    @property
    def relay_cursor(self) -> str:
        """Last relay-stream id ingested."""
        return self._k("relayed", "cursor")

    @property
    def relay_rounds(self) -> str:
        """Sorted set of "<host>|<round>" -> round: the rounds each host's relay reported finished, in batches the
        monitor read (recent rounds only)."""
        return self._k("relayed", "rounds")

    @staticmethod
    def relay_round_member(host: str, round_id: int) -> str:
        """The member of ``relay_rounds`` saying ``host``'s relay finished ``round_id``."""
        return f"{host}|{round_id}"

    @property
    def relay_unasked(self) -> str:
        """Sorted set VM -> the latest round its host's relay could not ask it (its silence then is no evidence)."""
        return self._k("relayed", "unasked")

    # -- per-host cover (agent VMs whose host vouches, round by round, that they answered: docs/protocol.md).
    # Host workers may write them (a restart starts a VM's account afresh: vmq.store.covers.RedisCovers.release).
    @property
    def relay_covers(self) -> str:
        """Hash host -> "<round> <arrival ms> <base round>": the latest round the host's cover entry was applied,
        when it arrived, and the round of the full listing its entries are relative to (vmq/lua/relay_cover.lua)."""
        return self._k("cover", "hosts")

    @property
    def relay_cover_owner(self) -> str:
        """Hash vm -> the host whose cover vouches for it (a covered VM's ``last_round`` is COVERED_ROUND)."""
        return self._k("cover", "owner")

    def relay_cover(self, host: str) -> str:
        """Set of the VMs ``host``'s full listing named and Redis vouched for (their record places them there
        on the agent path)."""
        return self._k("cover", "vms", host)

    def relay_cover_pending(self, host: str) -> str:
        """Set of the VMs ``host`` lists but Redis could not vouch for yet (or released): asked again each entry."""
        return self._k("cover", "pending", host)

    def relay_cover_silent(self, host: str) -> str:
        """Set of ``host``'s covered VMs that did not answer its latest applied round (their ``last_round`` is
        their real last answered round)."""
        return self._k("cover", "silent", host)

    def relay_cover_prefixes(self) -> tuple[str, str, str]:
        """What ``relay_cover``, ``relay_cover_pending`` and ``relay_cover_silent`` put before a host's name."""
        return self.relay_cover(""), self.relay_cover_pending(""), self.relay_cover_silent("")

    # -- per-VM liveness (hot path: one multi-member ZADD GT per batch)
    @property
    def last_round(self) -> str:
        """Sorted set vm -> highest round with a valid reply (or the round it was registered at)."""
        return self._k("last", "round")

    @property
    def last_seen(self) -> str:
        """Sorted set vm -> arrival ms (Redis time) of its latest valid reply."""
        return self._k("last", "seen")

    @property
    def last_reply(self) -> str:
        """Hash vm -> JSON of a recent valid reply (state parameters, boot id, round), saved at most every
        VMQ_REPLY_SAVE_INTERVAL_S per VM (vmq.ingest.LatestReplies)."""
        return self._k("last", "reply")

    # -- VMs
    @property
    def vms(self) -> str:
        """Set of all known VM ids."""
        return self._k("vms")

    @property
    def app_unhealthy(self) -> str:
        """Hash VM -> JSON {round, checks, since_ms}: VMs whose latest reply says a liveness check failed its
        threshold (vmq.ingest); judged each round as silence is (vmq.monitor)."""
        return self._k("app", "unhealthy")

    @property
    def attention(self) -> str:
        """Set of VMs whose state is not `healthy` (checked on every reply batch)."""
        return self._k("attention")

    def vm(self, vm: str) -> str:
        """Hash of one VM's state record."""
        return self._k("vm", vm)

    @property
    def vm_prefix(self) -> str:
        """What ``vm`` puts before a VM's name (Lua scripts that build VM keys from names: relay_apply.lua)."""
        return self.vm("")

    def vm_restarts(self, vm: str) -> str:
        """Sorted set of restart dispatch times (ms) of one VM, for the per-window budget."""
        return self._k("vm", vm, "restarts")

    def restart_claim(self, vm: str, generation: int) -> str:
        """Idempotency key of one restart attempt: set once by the host worker that acts."""
        return self._k("claim", vm, str(generation))

    # -- secrets
    @property
    def secrets(self) -> str:
        """Hash vm -> hex HMAC key of that VM's responder."""
        return self._k("secrets")

    @property
    def secrets_previous(self) -> str:
        """Hash vm -> "hexkey:until_ms": a rotated-out key, still accepted until then (key rotation grace)."""
        return self._k("secrets", "previous")

    @property
    def secrets_version(self) -> str:
        """INCR'd on every key change so workers can cache ``secrets``."""
        return self._k("secrets", "version")

    # -- hosts
    @property
    def hosts(self) -> str:
        """Set of registered host names."""
        return self._k("hosts")

    def host(self, host: str) -> str:
        """Hash of one host's registration (queue, libvirt URI, started, pid)."""
        return self._k("host", host)

    def host_heartbeat(self, host: str) -> str:
        """Key with a TTL the host worker renews; its existence means the host is alive."""
        return self._k("host", host, "alive")

    def host_heartbeat_parts(self) -> tuple[str, str]:
        """(prefix, suffix) with prefix + host + suffix == ``host_heartbeat(host)``: for Lua that checks the
        liveness of a host it has just read from a record."""
        prefix, _, suffix = self.host_heartbeat("\0").partition("\0")
        return prefix, suffix

    def host_domains(self, host: str) -> str:
        """Hash domain name -> JSON (uuid, status, reason) as last listed by that host."""
        return self._k("host", host, "domains")

    def host_definitions(self, host: str) -> str:
        """Hash VM -> JSON (inactive domain XML without secrets, its sha256, when) kept by that host's inventory
        for a failover (vmq.failover_flow)."""
        return self._k("host", host, "defs")

    def host_definition_digests(self, host: str) -> str:
        """Hash VM -> sha256 of the definition in ``host_definitions`` (read each inventory sync, not the XML)."""
        return self._k("host", host, "defsha")

    # -- failover (written by the monitor and the CLI only: not in the host ACL)
    def failover(self, host: str) -> str:
        """Hash of the failover incident of a dead host (episode = its down_since_ms, state, fence result)."""
        return self._k("failover", host)

    def failover_claim(self, vm: str, episode: int) -> str:
        """Set once when ``vm``'s start elsewhere is sent for the host incident ``episode`` (exactly once)."""
        return self._k("failover", "vm", vm, str(episode))

    def fence_confirmation(self, host: str) -> str:
        """An operator's `vmq hosts fence-confirm`: JSON (episode, by, when)."""
        return self._k("failover", "confirm", host)

    def failover_start_claim(self, vm: str, episode: int) -> str:
        """Taken by the host worker that starts ``vm`` for incident ``episode`` (a redelivered task does nothing)."""
        return self._k("claim", "failover", vm, str(episode))

    # -- audit, counters, switches
    @property
    def events(self) -> str:
        """Audit stream: one entry per transition and action, with its evidence."""
        return self._k("events")

    @property
    def notify_cursor(self) -> str:
        """Id of the last audit event the notifier handled (vmq.notifications)."""
        return self._k("notify", "cursor")

    @property
    def notify_lock(self) -> str:
        """Held by the one notifier run reading the audit stream (a few seconds at most)."""
        return self._k("notify", "lock")

    @property
    def rejects(self) -> str:
        """Hash reason -> count of replies that failed verification."""
        return self._k("stats", "rejects")

    @property
    def stats(self) -> str:
        """Hash of counters (rounds, replies_valid, faults, restarts ...)."""
        return self._k("stats")

    @property
    def restart_outcomes(self) -> str:
        """Hash "host|action|result" -> count of restart requests a host worker finished (for /metrics)."""
        return self._k("stats", "restarts")

    def histogram(self, name: str) -> str:
        """Hash of one Redis-held histogram (bucket upper bound -> count, plus sum and count) for /metrics."""
        return self._k("stats", "hist", name)

    @property
    def maintenance_ends(self) -> str:
        """Sorted set "<vm>|<until ms>" -> until ms: the maintenance windows that end by themselves."""
        return self._k("maintenance", "ends")

    @staticmethod
    def maintenance_end_member(vm: str, until_ms: int) -> str:
        """The member of ``maintenance_ends`` for one window of ``vm`` (each window its own member)."""
        return f"{vm}|{until_ms}"

    @property
    def storm(self) -> str:
        """Hash of guard episodes in progress ("cluster" or "host:<name>" -> since ms)."""
        return self._k("storm")

    @property
    def restarts_suspended(self) -> str:
        """Kill switch: while this key exists no restart is dispatched."""
        return self._k("suspend")

