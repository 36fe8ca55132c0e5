"""The ``vmq`` command: status, events, keys, clear, responder, demo. Errors are one line, never a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Table

from vmq.codec import new_secret
from vmq.config import Settings, load_settings
from vmq.errors import VmqError
from vmq.keys import valid_name
from vmq.model import VmState
from vmq.report import cluster_status, event_json
from vmq.sim import responder_url
from vmq.store.redis import RedisStore

F = TypeVar("F", bound=Callable[..., Any])
STATE_STYLE = {"healthy": "green", "faulty": "red", "restarting": "yellow", "recovering": "cyan",
               "failed": "magenta", "unknown": "dim", "maintenance": "blue", "disabled": "dim"}


def _one_line_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except VmqError as exc:
            click.echo(f"vmq: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def _store() -> tuple[Settings, RedisStore]:
    settings = load_settings()
    return settings, RedisStore.from_settings(settings)


class OneLineErrors(click.Group):
    """A group whose usage errors, like every vmq error, are one line on stderr and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as exc:
            # click's own parse errors point at --help; a plain UsageError is a sentence of ours.
            parse_error = isinstance(exc, click.UsageError) and (
                type(exc) is not click.UsageError or exc.message.startswith(("No such command", "Got unexpected")))
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if parse_error and ctx is not None else ""
            click.echo(f"vmq: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("vmq: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors)
@click.version_option(package_name="vmq")
def main() -> None:
    """vmq keeps a libvirt/KVM VM cluster alive: probe, authenticated replies, timeout, restart on its host."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
@_one_line_errors
def status(as_json: bool) -> None:
    """Hosts and VMs: liveness, state, seconds since the last valid reply, restarts in the window."""
    settings, store = _store()
    data = cluster_status(store, settings)
    if as_json:
        click.echo(json.dumps(data))
        return
    console = Console()
    hosts = Table(title="hosts")
    for col in ("host", "alive", "VMs", "libvirt"):
        hosts.add_column(col)
    for h in data["hosts"]:
        hosts.add_row(h["name"], "[green]yes[/]" if h["alive"] else "[red]no[/]", str(h["vms"]), h["libvirt_uri"])
    vms = Table(title="VMs")
    for col in ("vm", "host", "state", "last reply", "restarts", "decision"):
        vms.add_column(col)
    for v in data["vms"]:
        seen = "never" if v["since_last_reply_s"] is None else f"{v['since_last_reply_s']:.1f}s ago"
        style = STATE_STYLE.get(v["state"], "white")
        vms.add_row(v["id"], v["host"], f"[{style}]{v['state']}[/]", seen, str(v["restarts_in_window"]),
                    v["decision"][:80])
    console.print(hosts)
    console.print(vms)
    if data["rejected_replies"]:
        console.print(f"rejected replies: {data['rejected_replies']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--vm", default=None, help="Only this VM.")
@click.option("--host", default=None, help="Only events of this host (its VMs' and its own).")
@click.option("--type", "event_type", default=None, multiple=True,
              help="Only this event type (repeat for several, e.g. --type faulty --type restarted).")
@click.option("--limit", default=1000, show_default=True, help="At most this many past events.")
@_one_line_errors
def events(as_json: bool, follow: bool, vm: str | None, host: str | None, event_type: tuple[str, ...],
           limit: int) -> None:
    """The audit stream: every transition and action with its evidence."""
    _, store = _store()
    rows = store.events(count=1_000_000)[-limit:] if limit else []
    cursor = rows[-1][0] if rows else "$"
    if not rows and follow:
        existing = store.events(count=1_000_000)
        cursor = existing[-1][0] if existing else "0-0"

    def emit(entry_id: str, fields: dict[str, str]) -> None:
        event = event_json(entry_id, fields)
        if (vm and event["vm"] != vm) or (host and event["host"] != host) or \
                (event_type and event["type"] not in event_type):
            return
        if as_json:
            click.echo(json.dumps(event))
        else:
            extra = {k: v for k, v in event.items() if k not in {"id", "type", "vm", "host", "time", "time_ms"}}
            click.echo(f"{event['time']} {event['type']:<18} {event['vm']:<12} {event['host']:<10} "
                       f"{json.dumps(extra)}")

    for entry_id, fields in rows:
        emit(entry_id, fields)
    try:
        while follow:
            for entry_id, fields in store.events(after=cursor, count=500, block_ms=1000):
                cursor = entry_id
                emit(entry_id, fields)
    except KeyboardInterrupt:
        pass


def responder_config(settings: Settings, vm: str, secret: str, guest_redis_url: str | None) -> str:
    """The responder.toml lines for ``vm``. The guest connects as ``--guest-redis-url`` (the `guest` ACL user);
    VMQ_REDIS_URL is only a default when it has no password, because its user is the services' own."""
    if guest_redis_url is None and urlsplit(settings.redis_url).password:
        raise click.UsageError("VMQ_REDIS_URL holds the services' password, which a guest must never get: "
                               "pass --guest-redis-url redis://guest:PASSWORD@HOST:PORT/DB (the `guest` ACL user)")
    url, tls_ca_file = responder_url(guest_redis_url or settings.redis_url)  # the responder takes no ?query
    return (f'vm_id = "{vm}"\nredis_url = "{url}"\nnamespace = "{settings.namespace}"\nsecret_key = "{secret}"\n'
            + (f"tls_ca_file = {json.dumps(tls_ca_file)}\n" if tls_ca_file else ""))


