"""docs/configuration.md is generated from Settings and must not drift; `vmq config` masks passwords."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from vmq.config import Settings
from vmq.configdoc import mask, render_markdown, unit_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_is_the_one_generated_from_the_settings_class() -> None:
    assert DOC.read_text() == render_markdown(), \
        "docs/configuration.md is stale: run `python -m vmq.configdoc > docs/configuration.md`"


def test_every_setting_is_documented_with_a_meaning_and_every_timed_one_with_its_unit() -> None:
    documented = set(re.findall(r"^\| `VMQ_([A-Z0-9_]+)` ", DOC.read_text(), flags=re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}
    for name, info in Settings.model_fields.items():
        assert info.description and len(info.description) > 15, f"VMQ_{name.upper()} needs a description"
        if name.endswith("_s"):
            assert unit_of(name) == ("bytes/s" if name.endswith("_per_s") else "seconds")


def test_passwords_are_masked_and_nothing_else_is() -> None:
    assert mask("redis://vmq:s3cret@redis:6379/0") == "redis://vmq:***@redis:6379/0"
    assert mask("rediss://:only-pass@h:6380/1") == "rediss://:***@h:6380/1"
    assert mask("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_vmq_config_prints_the_values_in_force_without_the_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(VMQ_REDIS_URL="redis://vmq:hunter2-secret@redis:6379/0", VMQ_PROBE_INTERVAL_S="1.5",
               VMQ_REPLY_TIMEOUT_S="4")
    proc = subprocess.run([sys.executable, "-m", "vmq.cli", "config", "--json"], capture_output=True, text=True,
                          env=env, timeout=30, check=True)
    values = json.loads(proc.stdout)
    assert values["VMQ_PROBE_INTERVAL_S"] == 1.5 and values["VMQ_REPLY_TIMEOUT_S"] == 4.0
    assert values["VMQ_REDIS_URL"] == "redis://vmq:***@redis:6379/0"
    assert "hunter2" not in proc.stdout + proc.stderr
    env["VMQ_REPLY_TIMEOUT_S"] = "1"
    bad = subprocess.run([sys.executable, "-m", "vmq.cli", "config"], capture_output=True, text=True, env=env,
                         timeout=30, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "VMQ_REPLY_TIMEOUT_S (1.0) must be greater than VMQ_PROBE_INTERVAL_S (1.5)" in bad.stderr
