"""Helpers for the live-view tests: sample events, a settable status, a running server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from websockets.asyncio.client import ClientConnection

from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord, Word
from daemon.live import LiveHub
from daemon.metrics import StatusSnapshot
from daemon.web import LiveServer

SESSION = "sess-0001-abcdef"
T0 = datetime(2026, 11, 23, 23, 10, 1, 120000, tzinfo=UTC)


def turn(order: int, text: str, session: str = SESSION) -> TurnRecord:
    """A finished turn record."""
    words = tuple(Word(w, i * 300, i * 300 + 250, 0.9) for i, w in enumerate(text.split()))
    start = T0 + timedelta(seconds=5 * order)
    return TurnRecord(session, order, text, start, start + timedelta(seconds=2), 0.9, words,
                      None, "assemblyai", "test", "testhost")


def partial(order: int, text: str, session: str = SESSION) -> PartialTurn:
    """A partial turn."""
    return PartialTurn(session, order, text, "assemblyai")


def began(session: str = SESSION) -> SessionInfo:
    """A session start."""
    return SessionInfo(session, "assemblyai", T0 + timedelta(hours=3))


def ended(session: str = SESSION) -> SessionSummary:
    """A session end."""
    return SessionSummary(session, "assemblyai", 12.5, 12.0, 3, "1006 abnormal closure")


class StatusBox:
    """A settable status source for the server (what the app's snapshot would say)."""

    def __init__(self, snapshot: StatusSnapshot | None = None) -> None:
        self.snapshot = snapshot or StatusSnapshot(engine="assemblyai")

    def __call__(self) -> StatusSnapshot:
        return self.snapshot

    def set(self, **changes: Any) -> None:
        """Change some fields."""
        self.snapshot = replace(self.snapshot, **changes)


@asynccontextmanager
async def live_server(hub: LiveHub, status: StatusBox | None = None, **options: Any
                      ) -> AsyncIterator[LiveServer]:
    """A running server on an ephemeral loopback port."""
    options.setdefault("listen", "127.0.0.1:0")
    async with LiveServer(hub, status or StatusBox(), **options) as server:
        yield server


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next feed event, decoded."""
    data: dict[str, Any] = json.loads(await ws.recv())
    return data
