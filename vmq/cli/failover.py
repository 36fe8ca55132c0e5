"""`vmq hosts fence-confirm`: an operator's word that a dead host is powered off (issue 18), as Proxmox and
Pacemaker offer. It counts for the host's current down episode only: a confirmation cannot fence a host that
comes back and dies again later."""

from __future__ import annotations

import getpass

import click

from vmq.cli.common import one_line_errors, open_store

__all__ = ["COMMANDS", "fence_confirm"]


@click.command("fence-confirm")
@click.argument("host")
@click.option("--yes", is_flag=True, help="Do not ask: I powered it off (or know it is off).")
@click.option("--by", "by", default=None, help="Who confirms (default: this login).")
@one_line_errors
def fence_confirm(host: str, yes: bool, by: str | None) -> None:
    """Say HOST is powered off, so that its failover-enabled VMs may start elsewhere. A VM started twice
    corrupts its disks: confirm only what you checked (the BMC says off, the power is pulled)."""
    settings, store = open_store()
    overview = {name: (alive, info) for name, alive, info in store.hosts.hosts_overview()}
    if host not in overview:
        raise click.UsageError(f"unknown host {host}")
    alive, info = overview[host]
    episode = int(info.get("down_since_ms") or 0)
    if alive or not episode:
        raise click.UsageError(f"{host} is not down (its worker's heartbeat is fresh, or the sweep has not marked it "
                               "down yet): nothing to confirm")
    if not yes:
        click.confirm(f"{host} has been down since episode {episode}. Is it powered off, for certain?", abort=True)
    who = by or getpass.getuser()
    store.failovers.confirm_fenced(host, episode, who, store.clock.time_ms())
    failover = "" if settings.failover else " (VMQ_FAILOVER is off here: nothing will start elsewhere)"
    click.echo(f"{host} confirmed off by {who} for its down episode {episode}{failover}")


COMMANDS: list[click.Command] = []  # attached to `vmq hosts` in vmq.cli
