"""The small libvirt world the hypervisor contract suites share: three domains, one per start state."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmq.model import DomainStatus
from vmq.ports import Hypervisor
from vmq.sim.testnode import stable_uuid

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


def both_hypervisors(make_fake: Callable[[Path], Hypervisor], make_libvirt: Callable[[Path], Hypervisor]) -> Any:
    """A ``hypervisor`` fixture run once on the fake and once on libvirt's test driver, closed after each test;
    assign it in the suite: ``hypervisor = both_hypervisors(make_fake, make_libvirt)``."""

    @pytest.fixture(params=[make_fake, make_libvirt], ids=["fake", "libvirt"])
    def hypervisor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hypervisor]:
        factory: Callable[[Path], Hypervisor] = request.param
        made = factory(tmp_path)
        yield made
        made.close()

    return hypervisor
