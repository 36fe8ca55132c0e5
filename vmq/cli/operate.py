"""Operator commands that change what vmq does: suspend/resume (kill switch), maintenance, set (overrides),
disable/enable, clear."""

from __future__ import annotations

import click

from vmq import lifecycle
from vmq.cli.common import duration_s, one_line_errors, open_store
from vmq.model import AuditEvent, ProbePath, VmState


@click.command()
@click.option("--for", "for_", default=None, help="Lift by itself after this long (e.g. 30m).")
@one_line_errors
def suspend(for_: str | None) -> None:
    """Kill switch: hold every restart cluster-wide (VMs are still judged and flagged)."""
    _, store = open_store()
    seconds = duration_s(for_)
    store.hosts.set_kill_switch(seconds)
    store.audit.append(AuditEvent.RESTARTS_SUSPENDED, "", "", store.clock.time_ms(), reason="operator", for_s=seconds)
    click.echo("restarts suspended" + (f" for {seconds:g} s" if seconds else " until `vmq resume`"))


@click.command()
@one_line_errors
def resume() -> None:
    """Lift the kill switch."""
    _, store = open_store()
    store.hosts.set_kill_switch(None, on=False)
    store.audit.append(AuditEvent.RESTARTS_RESUMED, "", "", store.clock.time_ms(), reason="operator")
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
    now_ms = store.clock.time_ms()
    seconds = duration_s(for_)
    until_ms = -1 if seconds is None else now_ms + int(seconds * 1000)
    if host:
        store.hosts.set_host_fields(host, {"maintenance_until_ms": 0 if off else until_ms})
        store.audit.append(AuditEvent.HOST_MAINTENANCE, "", host, now_ms, on=not off, until_ms=None if off else until_ms)
        click.echo(f"host {host}: maintenance {'off' if off else 'on'}")
        return
    assert vm is not None
    rec = store.vms.record(vm)
    if not rec.exists:
        raise click.UsageError(f"unknown VM {vm}")
    if off:
        result = lifecycle.maintenance_off(store.vms, rec, now_ms)
    else:
        result = lifecycle.maintenance_on(store.vms, rec, now_ms, until_ms)
    if not result.applied:
        raise click.UsageError(f"{vm} is {result.previous}: cannot change its maintenance now")
    click.echo(f"{vm}: {result.previous} -> {'unknown' if off else 'maintenance'}")


@click.command("set")
@click.argument("vm")
@click.argument("knobs", nargs=-1, required=True)
@one_line_errors
def set_knobs(vm: str, knobs: tuple[str, ...]) -> None:
    """Override restart-condition knobs for one VM: `vmq set web-1 max_restarts=5 boot_grace_s=120`
    (`knob=` removes the override)."""
    from vmq.policy import OVERRIDABLE, PolicyConfig, with_overrides

    _, store = open_store()
    if not store.vms.record(vm).exists:
        raise click.UsageError(f"unknown VM {vm}")
    fields: dict[str, str] = {}
    for item in knobs:
        knob, sep, value = item.partition("=")
        if not sep or knob not in OVERRIDABLE:
            raise click.BadParameter(f"{item!r}: expected KNOB=VALUE with KNOB one of {sorted(OVERRIDABLE)}")
        if value and with_overrides(PolicyConfig(), {knob: value})[1]:
            raise click.BadParameter(f"{item!r}: {knob} must be a non-negative {OVERRIDABLE[knob].__name__}")
        fields[f"policy.{knob}"] = value
    store.vms.set_policy_overrides(vm, fields)
    store.audit.append(AuditEvent.OVERRIDES, vm, "", store.clock.time_ms(), overrides=fields)
    click.echo(f"{vm}: " + ", ".join(f"{k[7:]}={v or '(cluster default)'}" for k, v in fields.items()))


@click.command("path")
@click.argument("vm")
@click.argument("path", type=click.Choice([*(p.value for p in ProbePath), "auto"]))
@one_line_errors
def probe_path(vm: str, path: str) -> None:
    """Choose how VM's answers reach vmq: redis (its responder talks to Redis), channel (its responder answers
    over virtio-serial, relayed by its host), agent (the QEMU guest agent, asked by its host); auto: as its
    domain's channels allow (VMQ_PROBE_PATH_DETECT)."""
    _, store = open_store()
    rec = store.vms.record(vm)
    if not rec.exists:
        raise click.UsageError(f"unknown VM {vm}")
    store.vms.set_fields(vm, {"probe_path_set": "" if path == "auto" else path})
    now_ms = store.clock.time_ms()
    store.audit.append(AuditEvent.PROBE_PATH, vm, rec.host, now_ms, path=path, previous=rec.probe_path.value)
    store.vms.start_monitoring(vm, now_ms)  # answers on the new path are owed from the next round, after grace
    click.echo(f"{vm}: probe path {rec.probe_path.value} -> {path}")


def _switch(vm: str, enable: bool) -> None:
    _, store = open_store()
    rec = store.vms.record(vm)
    if not rec.exists:
        raise click.UsageError(f"unknown VM {vm}")
    result = (lifecycle.enable if enable else lifecycle.disable)(store.vms, rec, store.clock.time_ms())
    if not result.applied:
        raise click.UsageError(f"{vm} is {result.previous}: cannot {'enable' if enable else 'disable'} it now")
    click.echo(f"{vm}: {result.previous} -> {(VmState.UNKNOWN if enable else VmState.DISABLED).value}")


@click.command()
@click.argument("vm")
@one_line_errors
def disable(vm: str) -> None:
    """Stop monitoring VM until `vmq enable` (its replies are still verified and counted)."""
    _switch(vm, enable=False)


@click.command()
@click.argument("vm")
@one_line_errors
def enable(vm: str) -> None:
    """Monitor a disabled VM again; it is judged after its grace period."""
    _switch(vm, enable=True)


@click.command()
@click.argument("vm")
@one_line_errors
def clear(vm: str) -> None:
    """Operator clear: a failed/faulty VM goes back to `unknown` with a fresh restart budget."""
    _, store = open_store()
    now_ms = store.clock.time_ms()
    rec = store.vms.record(vm)
    if not rec.exists:
        raise click.UsageError(f"unknown VM {vm}")
    result = lifecycle.clear(store.vms, rec, now_ms)
    if not result.applied:
        raise click.UsageError(f"{vm} is {result.previous}: only failed, faulty, maintenance or disabled VMs "
                               "are cleared")
    click.echo(f"{vm}: {result.previous} -> unknown, restart budget reset")


COMMANDS: list[click.Command] = [suspend, resume, maintenance, set_knobs, disable, enable, clear, probe_path]
