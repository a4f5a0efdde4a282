"""A hunt for the file run's promise: it loses none of the file, whatever the outage.

``tests/test_file_outage.py`` shows the file waiting out one outage longer than
``reconnect.backlog_seconds``. These combine that wait with what else can happen meanwhile: an
outage that begins mid-sentence and ends in a parallel catch-up, session rollovers, an outage at
the end of the file, a SIGTERM just after the file flows again, and a short backlog with
ordinary pauses. Each checks every word delivered once, in order, exit 0, nothing dropped, and
an end in bounded time. (The hunt also passed, once, with a catch-up lane dropped, two outages
in a row, a SIGTERM as the catch-up starts and 1 s chunks; left out to keep the suite short.)
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.events import AudioChunk
from daemon.filegate import STUCK_GRACE_S, FileGate
from daemon.ledger import Ledger
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, Finished, read_turns
from tests.fake_assemblyai import FakeAssemblyAI, SessionRecord
from tests.fake_assemblyai_speech import load_speech_references
from tests.test_file_outage import delivered, file_config
from tests.test_lossless import samples, words

SENTENCES = ("espeak-s1.wav", "espeak-s3.wav", "espeak-s5.wav", "espeak-s4.wav")
RATE = 16000


def speech_file(tmp_path: Path, names: tuple[str, ...], gap_s: float) -> tuple[Path, list[float]]:
    """``names`` each followed by ``gap_s`` of silence; the file and each sentence's start (s)."""
    path, starts, offset = tmp_path / "speech.wav", [], 0
    gap = bytes(2 * int(RATE * gap_s))
    parts = []
    for name in names:
        starts.append(offset / 2 / RATE)
        pcm = samples(SPEECH_DIR / name) + gap
        parts.append(pcm)
        offset += len(pcm)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(b"".join(parts))
    return path, starts


def expected(names: tuple[str, ...]) -> list[str]:
    return [w for name in names for w in words(TRANSCRIPTS[name])]


def config_for(tmp_path: Path, fake: FakeAssemblyAI, wav: Path, backlog_s: float,
               session_s: int | None = None) -> Path:
    config = file_config(tmp_path, fake, wav, backlog_s)
    if session_s is not None:
        config.write_text(config.read_text().replace(
            "[assemblyai]\n", f"[assemblyai]\nmax_session_seconds = {session_s}\n"))
    return config


def assert_lossless(result: Finished, tmp_path: Path, names: tuple[str, ...]) -> None:
    """Exit 0, every word once and in order, nothing dropped, no turn delivered twice."""
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == expected(names), result.stderr[-6000:]
    assert not result.events("stream.backlog_dropped")
    ids = [t["id"] for t in read_turns(tmp_path / "turns.jsonl")]
    assert len(ids) == len(set(ids))


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, *SENTENCES),
                              allow_short_sessions=True) as server:
        yield server


async def _heard(session: SessionRecord, seconds: float) -> None:
    """Wait until ``session`` has received ``seconds`` of audio."""
    async with asyncio.timeout(60):
        await session.wait_for(lambda s: s.audio_ms >= seconds * 1000)


async def _cut(fake: FakeAssemblyAI, session: SessionRecord, refusals: int) -> None:
    """Drop ``session`` and refuse the next ``refusals`` tokens (429, ``Retry-After: 1``)."""
    fake.faults.token_status = [429] * refusals
    session.abort()


async def _run_with_outages(fake: FakeAssemblyAI, config: Path,
                            cuts: list[tuple[int, float, int]]) -> Finished:
    """Run the daemon; for each (session index, audio s, refusals) cut that session there."""
    daemon = await Daemon.start("run", "--config", str(config))
    try:
        for index, at_s, refusals in cuts:
            async with asyncio.timeout(60):
                session = await fake.wait_for_session(index)
            await _heard(session, at_s)
            await _cut(fake, session, refusals)
        return await daemon.finish(120)
    finally:
        await daemon.kill_if_running()


async def test_outage_from_mid_sentence_longer_than_the_backlog(fake: FakeAssemblyAI,
                                                                tmp_path: Path) -> None:
    """Dropped 1.5 s into the first sentence, tokens refused ~7 s, a 4 s backlog: the file waits,
    the reconnect is 4 s behind and catches up in parallel; every word arrives once."""
    names = SENTENCES[:3]
    wav, _ = speech_file(tmp_path, names, 0.8)
    result = await _run_with_outages(fake, config_for(tmp_path, fake, wav, 4),
                                     [(0, 1.5, 7)])
    assert_lossless(result, tmp_path, names)
    assert result.events("stream.input_paused")         # the file did wait
    began = result.events("session.began")
    assert max(e["behind_live_s"] for e in began) >= 3.9


@pytest.mark.parametrize(("backlog_s", "refusals"), [(4, 7)])
async def test_outage_with_rollovers_while_the_file_waits(
        fake: FakeAssemblyAI, tmp_path: Path, backlog_s: int, refusals: int) -> None:
    """The same outage with 10 s sessions (the next one opened 7 s in, switched by 9 s): the
    live session of the catch-up rolls over (at 4 s, once at the hard deadline mid-turn, then
    a backlog let go), and with a 12 s backlog the replay lane rolls over too. Every word
    once."""
    names = SENTENCES
    wav, _ = speech_file(tmp_path, names, 0.8)
    config = config_for(tmp_path, fake, wav, backlog_s, session_s=10)
    result = await _run_with_outages(fake, config, [(0, 1.5, refusals)])
    assert_lossless(result, tmp_path, names)
    assert result.events("stream.input_paused")
    assert result.events("stream.rolled_over")


