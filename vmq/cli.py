"""The ``vmq`` command: status, events, keys, clear, responder, demo. Errors are one line, never a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from vmq.codec import new_secret
from vmq.config import Settings, load_settings
from vmq.errors import VmqError
from vmq.keys import valid_name
from vmq.model import VmState
from vmq.report import cluster_status, event_json
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
    return settings, RedisStore.from_url(settings.redis_url, settings.keys, settings.events_maxlen)


@click.group()
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
@click.option("--type", "event_type", default=None, help="Only this event type.")
@click.option("--limit", default=1000, show_default=True, help="At most this many past events.")
@_one_line_errors
def events(as_json: bool, follow: bool, vm: str | None, event_type: str | None, limit: int) -> None:
    """The audit stream: every transition and action with its evidence."""
    _, store = _store()
    rows = store.events(count=1_000_000)[-limit:] if limit else []
    cursor = rows[-1][0] if rows else "$"
    if not rows and follow:
        existing = store.events(count=1_000_000)
        cursor = existing[-1][0] if existing else "0-0"

    def emit(entry_id: str, fields: dict[str, str]) -> None:
        event = event_json(entry_id, fields)
        if (vm and event["vm"] != vm) or (event_type and event["type"] != event_type):
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


@main.group()
def keys() -> None:
    """Per-VM responder keys."""


@keys.command("add")
@click.argument("vm")
@click.option("--guest-redis-url", default=None,
              help="Redis URL as the guest must use it (default: VMQ_REDIS_URL).")
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
    store.set_secret(vm, secret)
    store.start_monitoring(vm, store.time_ms())
    click.echo(f"# /etc/vmq/responder.toml for {vm} (mode 0600). Run in the guest:\n"
               f"#   python3 vmq_responder.py --config /etc/vmq/responder.toml\n"
               f'vm_id = "{vm}"\nredis_url = "{guest_redis_url or settings.redis_url}"\n'
               f'namespace = "{settings.namespace}"\nsecret_key = "{secret}"\n')


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


def _duration_s(text: str | None) -> float | None:
    """'90', '90s', '30m', '2h', '1d' -> seconds; None stays None."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 2h") from None
    if value <= 0:
        raise click.BadParameter("a duration must be positive")
    return value


@main.command()
@click.option("--for", "for_", default=None, help="Lift by itself after this long (e.g. 30m).")
@_one_line_errors
def suspend(for_: str | None) -> None:
    """Kill switch: hold every restart cluster-wide (VMs are still judged and flagged)."""
    _, store = _store()
    seconds = _duration_s(for_)
    store.set_kill_switch(seconds)
    store.audit("restarts_suspended", "", "", store.time_ms(), reason="operator", for_s=seconds)
    click.echo("restarts suspended" + (f" for {seconds:g} s" if seconds else " until `vmq resume`"))


@main.command()
@_one_line_errors
def resume() -> None:
    """Lift the kill switch."""
    _, store = _store()
    store.set_kill_switch(None, on=False)
    store.audit("restarts_resumed", "", "", store.time_ms(), reason="operator")
    click.echo("restarts resumed")


@main.command()
@click.argument("vm", required=False)
@click.option("--host", default=None, help="Put a whole host in maintenance instead of one VM.")
@click.option("--for", "for_", default=None, help="End by itself after this long (e.g. 2h).")
@click.option("--off", is_flag=True, help="End maintenance now.")
@_one_line_errors
def maintenance(vm: str | None, host: str | None, for_: str | None, off: bool) -> None:
    """Stop judging a VM (or every VM of --host) for a while; it is judged afresh when it ends."""
    if bool(vm) == bool(host):
        raise click.UsageError("name either a VM or --host HOST")
    _, store = _store()
    now_ms = store.time_ms()
    seconds = _duration_s(for_)
    until_ms = -1 if seconds is None else now_ms + int(seconds * 1000)
    if host:
        store.set_host_fields(host, {"maintenance_until_ms": 0 if off else until_ms})
        store.audit("host_maintenance", "", host, now_ms, on=not off, until_ms=None if off else until_ms)
        click.echo(f"host {host}: maintenance {'off' if off else 'on'}")
        return
    assert vm is not None
    rec = store.vm_record(vm)
    if not rec:
        raise click.UsageError(f"unknown VM {vm}")
    generation = int(rec.get("generation") or 0)
    if off:
        ok, previous, _ = store.transition(vm, [VmState.MAINTENANCE], VmState.UNKNOWN, now_ms,
                                           {"type": "maintenance_ended", "host": rec.get("host", ""),
                                            "reason": "operator"}, fields={"maintenance_until_ms": 0},
                                           expected_generation=generation)
        if ok:
            store.start_monitoring(vm, now_ms)
    else:
        sources = [s for s in VmState if s not in (VmState.MAINTENANCE, VmState.RESTARTING)]
        ok, previous, _ = store.transition(vm, sources, VmState.MAINTENANCE, now_ms,
                                           {"type": "maintenance", "host": rec.get("host", ""),
                                            "reason": "operator", "until_ms": until_ms},
                                           fields={"maintenance_until_ms": max(until_ms, 0), "incident": ""},
                                           expected_generation=generation)
    if not ok:
        raise click.UsageError(f"{vm} is {previous}: cannot change its maintenance now")
    click.echo(f"{vm}: {previous} -> {'unknown' if off else 'maintenance'}")


