"""vmq.store.client.CommandPacker: the same bytes as redis-py's own packer for every command vmq sends, and
the same errors for arguments hiredis cannot pack (memoryview is converted, None is refused)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.exceptions import DataError

from tests.contract.test_monitor_store import redis_server  # noqa: F401 - the real-server fixture
from vmq.store.client import CommandPacker
from vmq.store.redis import connect

REDIS_PY = HiredisRespSerializer()
ARG = st.one_of(st.text(max_size=20), st.binary(max_size=20), st.integers(), st.floats(allow_nan=False),
                st.builds(bytearray, st.binary(max_size=8)))


@given(st.sampled_from(["ZADD", "ZMSCORE", "XINFO STREAM", b"SCRIPT LOAD", b"HSET", "CLIENT SETINFO"]),
       st.lists(ARG, max_size=30))
def test_packs_every_command_exactly_as_redis_py_does(name: str | bytes, args: list[Any]) -> None:
    assert CommandPacker().pack(name, *args) == REDIS_PY.pack(name, *args)


def test_a_ten_thousand_member_zadd_is_packed_as_redis_py_packs_it() -> None:
    args: list[Any] = ["ZADD", "vmq:last_seen", "GT"]
    for i in range(10_000):
        args += [1_795_678_489_639 + i, f"vm-{i:05d}"]
    packed = CommandPacker().pack(*args)
    assert packed == REDIS_PY.pack(*args)
    # and as redis-py's pure-Python serializer does (the reference for the RESP format itself)
    python = PythonRespSerializer(6000, redis.connection.Encoder("utf-8", "strict", False).encode)
    assert b"".join(packed) == b"".join(python.pack(*args))


def test_a_memoryview_is_converted_and_none_is_refused_with_redis_pys_error() -> None:
    assert CommandPacker().pack("SET", "k", memoryview(b"v")) == REDIS_PY.pack("SET", "k", memoryview(b"v"))
    with pytest.raises(DataError):
        CommandPacker().pack("SET", "k", None)


def test_vmqs_client_uses_it_on_a_real_server(redis_server: int) -> None:  # noqa: F811
    client = connect(f"redis://127.0.0.1:{redis_server}/0")
    try:
        connection = client.connection_pool.get_connection()
        assert isinstance(connection._command_packer, CommandPacker)
        client.connection_pool.release(connection)
        mapping = {f"vm-{i:05d}": 1000 + i for i in range(10_000)}
        assert client.zadd("packer:z", mapping, gt=True) == 10_000
        assert client.zadd("packer:z", {"vm-00007": 5}, gt=True) == 0  # GT: never goes back
        assert client.zmscore("packer:z", ["vm-00007", "vm-09999", "nobody"]) == [1007.0, 10999.0, None]
        client.set("packer:mv", memoryview(b"bytes"))
        assert client.get("packer:mv") == b"bytes"
        with pytest.raises(DataError):
            client.set("packer:none", None)  # type: ignore[arg-type]
        client.xadd("packer:s", {"m": b"x"})
        assert client.xinfo_stream("packer:s")["length"] == 1  # a command name with a space
    finally:
        client.delete("packer:z", "packer:mv", "packer:s")
        client.close()
