"""Benchmarks for lossless sessions (issue 3), against the local fake v3 service.

1. Drop → audio flowing again: the fake aborts the live session's TCP connection (no close
   frame) N times; for each drop we take the time from the abort to the first audio frame the
   next session receives. Reported: p50, p90, max.
2. Catch-up after a 10 s outage during speech: the session is aborted and every reconnect is
   refused (HTTP 503 on upgrade) for 10 s while speech continues (the reconnect backoff makes
   the outage a little longer). Catch-up is parallel (``daemon.catchup``): the live session
   starts at a silence near live and a replay session sends the older backlog. We report, from
   the daemon's own log: ``audio_live_s``, how long until the audio path is live (the live
   session's ``stream.caught_up``; 0 when it starts within 0.5 s of live), and
   ``records_caught_up_s``, from the reconnect until every held record is released
   (``stream.replay_finished``), i.e. until the records are back to live; with a single-session
   catch-up (no silence to split at) both are the ``stream.caught_up`` figure. Two speech
   profiles: the test sentences with ~1 s pauses, and a dictation profile with 3 s pauses.

Run:  .venv/bin/python bench/lossless.py [--drops 30]
It streams real audio at real time, so it takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import wave
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr
from structlog.testing import capture_logs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine  # noqa: E402
from recorder import Recorder  # noqa: E402

from daemon.config import AssemblyAIConfig, ReconnectConfig  # noqa: E402
from daemon.events import AudioChunk  # noqa: E402
from daemon.stream import AssemblyAIEngine  # noqa: E402
from daemon.tokens import TokenProvider  # noqa: E402
from tests.fake_assemblyai import FakeAssemblyAI  # noqa: E402
from tests.fake_assemblyai_speech import load_speech_references  # noqa: E402

SPEECH = REPO / "tests" / "data" / "speech"
RATE = 16000


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
        task = asyncio.create_task(engine.run(live_chunks(pcm, stop), Recorder()))
        loop = asyncio.get_running_loop()
        session = await fake.wait_for_session(0)
        for _ in range(count):
            await session.wait_for(lambda s: s.audio_ms >= 6000)   # a healthy session
            dropped_at = loop.time()
            following_index = len(fake.sessions)   # the next one opened is the live session
            session.abort()
            following = await fake.wait_for_session(following_index)
            await following.wait_for(lambda s: bool(s.frames))
            assert following.began_at is not None
            results.append((following.began_at + following.frames[0].at_s - dropped_at) * 1000)
            session = following
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
            counter = Recorder()
            task = asyncio.create_task(engine.run(live_chunks(pcm, stop), counter))
            first = await fake.wait_for_session(0)
            await first.wait_for(lambda s: s.audio_ms >= 5000)
            fake.faults.http_status_on_upgrade = [503] * 10_000
            first.abort()
            await asyncio.sleep(outage_s)          # the outage itself: wall time is the point
            fake.faults.http_status_on_upgrade = []
            while not _caught_up(logs):
                await asyncio.sleep(0.2)
                if task.done():
                    break
            stop.set()
            await task
    caught = [e for e in logs if e["event"] == "stream.caught_up"]
    live = [e for e in logs if e["event"] == "session.began" and e.get("lane") == "live"]
    started = [e for e in logs if e["event"] == "stream.catch_up_started"]
    finished = [e for e in logs if e["event"] == "stream.replay_finished"]
    single = caught[0]["catch_up_s"] if caught else None
    result: dict[str, Any] = {
        "pause_s": pause_s,
        "outage_s": outage_s,
        "behind_live_at_reconnect_s": (round(started[0]["replay_s"] + started[0]["live_behind_s"],
                                             2) if started else live[-1]["behind_live_s"]),
        "mode": "parallel" if started else "single",
        "turns": len(counter.turns),
    }
    if started and finished:
        result |= {
            "replay_s": started[0]["replay_s"],
            "live_behind_s": started[0]["live_behind_s"],
            "audio_live_s": single if single is not None else 0.0,
            "records_caught_up_s": finished[0]["catch_up_s"],
            "records_lag_s": finished[0]["records_lag_s"],
            "replay_silence_skipped_s": finished[0]["silence_skipped_s"],
        }
    else:
        result |= {"audio_live_s": single, "records_caught_up_s": single,
                   "silence_skipped_s": caught[0]["silence_skipped_s"] if caught else None}
    return result


def _caught_up(logs: list[MutableMapping[str, Any]]) -> bool:
    """Records back to live: the replay finished (parallel), or the single session caught up."""
    events = {e["event"] for e in logs}
    if "stream.catch_up_started" in events:
        return "stream.replay_finished" in events
    return "stream.caught_up" in events


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the result to this file")
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
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
