"""Proof on real VMs: three QEMU guests under libvirtd, one on each probe path, in one vmq cluster (beat, monitor
and host worker started from docker-compose.yml's own command lines):

- ``vmq-e2e-redis`` (``redis``): the real responder in Debian's Python, talking to Redis over QEMU's user-mode
  network;
- ``vmq-e2e-channel`` (``channel``): the same responder and image without any network device, answering over the
  virtio-serial port ``org.vmq.responder.0``, which the host worker's relay finds in the live domain XML;
- ``vmq-e2e-agent`` (``agent``): no Python, no network, nothing of vmq: only Debian's qemu-guest-agent on
  ``org.qemu.guest_agent.0``, which the relay asks through libvirt.

Each VM's probe path is detected from its domain's channels (VMQ_PROBE_PATH_DETECT=1) and checked. Faults, each
measured on Redis' clock from the moment the fault was ordered:
1. a hang on each path, one after the other (the channel guest's responder, the agent guest's qemu-ga, the redis
   guest's responder SIGSTOPped inside the guest, ordered over its second serial port): libvirt says "running",
   vmq sees silence past T2, the host worker (queue ``host.node1``) resets only that domain, and it answers again
   (a new boot);
2. the redis guest's QEMU process is SIGKILLed from outside (a crash: libvirt reports shut off, reason
   "crashed"): the host worker's lifecycle events report it and vmq starts the domain again;
3. an operator powers the agent guest off with ``virsh destroy``: vmq records why and never restarts it.
Printed: detection, restart and recovery times per fault, and the relay's per-call latency against real qemu-ga.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.agent_image import AGENT_CHANNEL
from tests.e2e.debian import GuestKit
from tests.e2e.guest_image import HOST_IP, guest_initramfs
from tests.e2e.realvm import (
    Guest,
    Stack,
    domain_xml,
    event_ms,
    percentile,
    qemu_pid,
    remove_domain,
    send_guest_command,
    virsh,
)
from tests.integration.test_stack import build_services, env_example_names, wait_healthy
from vmq.model import RESPONDER_CHANNEL, ProbePath

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]  # image builds, three TCG boots, four faults

HOST = "node1"  # the compose file's first host worker; here its libvirt is the real qemu:///system
VM_REDIS, VM_CHANNEL, VM_AGENT = "vmq-e2e-redis", "vmq-e2e-channel", "vmq-e2e-agent"
PATHS = {VM_REDIS: ProbePath.REDIS, VM_CHANNEL: ProbePath.CHANNEL, VM_AGENT: ProbePath.AGENT}
# T1 = 1 s, T2 = 3 s as the benchmark; a TCG guest needs ~10-25 s from reset to its first answer, which the
# recovery timeout covers; the boot grace only protects a guest that has just started: three TCG guests booting
# at once on two cores take ~30-50 s to their first answer.
T1_S, T2_S, BOOT_GRACE_S = 1, 3, 60
TIMING = {"VMQ_PROBE_INTERVAL_S": str(T1_S), "VMQ_REPLY_TIMEOUT_S": str(T2_S), "VMQ_BOOT_GRACE_S": str(BOOT_GRACE_S),
          "VMQ_RECOVERY_TIMEOUT_S": "120", "VMQ_INVENTORY_INTERVAL_S": "1", "VMQ_MAX_RESTARTS": "5",
          "VMQ_PROBE_PATH_DETECT": "1",
          # the agent guest's state parameters every 10 s (the default is 30 s): enough latency samples to print
          "VMQ_RELAY_INFO_INTERVAL_S": "10"}
# The activity check stays on (the default): an idle QEMU guest accrues CPU time (~10 ms/s under TCG) and
# receives the probes, but neither holds a reset; only its own disk or network I/O above the floor would.


# The redis guest's application liveness check: fails once the guest's `break-app` command has run, until the
# next boot clears /run (tests/e2e/guest_init.py).
APP_LIVENESS = ('\n[[health]]\nname = "app"\ncommand = "test ! -e /run/app-broken"\ninterval_s = 1\n'
                'kind = "liveness"\nfailure_threshold = 2\n')


@pytest.fixture
def stack(tmp_path: Path, libvirtd: str) -> Iterator[Stack]:
    variables = {name: secrets.token_hex(16) for name in env_example_names()}
    variables["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_hex(8)}"
    variables["VMQ_NAMESPACE"] = "e2e"
    services = build_services(tmp_path, variables, profiles=set())
    wanted = {name: services[name] for name in ("redis", "beat", "monitor", f"host-{HOST}")}
    host = wanted[f"host-{HOST}"]
    # The compose host worker, minus the `vmq sim node --vms 3 --` prefix that fakes a hypervisor there.
    assert host.argv[:3] == ["vmq", "sim", "node"], host.argv
    host.argv = host.argv[host.argv.index("--") + 1:]
    host.env["VMQ_LIBVIRT_URI"] = libvirtd
    for name in ("beat", "monitor", f"host-{HOST}"):
        wanted[name].env.update(TIMING)
    try:
        wanted["redis"].start()
        wait_healthy({"redis": wanted["redis"]}, 10)
        for name in ("monitor", f"host-{HOST}", "beat"):
            wanted[name].start()
        wait_healthy(wanted, 90)
        yield Stack(wanted, variables)
    finally:
        for name in ("beat", f"host-{HOST}", "monitor", "redis"):
            wanted[name].stop()


@pytest.fixture
def guests(stack: Stack, guest_kit: GuestKit, agent_kit: GuestKit, tmp_path: Path) -> Iterator[dict[str, Guest]]:
    """The three guests defined on qemu:///system, each with its own key (``vmq keys add``), started together."""
    workdir = tmp_path / "guests"
    workdir.mkdir()
    port = re.search(r"@127\.0\.0\.1:(\d+)/", stack.env["VMQ_REDIS_URL"]).group(1)  # type: ignore[union-attr]
    url = f"redis://guest:{stack.variables['REDIS_GUEST_PASSWORD']}@{HOST_IP}:{port}/0"
    found: dict[str, Guest] = {}
    channels: tuple[str, ...]
    for vm, path in PATHS.items():
        remove_domain(vm)
        # Every VM is enrolled by `vmq keys add` (its key, its record); only the responder guests get the file,
        # the channel guest's without a Redis URL (no network: no route, no password in the guest).
        toml = stack.vmq("keys", "add", vm, *(["--channel"] if path is ProbePath.CHANNEL else
                                              ["--guest-redis-url", url]))
        if vm == VM_REDIS:
            toml += APP_LIVENESS
        if path is ProbePath.AGENT:
            kernel, initrd, channels, memory_mib = agent_kit.kernel, agent_kit.initramfs, (AGENT_CHANNEL,), 128
        else:
            if path is ProbePath.CHANNEL:
                assert "redis_url" not in toml and 'transport = "channel"' in toml
            kernel, memory_mib = guest_kit.kernel, 192
            initrd = guest_initramfs(guest_kit, toml, workdir / f"{vm}.initrd")
            channels = (RESPONDER_CHANNEL,) if path is ProbePath.CHANNEL else ()
        xml = workdir / f"{vm}.xml"
        xml.write_text(domain_xml(vm, kernel, initrd, workdir, network=path is ProbePath.REDIS, channels=channels,
                                  memory_mib=memory_mib))
        virsh("define", str(xml))
        found[vm] = Guest(vm, path, "agent" if path is ProbePath.AGENT else "responder",
                          workdir / f"{vm}.console.log", workdir / f"{vm}.cmd.sock")
    try:
        for vm in found:
            virsh("start", vm)
        yield found
    finally:
        for vm in found:
            remove_domain(vm)


