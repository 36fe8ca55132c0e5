"""What a host reports for a failover (issue 18): whether its lock manager is running (a host without one is not
failover-safe), and the facts of a kept definition the plan sizes hosts by."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmq.host_failover import lock_manager_state
from vmq.hypervisor.xmldesc import definition_facts


def listening(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_lockd_in_qemu_conf_with_virtlockd_answering_is_safe(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# lock_manager = "none"\nlock_manager = "lockd"\n')
    with listening(tmp_path / "virtlockd-sock"):
        assert lock_manager_state("auto", "qemu:///system", str(tmp_path / "virtlockd-sock"), conf) == \
            (True, "virtlockd answers")


def test_lockd_configured_but_virtlockd_gone_is_not_safe(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('lock_manager = "lockd"\n')
    safe, words = lock_manager_state("auto", "qemu:///system", str(tmp_path / "absent-sock"), conf)
    assert not safe and "virtlockd does not answer" in words


@pytest.mark.parametrize("setting,uri,conf_text,said", [
    ("auto", "qemu:///system", '#lock_manager = "lockd"\n', "no lock manager (lock_manager = 'none')"),
    ("auto", "qemu+ssh://root@alpha/system", "", "lock manager unknown for qemu+ssh"),
    ("none", "qemu:///system", 'lock_manager = "lockd"\n', "no lock manager"),
    ("auto", "test:///default", "", "lock manager unknown for test:///default"),
])
def test_no_lock_manager_or_an_unknown_one_is_not_safe(tmp_path: Path, setting: str, uri: str, conf_text: str,
                                                       said: str) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text(conf_text)
    safe, words = lock_manager_state(setting, uri, str(tmp_path / "sock"), conf)
    assert not safe and words.startswith(said)


def test_definition_facts_read_name_uuid_memory_and_vcpus_in_libvirts_units() -> None:
    xml = "<domain type='kvm'><name>db</name><uuid>u-9</uuid><memory unit='GiB'>4</memory><vcpu>3</vcpu></domain>"
    assert definition_facts(xml) == ("db", "u-9", 4096, 3)
    assert definition_facts("<domain><name>x</name><memory>2097152</memory></domain>") == ("x", "", 2048, 1)
    with pytest.raises(ValueError, match="does not parse"):
        definition_facts("<domain>")
    with pytest.raises(ValueError, match="no <name>|not a domain"):
        definition_facts("<network><name>x</name></network>")
