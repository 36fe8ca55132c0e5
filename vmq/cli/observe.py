"""Commands that look at the cluster without changing it: status, events, hosts, check, explain, config."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from vmq.cli.common import one_line_errors, open_store
from vmq.intent import enrolment, failover_enabled
from vmq.intent import knobs as intent_knobs
from vmq.intent import priority as intent_priority
from vmq.model import EXPLAINED_EVENTS, AuditEvent, ProbePath, VmRecord
from vmq.operator_views import cluster_status, event_json, failover_words

STATE_STYLE = {"healthy": "green", "faulty": "red", "restarting": "yellow", "recovering": "cyan",
               "failed": "magenta", "unknown": "dim", "maintenance": "blue", "disabled": "dim"}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
@one_line_errors
def status(as_json: bool) -> None:
    """Hosts and VMs: liveness, state, seconds since the last valid reply, restarts in the window."""
    settings, store = open_store()
    data = cluster_status(store, settings)
    if as_json:
        click.echo(json.dumps(data))
        return
    console = Console()
    hosts = Table(title="hosts")
    for col in ("host", "alive", "VMs", "libvirt", "failover"):
        hosts.add_column(col)
    for h in data["hosts"]:
        hosts.add_row(h["name"], "[green]yes[/]" if h["alive"] else "[red]no[/]", str(h["vms"]), h["libvirt_uri"],
                      h["failover"])
    vms = Table(title="VMs")
    for col in ("vm", "host", "path", "state", "last reply", "restarts", "decision"):
        vms.add_column(col)
    for v in data["vms"]:
        seen = "never" if v["since_last_reply_s"] is None else f"{v['since_last_reply_s']:.1f}s ago"
        style = STATE_STYLE.get(v["state"], "white")
        state = f"[{style}]{v['state']}[/]" + ("" if v["enrolled"] else " [dim](not enrolled)[/]")
        vms.add_row(v["id"], v["host"], v["probe_path"], state, seen,
                    str(v["restarts_in_window"]), v["decision"][:80])
    console.print(hosts)
    console.print(vms)
    if data["rejected_replies"]:
        console.print(f"rejected replies: {data['rejected_replies']}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--vm", default=None, help="Only this VM.")
@click.option("--host", default=None, help="Only events of this host (its VMs' and its own).")
@click.option("--type", "event_type", default=None, multiple=True,
              help="Only this event type (repeat for several, e.g. --type faulty --type restarted).")
@click.option("--limit", default=1000, show_default=True, help="At most this many past events.")
@one_line_errors
def events(as_json: bool, follow: bool, vm: str | None, host: str | None, event_type: tuple[str, ...],
           limit: int) -> None:
    """The audit stream: every transition and action with its evidence."""
    _, store = open_store()
    rows = store.audit.read(count=1_000_000)[-limit:] if limit else []
    cursor = rows[-1][0] if rows else "$"
    if not rows and follow:
        existing = store.audit.read(count=1_000_000)
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
            for entry_id, fields in store.audit.read(after=cursor, count=500, block_ms=1000):
                cursor = entry_id
                emit(entry_id, fields)
    except KeyboardInterrupt:
        pass


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
@one_line_errors
def hosts(ctx: click.Context, as_json: bool) -> None:
    """Registered hosts: alive, degraded, maintenance, VMs, last heartbeat, relay, the agent VMs it covers, and
    a dead host's failover (fence-confirm: an operator says a dead host is powered off)."""
    if ctx.invoked_subcommand is not None:
        return
    settings, store = open_store()
    now_ms = store.clock.time_ms()
    fresh_ms = settings.host_fresh_ms
    overview = store.hosts.hosts_overview()
    context = store.hosts.host_context([name for name, _, _ in overview], now_ms, fresh_ms)
    covers = store.replies.cover_states([name for name, _, _ in overview])
    current = store.rounds.current_round()
    rows: list[dict[str, Any]] = [{"name": name, "alive": alive, "fresh": context[name].alive, "degraded": context[name].degraded,
             "maintenance": context[name].in_maintenance(now_ms), "domains": context[name].vm_count,
             "queue": info.get("queue", ""), "libvirt_uri": info.get("libvirt_uri", ""),
             "relay": ("never" if not context[name].relay_seen_ms else
                       "ok" if context[name].relay_fresh(now_ms, settings.relay_fresh_ms) else "late"),
             "seen_s_ago": round((now_ms - int(info.get("seen_ms") or 0)) / 1000, 1) if info.get("seen_ms") else None,
             # Its agent VMs' cover (docs/protocol.md, "Cover entries"): how far behind the probes its entries are.
             "cover": ({**covers[name], "rounds_behind": max(0, current - int(covers[name]["round"]))}
                       if name in covers else None),
             "capacity": {k: int(info[k]) for k in ("cpus", "memory_mib", "vcpus_used", "memory_used_mib")
                          if info.get(k, "").isdigit()},
             "lock_manager": info.get("lock_state", ""),
             "failover": failover_words(store, name, alive, info)}
            for name, alive, info in overview]
    if as_json:
        click.echo(json.dumps({"hosts": rows}))
        return
    table = Table(title="hosts")
    for col in ("host", "state", "domains", "last heartbeat", "relay", "agent VMs covered", "failover", "queue",
                "libvirt"):
        table.add_column(col)
    for row in rows:
        state = ("[red]down[/]" if not row["alive"] else "[yellow]late[/]" if not row["fresh"]
                 else "[yellow]degraded[/]" if row["degraded"] else "[blue]maintenance[/]" if row["maintenance"]
                 else "[green]up[/]")
        seen = "never" if row["seen_s_ago"] is None else f"{row['seen_s_ago']:.1f}s ago"
        cover = row["cover"]
        covered = "-" if cover is None else (
            f"{cover['covered']} ({cover['silent']} silent, {cover['pending']} pending), "
            f"{cover['rounds_behind']} behind")
        failover = row["failover"] or ("safe" if row["lock_manager"] == "virtlockd answers" else "not safe: "
                                       + (row["lock_manager"] or "no report"))
        table.add_row(row["name"], state, str(row["domains"]), seen, row["relay"], covered, failover, row["queue"],
                      row["libvirt_uri"])
    Console().print(table)


