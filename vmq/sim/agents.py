"""Simulated QEMU guest agents for host workers on libvirt's test driver.

libvirt's test driver answers ``getTime`` on every running domain with a fixed time, so through it alone an
agent can never hang. ``SimulatedAgents`` wraps the host worker's real ``LibvirtHypervisor`` on a
``test:///`` node and changes only the two agent calls: a domain's agent is **silent** while the simulated
guest fleet has left a marker file ``<directory>/<vm>.hung`` (the guest hung, or is powered off / booting
after a restart), and answers otherwise. Listing, state, activity, reset, start, destroy, channels and the
answer's guest time all still come from the test driver.

The fleet (vmq.sim.guests.GuestFleet) writes and removes the markers exactly where it SIGSTOPs, kills and
starts a responder process; the host worker reads them. A file per VM is the whole link: both run on this
machine, a file needs no extra connection in the hypervisor layer, and it survives either side restarting.

Loaded only in a simulated host worker: ``vmq.hypervisor.with_simulated_agents`` imports this module when
``VMQ_SIM_AGENTS_DIR`` is set (LocalCluster sets it), and refuses any URI but ``test:///``.

A silent agent behaves as the libvirt adapter does with a hung qemu-ga (FIELD-NOTES): a running domain's call
fails with AgentTimeout after ``timeout_s``; libvirt's own response timeout (whole seconds, at least 1) keeps
the domain's call slot taken that long, so a call in between gets AgentBusy; a paused or shut-off domain
fails at once with DomainNotRunning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmq.errors import AgentBusy, AgentTimeout, DomainNotRunning
from vmq.hypervisor.types import ActivitySample, AgentAnswer, HostCapacity, reduce_guest_info
from vmq.model import RESPONDER_CHANNEL, DomainInfo, DomainStatus
from vmq.ports import Hypervisor

T = TypeVar("T")

MARKER_SUFFIX = ".hung"
PID_SUFFIX = ".pid"


def marker_path(directory: Path, vm: str) -> Path:
    """The file whose presence silences ``vm``'s simulated agent."""
    return directory / f"{vm}{MARKER_SUFFIX}"


def set_agent_silent(directory: Path, vm: str, silent: bool) -> None:
    """Silence (hung, powered off, booting) or wake ``vm``'s simulated agent; idempotent."""
    path = marker_path(directory, vm)
    if silent:
        directory.mkdir(parents=True, exist_ok=True)
        path.touch()
    else:
        path.unlink(missing_ok=True)


