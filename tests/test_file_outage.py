"""A file run waits out an outage longer than ``reconnect.backlog_seconds``; a microphone drops.

A microphone cannot wait: beyond the backlog its oldest audio is dropped and reported
(``stream.backlog_dropped``). A file can: while the backlog is full the file is not read, and it
goes on, at real time, as finished turns free room. (A 5-second backlog and an 8-second outage
lost the first sentence of the file.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import wave
from collections.abc import AsyncIterator, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from daemon.app import Listener, _beating
from daemon.dispatch import Dispatcher
from daemon.events import AudioChunk, SourceName
from daemon.filegate import STUCK_GRACE_S, FileGate
from daemon.filesource import WavFileSource
from daemon.health import Heartbeat
from daemon.ledger import Ledger
from daemon.plugins import load_plugins
from daemon.stream import AssemblyAIEngine
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.listeners import TurnsListener
from tests.test_lossless import outage_engine, samples, words

SENTENCES = ("espeak-s1.wav", "espeak-s3.wav", "espeak-s5.wav")     # 3.4 to 3.8 s each
GAP_S = 0.8


def three_sentences(tmp_path: Path) -> Path:
    """The three sentences, each followed by ``GAP_S`` of silence: 12.1 s."""
    path = tmp_path / "three.wav"
    gap = bytes(2 * int(16000 * GAP_S))
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"".join(samples(SPEECH_DIR / name) + gap for name in SENTENCES))
    return path


def expected_words() -> list[str]:
    return [w for name in SENTENCES for w in words(TRANSCRIPTS[name])]


def delivered(tmp_path: Path) -> list[str]:
    return [w for t in read_turns(tmp_path / "turns.jsonl") for w in words(t["transcript"])]


def file_config(tmp_path: Path, fake: FakeAssemblyAI, wav: Path, backlog_s: float) -> Path:
    config = cloud_config(tmp_path, fake, wav)
    text = config.read_text().replace("[reconnect]\n",
                                      f"[reconnect]\nbacklog_seconds = {backlog_s}\n")
    config.write_text(text)
    return config


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


async def aenumerate(chunks: AsyncIterator[AudioChunk]) -> AsyncIterator[tuple[int, AudioChunk]]:
    """``enumerate`` from 1, for an async iterator."""
    number = 0
    async for chunk in chunks:
        number += 1
        yield number, chunk


async def file_chunks(source: WavFileSource) -> AsyncIterator[AudioChunk]:
    async with source:
        async for chunk in source.chunks():
            yield chunk


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, *SENTENCES)) as server:
        yield server


async def test_outage_longer_than_the_backlog_loses_nothing(fake: FakeAssemblyAI,
                                                            tmp_path: Path) -> None:
    """Tokens refused for 8 s (eight 429s, each asking for ``Retry-After: 1``) with a 5 s
    backlog: the file waits at 5 s and goes on as turns free room; every sentence is delivered
    once, in order, and nothing is dropped."""
    fake.faults.token_status = [429] * 8
    config = file_config(tmp_path, fake, three_sentences(tmp_path), backlog_s=5)
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == expected_words()
    assert not result.events("stream.backlog_dropped")
    assert not result.events("stream.backlog_full")
    failed, began = result.events("stream.token_failed"), result.events("session.began")
    assert len(failed) == 8
    assert at(began[0]) - at(failed[0]) > 5 + 2       # the outage outlasted the backlog
    assert max(e["behind_live_s"] for e in began) == 5.0   # the file waited at a full backlog
    [paused] = result.events("stream.input_paused")                      # said, once
    [resumed] = result.events("stream.input_resumed")
    assert at(paused) < at(began[0]) < at(resumed) and resumed["paused_s"] > 2
    assert all(s.close_code not in (3007, 3008) for s in fake.sessions)


async def test_stopped_while_the_file_waits(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """SIGTERM while the file waits for room in a full backlog (the outage goes on): the run
    stops by the shutdown deadline (12 s), as any run stopped in an outage, with exit 0, and the
    held speech is reported as ``stream.untranscribed``; nothing is dropped."""
    fake.faults.token_status = [429] * 100
    config = file_config(tmp_path, fake, three_sentences(tmp_path), backlog_s=2)
    daemon = await Daemon.start("run", "--config", str(config))
    try:
        async with asyncio.timeout(30):
            await fake.wait_for_token_requests(5)       # 4 s (Retry-After: 1): the file waits
        daemon.signal()
        result = await daemon.finish(40)
    finally:
        await daemon.kill_if_running()
    assert result.code == 0, result.stderr[-3000:]
    [stopping], [stopped] = result.events("daemon.stopping"), result.events("daemon.stopped")
    assert at(stopped) - at(stopping) < 12 + 3 and stopped["reason"] == "signal"
    [lost] = result.events("stream.untranscribed")
    assert lost["level"] == "error" and 1 < lost["held_s"] <= 2.01
    assert not result.events("stream.backlog_dropped")


async def test_a_turn_longer_than_the_backlog_does_not_hang_the_file(
        fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """A 1 s backlog and a sentence of 3 s: the session has sent all the backlog holds, and its
    turn ends only with audio after it. The file waits a little for finals that cannot come, then
    drops the oldest audio (sent already) as a microphone does, and says so: the run ends, every
    word delivered (without the drop it waited for ever)."""
    config = file_config(tmp_path, fake, SPEECH_DIR / SENTENCES[0], backlog_s=1)
    result = await run_daemon("run", "--config", str(config), limit_s=60)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == words(TRANSCRIPTS[SENTENCES[0]])
    assert len(result.events("stream.backlog_full")) == 1


async def test_a_long_turns_audio_let_go_is_not_counted_as_dropped() -> None:
    """The live session has sent a full backlog of speech and waits for more: after the grace
    the oldest is let go, said once (``stream.backlog_full``), and not counted as dropped, which
    is audio never sent (``/metrics``, ``stream.backlog_dropped``: it was, for this)."""
    ledger = Ledger(16000, backlog_seconds=1.0)
    speech = samples(SPEECH_DIR / SENTENCES[0])[16000:48000]       # 1 s, inside the sentence
    for offset in range(0, len(speech), 3200):
        ledger.append(AudioChunk(speech[offset:offset + 3200], time.time()))
    sender = asyncio.ensure_future(ledger.wait_beyond(ledger.end))  # sent it all: waits
    gate = FileGate(ledger, 1600, 1.0, replaying=lambda: False)
    try:
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(STUCK_GRACE_S + 5):
                assert await gate.room_for(1600)
    finally:
        sender.cancel()
    assert not ledger.full(1600)
    assert ledger.dropped_samples == 0
    assert [e["event"] for e in logs] == ["stream.input_paused", "stream.backlog_full"]


async def test_silence_longer_than_a_short_backlog_is_let_go_at_once(tmp_path: Path) -> None:
    """A 4.5 s backlog and 6 s of silence between two sentences, no outage: the session covers
    silence only 5 s back, so the backlog fills with silence it has sent. That silence is let go
    at once, quietly (it stalled the file 2 s and warned of a turn longer than the backlog)."""
    path = tmp_path / "pause.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(samples(SPEECH_DIR / SENTENCES[0]) + bytes(2 * 16000 * 6)
                        + samples(SPEECH_DIR / SENTENCES[1]))
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, *SENTENCES[:2])) as fake:
        result = await run_daemon("run", "--config",
                                  str(file_config(tmp_path, fake, path, backlog_s=4.5)),
                                  limit_s=60)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == [w for name in SENTENCES[:2] for w in words(TRANSCRIPTS[name])]
    assert not result.events("stream.backlog_full")
    assert not result.events("stream.backlog_dropped")
    [ended] = result.events("session.ended")
    audio_s = (len(samples(path)) // 2) / 16000
    assert ended["duration_s"] < audio_s + 1.5      # no 2 s stall (plus the session's ends)


async def _captured(pcm: bytes, pulled: list[int]) -> AsyncIterator[AudioChunk]:
    """``pcm`` as 100 ms chunks, all captured already; ``pulled`` counts those taken."""
    now = time.time()
    for offset in range(0, len(pcm), 3200):
        pulled[0] += 1
        yield AudioChunk(pcm[offset:offset + 3200], now)


async def _outage(source: SourceName
                  ) -> tuple[AssemblyAIEngine, list[MutableMapping[str, Any]], int]:
    """An engine whose tokens are refused, fed 5 s of audio at once, cancelled (the shutdown
    deadline) after three token requests: the engine, its log and the chunks it took."""
    pulled = [0]
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        engine = outage_engine(fake, client, source)
        with structlog.testing.capture_logs() as logs:
            running = asyncio.create_task(engine.run(
                _captured(samples(SPEECH_DIR / "espeak-s2.wav"), pulled), TurnsListener()))
            async with asyncio.timeout(20):
                await fake.wait_for_token_requests(3)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    return engine, logs, pulled[0]


async def test_a_microphone_still_drops_the_oldest_audio() -> None:
    """The microphone cannot wait: it is read on, and beyond the backlog the oldest audio is
    dropped and reported exactly."""
    engine, logs, pulled = await _outage("microphone")
    assert pulled == 51                                 # all of the 5 s (the last one short)
    [loss] = [e for e in logs if e["event"] == "stream.backlog_dropped"]
    assert loss["lost_samples"] == engine.ledger.dropped_samples > 16000 * 3


async def test_a_file_is_not_read_beyond_a_full_backlog() -> None:
    """The same outage for a file: it is read only up to the 1 s backlog (and the chunk that
    waits for room), nothing is dropped, and the held speech is reported as untranscribed."""
    engine, logs, pulled = await _outage("file")
    assert pulled == 11
    assert engine.ledger.dropped_samples == 0
    assert not [e for e in logs if e["event"] == "stream.backlog_dropped"]
    [lost] = [e for e in logs if e["event"] == "stream.untranscribed"]
    assert lost["held_s"] == 1.0


async def test_a_paused_file_goes_on_at_real_time(tmp_path: Path) -> None:
    """A consumer that takes the next chunk 1.5 s late (the engine waited for room) gets the
    rest at real time from then on; it got the 15 chunks the pause "owed" at once. The chunks'
    ``captured_at`` stays the start plus their offset in the file."""
    loop = asyncio.get_running_loop()
    async with WavFileSource(three_sentences(tmp_path)) as source, asyncio.timeout(10):
        chunks = source.chunks()
        first = await anext(chunks)
        await asyncio.sleep(1.5)            # the consumer's pause (the engine's full backlog)
        resumed = loop.time()
        rest = [await anext(chunks) for _ in range(5)]
        elapsed = loop.time() - resumed
    assert elapsed >= 0.45
    assert [round(c.captured_at - first.captured_at, 3) for c in rest] == [0.1, 0.2, 0.3, 0.4,
                                                                          0.5]


async def test_a_stop_ends_the_input_of_a_waiting_file() -> None:
    """Stopped (source and engine, as a SIGTERM does) while the file waits for room: the input
    ends at once (the file is read no further, nothing is dropped); the engine then runs into
    the shutdown deadline as any stopped run in an outage, reporting the held speech."""
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        engine = outage_engine(fake, client, "file")
        source, held = WavFileSource(SPEECH_DIR / "espeak-s2.wav", realtime=False), asyncio.Event()

        async def eleven_then_held() -> AsyncIterator[AudioChunk]:
            async for number, chunk in aenumerate(file_chunks(source)):
                if number == 11:            # the backlog holds 10: this one waits for room
                    held.set()
                yield chunk

        with structlog.testing.capture_logs() as logs:
            running = asyncio.create_task(engine.run(eleven_then_held(), TurnsListener()))
            async with asyncio.timeout(20):
                await held.wait()
                source.stop()
                engine.stop()
                await engine.ledger.ended.wait()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    assert engine.ledger.end == 16000 and engine.ledger.dropped_samples == 0
    [lost] = [e for e in logs if e["event"] == "stream.untranscribed"]
    assert lost["held_s"] == 1.0


async def test_the_capture_heartbeat_owes_no_chunk_while_the_engine_holds_one() -> None:
    """While a file's engine holds a chunk (its backlog full, an outage) the capture heartbeat
    promises nothing: it went overdue after 25 s, withheld the watchdog, and systemd restarted a
    daemon that was only waiting. Asked for the next chunk, the promise is back."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def source() -> AsyncIterator[AudioChunk]:
        yield AudioChunk(bytes(3200), time.time())
        asked.set()                         # the engine asks for the next chunk
        await release.wait()
        yield AudioChunk(bytes(3200), time.time())

    beat, ended = Heartbeat("capture"), asyncio.Event()
    listener = Listener(Dispatcher([], dead_letter_dir=Path("/nonexistent")),
                        load_plugins(), transcripts_in_log=False)
    chunks = _beating(source(), beat, listener, 25.0, ended.set)
    await anext(chunks)
    assert beat.due is None                 # held by the engine: nothing owed
    second = asyncio.ensure_future(anext(chunks))
    async with asyncio.timeout(5):
        await asked.wait()
    assert beat.due is not None             # let go, the next one asked for: owed
    release.set()
    await second
    assert beat.due is None
    with contextlib.suppress(StopAsyncIteration):
        await anext(chunks)
    assert ended.is_set() and beat.due is None