@click.command()
@click.option("--host", "host", default=None, help="Also require this host's heartbeat to be fresh.")
@click.option("--monitor", is_flag=True, help="Also require probe rounds to be advancing (beat + monitor).")
@one_line_errors
def check(host: str | None, monitor: bool) -> None:
    """Health check for scripts and containers: exit 0 when healthy, 1 (with the reason) when not."""
    settings, store = open_store()
    now_ms = store.clock.time_ms()  # raises (exit 2) when Redis is unreachable
    problems: list[str] = []
    if host:
        fresh_ms = settings.host_fresh_ms
        context = store.hosts.host_context([host], now_ms, fresh_ms)[host]
        if not context.alive:
            problems.append(f"host {host}: no fresh heartbeat")
        elif context.degraded:
            problems.append(f"host {host}: libvirt unreachable (degraded)")
    if monitor:
        latest = store.rounds.current_round()
        sent = store.rounds.round_sent_ms(latest) if latest else None
        if sent is None or now_ms - sent > 3 * settings.probe_interval_s * 1000:
            age = "never" if sent is None else f"{(now_ms - sent) / 1000:.1f} s ago"
            problems.append(f"no probe round in the last {3 * settings.probe_interval_s:g} s (last: {age})")
    if problems:
        click.echo("unhealthy: " + "; ".join(problems), err=True)
        sys.exit(1)
    click.echo("ok")



