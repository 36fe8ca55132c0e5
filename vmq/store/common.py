"""Shared pieces of the Redis adapter: error translation, reply decoding, command packing and Lua loading."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from typing import Any

import redis
from hiredis import pack_command
from redis.connection import HiredisRespSerializer

from vmq.errors import StoreError, StoreUnavailable

Record = dict[str, str]


def load_lua(name: str) -> str:
    """The source of ``vmq/lua/<name>``, shipped as package data."""
    return resources.files("vmq").joinpath("lua", name).read_text()


def text(value: Any) -> str:
    """A Redis reply value as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class CommandPacker:
    """redis-py's hiredis command packer without its Python pass over every argument (it converts
    ``bytearray``/``memoryview`` to ``bytes``, which vmq never sends): the two ``ZADD`` and the ``ZMSCORE`` of
    an ingest carry ≈ 50,000 arguments per 10,000 replies, and that pass was ≈ 8 ms of the monitor's CPU per
    round (docs/performance.md). Same bytes on the wire; an argument hiredis refuses goes through redis-py's
    own packer, which converts it or raises redis-py's ``DataError`` as before."""

    _fallback = HiredisRespSerializer()

    def pack(self, *args: Any) -> list[bytes]:
        """The RESP bytes of one command (a command name with a space, "XINFO STREAM", is split as redis-py does)."""
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [pack_command(args)]
        except TypeError:
            packed: list[bytes] = self._fallback.pack(*args)
            return packed


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Map redis-py errors to the vmq error tree."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis unreachable during {what}: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreError(f"redis error during {what}: {exc}") from exc
