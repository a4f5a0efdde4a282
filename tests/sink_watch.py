"""A real sink with its sends watched, so a test awaits them instead of sleeping."""

from __future__ import annotations

import asyncio
from typing import Any, Self

from daemon.errors import SinkError
from daemon.events import TurnRecord


class Watched:
    """Wraps a real sink: finished send attempts (``attempts``, ``tried``), the first failure
    (``failed``) and deliveries (``sent``, ``delivered()``)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.attempts = 0
        self.tried = asyncio.Event()
        self.failed = asyncio.Event()
        self.sent = 0
        self._sent = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self.sink.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.sink.__aexit__(*exc)

    async def send(self, record: TurnRecord) -> None:
        try:
            await self.sink.send(record)
        except SinkError:
            self.failed.set()
            raise
        finally:
            self.attempts += 1
            self.tried.set()
        self.sent += 1
        self._sent.set()

    async def until_attempts(self, count: int, within: float) -> None:
        """Once ``count`` sends have finished (delivered or failed)."""
        async with asyncio.timeout(within):
            while self.attempts < count:
                self.tried.clear()
                await self.tried.wait()

    async def delivered(self, count: int, within: float = 8.0) -> None:
        """Once ``count`` records were delivered."""
        async with asyncio.timeout(within):
            while self.sent < count:
                self._sent.clear()
                await self._sent.wait()