async def test_outage_at_the_end_of_the_file(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """Dropped 1 s into the last sentence, tokens refused 7 s, a 3 s backlog: the file ends
    while it waits (its last chunks read only after the reconnect); every word once."""
    names = SENTENCES[:2]
    wav, starts = speech_file(tmp_path, names, 0.8)
    result = await _run_with_outages(fake, config_for(tmp_path, fake, wav, 3),
                                     [(0, starts[-1] + 1.0, 7)])
    assert_lossless(result, tmp_path, names)
    assert result.events("stream.input_paused")


async def _until_event(daemon: Daemon, name: str, lines: list[str]) -> dict[str, Any]:
    """Read the daemon's log (kept in ``lines``) until an ``name`` event; return it."""
    stream = daemon.process.stderr
    assert stream is not None
    async with asyncio.timeout(60):
        while line := (await stream.readline()).decode():
            lines.append(line)
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                return event
    raise AssertionError(f"the daemon ended without {name}:\n{''.join(lines)[-3000:]}")


async def test_sigterm_just_after_the_file_flows_again(fake: FakeAssemblyAI,
                                                       tmp_path: Path) -> None:
    """SIGTERM the moment a waiting file flows again (``stream.input_resumed``): exit 0, and
    what was read is delivered once, in order (a prefix of the file's words, the first
    sentence whole), nothing dropped."""
    names = SENTENCES[:3]
    wav, _ = speech_file(tmp_path, names, 0.8)
    daemon = await Daemon.start("run", "--config", str(config_for(tmp_path, fake, wav, 3)))
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            first = await fake.wait_for_session(0)
        await _heard(first, 1.5)
        await _cut(fake, first, 6)
        await _until_event(daemon, "stream.input_resumed", lines)
        daemon.signal()
        rest = await daemon.finish(60)
    finally:
        await daemon.kill_if_running()
    result = Finished(rest.code, rest.stdout, "".join(lines) + rest.stderr)
    assert result.code == 0, result.stderr[-3000:]
    got, want = delivered(tmp_path), expected(names)
    assert got == want[:len(got)], result.stderr[-6000:]
    assert len(got) >= len(words(TRANSCRIPTS[names[0]]))
    assert not result.events("stream.backlog_dropped")
    assert not result.events("stream.untranscribed")


@pytest.mark.parametrize("backlog_s", [1])
async def test_short_backlog_with_ordinary_pauses(fake: FakeAssemblyAI, tmp_path: Path,
                                                  backlog_s: int) -> None:
    """No outage, a backlog of 1-3 s (shorter than each sentence) and 1.2 s pauses: the long
    turns let their oldest (sent) audio go, and still every word arrives once."""
    names = SENTENCES[:3]
    wav, _ = speech_file(tmp_path, names, 1.2)
    daemon = await Daemon.start("run", "--config",
                                str(config_for(tmp_path, fake, wav, backlog_s)))
    try:
        result = await daemon.finish(90)
    finally:
        await daemon.kill_if_running()
    assert_lossless(result, tmp_path, names)


def _fill(ledger: Ledger, speech: bytes) -> None:
    for offset in range(0, len(speech), 3200):
        ledger.append(AudioChunk(speech[offset:offset + 3200], time.time()))


async def _let_go(ledger: Ledger, gate: FileGate) -> float:
    """The session has sent all the (full) ledger holds; the seconds until a chunk fits."""
    sender = asyncio.ensure_future(ledger.wait_beyond(ledger.end))
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        async with asyncio.timeout(STUCK_GRACE_S + 5):
            assert await gate.room_for(1600)
    finally:
        sender.cancel()
    return loop.time() - began


async def test_a_second_long_turn_waits_its_grace_and_is_said_again() -> None:
    """A long turn's oldest audio let go; its finals then free room and the file flows; a later
    turn longer than the backlog again waits the grace for its finals and is said again (the
    first turn's "letting go" outlived it: the next was let go at once, unsaid)."""
    ledger = Ledger(16000, backlog_seconds=1.0)
    gate = FileGate(ledger, 1600, 1.0, replaying=lambda: False)
    speech = samples(SPEECH_DIR / SENTENCES[0])[32000:64000]      # 1 s inside the sentence
    with structlog.testing.capture_logs() as logs:
        _fill(ledger, speech)
        assert await _let_go(ledger, gate) >= STUCK_GRACE_S - 0.1
        ledger.append(AudioChunk(speech[:3200], time.time()))
        ledger.cover(ledger.end)                # its finals: the ledger is empty
        assert not ledger.full(1600)
        gate.flowing()                          # the pump's next chunk goes in without a wait
        _fill(ledger, speech)                   # the next long turn fills the backlog
        assert ledger.full(1600)
        assert await _let_go(ledger, gate) >= STUCK_GRACE_S - 0.1
    said = [e["event"] for e in logs if e["event"] == "stream.backlog_full"]
    assert said == ["stream.backlog_full"] * 2
    assert ledger.dropped_samples == 0
