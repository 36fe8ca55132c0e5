"""The simulator's guest agents: vmq.sim.agents.SimulatedAgents over a real LibvirtHypervisor on a test:/// node,
switched on by VMQ_SIM_AGENTS_DIR through vmq.hypervisor.open_hypervisor, and driven by GuestFleet's markers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmq.errors import AgentBusy, AgentTimeout, ConfigError, DomainNotFound, DomainNotRunning
from vmq.hypervisor import SIM_AGENTS_DIR_VARIABLE, FakeHypervisor, open_hypervisor, with_simulated_agents
from vmq.keys import Keys
from vmq.model import AGENT_CHANNEL, DomainInfo, DomainStatus, ProbePath
from vmq.ports import Hypervisor
from vmq.sim.agents import SimulatedAgents, agent_silent, set_agent_silent
from vmq.sim.guests import GuestFleet
from vmq.sim.testnode import stable_uuid, write_node

TEST_DRIVER_GUEST_MS = 627319920 * 1000  # the test driver's fixed getTime answer
DOMAINS = [("vm-a", stable_uuid("vm-a"), DomainStatus.RUNNING), ("vm-p", stable_uuid("vm-p"), DomainStatus.PAUSED)]


@pytest.fixture
def agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hypervisor]:
    pytest.importorskip("libvirt")
    uri = write_node(tmp_path / "node.xml", "node1", DOMAINS, channels={"vm-a": [AGENT_CHANNEL]})
    monkeypatch.setenv(SIM_AGENTS_DIR_VARIABLE, str(tmp_path / "agents"))
    hypervisor = open_hypervisor(uri, call_timeout_s=10.0)
    yield hypervisor
    hypervisor.close()


def test_open_hypervisor_wraps_test_driver_hosts_only_when_the_variable_is_set(tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    uri = write_node(tmp_path / "node.xml", "node1", DOMAINS)
    plain = with_simulated_agents(open_hypervisor(uri), environ={})
    assert not isinstance(plain, SimulatedAgents)
    wrapped = with_simulated_agents(plain, environ={SIM_AGENTS_DIR_VARIABLE: str(tmp_path)})
    assert isinstance(wrapped, SimulatedAgents) and wrapped.inner is plain and wrapped.uri == uri
    fake = FakeHypervisor("fake://x")
    assert with_simulated_agents(fake, environ={}) is fake
    with pytest.raises(ConfigError, match="VMQ_SIM_AGENTS_DIR"):
        with_simulated_agents(fake, environ={SIM_AGENTS_DIR_VARIABLE: str(tmp_path)})


def test_a_simulated_agent_answers_with_the_test_drivers_time_and_the_simulated_guest_info(agents: Hypervisor) -> None:
    assert isinstance(agents, SimulatedAgents)
    assert agents.agent_ping("vm-a", 2.0).guest_time_ms == TEST_DRIVER_GUEST_MS
    assert agents.guest_info("vm-a", 2.0) == {"os_id": "vmq-sim", "os_version_id": "1", "hostname": "vm-a",
                                              "filesystems": []}
    with pytest.raises(DomainNotRunning):
        agents.agent_ping("vm-p", 2.0)
    with pytest.raises(DomainNotRunning):
        agents.guest_info("vm-p", 2.0)
    with pytest.raises(DomainNotFound):
        agents.agent_ping("nope", 2.0)
    with pytest.raises(ValueError):
        agents.agent_ping("vm-a", 0)


def test_a_silent_agent_times_out_after_the_timeout_holds_its_slot_as_libvirt_does_and_answers_once_cleared(
    agents: Hypervisor,
) -> None:
    assert isinstance(agents, SimulatedAgents)
    set_agent_silent(agents.directory, "vm-a", True)
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match="silent"):
        agents.agent_ping("vm-a", 0.3)
    took_s = time.monotonic() - started
    assert 0.3 <= took_s < 1.5, took_s
    with pytest.raises(AgentBusy):  # libvirt's response timeout (1 s at least) still holds the domain's slot
        agents.guest_info("vm-a", 0.3)
    time.sleep(0.8)
    with pytest.raises(AgentTimeout):
        agents.guest_info("vm-a", 1.0)
    set_agent_silent(agents.directory, "vm-p", True)
    started = time.monotonic()
    with pytest.raises(DomainNotRunning):  # a paused domain fails at once, agent or not
        agents.agent_ping("vm-p", 1.0)
    assert time.monotonic() - started < 0.5
    set_agent_silent(agents.directory, "vm-a", False)  # the guest rebooted
    assert agents.agent_ping("vm-a", 1.0).guest_time_ms == TEST_DRIVER_GUEST_MS


def test_everything_but_the_agent_passes_through_to_the_test_driver(agents: Hypervisor) -> None:
    assert [(d.name, d.status) for d in agents.list_domains()] == [("vm-a", DomainStatus.RUNNING),
                                                                   ("vm-p", DomainStatus.PAUSED)]
    assert agents.domain_info("vm-a").channels == (AGENT_CHANNEL,)
    agents.reset("vm-a")
    agents.resume("vm-p")
    assert agents.domain_info("vm-p").status is DomainStatus.RUNNING
    agents.destroy("vm-a")
    assert agents.domain_info("vm-a").status is DomainStatus.SHUTOFF
    agents.start("vm-a")
    agents.suspend("vm-a")
    assert agents.domain_info("vm-a").status is DomainStatus.PAUSED


def test_closing_wakes_a_call_waiting_on_a_silent_agent(tmp_path: Path) -> None:
    inner = FakeHypervisor("test:///fake-for-this-test", [DomainInfo("vm-a", stable_uuid("vm-a"),
                                                                     DomainStatus.RUNNING, "unknown")])
    agents = SimulatedAgents(inner, tmp_path)
    set_agent_silent(tmp_path, "vm-a", True)
    threading.Timer(0.2, agents.close).start()
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        agents.agent_ping("vm-a", 30.0)
    assert time.monotonic() - started < 5


def test_the_fleet_silences_an_agent_guest_on_hang_and_power_off_and_wakes_it_on_boot(tmp_path: Path) -> None:
    directory = tmp_path / "agents"
    fleet = GuestFleet("redis://127.0.0.1:1/0", Keys("simag"), {"vm-a": "00" * 32}, tmp_path,
                       paths={"vm-a": ProbePath.AGENT}, agents_dir=directory)
    guest = fleet.guests["vm-a"]
    set_agent_silent(directory, "vm-a", True)  # LocalCluster leaves it powered off until the fleet boots it
    fleet.boot("vm-a")
    assert not agent_silent(directory, "vm-a") and guest.process is None and guest.boot_id
    first_boot = guest.boot_id
    fleet.hang("vm-a")
    assert agent_silent(directory, "vm-a") and guest.hung
    fleet.boot("vm-a")  # what a `restarted` event leads to, after the boot delay
    assert not agent_silent(directory, "vm-a") and not guest.hung and guest.boot_id != first_boot
    fleet.stop()
    assert agent_silent(directory, "vm-a")  # powered off
    assert not list(tmp_path.glob("responder-*"))  # nothing of vmq ran in the guest
    with pytest.raises(ValueError, match="agents_dir"):
        GuestFleet("redis://127.0.0.1:1/0", Keys("simag"), {"vm-a": "00" * 32}, tmp_path,
                   paths={"vm-a": ProbePath.AGENT})
