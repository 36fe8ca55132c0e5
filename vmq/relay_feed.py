"""The host relay's probe subscription (vmq.relay.ProbeRelay): made when needed, and after it is lost made again
only once a back-off (0.2 s doubling to 5 s) is over, so a Redis that is gone costs one attempt per back-off."""

from __future__ import annotations

import logging
from collections.abc import Callable

from vmq.errors import StoreError
from vmq.ports import ProbeFeed

__all__ = ["BACKOFF_CAP_S", "BACKOFF_FIRST_S", "FeedKeeper"]

log = logging.getLogger(__name__)

BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.2, 5.0


class FeedKeeper:
    """One relay's subscription to the probes. ``subscribe`` makes one (raises StoreError), ``on_lost`` is told
    each loss with the back-off chosen (to count and log it)."""

    def __init__(self, host: str, subscribe: Callable[[], ProbeFeed], clock: Callable[[], float],
                 on_lost: Callable[[StoreError, float], None]) -> None:
        self.host = host
        self.feed: ProbeFeed | None = None
        self._subscribe, self._clock, self._on_lost = subscribe, clock, on_lost
        self._failures, self._retry_at = 0, 0.0

    def ready(self) -> ProbeFeed | None:
        """The subscription, (re)made when its back-off is over; None while Redis is gone."""
        if self.feed is None and self._clock() >= self._retry_at:
            try:
                self.feed = self._subscribe()
            except StoreError as exc:
                self.lost(exc)
            else:
                if self._failures:
                    log.info("host=%s relay subscribed to probes again", self.host)
                self._failures = 0
        return self.feed

    def lost(self, exc: StoreError) -> None:
        """The subscription failed: drop it and wait out the next back-off."""
        self.close()
        delay_s = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(self._failures, 16))
        self._failures += 1
        self._retry_at = self._clock() + delay_s
        self._on_lost(exc, delay_s)

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        if self.feed is not None:
            self.feed.close()
            self.feed = None
