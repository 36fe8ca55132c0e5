"""Node files for libvirt's test driver (``test:///ABS/PATH/node.xml``): a fake host with fixed domains.

The test driver keeps its world inside the process that opened the URI and re-reads the file on every
new connection, so each connection starts from the states written here. It honours only three start
states: any ``runstate`` other than paused (3) or shut off (5) comes up running, so CRASHED, OTHER and
ABSENT cannot be expressed and are refused. Initial state reasons are always libvirt's "unknown".

With ``devices=True`` every domain gets one file disk (target ``vda``) and one ``type='ethernet'``
interface with target ``vmq-<first 8 hex digits of its UUID>``, so ``blockStats``/``interfaceStats``
answer. Measured on libvirt 9.0's test driver: it accepts both without the image file or a network,
reports made-up byte counters that grow with the wall clock, and a constant ``getCPUStats`` CPU time;
it *drops* a target name starting with ``vnet`` (libvirt reserves that prefix for names it generates)
and reports ``testnet0`` instead, hence the ``vmq-`` prefix. On a domain that is not running every
statistics call fails with VIR_ERR_OPERATION_INVALID.

With ``channels`` a domain gets virtio-serial channels (``<channel type='unix'>`` bound to the socket
``channel_socket_path`` names). Measured on libvirt 9.0's test driver: it keeps them in the domain XML (and
adds a ``virtio-serial`` controller), creates no socket, and its ``getTime`` answers on every running domain,
channel or not, with a fixed time (627319920 s); ``guestInfo`` and ``agentSetResponseTimeout`` do not exist
there (VIR_ERR_NO_SUPPORT), and ``getTime`` on a paused or shut-off domain fails "domain is not running".

Does not import libvirt (only vmq.hypervisor.libvirt does); the tests check the numbers against it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

from vmq.model import DomainStatus

# libvirt.VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED, VIR_DOMAIN_SHUTOFF (virDomainState, stable ABI).
_RUNSTATE: dict[DomainStatus, int] = {
    DomainStatus.RUNNING: 1,
    DomainStatus.PAUSED: 3,
    DomainStatus.SHUTOFF: 5,
}

_TEST_NAMESPACE = "http://libvirt.org/schemas/domain/test/1.0"

# Fixed namespace of vmq VM UUIDs; changing it would change every generated UUID.
_VM_NAMESPACE = uuid.UUID("6f1c1c2e-3a7b-5d0e-9b8a-2f4d6c8e0a1b")

_NODE_HEAD = """<node>
  <!-- vmq test host {host} -->
  <cpu>
    <mhz>2000</mhz>
    <model>x86_64</model>
    <active>2</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>2</cores>
    <threads>1</threads>
  </cpu>
  <memory>4194304</memory>
"""

_DOMAIN = """  <domain type='test'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory unit='KiB'>65536</memory>
    <vcpu>1</vcpu>
    <os>
      <type arch='x86_64'>hvm</type>
    </os>
{devices}{metadata}    <test:runstate xmlns:test={namespace}>{runstate}</test:runstate>
  </domain>
"""

_DEVICES = """      <disk type='file' device='disk'>
        <source file='/guest.img'/>
        <target dev='vda'/>
      </disk>
      <interface type='ethernet'>
        <target dev={interface}/>
      </interface>
"""

_CHANNEL = """      <channel type='unix'>
        <source mode='bind' path={path}/>
        <target type='virtio' name={name}/>
      </channel>
"""


def stable_uuid(vm: str) -> str:
    """UUID of a VM: uuid5 of its name, so the UUID identifies the VM on whichever host it runs."""
    return str(uuid.uuid5(_VM_NAMESPACE, vm))


def interface_target(domain_uuid: str) -> str:
    """Target name of the interface ``node_xml(devices=True)`` gives a domain (15 characters at most)."""
    return f"vmq-{uuid.UUID(domain_uuid).hex[:8]}"


def channel_socket_path(socket_dir: str, domain_uuid: str, channel: str) -> str:
    """Host socket path ``node_xml(channels=...)`` gives a domain's channel: ``<dir>/vmq-<uuid8>.<channel>``."""
    return os.path.join(socket_dir, f"vmq-{uuid.UUID(domain_uuid).hex[:8]}.{channel}")


def _devices(domain_uuid: str, devices: bool, channels: Sequence[str], socket_dir: str) -> str:
    """The ``<devices>`` element of one domain, or "" when it has none."""
    parts = [_DEVICES.format(interface=quoteattr(interface_target(domain_uuid)))] if devices else []
    for channel in channels:
        path = channel_socket_path(socket_dir, domain_uuid, channel)
        parts.append(_CHANNEL.format(path=quoteattr(path), name=quoteattr(channel)))
    return f"    <devices>\n{''.join(parts)}    </devices>\n" if parts else ""


def node_xml(
    host: str,
    domains: Sequence[tuple[str, str, DomainStatus]],
    devices: bool = False,
    channels: Mapping[str, Sequence[str]] | None = None,
    socket_dir: str = "/run/vmq",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """A test-driver node document defining ``(name, uuid, status)`` domains; ``channels`` maps a domain name
    to its virtio channel names, each bound under ``socket_dir`` (see channel_socket_path); ``metadata`` a
    domain name to the elements of its ``<metadata>`` (vmq.intent.intent_xml); raises ValueError (also for
    channels or metadata of a domain not listed)."""
    channels, metadata = channels or {}, metadata or {}
    unknown = (set(channels) | set(metadata)) - {name for name, _uuid, _status in domains}
    if unknown:
        raise ValueError(f"channels or metadata given for domains not listed: {sorted(unknown)}")
    seen: set[str] = set()
    parts = [_NODE_HEAD.format(host=escape(host.replace("--", "- -")))]
    for name, domain_uuid, status in domains:
        if name in seen:
            raise ValueError(f"domain {name!r} listed twice for host {host!r}")
        seen.add(name)
        try:
            runstate = _RUNSTATE[status]
        except KeyError:
            raise ValueError(
                f"domain {name!r}: the test driver can only start domains running, paused or shutoff, "
                f"not {status.value}"
            ) from None
        parts.append(
            _DOMAIN.format(
                name=escape(name),
                uuid=str(uuid.UUID(domain_uuid)),
                namespace=quoteattr(_TEST_NAMESPACE),
                runstate=runstate,
                devices=_devices(domain_uuid, devices, channels.get(name, ()), socket_dir),
                metadata=f"    <metadata>{metadata[name]}</metadata>\n" if name in metadata else "",
            )
        )
    parts.append("</node>\n")
    return "".join(parts)


def write_node(
    path: str | os.PathLike[str],
    host: str,
    domains: Sequence[tuple[str, str, DomainStatus]],
    devices: bool = False,
    channels: Mapping[str, Sequence[str]] | None = None,
    socket_dir: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a node file for ``host`` (see ``node_xml``; channel sockets default to the file's directory)
    and return its ``test:///ABS/PATH`` URI."""
    absolute = os.path.abspath(os.fspath(path))
    directory = socket_dir if socket_dir is not None else os.path.dirname(absolute)
    with open(absolute, "w", encoding="utf-8") as handle:
        handle.write(node_xml(host, domains, devices, channels, directory, metadata))
    return f"test://{absolute}"
