"""The ``vmq`` command (entry point ``vmq.cli:main``). Errors are one line, never a traceback.

Command modules, each importing only ``vmq.cli.common`` and the library:
``observe`` (status, events, hosts, check, explain, config), ``operate`` (suspend, resume, maintenance,
set, disable, enable, clear), ``guest`` (keys add/revoke/rotate, responder), ``restart`` (restart, through
the workers) and ``sim`` (sim node/guests, demo: the simulator, loaded inside those commands only).
"""

from __future__ import annotations

import click

from vmq.cli import failover, guest, observe, operate, restart, sim
from vmq.cli.common import OneLineErrors

__all__ = ["main"]


@click.group(cls=OneLineErrors)
@click.version_option(package_name="vmq")
def main() -> None:
    """vmq keeps a libvirt/KVM VM cluster alive: probe, authenticated replies, timeout, restart on its host."""


for _module in (observe, operate, guest, restart, sim):
    for _command in _module.COMMANDS:
        main.add_command(_command)
observe.hosts.add_command(failover.fence_confirm)
