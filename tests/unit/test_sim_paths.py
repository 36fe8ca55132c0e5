"""Probe paths in the simulator: `vmq demo --via`, ClusterSpec.paths and the node files LocalCluster writes."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import pytest

from vmq.hypervisor.xmldesc import virtio_channels
from vmq.model import AGENT_CHANNEL, RESPONDER_CHANNEL, ProbePath
from vmq.sim.demo import _spec, probe_paths
from vmq.sim.localcluster import ClusterSpec, LocalCluster, _responder_sockets
from vmq.sim.testnode import channel_socket_path, stable_uuid

C, A, R = ProbePath.CHANNEL, ProbePath.AGENT, ProbePath.REDIS


def _channels(node_file: Path) -> dict[str, tuple[str, ...]]:
    """Domain -> its virtio channels, read from each domain's XML as a host reads it."""
    return {domain.findtext("name", ""): virtio_channels(ElementTree.tostring(domain, "unicode"))
            for domain in ElementTree.parse(node_file).getroot().iter("domain")}


def test_via_gives_every_vm_one_path_or_mixed_spreads_the_three_in_turn() -> None:
    vms = [f"vm-{i}" for i in range(1, 6)]
    assert probe_paths(vms, "agent") == dict.fromkeys(vms, A)
    assert probe_paths(vms, "mixed") == {"vm-1": R, "vm-2": C, "vm-3": A, "vm-4": R, "vm-5": C}
    with pytest.raises(ValueError):
        probe_paths(vms, "carrier-pigeon")
    spec = _spec(2, 4, 1.0, 3.0, "mixed")
    assert spec.paths == {"vm-1": R, "vm-2": C, "vm-3": A, "vm-4": R}
    assert _spec(2, 4, 1.0, 3.0).paths == {f"vm-{i}": R for i in range(1, 5)}  # the default: redis, recorded


def _cluster(workdir: Path, paths: dict[str, ProbePath]) -> LocalCluster:
    spec = ClusterSpec(placement={"node1": ["vm-r", "vm-c", "vm-a"]}, standby={"node2": ["vm-c"]}, paths=paths)
    return LocalCluster(workdir, "redis://127.0.0.1:1/0", spec)


def test_node_files_carry_the_channel_of_each_vms_path_and_the_fleet_learns_the_socket_from_them(
    tmp_path: Path
) -> None:
    cluster = _cluster(tmp_path, {"vm-c": C, "vm-a": A})
    try:
        cluster.write_host_node("node1")
        cluster.write_host_node("node2")
        assert _channels(tmp_path / "node-node1.xml") == {"vm-r": (), "vm-c": (RESPONDER_CHANNEL,),
                                                          "vm-a": (AGENT_CHANNEL,)}
        assert _channels(tmp_path / "node-node2.xml") == {"vm-c": (RESPONDER_CHANNEL,)}
        expected = channel_socket_path(str(cluster.channel_dir()), stable_uuid("vm-c"), RESPONDER_CHANNEL)
        assert cluster.channel_sockets == {"vm-c": expected}
        assert _responder_sockets(tmp_path / "node-node2.xml") == {"vm-c": expected}  # same socket on either host
        assert len(expected.encode()) + len(".guest") <= 107
    finally:
        cluster.store.client.close()


def test_a_cluster_without_relayed_paths_writes_the_same_node_files_as_before(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, {})
    try:
        cluster.write_host_node("node1")
        assert "<channel" not in (tmp_path / "node-node1.xml").read_text()
        assert cluster.channel_sockets == {} and not (tmp_path / "channels").exists()
    finally:
        cluster.store.client.close()


def test_a_deep_workdir_gets_its_channel_sockets_in_a_short_temporary_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    cluster = _cluster(deep, {"vm-c": C})
    try:
        directory = cluster.channel_dir()
        assert not directory.is_relative_to(deep)
    finally:
        cluster.stop()
    assert not directory.exists()


def test_paths_for_vms_the_cluster_does_not_run_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vm-x"):
        _cluster(tmp_path, {"vm-x": A})