def test_real_guests_on_every_probe_path_are_restarted_when_hung_or_crashed_and_left_off_when_an_operator_stops_them(
        stack: Stack, guests: dict[str, Guest], capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    store = stack.store
    timings: dict[str, dict[str, Any]] = {}

    def answering_after(vm: str, old_boot: str | None, since_ms: int = 0) -> dict[str, Any] | None:
        """Healthy and answering from a boot other than ``old_boot``: the responder's reply (its boot id), or
        for the agent guest a relayed answer that arrived after ``since_ms`` from a boot the console shows."""
        rec = store.vms.record(vm)
        if rec.state != "healthy":
            return None
        if guests[vm].path is ProbePath.AGENT:
            boots = guests[vm].boot_ids()
            answers = stack.relayed_answers(vm, since_ms)
            return answers[-1][1] if answers and boots and boots[-1] != old_boot else None
        reply = stack.last_reply(vm)
        return reply if reply.get("boot_id") and reply["boot_id"] != old_boot else None

    # All three boot and answer on their own paths, the path detected from each domain's channels.
    replies = {vm: stack.wait(lambda vm=vm: answering_after(vm, None), 150, f"{vm} healthy") for vm in guests}
    boot_took = time.monotonic() - started
    assert {rec.vm: rec.probe_path for rec in store.vms.records(sorted(PATHS))} == PATHS
    for vm in (VM_REDIS, VM_CHANNEL):
        reply, params = replies[vm], replies[vm]["params"]
        assert reply["vm"] == vm and store.vms.record(vm).host == HOST
        assert reply["boot_id"] == guests[vm].boot_ids()[-1], "boot id is not the guest kernel's"
        assert 100_000 < params["mem_total_kb"] < 196_608 and 0 < params["mem_available_kb"] < params["mem_total_kb"]
        assert len(params["load"]) == 3 and params["disk_total_b"] > 0 and 0 < params["uptime_s"] < 300
    assert replies[VM_REDIS]["boot_id"] != replies[VM_CHANNEL]["boot_id"]
    # The channel guest has no network device: its replies can only have come through the relay, signed by itself.
    assert {answer["p"] for _, answer in stack.relayed_answers(VM_CHANNEL)} == {"channel"}
    agent_answers = stack.relayed_answers(VM_AGENT)
    assert {answer["p"] for _, answer in agent_answers} == {"agent"}
    # The state parameters ride along every VMQ_RELAY_INFO_INTERVAL_S (10 s here; docs/protocol.md).
    arrival_ms, first = stack.wait(lambda: next((pair for pair in reversed(stack.relayed_answers(VM_AGENT))
                                                 if "latency_ms" in pair[1]), None), 30, "agent state parameters")
    assert first["latency_ms"] > 0 and abs(first["guest_ms"] - arrival_ms) < 120_000, first  # the guest's clock

    def past_boot_grace(vm: str) -> bool:
        booted = int(store.vms.record(vm).booted_at_ms or 0)
        return store.clock.time_ms() - booted > (BOOT_GRACE_S + 2) * 1000

    def at(event: dict[str, Any], since_ms: int) -> float:
        return round((event_ms(event) - since_ms) / 1000, 2)

    # Fault 1: a hang on each path in turn (the next once the previous VM has been reset, so that no two are
    # ever judged at once), while libvirt says running. Only the hung VM's restart is dispatched meanwhile.
    hung: dict[str, tuple[int, str]] = {}
    for vm in (VM_CHANNEL, VM_AGENT, VM_REDIS):
        guest = guests[vm]
        stack.wait(lambda vm=vm: past_boot_grace(vm), 90, f"{vm} past its boot grace")
        boot_before = guest.boot_ids()[-1]
        fault_ms = send_guest_command(guest, f"hang-{guest.service}", f"vmq-guest: SIGSTOP {guest.service}",
                                      store.clock.time_ms)
        assert "running" in virsh("domstate", vm)
        [restarted] = stack.wait(lambda vm=vm, since=fault_ms: stack.events(vm, since, "restarted"), 60,
                                 f"{vm}: hung {guest.service} restarted")
        [faulty] = stack.events(vm, fault_ms, "faulty")
        dispatched = [e for e in stack.events("", fault_ms, "restart_dispatched") if event_ms(e) <= event_ms(restarted)]
        assert [(e["vm"], e["queue"]) for e in dispatched] == [(vm, f"host.{HOST}")], dispatched
        assert restarted["action"] == "reset" and restarted["host"] == HOST, restarted
        hung[vm] = (fault_ms, boot_before)
        timings[f"fault 1: {guest.service} hung in {vm} ({guest.path.value})"] = {
            "detection_s": at(faulty, fault_ms), "restart_s": at(restarted, fault_ms)}
        if vm == VM_REDIS:
            # The activity check ran on real counters: libvirt's CPU time of the live domain is known (info() when
            # the host has no cgroup CPU controller), it grew, and it did not hold the reset.
            activity = restarted.get("activity") or {}
            assert activity["first"]["cpu_time_ns"] is not None and activity["busy"] == [], activity
    for vm, (fault_ms, boot_before) in hung.items():
        name = next(key for key in timings if f" in {vm} " in key)
        stack.wait(lambda vm=vm, boot=boot_before, since=fault_ms: answering_after(vm, boot, since), 180,
                   f"{vm} answering again after its reset")
        [healed] = stack.events(vm, fault_ms, "recovered")
        timings[name]["recovery_s"] = at(healed, fault_ms)
        assert len(guests[vm].boot_ids()) == 2, f"{vm} booted once more"
    for vm, figures in timings.items():
        figures["target_met"] = figures["detection_s"] <= T1_S + T2_S + 1

    # Fault 2: the redis guest's QEMU dies (SIGKILL from outside): libvirt reports shut off / crashed; vmq starts it.
    stack.wait(lambda: past_boot_grace(VM_REDIS), 90, f"{VM_REDIS} past its boot grace again")
    boot_before = stack.last_reply(VM_REDIS)["boot_id"]
    fault_ms = store.clock.time_ms()
    os.kill(qemu_pid(VM_REDIS), signal.SIGKILL)
    stack.wait(lambda: answering_after(VM_REDIS, boot_before), 180, f"{VM_REDIS} answering after its crash")
    crash = stack.events(VM_REDIS, fault_ms, "domain_event")
    assert any(e.get("kind") == "crash" for e in crash), crash
    [restarted] = stack.events(VM_REDIS, fault_ms, "restarted")
    [healed] = stack.events(VM_REDIS, fault_ms, "recovered")
    assert restarted["action"] == "create" and restarted["host"] == HOST, restarted
    assert stack.last_reply(VM_REDIS)["boot_id"] == guests[VM_REDIS].boot_ids()[-1]
    detected = stack.events(VM_REDIS, fault_ms, "faulty")
    assert detected, crash
    timings[f"fault 2: QEMU of {VM_REDIS} killed"] = {
        "detection_s": at(detected[0], fault_ms), "restart_s": at(restarted, fault_ms), "recovery_s": at(healed, fault_ms)}

    # Fault 3: an operator destroys the agent guest: left off, the reason recorded, never restarted.
    fault_ms = store.clock.time_ms()
    virsh("destroy", VM_AGENT)
    stack.wait(lambda: any(e.get("kind") == "operator_stop"
                           for e in stack.events(VM_AGENT, fault_ms, "domain_event")), 30, "operator stop reported")
    time.sleep(10)  # T2 three times over: the guest's silence is judged and must not lead anywhere
    stopped = store.vms.record(VM_AGENT)
    assert stopped.domain_status == "shutoff" and stopped.domain_reason == "destroyed", stopped
    assert "shut off" in virsh("domstate", VM_AGENT)
    explained = stack.vmq("explain", VM_AGENT)
    assert "destroyed" in explained, explained
    assert not stack.events(VM_AGENT, fault_ms, "faulty", "restart_dispatched", "restarted")

    # Fault 4: the redis guest's application stops being live (its liveness check fails twice in a row) while the
    # guest answers every probe: restarted once through its host, for that reason; the new boot clears it.
    stack.wait(lambda: past_boot_grace(VM_REDIS), 90, f"{VM_REDIS} past its boot grace again")
    boot_before = stack.last_reply(VM_REDIS)["boot_id"]
    fault_ms = send_guest_command(guests[VM_REDIS], "break-app", "vmq-guest: app broken", store.clock.time_ms)
    [restarted] = stack.wait(lambda: stack.events(VM_REDIS, fault_ms, "restarted"), 60,
                             f"{VM_REDIS}: application unhealthy, restarted")
    [faulty] = stack.events(VM_REDIS, fault_ms, "faulty")
    assert faulty["reasons"][0].startswith("application unhealthy: liveness check(s) app failed"), faulty
    assert restarted["action"] == "reset" and restarted["host"] == HOST, restarted
    stack.wait(lambda: answering_after(VM_REDIS, boot_before), 180, f"{VM_REDIS} answering after its reset")
    timings[f"fault 4: application liveness failing in {VM_REDIS}"] = {
        "detection_s": at(stack.events(VM_REDIS, fault_ms, "app_unhealthy")[0], fault_ms),
        "restart_s": at(restarted, fault_ms),
        "recovery_s": at(stack.events(VM_REDIS, fault_ms, "recovered")[0], fault_ms)}

    # Fault 5: the operators' intent, changed live in the channel guest's libvirt metadata: opted out, its hung
    # responder is left alone; opted in again, it is restarted.
    intent = "http://vmq.dev/xmlns/intent/1"
    stack.wait(lambda: past_boot_grace(VM_CHANNEL), 90, f"{VM_CHANNEL} past its boot grace")
    virsh("metadata", VM_CHANNEL, "--uri", intent, "--key", "vmq", "--live", "--set",
          "<intent><enroll>no</enroll></intent>")
    stack.wait(lambda: store.vms.record(VM_CHANNEL).intent.get("enroll") == "no", 15, "opt-out read by the host")
    boot_before = stack.last_reply(VM_CHANNEL)["boot_id"]
    channel_guest = guests[VM_CHANNEL]
    fault_ms = send_guest_command(channel_guest, f"hang-{channel_guest.service}",
                                  f"vmq-guest: SIGSTOP {channel_guest.service}", store.clock.time_ms)
    time.sleep(3 * (T1_S + T2_S))
    assert not stack.events(VM_CHANNEL, fault_ms, "faulty", "restart_dispatched"), "an opted-out VM is left alone"
    assert "not enrolled: its libvirt metadata says" in stack.vmq("explain", VM_CHANNEL)
    virsh("metadata", VM_CHANNEL, "--uri", intent, "--key", "vmq", "--live", "--set",
          "<intent><enroll>yes</enroll></intent>")
    opted_in_ms = store.clock.time_ms()
    [restarted] = stack.wait(lambda: stack.events(VM_CHANNEL, fault_ms, "restarted"), 60,
                             f"{VM_CHANNEL} restarted once opted in again")
    stack.wait(lambda: answering_after(VM_CHANNEL, boot_before), 180, f"{VM_CHANNEL} answering after its reset")
    timings[f"fault 5: {VM_CHANNEL} hung while opted out, then opted in"] = {
        "detection_s": at(stack.events(VM_CHANNEL, fault_ms, "faulty")[0], opted_in_ms),
        "restart_s": at(restarted, opted_in_ms)}

    # Over the whole run: one restart per fault, on the VM at fault, and nothing else.
    restarts = {vm: len(stack.events(vm, 0, "restart_dispatched")) for vm in guests}
    assert restarts == {VM_REDIS: 3, VM_CHANNEL: 2, VM_AGENT: 1}, restarts

    # The relay's per-call latency against the real qemu-ga (getTime through libvirtd), as the relay measured and
    # relayed it with the state parameters (every 10 s per VM here); and its own running summary from the host
    # worker's log (every 60 s), which counts every call.
    latencies = [answer["latency_ms"] for _, answer in stack.relayed_answers(VM_AGENT) if "latency_ms" in answer]
    assert len(latencies) >= 5, latencies  # one call in ten carries them; the summary below counts every call
    summaries = re.findall(r"relay (probes=.*)", stack.services[f"host-{HOST}"].log.read_text(errors="replace"))
    total = time.monotonic() - started
    with capsys.disabled():
        print(f"\nreal-VM proof: all three guests answered {boot_took:.1f} s after `virsh start` (TCG); "
              f"paths { {vm: path.value for vm, path in PATHS.items()} }", flush=True)
        for name, figures in timings.items():
            print(f"  {name}: {figures}", flush=True)
        print(f"  fault 3: {VM_AGENT} destroyed by an operator: left off ({stopped.domain_reason}), never restarted",
              flush=True)
        print(f"  relay -> real qemu-ga (getTime via libvirtd), {len(latencies)} answered calls: "
              f"p50 {percentile(latencies, 0.5):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms, "
              f"max {max(latencies):.2f} ms", flush=True)
        print(f"  host worker's last relay summary: {summaries[-1] if summaries else '(none logged yet)'}",
              flush=True)
        print(f"  test body {total:.1f} s", flush=True)
