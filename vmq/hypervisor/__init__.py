"""Hypervisor adapters: ``open_hypervisor`` picks the fake or libvirt one from the URI.

Importing this package does not import libvirt; only building a LibvirtHypervisor (or starting a
``vmq.hypervisor.events.LifecycleListener``) does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from vmq.errors import ConfigError
from vmq.hypervisor.fake import FakeHypervisor
from vmq.hypervisor.types import ActivitySample, busy, moving
from vmq.ports import Hypervisor

__all__ = ["ActivitySample", "FakeHypervisor", "busy", "moving", "open_hypervisor", "with_simulated_agents"]

FAKE_SCHEME = "fake://"
TEST_SCHEME = "test:///"

#: Simulator only: the directory of the simulated guests' "agent silent" markers (vmq.sim.agents). Set by
#: LocalCluster on the host workers it starts on test:/// nodes; no deployment sets it, so, like
#: VMQ_GUEST_REDIS_URL, it is not a Settings field.
SIM_AGENTS_DIR_VARIABLE = "VMQ_SIM_AGENTS_DIR"


def open_hypervisor(uri: str, call_timeout_s: float = 30.0) -> Hypervisor:
    """A Hypervisor for ``uri``: FakeHypervisor for ``fake://...``, else LibvirtHypervisor (lazy connect),
    passed through ``with_simulated_agents``."""
    if uri.startswith(FAKE_SCHEME):
        return FakeHypervisor(uri)
    # Deferred so that processes without libvirt (monitor, responder) can import vmq.hypervisor.
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    return with_simulated_agents(LibvirtHypervisor(uri, call_timeout_s=call_timeout_s))


def with_simulated_agents(hypervisor: Hypervisor, environ: Mapping[str, str] | None = None) -> Hypervisor:
    """``hypervisor`` itself, unless VMQ_SIM_AGENTS_DIR is set (a simulated host worker): then wrapped in
    vmq.sim.agents.SimulatedAgents, whose guest-agent calls follow the simulated guests (libvirt's test driver
    answers every running domain's agent). Raises ConfigError for the variable on any URI but test:///."""
    directory = (os.environ if environ is None else environ).get(SIM_AGENTS_DIR_VARIABLE, "")
    if not directory:
        return hypervisor
    if not hypervisor.uri.startswith(TEST_SCHEME):
        raise ConfigError(f"{SIM_AGENTS_DIR_VARIABLE}: simulated guest agents are for libvirt's test driver "
                          f"(test:///...) only, not {hypervisor.uri!r}; unset it on a real host")
    # The one place outside vmq/sim that loads the simulator, and only with the variable set
    # (tests/unit/test_import_graph.py allows exactly this import).
    from vmq.sim.agents import SimulatedAgents

    return SimulatedAgents(hypervisor, Path(directory))
