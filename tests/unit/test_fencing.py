"""The fence runner (vmq.fencing) against fake fence agents that follow the fence-agents interface: options as
name=value lines on stdin, exit 0 on success, status 0 on / 2 off. Success, failure, a machine still on, a hang,
garbage output, a missing agent; secrets only on stdin and never in what vmq keeps. (The real fence_dummy of
Debian's fence-agents: tests/integration/test_fencing.py.)"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from vmq.errors import ConfigError
from vmq.fencing import FenceDevice, fence_off, load_fence_config, run_fence

SECRET = "s3cr3t-pw"


def agent(tmp_path: Path, body: str) -> str:
    """A fence agent: a shell script reading its options (one name=value per line) into $opt_<name>."""
    path = tmp_path / "fence_fake"
    path.write_text("#!/bin/sh\n"
                    "while IFS='=' read -r name value; do [ -n \"$name\" ] && eval \"opt_$name=\\$value\"; done\n"
                    f'echo "$opt_action" >> "{tmp_path}/calls"\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().split() if path.exists() else []


POWER = """state=$(cat "{dir}/power" 2>/dev/null || echo on)
case "$opt_action" in
  off) [ "$opt_password" = "{secret}" ] || {{ echo "Failed: bad password $opt_password"; exit 1; }}
       echo off > "{dir}/power"; echo "Success: Powered OFF";;
  status) echo "Status: $state"; [ "$state" = off ] && exit 2; exit 0;;
  *) exit 1;;
esac
"""


def test_off_then_status_off_is_fenced_and_the_password_went_on_stdin_only(tmp_path: Path) -> None:
    device = FenceDevice(agent(tmp_path, POWER.format(dir=tmp_path, secret=SECRET)),
                         {"ip": "10.0.0.11", "username": "admin", "password": SECRET})
    result = fence_off(device)
    assert result.fenced and [s.action for s in result.steps] == ["off", "status"]
    assert [s.exit_code for s in result.steps] == [0, 2] and calls(tmp_path) == ["off", "status"]


def test_a_refused_off_is_not_fenced_and_the_secret_is_masked_in_what_is_kept(tmp_path: Path) -> None:
    device = FenceDevice(agent(tmp_path, 'echo "Failed: bad password $opt_password"; exit 1\n'),
                         {"password": SECRET})
    result = fence_off(device)
    assert not result.fenced and "off exited 1" in result.reason and calls(tmp_path) == ["off"]
    assert SECRET not in result.reason and "Failed: bad password ***" in result.reason


def test_an_off_that_leaves_the_machine_on_is_not_fenced(tmp_path: Path) -> None:
    body = 'case "$opt_action" in off) echo "Success: Powered OFF";; status) echo "Status: ON"; exit 0;; esac\n'
    result = fence_off(FenceDevice(agent(tmp_path, body)))
    assert not result.fenced and "says the machine is still on" in result.reason


@pytest.mark.parametrize(("status_body", "said"), [
    ("exit 1", "exited 1"),
    ("head -c 3000 /dev/urandom; exit 7", "exited 7"),  # garbage output: only the exit status counts
])
def test_a_status_that_cannot_tell_is_not_fenced(tmp_path: Path, status_body: str, said: str) -> None:
    body = f'case "$opt_action" in off) exit 0;; status) {status_body};; esac\n'
    result = fence_off(FenceDevice(agent(tmp_path, body)))
    assert not result.fenced and said in result.reason
    assert len(result.steps[-1].output) <= 400


def test_a_hung_agent_is_killed_at_its_timeout_with_its_children(tmp_path: Path) -> None:
    device = FenceDevice(agent(tmp_path, f'sleep 30 & echo $! > "{tmp_path}/child"; wait\n'), timeout_s=0.5)
    started = time.monotonic()
    result = fence_off(device)
    assert not result.fenced and "did not finish" in result.reason and time.monotonic() - started < 5
    child = Path(f"/proc/{int((tmp_path / 'child').read_text())}/stat")
    time.sleep(0.1)
    assert not child.exists() or child.read_text().split(") ")[1].startswith("Z"), "its child sleeps on"


def test_a_missing_agent_is_not_fenced(tmp_path: Path) -> None:
    step = run_fence(FenceDevice(str(tmp_path / "fence_nowhere")), "off")
    assert step.exit_code is None and "cannot run" in step.output
    assert not fence_off(FenceDevice("fence_not_installed_here")).fenced


def test_the_config_names_each_hosts_agent_and_refuses_what_would_inject_stdin_lines(tmp_path: Path) -> None:
    path = tmp_path / "fence.toml"
    path.write_text('[hosts.alpha]\nagent = "fence_ipmilan"\ntimeout_s = 30\n'
                    'options = { ip = "10.0.0.11", username = "admin", password = "pw", lanplus = true }\n')
    [(host, device)] = load_fence_config(path).items()
    assert host == "alpha" and device == FenceDevice("fence_ipmilan", {"ip": "10.0.0.11", "username": "admin",
                                                                       "password": "pw", "lanplus": "1"}, 30.0)
    for bad, what in [('options = { ip = "x\\naction=on" }', "line break"), ('options = { action = "on" }', "action"),
                      ("timeout_s = 0", "timeout_s"), ('agent = ""', "agent must name")]:
        body = bad if bad.startswith("agent") else f'agent = "fence_ipmilan"\n{bad}'
        path.write_text(f"[hosts.alpha]\n{body}\n")
        with pytest.raises(ConfigError, match=what):
            load_fence_config(path)
    path.write_text("[hosts.alpha\n")
    with pytest.raises(ConfigError, match="fence config"):
        load_fence_config(path)
