"""End to end: the real ``transcribed run`` serving its live view while a WAV streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, SPEECH_DIR, TRANSCRIBED, TRANSCRIPTS
from tests.daemon_proc import Daemon, cloud_config
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.mosquitto import free_port

S2 = "espeak-s2.wav"



@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S2)) as server:
        yield server


async def test_live_view_follows_the_daemon(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """While a WAV streams: /healthz is 200, tail --json sees partials then the final turn."""
    port = free_port()
    config = cloud_config(tmp_path, fake, SPEECH_DIR / S2,
                          extra=f'[http]\nlisten = "127.0.0.1:{port}"\n')
    daemon = await Daemon.start("run", "--config", str(config))
    session = await asyncio.wait_for(fake.wait_for_session(0), 15)
    await asyncio.wait_for(session.wait_for(lambda s: s.audio_ms >= 500), 15)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        health = await http.get("/healthz")
        assert health.status_code == 200, health.text
        page = await http.get("/")
        assert page.status_code == 200 and "transcribed" in page.text
    tail = await asyncio.create_subprocess_exec(
        *TRANSCRIBED, "tail", "--json", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert tail.stdout is not None
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while not any(e["type"] == "turn" for e in events):
            events.append(json.loads(await tail.stdout.readline()))
    partials = [e["transcript"] for e in events if e["type"] == "partial"]
    final = next(e for e in events if e["type"] == "turn")
    assert partials and final["transcript"] == TRANSCRIPTS[S2]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        metrics = (await http.get("/metrics")).text
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["transcribed_turns_total"] == 1 and samples["transcribed_sessions_total"] == 1
    result = await daemon.finish(30)
    assert result.code == 0, result.stderr
    async with asyncio.timeout(10):
        await tail.communicate()
    assert tail.returncode == 0


async def test_tail_without_daemon(tmp_path: Path) -> None:
    """transcribed tail with nothing listening: one line naming the URL, exit 1."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n')
    process = await asyncio.create_subprocess_exec(
        *TRANSCRIBED, "tail", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        _out, err = await process.communicate()
    assert process.returncode == 1
    assert err.decode().startswith(f"transcribed tail: cannot reach the daemon at "
                                   f"ws://127.0.0.1:{port}/events")
