"""libvirt's domain states and reasons in vmq's words: ``domain_status`` reduces a ``(state, reason)`` pair.

Imports libvirt for its constants (never bare numbers); used by vmq.hypervisor.libvirt.
"""

from __future__ import annotations

import libvirt

from vmq.model import DomainStatus

_RUNNING_REASONS: dict[int, str] = {
    libvirt.VIR_DOMAIN_RUNNING_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_RUNNING_BOOTED: "booted",
    libvirt.VIR_DOMAIN_RUNNING_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_RUNNING_RESTORED: "restored",
    libvirt.VIR_DOMAIN_RUNNING_FROM_SNAPSHOT: "from_snapshot",
    libvirt.VIR_DOMAIN_RUNNING_UNPAUSED: "unpaused",
    libvirt.VIR_DOMAIN_RUNNING_MIGRATION_CANCELED: "migration_canceled",
    libvirt.VIR_DOMAIN_RUNNING_SAVE_CANCELED: "save_canceled",
    libvirt.VIR_DOMAIN_RUNNING_WAKEUP: "wakeup",
    libvirt.VIR_DOMAIN_RUNNING_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_RUNNING_POSTCOPY: "postcopy",
    libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED: "postcopy_failed",
}

_PAUSED_REASONS: dict[int, str] = {
    libvirt.VIR_DOMAIN_PAUSED_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_PAUSED_USER: "user",
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration",
    libvirt.VIR_DOMAIN_PAUSED_SAVE: "save",
    libvirt.VIR_DOMAIN_PAUSED_DUMP: "dump",
    libvirt.VIR_DOMAIN_PAUSED_IOERROR: "ioerror",
    libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: "watchdog",
    libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT: "from_snapshot",
    libvirt.VIR_DOMAIN_PAUSED_SHUTTING_DOWN: "shutting_down",
    libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_PAUSED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PAUSED_STARTING_UP: "starting_up",
    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY: "postcopy",
    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "postcopy_failed",
}

_SHUTOFF_REASONS: dict[int, str] = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from_snapshot",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
}

# Only UNKNOWN and USER are state reasons; the other VIR_DOMAIN_SHUTDOWN_* constants are shutdown() flags.
_SHUTDOWN_REASONS: dict[int, str] = {
    libvirt.VIR_DOMAIN_SHUTDOWN_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTDOWN_USER: "user",
}

_CRASHED_REASONS: dict[int, str] = {
    libvirt.VIR_DOMAIN_CRASHED_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_CRASHED_PANICKED: "panicked",
}

_REASONS_BY_STATE: dict[int, dict[int, str]] = {
    libvirt.VIR_DOMAIN_RUNNING: _RUNNING_REASONS,
    libvirt.VIR_DOMAIN_PAUSED: _PAUSED_REASONS,
    libvirt.VIR_DOMAIN_SHUTOFF: _SHUTOFF_REASONS,
    libvirt.VIR_DOMAIN_SHUTDOWN: _SHUTDOWN_REASONS,
    libvirt.VIR_DOMAIN_CRASHED: _CRASHED_REASONS,
}

# Error codes that say "the hypervisor or the way to it is broken", not "this domain refused".


def domain_status(state: int, reason: int) -> tuple[DomainStatus, str]:
    """Reduce libvirt's ``(state, reason)`` pair to a DomainStatus and a lowercase reason word."""
    word = _REASONS_BY_STATE.get(state, {}).get(reason, "unknown")
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return DomainStatus.RUNNING, word
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return DomainStatus.PAUSED, word
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return DomainStatus.CRASHED, word
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return DomainStatus.CRASHED, word
        return DomainStatus.SHUTOFF, word
    return DomainStatus.OTHER, word
