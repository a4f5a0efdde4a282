"""Retry delays shared by every reconnect loop (the streaming socket, the audio device)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(initial: float, maximum: float) -> Iterator[float]:
    """Delays: immediate first, then exponential with full jitter, capped at ``maximum``."""
    yield 0.0
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, maximum)
