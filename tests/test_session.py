"""``StreamSession`` objects: what they keep alive, and what a waiting one can hold."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from datetime import UTC, datetime
from typing import cast

import httpx
import pytest
import structlog
from websockets.asyncio.client import ClientConnection

from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.events import AudioChunk
from daemon.liveness import HEARTBEAT_S
from daemon.protocol import Begin
from daemon.rollover import rollover_plan
from daemon.session import StreamSession
from daemon.stream import MAX_QUEUE, AssemblyAIEngine, _Failed
from daemon.tokens import TokenProvider
from tests.fake_assemblyai import SPEECH_DIR, FakeAssemblyAI, load_speech_references
from tests.listeners import TurnsListener


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
                                    Begin("sess", None, {}), TurnsListener())
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


async def test_heartbeats_queued_while_waiting_do_not_end_a_healthy_session() -> None:
    """A session opened, then not read while heartbeats queue up (a rollover's next session),
    then run on silence: it lives on through the service's next heartbeats. (It was declared
    silent about 1 s after it started: the queued heartbeats, read back to back, set the
    period.)"""
    refs = load_speech_references(SPEECH_DIR, "espeak-s1.wav")
    async with FakeAssemblyAI(refs, heartbeat_s=1.5) as fake, httpx.AsyncClient() as client:
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                                  token_url=fake.token_url)
        engine = AssemblyAIEngine(config, ReconnectConfig(), TokenProvider(config, client),
                                  sample_rate=16000, chunk_ms=100, source="file", host="h")
        session = await engine._open(TurnsListener(), None)
        record = fake.sessions[-1]
        async with asyncio.timeout(20):                 # waiting: nobody reads it
            await record.wait_for(lambda r: len(r.messages("Heartbeat")) >= 3)
        now = time.time()
        for i in range(30):                             # silence already captured
            engine.ledger.append(AudioChunk(bytes(3200), now - 3 + i / 10))
        with structlog.testing.capture_logs() as logs:
            running = asyncio.create_task(session.run(engine.ledger.head))
            async with asyncio.timeout(20):             # its next heartbeats, then the end
                await record.wait_for(lambda r: len(r.messages("Heartbeat")) >= 5)
                assert not running.done()
                engine.ledger.finish()
                outcome = await running
        assert outcome.reason == "terminated", outcome
        assert not [e for e in logs if e["event"].startswith("session.service")]


async def test_a_session_whose_begin_comes_too_late_is_closed() -> None:
    """No ``Begin`` within ``connect_timeout``: the attempt fails and its socket is closed. (It
    was left open, kept alive by the keepalive pings: a session the service went on billing,
    one more after every slow handshake.)"""
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        fake.faults.begin_delay_s = [1.0]
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                                  token_url=fake.token_url, connect_timeout=0.3)
        engine = AssemblyAIEngine(config, ReconnectConfig(), TokenProvider(config, client),
                                  sample_rate=16000, chunk_ms=100, source="file", host="h")
        with pytest.raises(_Failed, match=r"^no Begin from 127\.0\.0\.1:\d+ within 0\.3 s "):
            await engine._open(TurnsListener(), None)
        record = fake.sessions[0]
        async with asyncio.timeout(5):
            await record.wait_closed()
        assert record.closed_by == "client"
