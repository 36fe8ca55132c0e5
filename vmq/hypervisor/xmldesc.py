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
