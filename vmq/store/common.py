"""Shared pieces of the Redis adapter: error translation, reply decoding and Lua loading helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from typing import Any

import redis

from vmq.errors import StoreError, StoreUnavailable

Record = dict[str, str]


def load_lua(name: str) -> str:
    """The source of ``vmq/lua/<name>``, shipped as package data."""
    return resources.files("vmq").joinpath("lua", name).read_text()


def text(value: Any) -> str:
    """A Redis reply value as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Map redis-py errors to the vmq error tree."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis unreachable during {what}: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreError(f"redis error during {what}: {exc}") from exc
