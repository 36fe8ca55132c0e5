"""Hypervisor adapters: ``open_hypervisor`` picks the fake or libvirt one from the URI.

Importing this package does not import libvirt; only building a LibvirtHypervisor (or starting a
``vmq.hypervisor.events.LifecycleListener``) does.
"""

from __future__ import annotations

from vmq.hypervisor.fake import FakeHypervisor
from vmq.hypervisor.types import ActivitySample, busy, moving
from vmq.ports import Hypervisor

__all__ = ["ActivitySample", "FakeHypervisor", "busy", "moving", "open_hypervisor"]

FAKE_SCHEME = "fake://"


def open_hypervisor(uri: str, call_timeout_s: float = 30.0) -> Hypervisor:
    """A Hypervisor for ``uri``: FakeHypervisor for ``fake://...``, else LibvirtHypervisor (lazy connect)."""
    if uri.startswith(FAKE_SCHEME):
        return FakeHypervisor(uri)
    # Deferred so that processes without libvirt (monitor, responder) can import vmq.hypervisor.
    from vmq.hypervisor.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(uri, call_timeout_s=call_timeout_s)
