"""The Redis client vmq uses and what every store part shares: connecting, error translation, command packing,
Lua loading, server time."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import redis
from hiredis import pack_command
from redis.commands.core import Script
from redis.connection import HiredisRespSerializer, parse_url
from redis.sentinel import Sentinel

from vmq.errors import StoreError, StoreUnavailable
from vmq.keys import Keys

_INCLUDE = re.compile(r"^-- include: (lib_\w+\.lua)$", re.MULTILINE)


def load_lua(name: str) -> str:
    """The source of ``vmq/lua/<name>``, shipped as package data; each ``-- include: lib_<x>.lua`` line is replaced
    by that file (Redis scripts cannot import: the pieces several scripts share are written once)."""
    source = resources.files("vmq").joinpath("lua", name).read_text()
    return _INCLUDE.sub(lambda m: load_lua(m.group(1)), source)


def text(value: Any) -> str:
    """A Redis reply value as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class CommandPacker:
    """redis-py's hiredis command packer without its Python pass over every argument (vmq never sends
    ``bytearray``/``memoryview``); same bytes on the wire (docs/performance.md has the cost it saves). An
    argument hiredis refuses goes through redis-py's own packer, which converts it or raises ``DataError``."""

    _fallback = HiredisRespSerializer()  # type: ignore[no-untyped-call]

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


def connect(url: str, sentinels: Sequence[tuple[str, int]] = (), master: str = "") -> redis.Redis:
    """The one place vmq builds a Redis client: to ``url``, or with ``sentinels`` to the master they name
    ``master`` (``url`` then gives only user, password and db). A Sentinel-managed client asks the sentinels
    again after a disconnect or a READONLY reply, so it follows a failover."""
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 30,
                               "command_packer": CommandPacker()}
    if not sentinels:
        return redis.Redis.from_url(url, **options)
    parsed = parse_url(url)  # type: ignore[no-untyped-call]
    credentials = {name: parsed[name] for name in ("username", "password", "db") if name in parsed}
    sentinel = Sentinel(list(sentinels),
                        sentinel_kwargs={"socket_timeout": 2, "socket_connect_timeout": 2})
    client: redis.Redis = sentinel.master_for(master, **credentials, **options)
    return client


def raw_client(client: redis.Redis) -> Any:
    """A client on ``client``'s connection pool (same server, TLS and Sentinel) whose XRANGE returns Redis'
    reply as is: [[id, [field, value, ...]], ...]."""
    raw = redis.Redis(connection_pool=client.connection_pool)
    raw.set_response_callback("XRANGE", lambda response, **_: response)
    return raw


def server_time_us(client: Any) -> int:
    """Redis server time in µs. Raises StoreUnavailable/StoreError."""
    with translate_errors("TIME"):
        seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


class StorePart:
    """One Redis structure of vmq's state, built from ``(client, keys)``; safe to share between threads."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        # redis-py types every reply as `Awaitable | Any`; each part checks the shapes it parses.
        self.r: Any = client
        self.keys = keys

    def _script(self, name: str) -> Script:
        """Register ``vmq/lua/<name>`` on this client (EVALSHA, loaded on first use)."""
        return self.r.register_script(load_lua(name))  # type: ignore[no-any-return]
