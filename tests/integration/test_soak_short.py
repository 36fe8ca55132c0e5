"""The soak's short version for CI (bench/soak.py): 200 VMs on 2 real host workers for 1 minute, a hang
every ~2 s; every hang detected and restarted exactly once, nothing else restarted or flagged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.mark.timeout(420)
def test_a_one_minute_soak_of_200_vms_restarts_every_injected_hang_exactly_once_and_nothing_else() -> None:
    done = subprocess.run([sys.executable, str(SOAK), "--vms", "200", "--hosts", "2", "--minutes", "1",
                           "--fault-every", "2", "--json"], capture_output=True, text=True, timeout=400,
                          check=False)
    assert done.stdout.strip(), done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    print(counts)
    assert counts["injected"] >= 15, counts
    assert counts["detected"] == counts["injected"], counts
    assert counts["restarted_exactly_once"] == counts["injected"], counts
    assert counts["false_restarts"] == 0 and counts["false_faults"] == 0 and counts["missed"] == 0, counts
    assert done.returncode == 0, done.stderr[-3000:]