def record_guest_pid(directory: Path, vm: str, pid: int) -> None:
    """Note the pid of ``vm``'s simulated guest (its responder process), so that a reset can kill it at once."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{vm}{PID_SUFFIX}").write_text(str(pid))


def power_off_guest(directory: Path, vm: str) -> None:
    """What a reset does to a real guest, at once: its agent falls silent and its responder process dies (the
    fleet boots it again after its boot delay, when it sees the restart). A pid whose command line is not
    ``vm``'s responder (reused, or gone) is left alone."""
    set_agent_silent(directory, vm, True)
    try:
        pid = int((directory / f"{vm}{PID_SUFFIX}").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if f"responder-{vm}.toml".encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def agent_silent(directory: Path, vm: str) -> bool:
    """True while ``vm``'s simulated agent is silent."""
    return marker_path(directory, vm).exists()


def _libvirt_hold_s(timeout_s: float) -> float:
    """How long libvirt keeps a hung call's slot: its response timeout, whole seconds, at least 1
    (vmq.hypervisor.agent.response_timeout_s; not imported, as that module imports libvirt)."""
    return float(max(1, int(timeout_s)))


class SimulatedAgents:
    """A Hypervisor whose guest-agent calls follow the simulated guests; everything else is ``inner``'s.

    Thread-safe as ``inner`` is. ``sleep`` waits on an event that ``close()`` sets, so a worker shutting down
    never waits out a silent agent.
    """

    def __init__(self, inner: Hypervisor, directory: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.directory = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_until: dict[str, float] = {}  # a silent call's slot, by domain (monotonic seconds)
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return f"SimulatedAgents({self.inner!r}, {str(self.directory)!r})"

    # ------------------------------------------------------------ the agent calls
    def agent_ping(self, name: str, timeout_s: float) -> AgentAnswer:
        """The test driver's answer (its fixed guest time) unless the guest's agent is silent; raises as the
        port says (AgentTimeout after ``timeout_s`` when silent)."""
        return self._call("agent_ping", name, timeout_s, lambda: self.inner.agent_ping(name, timeout_s))

    def guest_info(self, name: str, timeout_s: float) -> dict[str, object]:
        """A simulated guest's facts (the test driver has no guestInfo): os ``vmq-sim``, hostname = the
        domain's name, no filesystems; raises as agent_ping."""

        def answer() -> dict[str, object]:
            self._require_running("guest_info", name)
            return reduce_guest_info({"os.id": "vmq-sim", "os.version-id": "1", "hostname": name, "fs.count": 0})

        return self._call("guest_info", name, timeout_s, answer)

    def _call(self, operation: str, name: str, timeout_s: float, answer: Callable[[], T]) -> T:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        what = f"{operation} {name!r} on {self.uri}"
        with self._lock:
            if self._busy_until.get(name, 0.0) > self._clock():
                raise AgentBusy(f"{what}: another guest-agent call on this domain is still in flight")
        if not agent_silent(self.directory, name):
            return answer()
        self._require_running(operation, name)
        with self._lock:
            self._busy_until[name] = self._clock() + max(timeout_s, _libvirt_hold_s(timeout_s))
        self._closing.wait(timeout_s)  # the caller's wait; libvirt would give up no sooner
        raise AgentTimeout(f"{what}: no answer within {timeout_s:g} s (simulated guest agent is silent)")

    def _require_running(self, operation: str, name: str) -> None:
        """Raise DomainNotFound / DomainNotRunning as libvirt would before reaching the agent."""
        info = self.inner.domain_info(name)
        if info.status is not DomainStatus.RUNNING:
            raise DomainNotRunning(f"{operation} {name!r} on {self.uri} failed: domain is not running")

    # ------------------------------------------------------------ passed through unchanged
    def list_domains(self) -> list[DomainInfo]:
        """``inner``'s listing."""
        return self.inner.list_domains()

    def domain_info(self, name: str) -> DomainInfo:
        """``inner``'s domain info."""
        return self.inner.domain_info(name)

    def channel_socket(self, name: str, channel: str = RESPONDER_CHANNEL) -> str:
        """``inner``'s channel socket path."""
        return self.inner.channel_socket(name, channel)

    def activity(self, name: str) -> ActivitySample:
        """``inner``'s activity counters."""
        return self.inner.activity(name)

    def reset(self, name: str) -> None:
        """``inner``'s reset, and the simulated guest powered off at that instant, as a reset does (the test
        driver's reset changes nothing; the fleet boots the guest again after its boot delay)."""
        power_off_guest(self.directory, name)
        self.inner.reset(name)

    def resume(self, name: str) -> None:
        """``inner``'s resume."""
        self.inner.resume(name)

    def start(self, name: str) -> None:
        """``inner``'s start."""
        self.inner.start(name)

    def suspend(self, name: str) -> None:
        """``inner``'s suspend."""
        self.inner.suspend(name)

    def destroy(self, name: str) -> None:
        """``inner``'s destroy."""
        self.inner.destroy(name)

    def definition(self, name: str) -> str:
        """``inner``'s definition."""
        return self.inner.definition(name)

    def define_and_start(self, domain_xml: str) -> None:
        """``inner``'s define and start."""
        self.inner.define_and_start(domain_xml)

    def capacity(self) -> HostCapacity:
        """``inner``'s capacity."""
        return self.inner.capacity()

    def close(self) -> None:
        """Wake any call waiting on a silent agent, then close ``inner``; idempotent."""
        closing, self._closing = self._closing, threading.Event()  # later calls wait again (inner reopens)
        closing.set()
        self.inner.close()
