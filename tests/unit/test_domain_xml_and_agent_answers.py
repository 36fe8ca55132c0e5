"""Pure readers of the hypervisor layer: virtio channels from domain XML, guest-agent answers checked."""

from __future__ import annotations

import pytest

from vmq.errors import AgentAnswerInvalid
from vmq.hypervisor.types import guest_time_ms, reduce_guest_info
from vmq.hypervisor.xmldesc import channel_socket_path, virtio_channels

AGENT = "org.qemu.guest_agent.0"
DOMAIN = """<domain type='kvm'><name>web</name><devices>
  <disk type='file'><target dev='vda'/></disk>
  <channel type='unix'>
    <source mode='bind' path='/run/libvirt/qemu/channel/1-web/org.qemu.guest_agent.0'/>
    <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
  </channel>
  <channel type='unix'><source mode='connect' path='/run/out.sock'/><target type='virtio' name='org.out.0'/></channel>
  <channel type='unix'><target type='virtio' name='org.nosource.0'/></channel>
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
  <channel type='pty'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>
  <channel type='unix'><target type='virtio'/></channel>
  <channel type='unix'/>
  <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_virtio_channels_lists_named_virtio_targets_in_order_without_duplicates() -> None:
    assert virtio_channels(DOMAIN) == (AGENT, "org.out.0", "org.nosource.0", "com.redhat.spice.0")


@pytest.mark.parametrize(
    "xml",
    [
        "",
        "<domain",
        "<domain><devices><channel></devices></domain>",
        "<domain/>",
        "<domain><devices/></domain>",
        "<domain><channel type='unix'><target type='virtio' name='x'/></channel></domain>",  # not under devices
        "<domain><devices><channel><target type='xen' name='x'/></channel></devices></domain>",
    ],
)
def test_virtio_channels_is_empty_for_malformed_or_channelless_xml(xml: str) -> None:
    assert virtio_channels(xml) == ()


def test_channel_socket_path_gives_a_bound_unix_socket() -> None:
    assert channel_socket_path(DOMAIN, AGENT) == "/run/libvirt/qemu/channel/1-web/org.qemu.guest_agent.0"


@pytest.mark.parametrize(
    ("channel", "words"),
    [
        ("org.absent.0", "no virtio channel"),
        ("org.out.0", "QEMU connects out"),
        ("org.nosource.0", "no socket path"),
        ("com.redhat.spice.0", "not a unix socket"),
    ],
)
def test_channel_socket_path_says_what_is_missing(channel: str, words: str) -> None:
    with pytest.raises(LookupError, match=words):
        channel_socket_path(DOMAIN, channel)


def test_channel_socket_path_raises_value_error_on_xml_that_does_not_parse() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        channel_socket_path("<domain", AGENT)


def test_guest_time_ms_reads_seconds_and_nanoseconds() -> None:
    assert guest_time_ms({"seconds": 1_700_000_000, "nseconds": 123_456_789}) == 1_700_000_000_123
    assert guest_time_ms({"seconds": 5}) == 5000


@pytest.mark.parametrize(
    "answer",
    [None, 12, "soon", [], {}, {"seconds": "1"}, {"seconds": -1}, {"seconds": True}, {"seconds": 1.5},
     {"seconds": 1, "nseconds": 1_000_000_000}, {"seconds": 1, "nseconds": -1}],
)
def test_guest_time_ms_rejects_nonsense(answer: object) -> None:
    with pytest.raises(AgentAnswerInvalid):
        guest_time_ms(answer)


def test_reduce_guest_info_keeps_os_hostname_and_filesystems() -> None:
    raw = {"os.id": "rhel", "os.version-id": "9.4", "os.name": "Red Hat", "hostname": "db-1", "user.count": 2,
           "fs.count": 2, "fs.0.mountpoint": "/", "fs.0.fstype": "xfs", "fs.0.used-bytes": 10, "fs.0.total-bytes": 20,
           "fs.1.mountpoint": "/boot", "fs.1.fstype": "vfat"}
    assert reduce_guest_info(raw) == {
        "os_id": "rhel", "os_version_id": "9.4", "hostname": "db-1",
        "filesystems": [
            {"mountpoint": "/", "fstype": "xfs", "used_bytes": 10, "total_bytes": 20},
            {"mountpoint": "/boot", "fstype": "vfat", "used_bytes": None, "total_bytes": None},
        ],
    }


def test_reduce_guest_info_of_an_empty_answer_is_all_unknown() -> None:
    assert reduce_guest_info({}) == {"os_id": None, "os_version_id": None, "hostname": None, "filesystems": []}


@pytest.mark.parametrize("raw", ["garbage", None, {"hostname": 7}, {"fs.count": "2"}, {"fs.count": 1, "fs.0.used-bytes": -5}])
def test_reduce_guest_info_rejects_nonsense(raw: object) -> None:
    with pytest.raises(AgentAnswerInvalid):
        reduce_guest_info(raw)