@main.group()
def keys() -> None:
    """Per-VM responder keys."""


@keys.command("add")
@click.argument("vm")
@click.option("--guest-redis-url", default=None,
              help="Redis URL as the guest must use it: the `guest` ACL user "
                   "(default: VMQ_REDIS_URL, if it has no password).")
@click.option("--force", is_flag=True, help="Replace an existing key (the old one stops working at once).")
@_one_line_errors
def keys_add(vm: str, guest_redis_url: str | None, force: bool) -> None:
    """Create VM's key and print the responder config to install in that guest (/etc/vmq/responder.toml)."""
    if not valid_name(vm):
        raise click.BadParameter("VM names are 1-128 of A-Z a-z 0-9 _ . -", param_hint="VM")
    settings, store = _store()
    if vm in store.secrets() and not force:
        raise click.UsageError(f"{vm} already has a key; use --force to replace it")
    secret = new_secret()
    config = responder_config(settings, vm, secret, guest_redis_url)  # refused before any key is stored
    store.set_secret(vm, secret)
    store.start_monitoring(vm, store.time_ms())
    click.echo(f"# /etc/vmq/responder.toml for {vm} (mode 0600). Run in the guest:\n"
               f"#   python3 vmq_responder.py --config /etc/vmq/responder.toml\n{config}")


@keys.command("revoke")
@click.argument("vm")
@_one_line_errors
def keys_revoke(vm: str) -> None:
    """Delete VM's key: its replies are refused and it is no longer judged."""
    _, store = _store()
    if not store.delete_secret(vm):
        raise click.UsageError(f"{vm} has no key")
    click.echo(f"key of {vm} revoked")


@main.command()
@click.argument("vm")
@_one_line_errors
def clear(vm: str) -> None:
    """Operator clear: a failed/faulty VM goes back to `unknown` with a fresh restart budget."""
    _, store = _store()
    now_ms = store.time_ms()
    rec = store.vm_record(vm)
    if not rec:
        raise click.UsageError(f"unknown VM {vm}")
    ok, previous, _ = store.transition(
        vm, [VmState.FAILED, VmState.FAULTY, VmState.MAINTENANCE, VmState.DISABLED], VmState.UNKNOWN, now_ms,
        {"type": "cleared", "host": rec.get("host", ""), "reason": "operator clear"},
        fields={"incident": "", "decision": ""})
    if not ok:
        raise click.UsageError(f"{vm} is {previous}: only failed, faulty, maintenance or disabled VMs are cleared")
    store.reset_budget(vm)
    store.start_monitoring(vm, now_ms)
    click.echo(f"{vm}: {previous} -> unknown, restart budget reset")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def responder(ctx: click.Context) -> None:
    """Run the in-guest responder (same as `python3 vmq_responder.py`); --print-path shows the file to copy."""
    from vmq import responder as guest

    if ctx.args == ["--print-path"]:
        click.echo(guest.__file__)
        return
    sys.exit(guest.main(list(ctx.args)))


@main.command()
@click.option("--hosts", default=2, show_default=True, help="Simulated hypervisors (libvirt test:/// nodes).")
@click.option("--vms", default=6, show_default=True, help="Simulated guests running the real responder.")
@click.option("--fault", default=None, help="VM to freeze (default: random).")
@click.option("--probe-interval", default=1.0, show_default=True, help="T1, seconds.")
@click.option("--reply-timeout", default=3.0, show_default=True, help="T2, seconds (> T1).")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary at the end (live view on stderr).")
@_one_line_errors
def demo(hosts: int, vms: int, fault: str | None, probe_interval: float, reply_timeout: float,
         timeout_s: float, as_json: bool) -> None:
    """Run a whole cluster here, freeze one guest, and show its detection, restart and recovery live."""
    from vmq.demo import run_demo

    if hosts < 1 or vms < 2:
        raise click.BadParameter("need at least 1 host and 2 VMs")
    if reply_timeout <= probe_interval:
        raise click.BadParameter("--reply-timeout must be greater than --probe-interval")
    status_code, _ = run_demo(hosts, vms, fault, probe_interval, reply_timeout, as_json, timeout_s)
    sys.exit(status_code)



# Operator commands (maintenance, kill switch, overrides, enable/disable, hosts, check, explain) live in
# vmq.cli_ops, the ones that go through the workers (restart, keys rotate) in vmq.cli_restart; importing
# them registers them on `main`.
from vmq import cli_ops, cli_restart, cli_stack  # noqa: F401

if __name__ == "__main__":
    # Run as `python -m vmq.cli`, this file is `__main__`; vmq.cli_ops registered its commands on the
    # imported `vmq.cli` module's group, so that is the one to run.
    from vmq.cli import main as registered_main

    registered_main()
