"""Benchmarks for lossless sessions (issue 3), against the local fake v3 service.

1. Drop → audio flowing again: the fake aborts the live session's TCP connection (no close
   frame) N times; for each drop we take the time from the abort to the first audio frame the
   next session receives. Reported: p50, p90, max.
2. Catch-up after a 10 s outage during speech: the session is aborted and every reconnect is
   refused (HTTP 503 on upgrade) for 10 s while speech continues; we report the time from the
   first audio frame after the outage until the stream is back to live (the daemon's own
   ``stream.caught_up`` measurement), for two speech profiles: the test recording looped as is
   (sentences with ~1 s pauses) and a dictation profile (the same sentences with 3 s pauses).

Run:  .venv/bin/python bench/lossless.py [--drops 30]
It streams real audio at real time, so it takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr
from structlog.testing import capture_logs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.config import AssemblyAIConfig, ReconnectConfig  # noqa: E402
from daemon.events import AudioChunk, PartialTurn, SessionInfo, SessionSummary, TurnRecord  # noqa: E402
from daemon.stream import AssemblyAIEngine  # noqa: E402
from daemon.tokens import TokenProvider  # noqa: E402
from tests.fake_assemblyai import FakeAssemblyAI  # noqa: E402
from tests.fake_assemblyai_speech import load_speech_references  # noqa: E402

SPEECH = REPO / "tests" / "data" / "speech"
RATE = 16000


class Counter:
    """A listener that counts turns."""

    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []

    def turn(self, record: TurnRecord) -> None:
        self.turns.append(record)

    def partial(self, partial: PartialTurn) -> None:
        pass

    def session_started(self, session: SessionInfo) -> None:
        pass

    def session_ended(self, summary: SessionSummary) -> None:
        pass


def sentences() -> list[np.ndarray]:
    out = []
    for i in range(1, 6):
        with wave.open(str(SPEECH / f"espeak-s{i}.wav")) as wav:
            out.append(np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"))
    return out


def profile(pause_s: float, seconds: float) -> bytes:
    """The five test sentences separated by ``pause_s`` of silence, repeated to ``seconds``."""
    parts: list[np.ndarray] = []
    total = 0
    pause = np.zeros(int(pause_s * RATE), dtype="<i2")
    while total < seconds * RATE:
        for sentence in sentences():
            parts += [sentence, pause]
            total += len(sentence) + len(pause)
    return np.concatenate(parts)[: int(seconds * RATE)].tobytes()


async def live_chunks(pcm: bytes, stop: asyncio.Event) -> AsyncIterator[AudioChunk]:
    """Paced 100 ms chunks, like a microphone."""
    loop = asyncio.get_running_loop()
    start, wall = loop.time(), time.time()
    step = RATE // 10 * 2
    for i, offset in enumerate(range(0, len(pcm), step)):
        due = start + i * 0.1
        await asyncio.sleep(max(0.0, due - loop.time()))
        if stop.is_set():
            return
        yield AudioChunk(pcm[offset : offset + step].ljust(step, b"\0"), wall + i * 0.1)


def engine_for(fake: FakeAssemblyAI, client: httpx.AsyncClient) -> AssemblyAIEngine:
    config = AssemblyAIConfig(api_key=SecretStr(fake.api_key), streaming_url=fake.streaming_url,
                              token_url=fake.token_url)
    reconnect = ReconnectConfig(initial_delay=0.5, max_delay=30, backlog_seconds=120)
    return AssemblyAIEngine(config, reconnect, TokenProvider(config, client),
                            sample_rate=RATE, chunk_ms=100, source="microphone", host="bench")


async def drops(count: int) -> list[float]:
    """Abort the live session ``count`` times; return abort → first new frame, in ms."""
    refs = load_speech_references(SPEECH, "espeak-five-sentences.wav")
    pcm = profile(1.0, 7.0 * count + 10)
    results: list[float] = []
    async with FakeAssemblyAI(refs) as fake, httpx.AsyncClient() as client:
        engine = engine_for(fake, client)
        stop = asyncio.Event()
        task = asyncio.create_task(engine.run(live_chunks(pcm, stop), Counter()))
        loop = asyncio.get_running_loop()
        for index in range(count):
            session = await fake.wait_for_session(index)
            await session.wait_for(lambda s: s.audio_ms >= 6000)   # a healthy session
            dropped_at = loop.time()
            session.abort()
            following = await fake.wait_for_session(index + 1)
            await following.wait_for(lambda s: bool(s.frames))
            assert following.began_at is not None
            results.append((following.began_at + following.frames[0].at_s - dropped_at) * 1000)
        stop.set()
        await task
    return results


async def catch_up(pause_s: float, outage_s: float = 10.0) -> dict[str, Any]:
    """One outage of ``outage_s`` during speech; return the engine's catch-up figures."""
    refs = load_speech_references(SPEECH, "espeak-s1.wav", "espeak-s2.wav", "espeak-s3.wav",
                                  "espeak-s4.wav", "espeak-s5.wav")
    pcm = profile(pause_s, 5 + outage_s + 90)
    async with FakeAssemblyAI(refs) as fake, httpx.AsyncClient() as client:
        engine = engine_for(fake, client)
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(engine.run(live_chunks(pcm, stop), Counter()))
            first = await fake.wait_for_session(0)
            await first.wait_for(lambda s: s.audio_ms >= 5000)
            fake.faults.http_status_on_upgrade = [503] * 10_000
            first.abort()
            await asyncio.sleep(outage_s)          # the outage itself: wall time is the point
            fake.faults.http_status_on_upgrade = []
            while not any(e["event"] == "stream.caught_up" for e in logs):
                await asyncio.sleep(0.2)
                if task.done():
                    break
            stop.set()
            await task
    caught = [e for e in logs if e["event"] == "stream.caught_up"]
    began = [e for e in logs if e["event"] == "session.began"]
    return {
        "pause_s": pause_s,
        "outage_s": outage_s,
        "behind_live_at_reconnect_s": began[-1]["behind_live_s"] if began else None,
        "catch_up_s": caught[0]["catch_up_s"] if caught else None,
        "silence_skipped_s": caught[0]["silence_skipped_s"] if caught else None,
    }


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    import os

    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=30)
    args = parser.parse_args()
    latencies = await drops(args.drops)
    ordered = sorted(latencies)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "drop_to_flowing_ms": {
            "n": len(latencies),
            "p50": round(statistics.median(latencies), 1),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
            "max": round(max(latencies), 1),
        },
        "catch_up": [await catch_up(1.0), await catch_up(3.0)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
