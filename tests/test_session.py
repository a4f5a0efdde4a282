"""``StreamSession`` objects: what they keep alive, and what a waiting one can hold."""

from __future__ import annotations

import gc
import weakref
from datetime import UTC, datetime
from typing import cast

import httpx
from websockets.asyncio.client import ClientConnection

from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.protocol import Begin
from daemon.session import HEARTBEAT_S, StreamSession
from daemon.stream import MAX_QUEUE, AssemblyAIEngine, rollover_plan
from daemon.tokens import TokenProvider


class _Listener:
    def turn(self, record: TurnRecord) -> None: ...
    def partial(self, value: PartialTurn) -> None: ...
    def session_started(self, session: SessionInfo) -> None: ...
    def session_ended(self, summary: SessionSummary) -> None: ...


async def test_an_ended_session_is_freed_at_once() -> None:
    """No reference cycle: a session (its timeline is MBs after 3 hours) is freed when dropped,
    not left to a full run of the cycle collector, which a steady daemon makes rarely."""
    config = AssemblyAIConfig(api_key="k", streaming_url="ws://127.0.0.1:9/v3/ws",
                              token_url="http://127.0.0.1:9/v3/token")
    async with httpx.AsyncClient() as client:
        engine = AssemblyAIEngine(config, ReconnectConfig(), TokenProvider(config, client),
                                  sample_rate=16000, chunk_ms=100, source="file", host="h")
        gc.disable()
        try:
            session = StreamSession(engine, cast(ClientConnection, None),
                                    Begin("sess", None, {}), _Listener())
            ref = weakref.ref(session)
            del session
            assert ref() is None
        finally:
            gc.enable()


def test_a_waiting_successor_keeps_reading() -> None:
    """A rollover's next session is not read until the switch; the heartbeats it receives
    meanwhile must fit in the connection's queue, or it stops reading the socket, misses its
    keepalive pong and is closed just before it is needed."""
    began = 1_000_000.0
    begin = Begin("sess", datetime.fromtimestamp(began + 10_800, UTC), {})
    plan = rollover_plan(begin, began, 0.0)
    assert plan is not None
    waited = plan.switch_by - plan.open_at
    assert waited / HEARTBEAT_S < MAX_QUEUE / 2
