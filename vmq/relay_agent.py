"""One guest-agent call of the host's probe relay (vmq.relay): a ping, and the guest's info when asked, within
the round's deadline, turned into a relayed answer or a drop reason. Runs in the relay's pool threads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmq.errors import (
    AgentAnswerInvalid,
    AgentBusy,
    AgentTimeout,
    AgentUnavailable,
    DomainNotRunning,
    HypervisorError,
)
from vmq.ports import Hypervisor
from vmq.relay_answers import Answer, agent_answer

__all__ = ["FAST_LANE_TIMEOUT_S", "HOST_SIDE_REASONS", "MIN_CALL_S", "Called", "call_agent", "drop_reason"]

log = logging.getLogger(__name__)

FAST_LANE_TIMEOUT_S = 0.25  # qemu-ga answers in 1.3 ms (p50), 2.6 ms (p99)
MIN_CALL_S = 0.01  # a call that would get less time than this is not started (agent_late)
#: Drop reasons that say the host could not ask (libvirt failed, the domain is not running, the call never
#: started): the VM is named unasked in the round's mark, so its silence is no evidence. The others (timeout, no
#: agent, nonsense, busy) are the guest's own.
HOST_SIDE_REASONS = frozenset({"agent_late", "hypervisor_error", "not_running"})


@dataclass(frozen=True)
class Called:
    """What one agent call gave, handed from a pool thread to the relay's loop."""

    vm: str
    round_id: int
    answer: Answer | None
    reason: str  # "" with an answer
    detail: str
    latency_ms: float | None
    done_s: float
    info_failed: bool = False


def drop_reason(exc: HypervisorError) -> str:
    """The drop reason of a failed agent call (AgentBusy before AgentTimeout: it is a subclass)."""
    for kind, reason in ((AgentBusy, "agent_busy"), (AgentTimeout, "agent_timeout"),
                         (AgentUnavailable, "agent_unavailable"), (AgentAnswerInvalid, "agent_invalid"),
                         (DomainNotRunning, "not_running")):
        if isinstance(exc, kind):
            return reason
    return "hypervisor_error"


def call_agent(hypervisor: Callable[[], Hypervisor], clock: Callable[[], float], vm: str, round_id: int, nonce: str,
               deadline_s: float, slow: bool, with_info: bool,
               on_start: Callable[[tuple[int, str]], None] = lambda call: None) -> Called:
    """Ping ``vm``'s guest agent for round ``round_id`` (and read its info when ``with_info``) before
    ``deadline_s`` (``clock`` seconds); the fast lane (not ``slow``) waits at most FAST_LANE_TIMEOUT_S.
    ``on_start((round_id, vm))`` runs once the call is really made; a call with less than MIN_CALL_S left is
    not made (reason ``agent_late``). Never raises: failures come back as a drop reason."""
    remaining_s = deadline_s - clock()
    if remaining_s < MIN_CALL_S:
        return Called(vm, round_id, None, "agent_late", "queued past its round", None, clock())
    timeout_s = remaining_s if slow else min(remaining_s, FAST_LANE_TIMEOUT_S)
    on_start((round_id, vm))
    try:
        port = hypervisor()
        pinged = port.agent_ping(vm, timeout_s)
    except HypervisorError as exc:
        return Called(vm, round_id, None, drop_reason(exc), str(exc), None, clock())
    except Exception as exc:  # a bug in an adapter must not kill the pool thread silently
        log.exception("vm=%s agent call failed", vm)
        return Called(vm, round_id, None, "hypervisor_error", repr(exc), None, clock())
    info: dict[str, object] | None = None
    info_failed = False
    if with_info and (left_s := deadline_s - clock()) >= MIN_CALL_S:
        try:
            info = port.guest_info(vm, left_s)
        except HypervisorError:
            info_failed = True
    answer = agent_answer(vm, round_id, nonce, pinged.latency_ms, pinged.guest_time_ms, info)
    return Called(vm, round_id, answer, "", "", pinged.latency_ms, clock(), info_failed)
