"""`vmq restart VM [--force]`: the operator command that goes through the workers (a manual restart task,
then the host's outcome and the guest's answer from the audit stream)."""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from typing import Any

import click

from vmq.cli.common import one_line_errors, open_store
from vmq.errors import VmqError
from vmq.model import HOST_OUTCOME_EVENTS, INCIDENT_END_EVENTS, AuditEvent
from vmq.operator_views import event_json

#: Events that end a manual restart's wait: the host's outcome, then the guest's answer.


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


@click.command()
@click.argument("vm")
@click.option("--force", is_flag=True, help="Restart even when the VM's restart budget is exhausted.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the host's outcome and the guest's answer.")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds to wait in all.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome and the events as JSON lines.")
@one_line_errors
def restart(vm: str, force: bool, wait: bool, timeout_s: float, as_json: bool) -> None:
    """Restart VM now, through its host's queue and the usual guards (exit 1 when refused or failed)."""
    from vmq.errors import TaskTimeout
    from vmq.routing import MANUAL_RESTART_TASK, MONITOR_QUEUE
    from vmq.taskclient import call_task

    settings, store = open_store()
    if not store.vms.record(vm).exists:
        raise click.UsageError(f"unknown VM {vm}")
    past = store.audit.read(count=1_000_000)
    cursor = past[-1][0] if past else "0-0"
    deadline = time.monotonic() + timeout_s
    try:
        # expires: a request nobody took within the wait must not restart the VM later by surprise.
        outcome: dict[str, Any] = call_task(settings, MANUAL_RESTART_TASK, [vm, force, _who()], MONITOR_QUEUE,
                                            timeout_s=min(timeout_s, 30.0), expires_s=timeout_s)
    except TaskTimeout:
        raise VmqError(f"no monitor worker took the request within {min(timeout_s, 30.0):g} s: is a worker "
                       "consuming the vmq.monitor queue running?") from None
    except VmqError:
        raise
    except Exception as exc:  # noqa: BLE001 - broker or backend trouble: one line, no traceback
        raise VmqError(f"could not send the restart request: {exc}") from None
    _say(as_json, outcome, f"{vm}: {outcome['outcome']}"
         + (f" to {outcome['queue']} (incident {outcome['incident']})" if outcome["queue"] else "")
         + f": {'; '.join(outcome['reasons'])}")
    if outcome["outcome"] != "dispatched":
        sys.exit(1)
    if not wait:
        return
    failed = _follow(store, vm, outcome["incident"], cursor, deadline, as_json)
    sys.exit(1 if failed else 0)


def _say(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)


def _follow(store: Any, vm: str, incident: str, cursor: str, deadline: float, as_json: bool) -> bool:
    """Print this incident's events until the guest answers, it fails, or the time is up; True if failed."""
    restarted = False
    while time.monotonic() < deadline:
        block_ms = max(1, min(1000, int((deadline - time.monotonic()) * 1000)))
        for entry_id, fields in store.audit.read(after=cursor, count=500, block_ms=block_ms):
            cursor = entry_id
            event = event_json(entry_id, fields)
            if event["vm"] != vm or event.get("incident", incident) != incident:
                continue
            kind = event["type"]
            if kind not in HOST_OUTCOME_EVENTS | INCIDENT_END_EVENTS:
                continue
            words = event.get("result") or event.get("reason") or ""
            if kind == AuditEvent.RESTARTED:
                restarted = True
                words = f"{event.get('action')} on {event['host']} in {event.get('took_ms')} ms"
            elif kind == AuditEvent.RECOVERED:
                words = f"answering again after {event.get('recovered_after_s')} s, boot {event.get('boot_id')}"
            _say(as_json, event, f"{vm}: {kind}: {words}")
            if kind in INCIDENT_END_EVENTS:
                return bool(kind == AuditEvent.FAILED)
            if kind in HOST_OUTCOME_EVENTS and kind != AuditEvent.RESTARTED:
                return True
    if restarted:
        _say(as_json, {"vm": vm, "type": "waiting", "incident": incident},
             f"{vm}: restarted, not answering yet; vmq keeps judging it (vmq explain {vm})")
        return False
    raise VmqError(f"no outcome for {vm} within the timeout: the host worker may be busy or down "
                   f"(vmq hosts; vmq events --vm {vm})")


COMMANDS: list[click.Command] = [restart]
