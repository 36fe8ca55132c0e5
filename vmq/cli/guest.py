"""The guest side of ``vmq``: per-VM responder keys (``keys add``, ``keys revoke``, ``keys rotate``) and the
in-guest responder itself (``responder``)."""

from __future__ import annotations

import sys
import time

import click

from vmq.cli.common import duration_s, one_line_errors, open_store, responder_config
from vmq.codec import new_secret
from vmq.keys import valid_name
from vmq.model import AuditEvent


@click.group()
def keys() -> None:
    """Per-VM responder keys."""


@keys.command("add")
@click.argument("vm")
@click.option("--guest-redis-url", default=None,
              help="Redis URL as the guest must use it: the `guest` ACL user "
                   "(default: VMQ_REDIS_URL, if it has no password).")
@click.option("--channel", is_flag=True,
              help="The guest answers over its virtio-serial port org.vmq.responder.0 (probe path `channel`): "
                   "the config has no Redis URL and no credentials.")
@click.option("--force", is_flag=True, help="Replace an existing key (the old one stops working at once).")
@one_line_errors
def keys_add(vm: str, guest_redis_url: str | None, channel: bool, force: bool) -> None:
    """Create VM's key and print the responder config to install in that guest (/etc/vmq/responder.toml)."""
    if not valid_name(vm):
        raise click.BadParameter("VM names are 1-128 of A-Z a-z 0-9 _ . -", param_hint="VM")
    settings, store = open_store()
    if vm in store.keyring.secrets() and not force:
        raise click.UsageError(f"{vm} already has a key; use --force to replace it")
    secret = new_secret()
    config = responder_config(settings, vm, secret, guest_redis_url, channel)  # refused before any key is stored
    store.keyring.set_secret(vm, secret)
    store.vms.start_monitoring(vm, store.clock.time_ms())
    click.echo(f"# /etc/vmq/responder.toml for {vm} (mode 0600). Run in the guest:\n"
               f"#   python3 vmq_responder.py --config /etc/vmq/responder.toml\n{config}")


@keys.command("revoke")
@click.argument("vm")
@one_line_errors
def keys_revoke(vm: str) -> None:
    """Delete VM's key: its replies are refused and it is no longer judged."""
    _, store = open_store()
    if not store.keyring.delete_secret(vm):
        raise click.UsageError(f"{vm} has no key")
    click.echo(f"key of {vm} revoked")


@keys.command("rotate")
@click.argument("vm")
@click.option("--grace", default=None,
              help="Keep accepting the old key this long (e.g. 30m, 2h; 0 = refuse it at once). "
                   "Default: VMQ_KEY_ROTATION_GRACE_S.")
@click.option("--guest-redis-url", default=None,
              help="Redis URL as the guest must use it: the `guest` ACL user "
                   "(default: VMQ_REDIS_URL, if it has no password).")
@click.option("--channel", is_flag=True,
              help="The guest answers over its virtio-serial port org.vmq.responder.0 (probe path `channel`): "
                   "the config has no Redis URL and no credentials.")
@one_line_errors
def keys_rotate(vm: str, grace: str | None, guest_redis_url: str | None, channel: bool) -> None:
    """Give VM a new key; the old one keeps working for the grace period, so the guest can be updated
    without a gap. Prints the new responder config to install in the guest."""
    settings, store = open_store()
    if grace is None:
        grace_s = settings.key_rotation_grace_s
    elif grace.strip().rstrip("smhd") in {"0", "0.0"}:
        grace_s = 0.0
    else:
        grace_s = duration_s(grace) or 0.0
    secret = new_secret()
    config = responder_config(settings, vm, secret, guest_redis_url, channel)  # refused before the key is rotated
    until_ms = store.keyring.rotate_secret(vm, secret, int(grace_s * 1000))
    store.audit.append(AuditEvent.KEY_ROTATED, vm, "", store.clock.time_ms(), grace_s=grace_s, old_key_until_ms=until_ms)
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until_ms / 1000))
    click.echo(f"# new key for {vm}; the old one is accepted until {until} ({grace_s:g} s)\n"
               f"# replace /etc/vmq/responder.toml in the guest (mode 0600) and restart the responder\n{config}")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def responder(ctx: click.Context) -> None:
    """Run the in-guest responder (same as `python3 vmq_responder.py`); --print-path shows the file to copy."""
    from vmq import responder as guest

    if ctx.args == ["--print-path"]:
        click.echo(guest.__file__)
        return
    sys.exit(guest.main(list(ctx.args)))


COMMANDS: list[click.Command] = [keys, responder]