@main.command("set")
@click.argument("vm")
@click.argument("knobs", nargs=-1, required=True)
@_one_line_errors
def set_knobs(vm: str, knobs: tuple[str, ...]) -> None:
    """Override restart-condition knobs for one VM: `vmq set web-1 max_restarts=5 boot_grace_s=120`
    (`knob=` removes the override)."""
    from vmq.policy import OVERRIDABLE, PolicyConfig, with_overrides

    _, store = _store()
    if not store.vm_record(vm):
        raise click.UsageError(f"unknown VM {vm}")
    fields: dict[str, str] = {}
    for item in knobs:
        knob, sep, value = item.partition("=")
        if not sep or knob not in OVERRIDABLE:
            raise click.BadParameter(f"{item!r}: expected KNOB=VALUE with KNOB one of {sorted(OVERRIDABLE)}")
        if value and with_overrides(PolicyConfig(), {knob: value})[1]:
            raise click.BadParameter(f"{item!r}: {knob} must be a non-negative {OVERRIDABLE[knob].__name__}")
        fields[f"policy.{knob}"] = value
    store.set_policy_overrides(vm, fields)
    store.audit("overrides", vm, "", store.time_ms(), overrides=fields)
    click.echo(f"{vm}: " + ", ".join(f"{k[7:]}={v or '(cluster default)'}" for k, v in fields.items()))


DECISION_EVENTS = {"faulty", "decision", "restart_dispatched", "restarted", "restart_failed", "restart_skipped",
                   "restart_left_alone", "silent_but_active", "recovered", "failed", "escalated", "unreachable",
                   "domain_event", "maintenance", "maintenance_ended", "cleared", "healthy"}


@main.command()
@click.argument("vm")
@click.option("--last", default=10, show_default=True, help="How many decisions to explain.")
@_one_line_errors
def explain(vm: str, last: int) -> None:
    """Why vmq did (or did not) act on VM: its state and its last decisions in plain words."""
    _, store = _store()
    rec = store.vm_record(vm)
    if not rec:
        raise click.UsageError(f"unknown VM {vm}")
    click.echo(f"{vm} on {rec.get('host') or '?'}: {rec.get('state', 'unknown')}"
               + (f" (incident {rec['incident']})" if rec.get("incident") else ""))
    if rec.get("decision"):
        click.echo(f"  now: {rec.get('decision_action', '')}: {rec['decision']}")
    rows = [event_json(i, f) for i, f in store.events(count=1_000_000) if f.get("vm") == vm]
    rows = [e for e in rows if e["type"] in DECISION_EVENTS][-last:]
    for event in rows:
        words = "; ".join(event.get("reasons") or []) or event.get("reason") or event.get("result") or ""
        extra = ""
        evidence = event.get("evidence")
        if isinstance(evidence, dict):
            guards = evidence.get("guards") or {}
            extra = f" [round {evidence.get('round')}, missed {evidence.get('rounds_missed')}, " \
                    f"guards {json.dumps(guards)}]"
        if event.get("action") and event["type"] == "restarted":
            words = f"{event['action']} {event.get('result', '')} in {event.get('took_ms')} ms"
        click.echo(f"  {event['time']}  {event['type']:<18} {words}{extra}")


if __name__ == "__main__":
    main()
