"""Hypothesis without per-example deadlines: the property tests' verdicts do not depend on speed, and a loaded
CI machine must not turn a slow example into a failure (the examples' count stays as each test sets it)."""

from hypothesis import settings

settings.register_profile("vmq", deadline=None)
settings.load_profile("vmq")
