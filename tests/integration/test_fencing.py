"""vmq's fence runner against a real fence agent: fence_dummy of Debian's fence-agents (the ClusterLabs project),
`./dev install` unpacks it. Its file-backed power state stands for a host's BMC: off then status off is fenced; a
machine its agent reports on is not; an agent that cannot reach its device is not."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_deploy_files import tool_or_skip
from vmq.fencing import FenceDevice, fence_off, run_fence

FENCE_INSTALL = "./dev install: Debian's fence-agents package, unpacked into .venv/fence-agents (./dev test sets PATH)"


def dummy(tmp_path: Path, **options: str) -> FenceDevice:
    return FenceDevice(tool_or_skip("fence_dummy", install=FENCE_INSTALL),
                       {"status_file": str(tmp_path / "power"), **options}, timeout_s=30)


def test_fence_dummy_powered_on_is_fenced_by_off_then_status(tmp_path: Path) -> None:
    device = dummy(tmp_path)
    assert run_fence(device, "on").exit_code == 0
    assert run_fence(device, "status").exit_code == 0, "the real agent says on with 0"
    result = fence_off(device)
    assert result.fenced, result.reason
    assert [(s.action, s.exit_code) for s in result.steps] == [("off", 0), ("status", 2)]
    assert (tmp_path / "power").read_text().strip() == "off"
    print(f"fence_dummy: off {result.steps[0].seconds * 1000:.0f} ms, status {result.steps[1].seconds * 1000:.0f} ms")


def test_fence_dummy_of_the_fail_type_cannot_prove_anything(tmp_path: Path) -> None:
    result = fence_off(dummy(tmp_path, type="fail", power_timeout="1"))  # its "device" never powers off
    assert not result.fenced and "off exited" in result.reason
