"""The deploy files hold together: docker-compose.yml validates, the systemd units run the same command lines
as the compose services (so the two cannot drift), the Redis entrypoint renders the ACL safely.

Documented substitutions between a compose service's command and its systemd unit's ExecStart:
``celery`` -> ``/opt/vmq/bin/celery`` (the virtualenv of docs/deployment.md); systemd's ``%%`` -> ``%``;
for the host worker the example host name -> ``%i`` and no ``vmq sim node ... --`` prefix (it only fakes a
hypervisor in compose). The responder unit runs what vmq's simulated guests run
(``vmq.sim.guests.responder_argv``) with the installed paths of docs/deployment.md.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmq.config import Settings
from vmq.keys import Keys
from vmq.sim.guests import RESPONDER_FILE, responder_argv

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SYSTEMD = ROOT / "deploy" / "systemd"
REDIS_DEPLOY = ROOT / "deploy" / "redis"
VENV_BIN = "/opt/vmq/bin/"
INSTALLED_PYTHON = "/usr/bin/python3"
INSTALLED_RESPONDER = "/usr/local/lib/vmq/vmq_responder.py"
RESPONDER_CONFIG = "${CREDENTIALS_DIRECTORY}/responder.toml"
PROMETHEUS_INSTALL = "./dev install: Debian's prometheus package, unpacked into .venv/prometheus/usr/bin"
EXTRA_VARIABLES = {"VMQ_GUEST_REDIS_URL"}  # read by `vmq sim guests`, not a Settings field


def tool_or_skip(name: str, required_in_ci: bool = True, install: str = "") -> str:
    """The path of ``name``; missing: a failure in CI (CI=true: .ci/run installs it), else a loud skip saying
    how to get it (``install``, default ``apt-get install <name>``)."""
    path = shutil.which(name)
    if path:
        return path
    message = f"`{name}` is not installed ({install or f'apt-get install {name}'})"
    if required_in_ci and os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(f"SKIPPED, NOT CHECKED: {message}")


def services() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text())["services"])


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def unit(name: str) -> configparser.ConfigParser:
    """A unit file, parsed strictly (a duplicate section or key is an error), keys case-sensitive."""
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text(), source=name)
    return parser


def exec_start(name: str) -> list[str]:
    """ExecStart of a unit as an argv, systemd's %% escape undone (%i and friends left as they are)."""
    return [arg.replace("%%", "%") for arg in shlex.split(unit(name)["Service"]["ExecStart"])]


def unit_environment(name: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(unit(name)["Service"].get("Environment", "")))


