"""Proof on real VMs of issue 18's failover: host A loses power, a fence agent proves it off, A's failover-enabled
guest answers again on host B, A's other guest stays down, and when A's libvirtd comes back a forced start of the
same disk there is refused by libvirt's lock manager.

Two hypervisors on this machine (tests/e2e/twohosts.py: a libvirtd and a virtlockd each, in their own namespaces,
one shared image directory, direct leases), one vmq cluster: Redis with the compose file's ACL, beat and the
monitor from docker-compose.yml's command lines, and one host worker per hypervisor (the compose host worker's
command, queue ``host.host-a`` / ``host.host-b``) reporting its real lock manager. The guests are the agent guest
(only Debian's qemu-guest-agent inside, no network): vmq watches them through their host (``agent`` path).

The fence agent follows the ClusterLabs fence-agents interface (options on stdin, ``action=off`` then
``action=status``: exit 2 for off): its "BMC" is the power of host A's namespace.
Printed: host loss -> host_down -> fenced -> started on B -> answering.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.debian import GuestKit
from tests.e2e.realvm import Stack, event_ms
from tests.e2e.test_disk_locks import lock_refused
from tests.e2e.twohosts import TwoHosts, create_disk, define_guest, domain_state
from tests.integration.test_stack import build_services, env_example_names, wait_healthy
from vmq.intent import intent_xml

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

HA_VM, PLAIN_VM = "vmq-e2e-ha", "vmq-e2e-plain"
HOSTS = {"A": "host-a", "B": "host-b"}
TTL_S = 6
TIMING = {"VMQ_PROBE_INTERVAL_S": "1", "VMQ_REPLY_TIMEOUT_S": "3", "VMQ_BOOT_GRACE_S": "60",
          "VMQ_RECOVERY_TIMEOUT_S": "120", "VMQ_INVENTORY_INTERVAL_S": "1", "VMQ_PROBE_PATH_DETECT": "1",
          "VMQ_HOST_HEARTBEAT_TTL_S": str(TTL_S), "VMQ_HOST_HEARTBEAT_INTERVAL_S": "0.3"}

#: A fence agent with the fence-agents interface whose device is host A's power (its namespace's PID 1).
FENCE_AGENT = '''#!{python}
import os, signal, sys
opts = dict(line.rstrip("\\n").split("=", 1) for line in sys.stdin if "=" in line)
pid = int(opts["port"])
def on():
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
if opts["action"] == "off":
    if on():
        os.kill(pid, signal.SIGKILL)
    print("Success: Powered OFF")
    sys.exit(0)
if opts["action"] == "status":
    print("Status: " + ("ON" if on() else "OFF"))
    sys.exit(0 if on() else 2)
sys.exit(1)
'''


@pytest.fixture
def cluster(two_hosts: TwoHosts, tmp_path: Path) -> Iterator[Stack]:
    """Redis, beat, the monitor (failover on, host A's fence device) and one host worker per hypervisor."""
    agent = tmp_path / "fence_namespace"
    agent.write_text(FENCE_AGENT.format(python=sys.executable))
    agent.chmod(0o755)
    fence = tmp_path / "fence.toml"
    fence.write_text(f'[hosts.host-a]\nagent = "{agent}"\ntimeout_s = 20\n'
                     f'options = {{ port = "{two_hosts.pids("A").init}" }}\n')
    variables = {name: secrets.token_hex(16) for name in env_example_names()}
    variables["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_hex(8)}"
    variables["VMQ_NAMESPACE"] = "e2efo"
    services = build_services(tmp_path, variables, profiles=set())
    template = services["host-node1"]
    assert template.argv[:3] == ["vmq", "sim", "node"], template.argv
    wanted = {name: services[name] for name in ("redis", "beat", "monitor")}
    for letter, host in HOSTS.items():
        argv = [("host." + host if arg == "host.node1" else arg) for arg in template.argv[template.argv.index("--") + 1:]]
        wanted[host] = dataclasses.replace(
            template, name=host, argv=argv, log=template.log.with_name(f"{host}.log"),
            health=[host if arg == "node1" else arg for arg in template.health],
            env={**template.env, **TIMING, "VMQ_HOST_NAME": host, "VMQ_LIBVIRT_URI": two_hosts[letter].uri,
                 "VMQ_LOCK_MANAGER": "lockd", "VMQ_VIRTLOCKD_SOCKET": str(two_hosts[letter].root / "run" / "virtlockd-sock")})
    wanted["beat"].env.update(TIMING)
    wanted["monitor"].env.update({**TIMING, "VMQ_FAILOVER": "true", "VMQ_FENCE_CONFIG": str(fence)})
    try:
        wanted["redis"].start()
        wait_healthy({"redis": wanted["redis"]}, 10)
        for name in ("monitor", *HOSTS.values(), "beat"):
            wanted[name].start()
        wait_healthy(wanted, 90)
        yield Stack(wanted, variables)
    finally:
        for name in ("beat", *HOSTS.values(), "monitor", "redis"):
            if name in wanted:  # a host worker the test killed is no longer there
                wanted[name].stop()


def define_with_intent(two_hosts: TwoHosts, vm: str, kit: GuestKit, tmp_path: Path, failover: bool | None) -> None:
    """The guest on host A only, its disk in the shared directory, its failover intent in its libvirt metadata."""
    xml = define_guest(two_hosts["A"], vm, create_disk(two_hosts.image_dir / f"{vm}.img"), kit)
    if failover is not None:
        xml = xml.replace("</domain>", f"<metadata>{intent_xml(failover=failover, priority=100)}</metadata></domain>")
        path = tmp_path / f"{vm}.intent.xml"
        path.write_text(xml)
        two_hosts.virsh("A", "define", str(path))


def test_host_power_loss_fences_it_and_its_enabled_guest_answers_on_the_other_host_never_twice(
        two_hosts: TwoHosts, cluster: Stack, agent_kit: GuestKit, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    stack, store = cluster, cluster.store
    define_with_intent(two_hosts, HA_VM, agent_kit, tmp_path, failover=True)
    define_with_intent(two_hosts, PLAIN_VM, agent_kit, tmp_path, failover=None)  # VMQ_FAILOVER_DEFAULT: off
    for vm in (HA_VM, PLAIN_VM):
        two_hosts.virsh("A", "start", vm)
    for vm in (HA_VM, PLAIN_VM):
        stack.wait(lambda vm=vm: store.vms.record(vm).state == "healthy", 180, f"{vm} healthy on host A")
    assert {store.vms.record(vm).host for vm in (HA_VM, PLAIN_VM)} == {HOSTS["A"]}
    assert store.vms.record(HA_VM).probe_path.value == "agent"
    # What a failover needs was reported by the hosts themselves: their real virtlockd, the kept definition.
    stack.wait(lambda: all(store.hosts.host_info(h).get("lock_ok") == "1" for h in HOSTS.values()), 30,
               "both hosts report virtlockd answering")
    kept = store.failovers.definitions(HOSTS["A"], [HA_VM])[HA_VM]["xml"]
    assert "<failover>yes</failover>" in kept.replace("vmq:", "") and "share-rw" in kept

    # Host A loses power: its QEMUs, libvirtd and virtlockd die at once, and its host worker with them.
    lost_ms = store.clock.time_ms()
    worker_a = stack.services.pop(HOSTS["A"])  # no longer a service that must stay up
    assert worker_a.process is not None
    os.killpg(worker_a.process.pid, signal.SIGKILL)
    two_hosts.power_loss("A")
    [done] = stack.wait(lambda: stack.events(HA_VM, lost_ms, "failover_done"), 60, f"{HA_VM} started on host B")
    assert done["host"] == HOSTS["B"] and done["from_host"] == HOSTS["A"]
    assert domain_state(two_hosts["B"], HA_VM) == "running"
    stack.wait(lambda: store.vms.record(HA_VM).host == HOSTS["B"] and store.vms.record(HA_VM).state == "healthy",
               120, f"{HA_VM} answering on host B through its agent")
    answering_ms = store.clock.time_ms()
    [down] = stack.events("", lost_ms, "host_down")
    [fenced] = stack.events("", lost_ms, "fenced")
    [started] = stack.events(HA_VM, lost_ms, "failover_started")
    assert fenced["host"] == HOSTS["A"] and "fence_namespace" in fenced["method"]
    [refused] = stack.events(PLAIN_VM, lost_ms, "failover_refused")
    assert "not enabled" in refused["reason"] and store.vms.record(PLAIN_VM).state == "unreachable"
    assert not stack.events("", lost_ms, "restart_dispatched", "failover_failed")
    assert len(stack.events("", 0, "failover_started")) == 1 and len(stack.events("", 0, "failover_done")) == 1

    # A's libvirtd comes back: a forced start of the disk that now runs on B is refused by the lock manager.
    two_hosts.restart_libvirtd("A")
    forced = two_hosts["A"].virsh_result("start", HA_VM, "--force-boot")
    assert lock_refused(forced, two_hosts.image_dir / f"{HA_VM}.img"), forced.stderr
    assert domain_state(two_hosts["A"], HA_VM) == "shut off" and domain_state(two_hosts["B"], HA_VM) == "running"

    def after(event: dict[str, object]) -> float:
        return round((event_ms(event) - lost_ms) / 1000, 2)

    fence_s = float(fenced["since_host_down_s"])
    with capsys.disabled():
        print(f"\nreal-VM failover: host A lost -> host_down {after(down)} s -> fenced {after(fenced)} s -> start sent "
              f"{after(started)} s -> started on B {after(done)} s -> answering {round((answering_ms - lost_ms) / 1000, 2)}"
              f" s (heartbeat TTL {TTL_S} s, fence {fence_s} s); the forced start on A refused by virtlockd", flush=True)
    assert after(done) <= TTL_S + fence_s + 5, "started on a healthy host within heartbeat TTL + fence time + 5 s"