def intent_lines(rec: VmRecord, mode: str) -> list[str]:
    """What the operators' intent says of this VM and where each value comes from (vmq.intent)."""
    said = rec.intent
    why = enrolment(said, mode)
    lines = [f"enrolment: {why or 'enrolled'} (VMQ_ENROLL={mode}"
             + (f", metadata enroll={said['enroll']})" if said.get("enroll") else ", no metadata enroll)")]
    lines.append(f"priority: {intent_priority(said)} ({'libvirt metadata' if said.get('priority') else 'default'})")
    from_metadata, from_set = intent_knobs(said), dict(rec.overrides)
    for knob in sorted(from_metadata.keys() | from_set.keys()):
        if knob in from_set:
            shadowed = f"; metadata says {from_metadata[knob]}, `vmq set` wins" if knob in from_metadata else ""
            lines.append(f"knob {knob}={from_set[knob]} (vmq set{shadowed})")
        else:
            lines.append(f"knob {knob}={from_metadata[knob]} (libvirt metadata)")
    if said.get("error"):
        lines.append(f"metadata refused (defaults apply): {said['error']}")
    return lines


@click.command()
@click.argument("vm")
@click.option("--last", default=10, show_default=True, help="How many decisions to explain.")
@one_line_errors
def explain(vm: str, last: int) -> None:
    """Why vmq did (or did not) act on VM: its state and its last decisions in plain words."""
    settings, store = open_store()
    rec = store.vms.record(vm)
    if not rec.exists:
        raise click.UsageError(f"unknown VM {vm}")
    click.echo(f"{vm} on {rec.host or '?'}: {rec.state.value}"
               + (f" (incident {rec.incident})" if rec.incident else ""))
    source = ("chosen with `vmq path`" if rec.probe_path_set else
              "from its libvirt metadata" if rec.intent.get("probe_path") else
              "detected from its domain's channels" if rec.probe_path_detected is not ProbePath.REDIS else "default")
    click.echo(f"  probe path: {rec.probe_path.value} ({source})")
    for line in intent_lines(rec, settings.enroll):
        click.echo(f"  {line}")
    if rec.decision:
        click.echo(f"  now: {rec.decision_action}: {rec.decision}")
    click.echo(f"  failover: {'enabled' if failover_enabled(rec.intent, settings.failover_default) else 'not enabled'}"
               f" for it (metadata failover={rec.intent.get('failover') or 'unset'}, VMQ_FAILOVER_DEFAULT="
               f"{'on' if settings.failover_default else 'off'}; cluster VMQ_FAILOVER={'on' if settings.failover else 'off'})")
    if rec.state.value == "unreachable" and rec.host:
        host_info = store.hosts.host_info(rec.host)
        words = failover_words(store, rec.host, False, host_info)
        if words:
            click.echo(f"  its host {rec.host}: {words}")
    rows = [event_json(i, f) for i, f in store.audit.read(count=1_000_000) if f.get("vm") == vm]
    rows = [e for e in rows if e["type"] in EXPLAINED_EVENTS][-last:]
    for event in rows:
        words = "; ".join(event.get("reasons") or []) or event.get("reason") or event.get("result") or ""
        if event["type"] == AuditEvent.INTENT:
            words = f"libvirt metadata: {event.get('intent')}" + "".join(f"; refused {e}" for e in event.get("errors") or [])
        extra = ""
        evidence = event.get("evidence")
        if isinstance(evidence, dict):
            guards = evidence.get("guards") or {}
            extra = f" [round {evidence.get('round')}, missed {evidence.get('rounds_missed')}, " \
                    f"guards {json.dumps(guards)}]"
        if event.get("action") and event["type"] == AuditEvent.RESTARTED:
            words = f"{event['action']} {event.get('result', '')} in {event.get('took_ms')} ms"
        click.echo(f"  {event['time']}  {event['type']:<18} {words}{extra}")


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@one_line_errors
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


COMMANDS: list[click.Command] = [status, events, hosts, check, explain, show_config]
