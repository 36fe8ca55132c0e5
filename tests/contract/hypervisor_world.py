"""The small libvirt world the hypervisor contract suites share: three domains, one per start state."""

from __future__ import annotations

import importlib.util

import pytest

from vmq.sim.testnode import stable_uuid
from vmq.model import DomainStatus

HOST = "host-a"
RUNNING, PAUSED, OFF = "vm-running", "vm-paused", "vm-off"
WORLD: list[tuple[str, str, DomainStatus]] = [
    (RUNNING, stable_uuid(RUNNING), DomainStatus.RUNNING),
    (PAUSED, stable_uuid(PAUSED), DomainStatus.PAUSED),
    (OFF, stable_uuid(OFF), DomainStatus.SHUTOFF),
]

libvirt_only = pytest.mark.skipif(
    importlib.util.find_spec("libvirt") is None, reason="libvirt-python not installed"
)
