"""Facts read from a libvirt domain XML (``virDomainGetXMLDesc``): its virtio channels and their host sockets.

Pure: takes the XML text, imports no libvirt, so FakeHypervisor, the test node writer and unit tests share it.
A channel, as libvirt writes it::

    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>

Only ``<target type='virtio'>`` channels count (``guestfwd`` and ``xen`` targets are not virtio-serial ports).
"""

from __future__ import annotations

import hashlib
from xml.etree import ElementTree

# Cheap pre-check: most domains have no channel, and a substring search costs far less than a parse.
_CHANNEL_TAG = "<channel"


def virtio_channels(domain_xml: str) -> tuple[str, ...]:
    """Names of the domain's virtio channels in document order, duplicates dropped; () if the XML does not
    parse, has no ``<devices>`` or no such channel. Never raises (a listing must not fail on one domain)."""
    if _CHANNEL_TAG not in domain_xml:
        return ()
    try:
        root = ElementTree.fromstring(domain_xml)
    except ElementTree.ParseError:
        return ()
    names: list[str] = []
    for target in root.findall("./devices/channel/target[@type='virtio']"):
        name = target.get("name")
        if name and name not in names:
            names.append(name)
    return tuple(names)


def channel_socket_path(domain_xml: str, channel: str) -> str:
    """Host-side unix socket path of the virtio channel ``channel`` (``<channel type='unix'>`` with a
    ``<source path=...>`` that QEMU binds); raises LookupError saying what is missing, ValueError if the XML
    does not parse. A ``mode='connect'`` source is refused: there QEMU connects out, nothing listens."""
    try:
        root = ElementTree.fromstring(domain_xml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    for element in root.findall("./devices/channel"):
        target = element.find("target")
        if target is None or target.get("type") != "virtio" or target.get("name") != channel:
            continue
        if element.get("type") != "unix":
            raise LookupError(f"channel {channel!r} is of type {element.get('type')!r}, not a unix socket")
        source = element.find("source")
        path = source.get("path") if source is not None else None
        if not path:
            raise LookupError(f"channel {channel!r} has no socket path (libvirt fills it in when the domain starts)")
        mode = source.get("mode", "bind") if source is not None else "bind"
        if mode != "bind":
            raise LookupError(f"channel {channel!r} socket {path!r} is mode {mode!r}: QEMU connects out, not bound")
        return path
    raise LookupError(f"no virtio channel {channel!r}")


#: Attributes of a domain XML that hold a secret in clear (libvirt writes them only with VIR_DOMAIN_XML_SECURE,
#: which vmq never asks for; dropped again here so that no definition vmq keeps can carry one).
_SECRET_ATTRIBUTES = ("passwd",)


def definition_facts(domain_xml: str) -> tuple[str, str, int, int]:
    """(name, uuid, memory MiB, vCPUs) of a domain definition; raises ValueError if it does not parse or has
    no name."""
    try:
        root = ElementTree.fromstring(domain_xml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    name = (root.findtext("name") or "").strip()
    if root.tag != "domain" or not name:
        raise ValueError("not a domain definition with a <name>")
    memory = root.find("memory")
    unit = (memory.get("unit", "KiB") if memory is not None else "KiB").lower()
    scale = {"b": 1 / 1048576, "bytes": 1 / 1048576, "k": 1 / 1024, "kib": 1 / 1024, "kb": 1000 / 1048576,
             "m": 1, "mib": 1, "mb": 1000000 / 1048576, "g": 1024, "gib": 1024, "gb": 1e9 / 1048576}.get(unit, 1 / 1024)
    try:
        memory_mib = int(float((memory.text or "0") if memory is not None else "0") * scale)
        vcpus = int((root.findtext("vcpu") or "1").strip())
    except ValueError as exc:
        raise ValueError(f"domain {name!r}: memory or vcpu is not a number: {exc}") from exc
    return name, (root.findtext("uuid") or "").strip(), memory_mib, vcpus


def scrub_definition(domain_xml: str) -> str:
    """The definition without secrets in clear (``passwd`` attributes of graphics and the like); the XML as
    given when it holds none (the common case: libvirt leaves them out without VIR_DOMAIN_XML_SECURE)."""
    if not any(f"{name}=" in domain_xml for name in _SECRET_ATTRIBUTES):
        return domain_xml
    root = ElementTree.fromstring(domain_xml)
    for element in root.iter():
        for name in _SECRET_ATTRIBUTES:
            element.attrib.pop(name, None)
    return ElementTree.tostring(root, encoding="unicode")


def definition_digest(domain_xml: str) -> str:
    """The sha256 of a kept definition (what a failover start checks it was given)."""
    return hashlib.sha256(domain_xml.encode()).hexdigest()
