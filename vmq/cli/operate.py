"""Operator commands that change what vmq does: suspend/resume (kill switch), maintenance, set (overrides),
disable/enable, clear."""

from __future__ import annotations

import click

from vmq.cli.common import duration_s, one_line_errors, open_store
from vmq.model import VmState


@click.command()
@click.option("--for", "for_", default=None, help="Lift by itself after this long (e.g. 30m).")
@one_line_errors
def suspend(for_: str | None) -> None:
    """Kill switch: hold every restart cluster-wide (VMs are still judged and flagged)."""
    _, store = open_store()
    seconds = duration_s(for_)
    store.set_kill_switch(seconds)
    store.audit("restarts_suspended", "", "", store.time_ms(), reason="operator", for_s=seconds)
    click.echo("restarts suspended" + (f" for {seconds:g} s" if seconds else " until `vmq resume`"))


@click.command()
@one_line_errors
def resume() -> None:
    """Lift the kill switch."""
    _, store = open_store()
    store.set_kill_switch(None, on=False)
    store.audit("restarts_resumed", "", "", store.time_ms(), reason="operator")
    click.echo("restarts resumed")


@click.command()
@click.argument("vm", required=False)
@click.option("--host", default=None, help="Put a whole host in maintenance instead of one VM.")
@click.option("--for", "for_", default=None, help="End by itself after this long (e.g. 2h).")
@click.option("--off", is_flag=True, help="End maintenance now.")
@one_line_errors
def maintenance(vm: str | None, host: str | None, for_: str | None, off: bool) -> None:
    """Stop judging a VM (or every VM of --host) for a while; it is judged afresh when it ends."""
    if bool(vm) == bool(host):
        raise click.UsageError("name either a VM or --host HOST")
    _, store = open_store()
    now_ms = store.time_ms()
    seconds = duration_s(for_)
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


@click.command("set")
@click.argument("vm")
@click.argument("knobs", nargs=-1, required=True)
@one_line_errors
def set_knobs(vm: str, knobs: tuple[str, ...]) -> None:
    """Override restart-condition knobs for one VM: `vmq set web-1 max_restarts=5 boot_grace_s=120`
    (`knob=` removes the override)."""
    from vmq.policy import OVERRIDABLE, PolicyConfig, with_overrides

    _, store = open_store()
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


def _switch(vm: str, target: VmState, sources: list[VmState], reason: str) -> None:
    _, store = open_store()
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


@click.command()
@click.argument("vm")
@one_line_errors
def disable(vm: str) -> None:
    """Stop monitoring VM until `vmq enable` (its replies are still verified and counted)."""
    _switch(vm, VmState.DISABLED, [s for s in VmState if s not in (VmState.DISABLED, VmState.RESTARTING)],
            "disable")


@click.command()
@click.argument("vm")
@one_line_errors
def enable(vm: str) -> None:
    """Monitor a disabled VM again; it is judged after its grace period."""
    _switch(vm, VmState.UNKNOWN, [VmState.DISABLED], "enable")


@click.command()
@click.argument("vm")
@one_line_errors
def clear(vm: str) -> None:
    """Operator clear: a failed/faulty VM goes back to `unknown` with a fresh restart budget."""
    _, store = open_store()
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


COMMANDS: list[click.Command] = [suspend, resume, maintenance, set_knobs, disable, enable, clear]
