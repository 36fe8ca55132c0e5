"""Operator commands of ``vmq``: maintenance, kill switch, overrides, enable/disable, hosts, check, explain."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from vmq.cli import _one_line_errors, _store, main
from vmq.model import VmState
from vmq.report import event_json


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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_one_line_errors
def hosts(as_json: bool) -> None:
    """Registered hosts: alive, degraded, maintenance, VMs, last heartbeat."""
    settings, store = _store()
    now_ms = store.time_ms()
    fresh_ms = int(3 * settings.host_heartbeat_interval_s * 1000)
    overview = store.hosts_overview()
    context = store.host_context([name for name, _, _ in overview], now_ms, fresh_ms)
    rows: list[dict[str, Any]] = [{"name": name, "alive": alive, "fresh": context[name].alive, "degraded": context[name].degraded,
             "maintenance": context[name].in_maintenance(now_ms), "domains": context[name].vm_count,
             "queue": info.get("queue", ""), "libvirt_uri": info.get("libvirt_uri", ""),
             "seen_s_ago": round((now_ms - int(info.get("seen_ms") or 0)) / 1000, 1) if info.get("seen_ms") else None}
            for name, alive, info in overview]
    if as_json:
        click.echo(json.dumps({"hosts": rows}))
        return
    table = Table(title="hosts")
    for col in ("host", "state", "domains", "last heartbeat", "queue", "libvirt"):
        table.add_column(col)
    for row in rows:
        state = ("[red]down[/]" if not row["alive"] else "[yellow]late[/]" if not row["fresh"]
                 else "[yellow]degraded[/]" if row["degraded"] else "[blue]maintenance[/]" if row["maintenance"]
                 else "[green]up[/]")
        seen = "never" if row["seen_s_ago"] is None else f"{row['seen_s_ago']:.1f}s ago"
        table.add_row(row["name"], state, str(row["domains"]), seen, row["queue"], row["libvirt_uri"])
    Console().print(table)


@main.command()
@click.option("--host", "host", default=None, help="Also require this host's heartbeat to be fresh.")
@click.option("--monitor", is_flag=True, help="Also require probe rounds to be advancing (beat + monitor).")
@_one_line_errors
def check(host: str | None, monitor: bool) -> None:
    """Health check for scripts and containers: exit 0 when healthy, 1 (with the reason) when not."""
    settings, store = _store()
    now_ms = store.time_ms()  # raises (exit 2) when Redis is unreachable
    problems: list[str] = []
    if host:
        fresh_ms = int(3 * settings.host_heartbeat_interval_s * 1000)
        context = store.host_context([host], now_ms, fresh_ms)[host]
        if not context.alive:
            problems.append(f"host {host}: no fresh heartbeat")
        elif context.degraded:
            problems.append(f"host {host}: libvirt unreachable (degraded)")
    if monitor:
        latest = store.current_round()
        sent = store.round_sent_ms(latest) if latest else None
        if sent is None or now_ms - sent > 3 * settings.probe_interval_s * 1000:
            age = "never" if sent is None else f"{(now_ms - sent) / 1000:.1f} s ago"
            problems.append(f"no probe round in the last {3 * settings.probe_interval_s:g} s (last: {age})")
    if problems:
        click.echo("unhealthy: " + "; ".join(problems), err=True)
        sys.exit(1)
    click.echo("ok")


def _switch(vm: str, target: VmState, sources: list[VmState], reason: str) -> None:
    _, store = _store()
    rec = store.vm_record(vm)
    if not rec:
        raise click.UsageError(f"unknown VM {vm}")
    now_ms = store.time_ms()
    ok, previous, _ = store.transition(vm, sources, target, now_ms,
                                       {"type": target.value if target is VmState.DISABLED else "enabled",
                                        "host": rec.get("host", ""), "reason": reason},
                                       fields={"incident": "", "decision": reason},
                                       expected_generation=int(rec.get("generation") or 0))
    if not ok:
        raise click.UsageError(f"{vm} is {previous}: cannot {reason} it now")
    if target is VmState.UNKNOWN:
        store.start_monitoring(vm, now_ms)
    click.echo(f"{vm}: {previous} -> {target.value}")


@main.command()
@click.argument("vm")
@_one_line_errors
def disable(vm: str) -> None:
    """Stop monitoring VM until `vmq enable` (its replies are still verified and counted)."""
    _switch(vm, VmState.DISABLED, [s for s in VmState if s not in (VmState.DISABLED, VmState.RESTARTING)],
            "disable")


@main.command()
@click.argument("vm")
@_one_line_errors
def enable(vm: str) -> None:
    """Monitor a disabled VM again; it is judged after its grace period."""
    _switch(vm, VmState.UNKNOWN, [VmState.DISABLED], "enable")


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



@main.command("config")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_one_line_errors
def show_config(as_json: bool) -> None:
    """The VMQ_* settings in force here (passwords masked); docs/configuration.md explains each."""
    from vmq.config import load_settings
    from vmq.configdoc import effective_settings

    values = effective_settings(load_settings())
    if as_json:
        click.echo(json.dumps(values))
        return
    width = max(len(name) for name in values)
    for name, value in values.items():
        click.echo(f"{name:<{width}}  {value}")