# ------------------------------------------------------------------------------ docker-compose config
def test_docker_compose_validates_the_file_with_the_example_environment() -> None:
    compose = tool_or_skip("docker-compose")
    for profile in ([], ["--profile", "demo"]):
        proc = subprocess.run([compose, "-f", str(COMPOSE_FILE), "--env-file", str(ROOT / ".env.example"),
                               *profile, "config", "-q"], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([compose, "-f", str(COMPOSE_FILE), "--env-file", str(ROOT / ".env.example"),
                           "--profile", "demo", "config", "--services"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert set(proc.stdout.split()) == set(services())


def test_docker_compose_refuses_to_start_without_the_passwords(tmp_path: Path) -> None:
    compose = tool_or_skip("docker-compose")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {"PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([compose, "-f", str(COMPOSE_FILE), "--env-file", str(empty), "config", "-q"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "see .env.example" in proc.stderr


def test_env_example_lists_exactly_the_variables_the_compose_file_uses() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used == set(env_example())


# --------------------------------------------------------------------------------- the compose file
def test_every_vmq_variable_in_the_deploy_files_is_a_setting() -> None:
    known = {f"VMQ_{name.upper()}" for name in Settings.model_fields} | EXTRA_VARIABLES
    compose_vars = {k for s in services().values() for k in (s.get("environment") or {})
                    if k.startswith("VMQ_")}
    lines = (SYSTEMD / "vmq.env.example").read_text().splitlines()
    env_file_vars = {line.split("=", 1)[0] for line in lines if line.startswith("VMQ_")}
    unit_vars = {k for name in ("vmq-beat.service", "vmq-monitor.service", "vmq-host@.service")
                 for k in unit_environment(name)}
    assert (compose_vars | env_file_vars | unit_vars) - known == set()


def test_the_stack_has_one_beat_evented_workers_and_a_health_check_everywhere() -> None:
    svc = services()
    beats = [name for name, s in svc.items() if "beat" in s.get("command", [])]
    assert beats == ["beat"] and svc["beat"].get("container_name"), "exactly one beat, which cannot scale"
    for name, s in svc.items():
        if s.get("profiles") == ["observability"]:
            continue  # Prometheus and Grafana: tests/unit/test_observability_files.py
        command = s["command"]
        if "worker" in command:
            assert "-E" in command, f"{name}: Flower needs task events (-E)"
        test = s["healthcheck"]["test"]
        if name == "redis":
            assert "redis-cli --user vmq" in test[1]
        elif name == "flower":
            assert "/healthcheck" in test[-1]
        else:
            assert test[:3] == ["CMD", "vmq", "check"], name
    assert svc["beat"]["healthcheck"]["test"][3:] == ["--monitor"]
    assert svc["monitor"]["healthcheck"]["test"][3:] == ["--monitor"]
    assert svc["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert {"--appendonly", "yes", "--aclfile"} <= set(svc["redis"]["command"])


def test_each_example_host_worker_consumes_its_own_queue_and_the_demo_guests_match_its_domains() -> None:
    svc = services()
    hosts = {s["environment"]["VMQ_HOST_NAME"]: s for s in svc.values()
             if "VMQ_HOST_NAME" in (s.get("environment") or {})}
    assert len(hosts) >= 2
    guests = svc["guests"]["command"]
    assert guests[guests.index("--hosts") + 1].split(",") == sorted(hosts)
    for host, s in hosts.items():
        command = s["command"]
        worker = command[command.index("--") + 1:]
        assert worker[worker.index("-Q") + 1] == f"host.{host}"
        assert worker[worker.index("-n") + 1] == f"{host}@%h"
        assert s["environment"]["VMQ_LIBVIRT_URI"] == f"test:///var/lib/vmq/{host}.xml"
        assert command[command.index("--vms") + 1] == guests[guests.index("--vms") + 1]


# ------------------------------------------------------------------------------------ systemd units
UNITS = ("vmq-beat.service", "vmq-monitor.service", "vmq-host@.service", "vmq-responder.service")


@pytest.mark.parametrize("name", UNITS)
def test_units_parse_strictly_and_restart_their_service(name: str) -> None:
    parsed = unit(name)
    assert set(parsed.sections()) == {"Unit", "Service", "Install"}
    service = parsed["Service"]
    assert service["Restart"] == "always" and service["ExecStart"]
    assert service.get("User") == "vmq" or service.get("DynamicUser") == "yes", "never root"
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize(("name", "role"), [("vmq-beat.service", "beat"), ("vmq-monitor.service", "monitor")])
def test_central_units_run_the_compose_command_of_their_role(name: str, role: str) -> None:
    command = services()[role]["command"]
    assert exec_start(name) == [VENV_BIN + command[0], *command[1:]]
    assert unit(name)["Service"]["EnvironmentFile"] == "/etc/vmq/vmq.env"


def test_monitor_unit_serves_metrics_on_the_compose_port() -> None:
    assert unit_environment("vmq-monitor.service")["VMQ_METRICS_PORT"] == \
        services()["monitor"]["environment"]["VMQ_METRICS_PORT"]


def test_host_unit_runs_the_compose_host_worker_without_the_simulated_hypervisor() -> None:
    service = services()["host-node1"]
    command = service["command"]
    assert command[:3] == ["vmq", "sim", "node"]  # the documented prefix: fakes the hypervisor, then execs
    worker = command[command.index("--") + 1:]
    host = service["environment"]["VMQ_HOST_NAME"]
    expected = [VENV_BIN + worker[0]] + [arg.replace(host, "%i") for arg in worker[1:]]
    assert exec_start("vmq-host@.service") == expected
    assert unit_environment("vmq-host@.service") == {"VMQ_HOST_NAME": "%i"}


def test_responder_unit_runs_what_the_simulated_guests_run() -> None:
    simulated = responder_argv(Path(RESPONDER_CONFIG))
    installed = {sys.executable: INSTALLED_PYTHON, str(RESPONDER_FILE): INSTALLED_RESPONDER}
    assert exec_start("vmq-responder.service") == [installed.get(arg, arg) for arg in simulated]
    credential = unit("vmq-responder.service")["Service"]["LoadCredential"]
    assert credential == "responder.toml:/etc/vmq/responder.toml"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = tool_or_skip("systemd-analyze", required_in_ci=False)  # not every CI image has systemd
    celery = shutil.which("celery") or str(Path(sys.executable).parent / "celery")
    # verify checks that ExecStart's binary exists: point the venv path at this machine's celery, and give
    # the template an instance name. Nothing else is changed.
    names = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(VENV_BIN + "celery", celery)
        target = tmp_path / name.replace("@.", "@node1.")
        target.write_text(text)
        names.append(str(target))
    proc = subprocess.run([analyze, "verify", *names], capture_output=True, text=True, timeout=60,
                          check=False)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if any(Path(n).name in line for n in names)]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- the Redis entrypoint
def render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "REDIS_ACL_FILE": str(tmp_path / "users.acl"),
            "REDIS_ACL_TEMPLATE": str(REDIS_DEPLOY / "users.acl.template")}
    return subprocess.run([str(REDIS_DEPLOY / "entrypoint.sh"), "true"], env=base | env, capture_output=True,
                          text=True, timeout=30, check=False)


def test_entrypoint_renders_the_acl_with_password_hashes_only(tmp_path: Path) -> None:
    proc = render(tmp_path, REDIS_VMQ_PASSWORD="s3rvices-pw", REDIS_GUEST_PASSWORD="gu3st-pw",
                  REDIS_HOST_PASSWORD="h0st-pw", VMQ_NAMESPACE="prod")
    assert proc.returncode == 0, proc.stderr
    acl = tmp_path / "users.acl"
    text = acl.read_text()
    assert acl.stat().st_mode & 0o077 == 0
    assert not re.search(r"@[A-Z_]+@", text)
    assert "s3rvices-pw" not in text and "gu3st-pw" not in text and "h0st-pw" not in text
    users = {line.split()[1]: line.split()[2:] for line in text.splitlines()}
    assert list(users) == ["default", "vmq", "host", "guest"]  # nothing but `user` lines: Redis allows no comments
    assert "off" in users["default"] and "nopass" not in text
    assert users["guest"] == ["on", users["guest"][1], "resetkeys", "%W~prod:replies", "resetchannels",
                              "&prod:probes", "nocommands", "+subscribe", "+xadd", "+ping"]
    assert "~prod:*" in users["vmq"] and "-@dangerous" in users["vmq"]
    # the host user: no pattern that reaches the VMs' keys, the guests' replies or the monitor's own keys
    host_keys = [rule.lstrip("%RW") for rule in users["host"] if "~" in rule]
    assert host_keys and "~prod:*" not in host_keys and "-@dangerous" in users["host"]
    keys = Keys("prod")
    for key in (keys.secrets, keys.secrets_previous, keys.secrets_version, keys.reply_stream, keys.reply_cursor,
                keys.rounds, keys.rounds_pending, keys.judge_lock, keys.relay_cursor, keys.relay_rounds,
                keys.restarts_suspended, keys.storm):
        assert not any(fnmatch.fnmatchcase(key, rule[1:]) for rule in host_keys), key
    for key in (keys.vm("web-1"), keys.vms, keys.host("node1"), keys.host_domains("node1"), keys.events,
                keys.relay_stream, keys.last_round, keys.round_seq, keys.attention, keys.restart_claim("web-1", 3), keys.vm_restarts("web-1")):
        assert any(fnmatch.fnmatchcase(key, rule[1:]) for rule in host_keys), key


@pytest.mark.parametrize("env", [
    {"REDIS_GUEST_PASSWORD": "g"},
    {"REDIS_VMQ_PASSWORD": "v"},
    {"REDIS_VMQ_PASSWORD": "v", "REDIS_GUEST_PASSWORD": "g"},
    {"REDIS_VMQ_PASSWORD": "same", "REDIS_GUEST_PASSWORD": "same", "REDIS_HOST_PASSWORD": "h"},
    {"REDIS_VMQ_PASSWORD": "v", "REDIS_GUEST_PASSWORD": "g", "REDIS_HOST_PASSWORD": "v"},
    {"REDIS_VMQ_PASSWORD": "v", "REDIS_GUEST_PASSWORD": "g", "REDIS_HOST_PASSWORD": "g"},
    {"REDIS_VMQ_PASSWORD": "v", "REDIS_GUEST_PASSWORD": "g", "REDIS_HOST_PASSWORD": "h", "VMQ_NAMESPACE": "a/b"},
])
def test_entrypoint_refuses_a_missing_or_unsafe_setting(tmp_path: Path, env: dict[str, str]) -> None:
    proc = render(tmp_path, **env)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "users.acl").exists()
