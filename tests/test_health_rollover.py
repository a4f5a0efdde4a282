"""``/healthz`` of the real ``transcribed run`` across a make-before-break session rollover.

At the switch the next session begins before the old one has ended, and the daemon is healthy
throughout. It used to answer 503 from the next session's start until the next chunk of audio
was read (a chunk's length: 0.1 s by default, 1 s here, so a probe lands in it for sure).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import SPEECH_DIR
from tests.daemon_proc import Daemon, cloud_config
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.mosquitto import free_port

FIVE = "espeak-five-sentences.wav"   # 25 s: 10-second sessions roll over twice


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, FIVE),
                              allow_short_sessions=True) as server:
        yield server


async def _next_session_started(feed: ClientConnection, after: str) -> str:
    """Read the feed until a session other than ``after`` starts; return its id."""
    while True:
        event: dict[str, Any] = json.loads(await feed.recv())
        if event["type"] == "session" and event["event"] == "started" \
                and event["session_id"] != after:
            return str(event["session_id"])


async def test_healthy_while_a_session_rolls_over(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """Probed the moment the next session of a rollover starts, /healthz is 200 and live."""
    port = free_port()
    config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE,
                          extra=f'[http]\nlisten = "127.0.0.1:{port}"\n')
    config.write_text(config.read_text()
                      .replace("[audio]\n", "[audio]\nchunk_ms = 1000\n")
                      .replace("[assemblyai]\n", "[assemblyai]\nmax_session_seconds = 10\n"))
    daemon = await Daemon.start("run", "--config", str(config))
    try:
        async with asyncio.timeout(20):
            first = await fake.wait_for_session(0)
            await first.wait_for(lambda s: s.audio_ms >= 1000)   # the live view is up by now
        async with connect(f"ws://127.0.0.1:{port}/events") as feed, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(20):
                successor = await _next_session_started(feed, first.id)
            during = await http.get("/healthz")
        assert during.status_code == 200, during.text
        assert during.json()["connection"] == "live"
    finally:
        daemon.signal()                             # the rest of the file has nothing to add
        result = await daemon.finish(60)
    assert result.code == 0, result.stderr[-3000:]
    [rolled, *_] = result.events("stream.rolled_over")
    assert (rolled["previous"], rolled["next"]) == (first.id, successor)
    assert first.close_code == 1000             # terminated after the switch: not a drop
