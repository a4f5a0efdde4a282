"""Retry delays: the backoff of every reconnect loop, and the ``Retry-After`` a server asks for.

The backoff serves the streaming socket and the audio device; ``retry_after_s`` the token
endpoint and the webhook sink.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime


def backoff(initial: float, maximum: float) -> Iterator[float]:
    """Delays: immediate first, then exponential with full jitter, capped at ``maximum``."""
    yield 0.0
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, maximum)


def retry_after_s(value: str | None, cap_s: float) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds, within 0..``cap_s``.

    ``None`` for a missing or unreadable value, "nan", "inf" or a date beyond any calendar
    (year 3000000000: ``OverflowError``, which crashed the daemon): the caller's own backoff then
    applies. The caller also keeps its backoff as a floor, so "0" or a date in the past never
    makes a tight loop.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap_s)
