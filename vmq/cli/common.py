"""What every ``vmq`` command module shares: one-line errors, the store built from settings, durations, and
the responder config printed for a guest. Command modules import from here and from the library only."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from vmq.config import Settings, load_settings, responder_url
from vmq.errors import VmqError
from vmq.store.redis import RedisStore

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(func: F) -> F:
    """Wrap a command so that a VmqError is one line on stderr and exit status 2, never a traceback."""
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except VmqError as exc:
            click.echo(f"vmq: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


class OneLineErrors(click.Group):
    """A group whose usage errors, like every vmq error, are one line on stderr and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as exc:
            # click's own parse errors point at --help; a plain UsageError is a sentence of ours.
            parse_error = isinstance(exc, click.UsageError) and (
                type(exc) is not click.UsageError or exc.message.startswith(("No such command", "Got unexpected")))
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if parse_error and ctx is not None else ""
            click.echo(f"vmq: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("vmq: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def open_store() -> tuple[Settings, RedisStore]:
    """Settings from the environment and the Redis store they name; raises ConfigError on a bad VMQ_*."""
    settings = load_settings()
    return settings, RedisStore.from_settings(settings)


def duration_s(text: str | None) -> float | None:
    """'90', '90s', '30m', '2h', '1d' -> seconds; None stays None."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 2h") from None
    if value <= 0:
        raise click.BadParameter("a duration must be positive")
    return value


def responder_config(settings: Settings, vm: str, secret: str, guest_redis_url: str | None,
                     channel: bool = False) -> str:
    """The responder.toml lines for ``vm``. The guest connects as ``--guest-redis-url`` (the `guest` ACL user);
    VMQ_REDIS_URL is only a default when it has no password, because its user is the services' own. With
    ``channel`` the guest answers over its virtio-serial port instead: no Redis URL, no credentials."""
    if channel:
        if guest_redis_url is not None:
            raise click.UsageError("--channel and --guest-redis-url exclude each other: a channel guest has no "
                                   "route to Redis")
        return (f'vm_id = "{vm}"\nnamespace = "{settings.namespace}"\nsecret_key = "{secret}"\n'
                'transport = "channel"\n')
    if guest_redis_url is None and urlsplit(settings.redis_url).password:
        raise click.UsageError("VMQ_REDIS_URL holds the services' password, which a guest must never get: "
                               "pass --guest-redis-url redis://guest:PASSWORD@HOST:PORT/DB (the `guest` ACL user)")
    url, tls_ca_file = responder_url(guest_redis_url or settings.redis_url)  # the responder takes no ?query
    return (f'vm_id = "{vm}"\nredis_url = "{url}"\nnamespace = "{settings.namespace}"\nsecret_key = "{secret}"\n'
            + (f"tls_ca_file = {json.dumps(tls_ca_file)}\n" if tls_ca_file else ""))
