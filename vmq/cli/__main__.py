"""``python -m vmq.cli``: the same as the ``vmq`` command."""

from __future__ import annotations

from vmq.cli import main

main()
