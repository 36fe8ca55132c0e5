"""``vmq sim`` and ``vmq demo``: the simulated parts of the compose stack (docker-compose.yml) and local runs.

``vmq sim node`` gives a host worker its own libvirt ``test:///`` node (domains ``<host>-vm1..N``) and then
execs the worker; ``vmq sim guests`` runs one real responder per such domain (the ``demo`` profile). Both
take their names from the same rule, ``sim_vm_names``, so the domains the host workers list and the guests
that answer are the same VMs. On a real cluster neither runs: host workers use ``qemu:///system`` and the
guests run ``vmq_responder.py`` themselves. The simulator (``vmq.sim``) is loaded inside the commands only,
so that production code never imports it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import click

from vmq.cli.common import one_line_errors, open_store
from vmq.codec import new_secret
from vmq.config import load_settings
from vmq.errors import ConfigError
from vmq.keys import valid_name
from vmq.model import DomainStatus, ProbePath

TEST_URI_PREFIX = "test:///"


def sim_vm_names(host: str, vms: int) -> list[str]:
    """Names of the simulated VMs of ``host``: ``<host>-vm1`` .. ``<host>-vm<vms>``."""
    return [f"{host}-vm{i}" for i in range(1, vms + 1)]


def _node_path(libvirt_uri: str) -> Path:
    """The node file a ``test:///ABS/PATH.xml`` URI names; raises ConfigError for any other URI."""
    if not libvirt_uri.startswith(TEST_URI_PREFIX) or not libvirt_uri.endswith(".xml"):
        raise ConfigError(f"VMQ_LIBVIRT_URI: `vmq sim node` needs test:///ABSOLUTE/PATH.xml, "
                          f"not {libvirt_uri!r}")
    return Path(libvirt_uri[len("test://"):])


@click.group()
def sim() -> None:
    """Simulated hypervisors and guests (the compose stack's example hosts and its `demo` profile)."""


@sim.command("node", context_settings={"ignore_unknown_options": True})
@click.option("--vms", default=3, show_default=True, type=click.IntRange(0, 10_000),
              help="Running domains <host>-vm1 .. <host>-vmN.")
@click.option("--devices", is_flag=True, help="Give each domain a disk and a NIC (their counters move).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@one_line_errors
def sim_node(vms: int, devices: bool, command: tuple[str, ...]) -> None:
    """Write the libvirt test-driver node that VMQ_LIBVIRT_URI (test:///PATH.xml) names for VMQ_HOST_NAME,
    then exec COMMAND (after `--`), normally the host worker: `vmq sim node --vms 3 -- celery -A workers.app
    worker -Q host.node1 ...`. Rewritten at every start, so the host boots with all its domains running."""
    from vmq.sim.testnode import stable_uuid, write_node

    settings = load_settings()
    host = settings.require_host()
    path = _node_path(settings.libvirt_uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        domains = [(vm, stable_uuid(vm), DomainStatus.RUNNING) for vm in sim_vm_names(host, vms)]
        write_node(path, host, domains, devices=devices)
    except OSError as exc:
        raise ConfigError(f"VMQ_LIBVIRT_URI: cannot write {path}: {exc.strerror}") from None
    if not command:
        click.echo(f"{settings.libvirt_uri}: {host} with {vms} running domains")
        return
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        raise ConfigError(f"cannot run {command[0]!r}: {exc.strerror}") from None


def _host_list(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    bad = [h for h in hosts if not valid_name(h)]
    if not hosts or bad:
        raise click.BadParameter(f"expected a comma-separated list of host names, got {text!r}")
    return hosts


@sim.command("guests")
@click.option("--hosts", "hosts_text", required=True, help="Comma-separated hosts, e.g. node1,node2.")
@click.option("--vms", default=3, show_default=True, type=click.IntRange(1, 10_000),
              help="Guests per host: <host>-vm1 .. <host>-vmN (as `vmq sim node --vms`).")
@click.option("--workdir", default="/var/lib/vmq/guests", show_default=True, type=click.Path(file_okay=False),
              help="Responder configs and logs.")
@click.option("--guest-redis-url", envvar="VMQ_GUEST_REDIS_URL", required=True,
              help="Redis URL the responders use (the `guest` ACL user) [env VMQ_GUEST_REDIS_URL].")
@click.option("--boot-delay", "boot_delay_s", default=2.0, show_default=True, type=click.FloatRange(0, 600),
              help="Seconds a restarted guest stays silent before it answers with a new boot id.")
@one_line_errors
def sim_guests(hosts_text: str, vms: int, workdir: str, guest_redis_url: str, boot_delay_s: float) -> None:
    """Run one real responder per simulated VM until SIGTERM, creating missing keys (as `vmq keys add`);
    a restart reported in the audit stream reboots that guest (new boot id)."""
    from vmq.sim.guests import GuestFleet

    settings, store = open_store()
    vm_names = [vm for host in _host_list(hosts_text) for vm in sim_vm_names(host, vms)]
    existing = store.keyring.secrets()
    secrets: dict[str, str] = {}
    for vm in vm_names:
        if vm in existing:
            secrets[vm] = existing[vm].hex()
            continue
        secrets[vm] = new_secret()
        store.keyring.set_secret(vm, secrets[vm])
        store.vms.start_monitoring(vm, store.clock.time_ms())
    directory = Path(workdir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--workdir {workdir}: {exc.strerror}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    fleet = GuestFleet(guest_redis_url, settings.keys, secrets, directory, boot_delay_s,
                       watch_url=settings.redis_url)
    fleet.start()
    click.echo(f"{len(vm_names)} simulated guests answering: {', '.join(vm_names)}", err=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        fleet.stop()


@click.command()
@click.option("--hosts", default=2, show_default=True, help="Simulated hypervisors (libvirt test:/// nodes).")
@click.option("--vms", default=6, show_default=True, help="Simulated guests running the real responder.")
@click.option("--fault", default=None, help="VM to freeze (default: random).")
@click.option("--probe-interval", default=1.0, show_default=True, help="T1, seconds.")
@click.option("--reply-timeout", default=3.0, show_default=True, help="T2, seconds (> T1).")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary at the end (live view on stderr).")
@click.option("--via", default="redis", show_default=True,
              type=click.Choice([*(path.value for path in ProbePath), "mixed"]),
              help="How guests answer: their own Redis connection, the virtio-serial channel or the QEMU guest "
                   "agent (both relayed by the VM's host), or mixed: the three in turn over the VMs.")
@one_line_errors
def demo(hosts: int, vms: int, fault: str | None, probe_interval: float, reply_timeout: float,
         timeout_s: float, as_json: bool, via: str) -> None:
    """Run a whole cluster here, freeze one guest, and show its detection, restart and recovery live."""
    from vmq.sim.demo import run_demo

    if hosts < 1 or vms < 2:
        raise click.BadParameter("need at least 1 host and 2 VMs")
    if reply_timeout <= probe_interval:
        raise click.BadParameter("--reply-timeout must be greater than --probe-interval")
    status_code, _ = run_demo(hosts, vms, fault, probe_interval, reply_timeout, as_json, timeout_s, via)
    sys.exit(status_code)


COMMANDS: list[click.Command] = [sim, demo]
