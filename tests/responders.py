"""Helpers shared by the responder's tests (unit and integration): run one in a thread, find an old Python."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from vmq.responder import Responder, ResponderConfig


@contextmanager
def serving(config: ResponderConfig) -> Iterator[Responder]:
    """Run a Responder in a thread; on exit stop it and check it stopped cleanly, without an exception."""
    agent, stop, failures = Responder(config), threading.Event(), []

    def target() -> None:
        try:
            agent.run(stop)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            failures.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "responder did not stop within 10 s of stop_event"
    assert failures == []


def find_old_python() -> str | None:
    """A Python 3.9 or 3.10 interpreter, as guests may have (pyenv's or on PATH), if this machine has one."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3")))
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3")))
    candidates += [path for name in ("python3.9", "python3.10") if (path := shutil.which(name))]
    for candidate in candidates:
        check = subprocess.run([candidate, "-c", "import sys; print(sys.version_info < (3, 11))"],
                               capture_output=True, text=True, timeout=30, check=False)
        if check.returncode == 0 and check.stdout.strip() == "True":
            return candidate
    return None
