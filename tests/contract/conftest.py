"""Store fixtures shared by the contract suites (defined with the monitor/store contract suite)."""

from tests.contract.test_monitor_store import backend, redis_server, world  # noqa: F401
