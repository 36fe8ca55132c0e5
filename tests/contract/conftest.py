"""Fixtures shared by the contract suites: the store's (defined with the monitor/store contract suite) and the
fake channel guests' (defined with the channel relay's suite)."""

from tests.contract.test_channel_relay import guests, short_dir  # noqa: F401
from tests.contract.test_monitor_store import backend, redis_server, world  # noqa: F401
