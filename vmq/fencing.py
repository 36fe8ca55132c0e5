"""Fencing a host before anything of it starts elsewhere (issue 18): the ClusterLabs fence agents (Debian's
`fence-agents`: fence_ipmilan, fence_redfish, fence_dummy ...) through their standard interface.

The interface (the FenceAgentAPI every agent of that project follows): the agent reads its options as
``name=value`` lines on stdin, ``action`` among them; it exits 0 when the action succeeded, and for ``status``
0 when the machine is on, 2 when it is off, anything else when it cannot tell. Secrets (``password``) go on stdin
only, never on a command line or in a log line. ``fence_off`` is what vmq asks before a failover: ``off``, then
``status`` must say off; anything else (a failure, a timeout, a missing agent, output it does not understand)
is "not fenced", with the reason. Standard library only; no Redis, no Celery (the caller audits the result).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmq.errors import ConfigError
from vmq.keys import valid_name

__all__ = ["FenceDevice", "FenceResult", "FenceStep", "fence_off", "load_fence_config", "run_fence"]

#: Exit status of ``action=status`` for a machine that is off (0: on; anything else: unknown).
STATUS_OFF = 2
#: Options whose values never appear anywhere but on the agent's stdin.
SECRET_OPTIONS = frozenset({"password", "passwd", "password_script", "snmp_priv_passwd", "identity_file"})
#: Output of an agent kept for the audit (its tail), after secrets are masked.
OUTPUT_KEPT = 400


@dataclass(frozen=True)
class FenceDevice:
    """How to fence one host: the agent (a path or a name on PATH) and its options (as its stdin takes them)."""

    agent: str
    options: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0

    def masked(self, text: str) -> str:
        """``text`` with the value of every secret option replaced by ***."""
        for name, value in self.options.items():
            if name in SECRET_OPTIONS and value:
                text = text.replace(value, "***")
        return text


@dataclass(frozen=True)
class FenceStep:
    """One run of the agent: the action, its exit status (None: it did not finish or could not start), how long
    it took, and what it said (masked, its tail)."""

    action: str
    exit_code: int | None
    seconds: float
    output: str


@dataclass(frozen=True)
class FenceResult:
    """Whether the host is proven off (``fenced``), the reason when not, and each step run."""

    fenced: bool
    reason: str
    steps: tuple[FenceStep, ...] = ()


def _stdin(device: FenceDevice, action: str) -> bytes:
    lines = [f"{name}={value}" for name, value in device.options.items() if name != "action"]
    return ("\n".join([f"action={action}", *lines]) + "\n").encode()


def run_fence(device: FenceDevice, action: str) -> FenceStep:
    """Run the agent once for ``action`` (its own process group, killed whole at the timeout)."""
    started = time.monotonic()
    agent = device.agent if os.sep in device.agent else (shutil.which(device.agent) or device.agent)
    try:
        proc = subprocess.Popen([agent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
                                                             **_passed_env()})
    except OSError as exc:
        return FenceStep(action, None, time.monotonic() - started, f"cannot run {device.agent}: {exc.strerror}")
    try:
        out, _ = proc.communicate(_stdin(device, action), timeout=device.timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        text = device.masked(out.decode("utf-8", "replace"))[-OUTPUT_KEPT:]
        return FenceStep(action, None, time.monotonic() - started,
                         f"no answer within {device.timeout_s:g} s (killed){': ' + text if text else ''}")
    text = device.masked(out.decode("utf-8", "replace")).strip()[-OUTPUT_KEPT:]
    return FenceStep(action, proc.returncode, time.monotonic() - started, text)


def _passed_env() -> dict[str, str]:
    """What the agent may see of vmq's environment: PYTHONPATH (agents unpacked beside vmq), the locale."""
    return {name: os.environ[name] for name in ("PYTHONPATH", "LANG", "LC_ALL") if name in os.environ}


def fence_off(device: FenceDevice) -> FenceResult:
    """Power the host off and prove it: ``off`` must succeed and ``status`` must then say off."""
    off = run_fence(device, "off")
    if off.exit_code != 0:
        what = "did not finish" if off.exit_code is None else f"exited {off.exit_code}"
        return FenceResult(False, f"{device.agent} off {what}: {off.output or 'no output'}", (off,))
    status = run_fence(device, "status")
    if status.exit_code == STATUS_OFF:
        return FenceResult(True, f"{device.agent}: off, and its status says off", (off, status))
    said = {None: "did not finish", 0: "says the machine is still on"}.get(status.exit_code,
                                                                           f"exited {status.exit_code}")
    return FenceResult(False, f"{device.agent} status after off {said}: {status.output or 'no output'}",
                       (off, status))


def load_fence_config(path: Path) -> dict[str, FenceDevice]:
    """The fence device of each host from a TOML file (docs/design.md, "Failover: the parts built")::

        [hosts.alpha]
        agent = "fence_ipmilan"
        timeout_s = 60
        options = { ip = "10.0.0.11", username = "admin", password = "...", lanplus = "1" }

    Raises ConfigError naming what is wrong; a value with a line break is refused (it would be a second option
    on the agent's stdin)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"fence config {path}: {exc}") from None
    hosts = raw.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"fence config {path}: [hosts] must be a table of hosts")
    devices: dict[str, FenceDevice] = {}
    for host, entry in hosts.items():
        where = f"fence config {path}, host {host!r}"
        if not valid_name(host) or not isinstance(entry, dict):
            raise ConfigError(f"{where}: not a valid host name with a table")
        agent, options, timeout = entry.get("agent"), entry.get("options", {}), entry.get("timeout_s", 60)
        if not isinstance(agent, str) or not agent.strip():
            raise ConfigError(f"{where}: agent must name a fence agent (fence_ipmilan, /usr/sbin/fence_redfish ...)")
        if not isinstance(options, dict) or not all(isinstance(v, (str, int, bool)) for v in options.values()):
            raise ConfigError(f"{where}: options must map names to strings")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 600:
            raise ConfigError(f"{where}: timeout_s must be a number of seconds in (0, 600]")
        text = {str(k): (("1" if v else "0") if isinstance(v, bool) else str(v)) for k, v in options.items()}
        for name, value in text.items():
            if "\n" in name or "\r" in name or "=" in name or "\n" in value or "\r" in value or name == "action":
                raise ConfigError(f"{where}: option {name!r} has a line break, '=' or is 'action' (vmq sets it)")
        devices[host] = FenceDevice(agent.strip(), text, float(timeout))
    return devices
