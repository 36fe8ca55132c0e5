"""Every ``VMQ_*`` setting as documentation, generated from the Settings class (the one source of truth).

``python -m vmq.configdoc > docs/configuration.md`` writes the reference; a test fails when they differ.
``effective_settings`` is what `vmq config` prints: the values in force, with passwords masked.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic.fields import FieldInfo

from vmq.config import Settings

_UNITS = (("_bytes_per_s", "bytes/s"), ("_s", "seconds"), ("_bytes", "bytes"), ("_maxlen", "entries"), ("_fraction", "fraction (0-1]"),
          ("_port", "TCP port"), ("_vms", "VMs"), ("_per_host", "restarts"), ("max_restarts", "restarts"),
          ("rounds_kept", "rounds"))
_PASSWORD = re.compile(r"(?P<scheme>rediss?://)(?P<user>[^:@/]*):(?P<password>[^@/]+)@")

HEADER = """# Configuration

Every vmq process (beat, the monitor worker, the host workers, the CLI) reads the same `VMQ_*` environment
variables once, at its entry point. A bad value stops the process with one line naming the variable.
`vmq config` prints the values in force (passwords masked).

This page is generated from `vmq/config.py` (`python -m vmq.configdoc > docs/configuration.md`);
a test fails when the two differ. The in-guest responder has its own small config file (docs/protocol.md).

| variable | default | unit | meaning |
|---|---|---|---|
"""


def unit_of(name: str) -> str:
    """The unit a setting's name declares (units are in the names)."""
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return unit
    return ""


def _limits(info: FieldInfo) -> str:
    words = []
    for meta in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None:
                words.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return f" ({', '.join(words)})" if words else ""


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return "(empty)"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def render_markdown() -> str:
    """docs/configuration.md, from the Settings fields."""
    rows = []
    for name, info in Settings.model_fields.items():
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| `VMQ_{name.upper()}` | {_default(info.default)} | {unit_of(name)}{_limits(info)} | "
                    f"{description} |")
    return HEADER + "\n".join(rows) + "\n"


def mask(url: str) -> str:
    """A Redis URL with its password replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def effective_settings(settings: Settings) -> dict[str, Any]:
    """``VMQ_NAME -> value`` in force, with every password masked."""
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        out[f"VMQ_{name.upper()}"] = mask(value) if isinstance(value, str) and "://" in value else value
    return out


if __name__ == "__main__":
    print(render_markdown(), end="")
