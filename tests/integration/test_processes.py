"""Process-level behaviour: bad settings stop a worker with a clear message; the demo cleans up on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    return {**env, **extra}


@pytest.mark.parametrize(("variable", "value"), [
    ("VMQ_REPLY_TIMEOUT_S", "1"),  # not greater than the 2 s default T1
    ("VMQ_PROBE_INTERVAL_S", "soon"),
    ("VMQ_MAX_RESTARTS", "-1"),
    ("VMQ_REDIS_URL", "http://localhost"),
])
def test_a_worker_with_a_bad_setting_stops_at_startup_naming_the_variable(variable: str, value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "vmq.monitor"],
                          capture_output=True, text=True, timeout=60, check=False, env=_env(**{variable: value}))
    assert proc.returncode == 2
    assert variable in proc.stderr
    assert "Traceback" not in proc.stderr


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or working directory names ``text`` (the demo's work dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if text in cmdline or cwd.startswith(text):
            found.append(f"{pid}: {cmdline}")
    return found


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    demo = subprocess.Popen([sys.executable, "-m", "vmq.cli", "demo", "--probe-interval", "0.5",
                             "--reply-timeout", "1.5", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(COLUMNS="300"))
    assert demo.stdout is not None
    workdir = None
    seen = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = demo.stdout.readline()
        seen += line
        match = re.search(r"logs in\s+(/\S+)", seen)
        if match:
            workdir = match.group(1)
        if workdir and "waiting for every guest" in seen:
            break
    assert workdir, seen
    cluster_deadline = time.monotonic() + 30
    # redis-server, beat, the monitor worker, 2 host workers (cwd = work dir) and 6 guests (config path).
    while len(_processes_mentioning(workdir)) < 11 and time.monotonic() < cluster_deadline:
        time.sleep(0.2)
    assert len(_processes_mentioning(workdir)) >= 11, _processes_mentioning(workdir)

    demo.send_signal(signal.SIGINT)
    demo.wait(timeout=60)
    assert demo.returncode == 1  # interrupted: no verdict
    assert _processes_mentioning(workdir) == []
