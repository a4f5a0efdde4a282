"""Lossless sessions: every spoken word reaches the sink exactly once, in order, whatever fails.

Each test runs the real ``transcribed run`` on test speech against the fake v3 service, arms one
or more faults, and compares the delivered words with the reference transcript word by word.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import structlog

from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.dispatch import Dispatcher
from daemon.events import AudioChunk, SourceName
from daemon.metrics import AudioMeter, MetricsRenderer, snapshot_of
from daemon.stream import AssemblyAIEngine
from daemon.tokens import TokenProvider
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, Finished, cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI, SessionRecord
from tests.fake_assemblyai_speech import load_speech_references
from tests.listeners import TurnsListener

S1, S2, FIVE = "espeak-s1.wav", "espeak-s2.wav", "espeak-five-sentences.wav"


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def delivered(tmp_path: Path) -> list[str]:
    return [w for t in read_turns(tmp_path / "turns.jsonl") for w in words(t["transcript"])]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    refs = load_speech_references(SPEECH_DIR, FIVE, S1, S2)
    async with FakeAssemblyAI(refs, allow_short_sessions=True) as server:
        yield server


async def stream(fake: FakeAssemblyAI, tmp_path: Path, name: str, extra: str = "") -> Finished:
    config = cloud_config(tmp_path, fake, SPEECH_DIR / name, extra=extra)
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    return result


def no_rate_or_expiry_closes(fake: FakeAssemblyAI) -> None:
    assert all(s.close_code not in (3007, 3008) for s in fake.sessions), \
        [(s.close_code, s.close_reason) for s in fake.sessions]


class TestSingleFaults:
    async def test_error_3005_mid_turn(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """An Error 3005 mid-turn: the next session replays the turn; every word once."""
        fake.faults.error_after_audio_ms(2000, code=3005)
        await stream(fake, tmp_path, S2)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S2])
        assert fake.sessions[0].close_code == 3005
        no_rate_or_expiry_closes(fake)

    async def test_token_endpoint_failing_for_a_while(self, fake: FakeAssemblyAI,
                                                      tmp_path: Path) -> None:
        """Token requests failing (500, 429) delay the start; the backlog is replayed whole.

        The 429 asks for ``Retry-After: 0``: the backoff stays the floor (no tight loop).
        """
        fake.faults.token_status = [500, 429, 500]
        fake.faults.token_retry_after = "0"
        result = await stream(fake, tmp_path, S1)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        assert [r.status for r in fake.token_requests[:4]] == [500, 429, 500, 200]
        failed = result.events("stream.token_failed")
        assert len(failed) == 3
        assert all(e["retry_in_s"] > 0 for e in failed[1:])     # the first retry is immediate
        no_rate_or_expiry_closes(fake)

    async def test_1011_at_handshake(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """A 1011 before Begin (twice) is transient: back off, reconnect, lose nothing."""
        fake.faults.reject_handshake = [1011, 1011]
        result = await stream(fake, tmp_path, S1)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        assert {e["kind"] for e in result.events("stream.reconnecting")} == {"transient"}

    async def test_back_to_back_drops(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """Two abrupt drops in a row, the second during the replay of the first's backlog."""
        fake.faults.drop_after_audio_ms(2500)
        fake.faults.drop_after_audio_ms(800)
        result = await stream(fake, tmp_path, S2)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S2])
        assert [s.closed_by for s in fake.sessions[:2]] == ["abort", "abort"]
        ended = result.events("session.ended")
        assert [e["reason"] for e in ended[:2]] == ["1006 abnormal closure"] * 2
        no_rate_or_expiry_closes(fake)

    @pytest.mark.parametrize(("chunk_ms", "name", "cap_s"), [(400, S2, None), (1000, FIVE, 12)])
    async def test_large_chunks_replayed_within_the_rate_limit(
            self, fake: FakeAssemblyAI, tmp_path: Path, chunk_ms: int, name: str,
            cap_s: int | None) -> None:
        """With chunks over the service's 0.3 s tolerance, a replay after a drop (and, with
        1 s chunks, a rollover too) still never runs ahead of real time (it was closed 3007 at
        once, in a loop)."""
        fake.faults.drop_after_audio_ms(2000)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / name)
        text = config.read_text().replace("[audio]\n", f"[audio]\nchunk_ms = {chunk_ms}\n")
        if cap_s is not None:
            text = text.replace("[assemblyai]\n", f"[assemblyai]\nmax_session_seconds = {cap_s}\n")
        config.write_text(text)
        result = await run_daemon("run", "--config", str(config), limit_s=90)
        assert result.code == 0, result.stderr[-3000:]
        assert delivered(tmp_path) == words(TRANSCRIPTS[name])
        no_rate_or_expiry_closes(fake)
        assert fake.sessions[0].closed_by == "abort"
        assert bool(result.events("stream.rolled_over")) == (cap_s is not None)

    async def test_service_that_stops_answering_is_replayed(self, fake: FakeAssemblyAI,
                                                             tmp_path: Path) -> None:
        """The service takes audio but stops transcribing and never answers ``Terminate``: the
        speech no turn covers is replayed by a new session (it ended "finished", exit 0, with
        the speech silently lost)."""
        fake.faults.deaf_after_audio_ms(1500)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S2)
        config.write_text(config.read_text().replace("terminate_timeout = 5",
                                                     "terminate_timeout = 1"))
        result = await run_daemon("run", "--config", str(config), limit_s=90)
        assert result.code == 0, result.stderr[-3000:]
        assert delivered(tmp_path) == words(TRANSCRIPTS[S2])
        assert result.events("session.termination_timeout")
        [replaying] = result.events("session.replaying_unanswered")
        assert replaying["speech_s"] > 1
        assert fake.sessions[0].closed_by == "client"  # the unanswered one; then the replay
        no_rate_or_expiry_closes(fake)

    async def test_stopped_while_speech_is_unanswered(self, fake: FakeAssemblyAI,
                                                      tmp_path: Path) -> None:
        """Stopped (two SIGTERMs) while the service has not answered some speech: one error
        line says how much was lost (there was none)."""
        for _ in range(5):
            fake.faults.deaf_after_audio_ms(1500)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S2)
        config.write_text(config.read_text().replace("terminate_timeout = 5",
                                                     "terminate_timeout = 1"))
        daemon = await Daemon.start("run", "--config", str(config))
        await asyncio.wait_for(fake.wait_for_session(1), 30)       # the first replay
        daemon.signal()
        async with asyncio.timeout(30):                 # it is stopping: Terminate went out
            await fake.sessions[1].wait_for(lambda s: any("Terminate" in t for t in s.texts))
        daemon.signal()                                 # the second signal: stop now
        result = await daemon.finish(30)
        assert result.events("daemon.forced_stop")
        [lost] = result.events("stream.untranscribed")
        assert lost["level"] == "error" and lost["held_s"] > 1

    @pytest.mark.parametrize(("fault", "event"), [("deaf", "session.service_silent"),
                                                  ("stall", "session.service_behind")])
    async def test_service_that_stops_mid_session(self, tmp_path: Path, fault: str,
                                                  event: str) -> None:
        """A service that stops mid-session, socket open, either altogether (heartbeats too)
        or by no longer reading (its heartbeats go on, the audio received frozen): the daemon
        notices from the heartbeats, reconnects and replays what it did not answer. (Before,
        audio over 5 s old with no turn open counted as heard: the second sentence, sent to the
        stopped service and followed by silence, was lost without a word.)"""
        s1, s2 = samples(SPEECH_DIR / S1), samples(SPEECH_DIR / S2)
        wav = tmp_path / "two.wav"
        _write(wav, s1 + _silence(2.0) + s2 + _silence(6.5))
        refs = load_speech_references(SPEECH_DIR, S1, S2)
        async with FakeAssemblyAI(refs, heartbeat_s=1.0) as fake:
            arm = {"deaf": fake.faults.deaf_after_audio_ms,
                   "stall": fake.faults.stall_after_audio_ms}[fault]
            arm(len(s1) // 32 + 1000)                # in the pause after the first sentence
            config = cloud_config(tmp_path, fake, wav)
            result = await run_daemon("run", "--config", str(config), limit_s=90)
        assert result.code == 0, result.stderr[-3000:]
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1]) + words(TRANSCRIPTS[S2])
        [noticed] = result.events(event)
        assert 4 < noticed["silent_s" if fault == "deaf" else "behind_s"] < 8   # limit: 4 s
        assert fake.sessions[0].closed_by == "client"
        assert fake.sessions[0].params is not None and fake.sessions[0].params.session_heartbeat
        no_rate_or_expiry_closes(fake)

    async def test_closed_after_terminate_without_termination(self, fake: FakeAssemblyAI,
                                                              tmp_path: Path) -> None:
        """A close 1000 after the last finals but without ``Termination`` ends the run: every
        word once, one session (it reconnected at once, forever)."""
        fake.faults.close_without_termination = True
        result = await stream(fake, tmp_path, S1)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        assert len(result.events("session.closed_without_termination")) == 1
        assert len(fake.sessions) == 1

    async def test_outage_longer_than_backlog(self, fake: FakeAssemblyAI) -> None:
        """Beyond backlog_seconds a microphone's oldest audio is dropped, and the loss is
        reported exactly. (A file waits instead: tests/test_file_outage.py.)"""
        fake.faults.token_status = [429, 429]          # each answer asks for Retry-After: 1 s
        pcm = samples(SPEECH_DIR / S2)
        listener = TurnsListener()
        async with httpx.AsyncClient() as client:
            config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                                      token_url=fake.token_url)
            engine = AssemblyAIEngine(config, ReconnectConfig(backlog_seconds=1.0),
                                      TokenProvider(config, client), sample_rate=16000,
                                      chunk_ms=100, source="microphone", host="h")
            with structlog.testing.capture_logs() as logs:
                async with asyncio.timeout(60):
                    await engine.run(_captured(pcm), listener)
        [loss] = [e for e in logs if e["event"] == "stream.backlog_dropped"]
        got = [w for turn in listener.turns for w in words(turn.transcript)]
        expected = words(TRANSCRIPTS[S2])
        assert got and got == expected[len(expected) - len(got):]      # the newest words survive
        first = bytes(fake.sessions[0].audio[:3200])
        offset_samples = pcm.find(first) // 2
        # the first audio sent is exactly where the dropped audio ends (or, if the replay
        # skipped leading silence, at most the hangover-bounded silence later)
        assert 0 <= offset_samples - loss["lost_samples"] <= 16000 * 0.35


async def _captured(pcm: bytes) -> AsyncIterator[AudioChunk]:
    """``pcm`` as 100 ms chunks, all captured already."""
    now = time.time()
    for offset in range(0, len(pcm), 3200):
        yield AudioChunk(pcm[offset:offset + 3200], now)


def outage_engine(fake: FakeAssemblyAI, client: httpx.AsyncClient,
                  source: SourceName) -> AssemblyAIEngine:
    """An engine with a 1 s backlog whose every token request ``fake`` refuses (500), retried
    every 0.05-0.2 s."""
    fake.faults.token_status = [500] * 100
    config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                              token_url=fake.token_url)
    reconnect = ReconnectConfig(initial_delay=0.05, max_delay=0.2, backlog_seconds=1.0)
    return AssemblyAIEngine(config, reconnect, TokenProvider(config, client),
                            sample_rate=16000, chunk_ms=100, source=source, host="h")


async def test_outage_loss_reported_when_stopped_during_it() -> None:
    """Stopped (the shutdown deadline) while the outage lasts: the audio the full backlog
    dropped is still reported, exactly, as ``stream.backlog_dropped``. (It was reported only on
    reconnecting, so this loss went unsaid: ``stream.untranscribed`` counts what is held.)"""
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        engine = outage_engine(fake, client, "microphone")
        with structlog.testing.capture_logs() as logs:
            running = asyncio.create_task(engine.run(_captured(samples(SPEECH_DIR / S2)),
                                                     TurnsListener()))
            async with asyncio.timeout(20):
                await fake.wait_for_token_requests(3)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    [loss] = [e for e in logs if e["event"] == "stream.backlog_dropped"]
    assert loss["lost_samples"] == engine.ledger.dropped_samples > 16000
    # and counted (SPEC: "dropped and counted"), in /metrics as seconds of audio
    snapshot = snapshot_of(engine=engine, source=None, dispatcher=Dispatcher(
        [], dead_letter_dir=Path("/nonexistent")), meter=AudioMeter(), sessions=0, turns=0,
        engine_live=False)
    [value] = [line.split()[1] for line in MetricsRenderer().render(snapshot).splitlines()
               if line.startswith("transcribed_audio_backlog_dropped_seconds_total ")]
    assert float(value) == loss["lost_samples"] / 16000


@pytest.mark.parametrize("chunk_ms", [100, 60])
async def test_newest_audio_under_50_ms_is_not_padded(chunk_ms: int) -> None:
    """A session that starts inside a chunk (a turn covered the ledger up to 30 ms before its
    end) reaches the newest chunk with under 50 ms of it left to send, before the next chunk is
    captured: it waits for that chunk. It padded the rest to 50 ms with silence and went on
    after the pad, so the next chunk's first samples were never sent, and the session counted
    the silence as audio."""
    chunk = 16 * chunk_ms
    pcm = samples(SPEECH_DIR / S1)[32000:32000 + 2 * chunk * 6]       # 6 chunks of speech
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                                  token_url=fake.token_url)
        engine = AssemblyAIEngine(config, ReconnectConfig(), TokenProvider(config, client),
                                  sample_rate=16000, chunk_ms=chunk_ms, source="file", host="h")
        ledger, now = engine.ledger, time.time()
        for index in range(2):
            ledger.append(AudioChunk(pcm[2 * chunk * index:2 * chunk * (index + 1)], now))
        ledger.cover(chunk - 480)                   # 30 ms of the first chunk left
        session = await engine._open(TurnsListener(), None)
        record = fake.sessions[-1]
        running = asyncio.create_task(session.run(ledger.head))
        async with asyncio.timeout(10):
            # the first chunk's rest with the start of the second: what is left is the newest
            # audio, 30 ms (the sender reads it in the same step, before the service gets this)
            await record.wait_for(lambda r: len(r.audio) >= 2 * chunk)
            for index in range(2, 6):
                ledger.append(AudioChunk(pcm[2 * chunk * index:2 * chunk * (index + 1)], now))
            ledger.finish()
            outcome = await running
    assert outcome.reason == "terminated", outcome
    sent = pcm[2 * (chunk - 480):]
    received = bytes(record.audio)
    assert received == sent, f"first difference at sample {_first_difference(received, sent)}"
    # it waited for the third chunk and sent it whole with those 30 ms: whole chunks again
    assert [f.nbytes // 2 for f in record.frames] == [chunk, 480 + chunk, chunk, chunk, chunk]
    # the session's timeline maps every sample the service heard to that sample of the ledger
    timeline = session.timeline
    assert timeline.sent_samples == len(sent) // 2
    for ms in range(timeline.sent_samples // 16):
        located = timeline.locate(ms)
        assert located is not None
        assert pcm[2 * located[0]:2 * located[0] + 2] == received[32 * ms:32 * ms + 2], ms


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i // 2 for i in range(min(len(a), len(b))) if a[i] != b[i]),
                min(len(a), len(b)) // 2)


async def test_three_failures_and_12_second_sessions(fake: FakeAssemblyAI,
                                                     tmp_path: Path) -> None:
    """Done-when of issue 3: three mid-turn failures of different kinds and 12-second sessions."""
    fake.faults.drop_after_audio_ms(2000)
    fake.faults.error_after_audio_ms(2500, code=3005)
    fake.faults.error_after_audio_ms(3000, code=1011, message="Internal error")
    extra_assemblyai = 'max_session_seconds = 12\n'
    config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE)
    config.write_text(config.read_text().replace("[assemblyai]\n",
                                                 "[assemblyai]\n" + extra_assemblyai))
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == words(TRANSCRIPTS[FIVE])
    no_rate_or_expiry_closes(fake)
    assert result.events("stream.rolled_over"), "12-second sessions must roll over"
    assert all(r.params.get("max_session_duration_seconds") == ["12"]
               for r in fake.token_requests)
    codes = [s.close_code for s in fake.sessions]
    assert 3005 in codes and 1011 in codes and fake.sessions[0].closed_by == "abort"
    ids = [t["id"] for t in read_turns(tmp_path / "turns.jsonl")]
    assert len(ids) == len(set(ids))
    times = [(t["started_at"], t["ended_at"]) for t in read_turns(tmp_path / "turns.jsonl")]
    assert times == sorted(times) and all(a < b for a, b in times)


def samples(path: Path) -> bytes:
    """The 16-bit PCM frames of the WAV at ``path``."""
    with wave.open(str(path)) as wav:
        pcm: bytes = wav.readframes(wav.getnframes())
    return pcm


def _silence(seconds: float) -> bytes:
    return bytes(2 * int(16000 * seconds))


def _write(path: Path, pcm: bytes) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm)


def no_fault(fake: FakeAssemblyAI) -> None:
    """Arm a fault that never fires, so the next faults go to the sessions after the next one."""
    fake.faults.drop_after_audio_ms(10**9)


def span(session: SessionRecord) -> tuple[float, float]:
    """When (loop time) a session received its first and last audio frame."""
    assert session.began_at is not None and session.frames
    return session.began_at + session.frames[0].at_s, session.began_at + session.frames[-1].at_s


async def outage(fake: FakeAssemblyAI, tmp_path: Path,
                 arm: Callable[[FakeAssemblyAI], None] | None = None,
                 session_s: int | None = None) -> Finished:
    """Five sentences; at 2.5 s (mid-turn) the session drops and tokens fail for ~8 s."""
    config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE)
    if session_s is not None:
        config.write_text(config.read_text().replace(
            "[assemblyai]\n", f"[assemblyai]\nmax_session_seconds = {session_s}\n"))
    daemon = await Daemon.start("run", "--config", str(config))
    async with asyncio.timeout(30):
        first = await fake.wait_for_session(0)
        await first.wait_for(lambda s: s.audio_ms >= 2500)
    fake.faults.token_status = [429] * 8              # each answer says Retry-After: 1 s
    if arm is not None:
        arm(fake)
    first.abort()
    result = await daemon.finish(90)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == words(TRANSCRIPTS[FIVE])
    no_rate_or_expiry_closes(fake)
    [started] = result.events("stream.catch_up_started")
    assert started["replay_s"] >= 5
    return result


@pytest.mark.parametrize("refused", [1, 12])
async def test_rollover_whose_next_session_is_refused(fake: FakeAssemblyAI, tmp_path: Path,
                                                      refused: int) -> None:
    """12-second sessions whose next session's upgrade is refused (HTTP 503) ``refused`` times
    in a row: once, the rollover retries and still switches over in time; twelve times, the
    window closes, the session runs into its cap (3008, the open turn not flushed) and the
    next one replays it. Every word arrives once either way."""
    fake.faults.http_status_on_upgrade = [101] + [503] * refused
    config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE)
    config.write_text(config.read_text().replace("[assemblyai]\n",
                                                 "[assemblyai]\nmax_session_seconds = 12\n"))
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == words(TRANSCRIPTS[FIVE])
    failed = result.events("stream.rollover_open_failed")
    assert failed and all(f["error"].endswith("handshake answered HTTP 503") for f in failed)
    assert result.events("stream.rolled_over")
    expired = [s for s in fake.sessions if s.close_code == 3008]
    assert bool(expired) == (refused > 1), [(s.close_code, s.close_reason) for s in fake.sessions]
    ids = [t["id"] for t in read_turns(tmp_path / "turns.jsonl")]
    assert len(ids) == len(set(ids))


class TestParallelCatchUp:
    async def test_outage_caught_up_in_parallel(self, fake: FakeAssemblyAI,
                                                tmp_path: Path) -> None:
        """After an ~8 s outage a live and a replay session overlap; records catch up fast."""
        result = await outage(fake, tmp_path)
        [finished] = result.events("stream.replay_finished")
        # one session replaying ~8 s of continuous sentences needed several times the backlog
        assert finished["catch_up_s"] <= finished["replay_s"] + 1
        assert finished["held_turns"] >= 1
        live, replay = fake.sessions[1], fake.sessions[2]
        assert span(replay)[0] < span(live)[1] and span(live)[0] < span(replay)[1]
        lanes = [e["lane"] for e in result.events("session.began")]
        assert lanes == ["live", "live", "replay"]
        times = [(t["started_at"], t["ended_at"]) for t in read_turns(tmp_path / "turns.jsonl")]
        assert times == sorted(times)

    async def test_both_lanes_roll_over(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """With 10-second sessions the live and the replay lane both roll over mid-catch-up."""
        result = await outage(fake, tmp_path, session_s=10)
        logs = result.logs()
        lanes = {e["session_id"]: e["lane"] for e in logs if e.get("event") == "session.began"}
        done = next(i for i, e in enumerate(logs) if e.get("event") == "stream.replay_finished")
        switched = {lanes[e["session_id"]] for e in logs[:done]
                    if e.get("event") == "session.switched"}
        assert switched == {"live", "replay"}

    async def test_replay_and_live_sessions_dropped(self, fake: FakeAssemblyAI,
                                                    tmp_path: Path) -> None:
        """The live session drops while the replay runs, then the replay drops: lossless."""
        def arm(fake: FakeAssemblyAI) -> None:
            fake.faults.drop_after_audio_ms(1000)     # the live session
            fake.faults.drop_after_audio_ms(3000)     # the replay session

        result = await outage(fake, tmp_path, arm)
        assert [s.closed_by for s in fake.sessions[1:3]] == ["abort", "abort"]
        logs = result.logs()
        done = next(i for i, e in enumerate(logs) if e.get("event") == "stream.replay_finished")
        reconnects = [e["lane"] for e in logs[:done] if e.get("event") == "stream.reconnecting"]
        assert reconnects[-2:] == ["live", "replay"]   # the first is the outage itself

    async def test_sigterm_during_replay(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """SIGTERM while the replay runs: both sessions drain; what was said arrives once."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE)
        daemon = await Daemon.start("run", "--config", str(config))
        async with asyncio.timeout(40):
            first = await fake.wait_for_session(0)
            await first.wait_for(lambda s: s.audio_ms >= 2500)
            fake.faults.token_status = [429] * 8
            first.abort()
            replay = await fake.wait_for_session(2)
            await replay.wait_for(lambda s: s.audio_ms >= 2000)
        daemon.signal()
        result = await daemon.finish(30)
        assert result.code == 0, result.stderr[-3000:]
        got, expected = delivered(tmp_path), words(TRANSCRIPTS[FIVE])
        assert got == expected[: len(got)]
        assert len(got) >= len(words(TRANSCRIPTS[S1] + " " + TRANSCRIPTS[S2]))
        assert result.events("stream.replay_finished")
        assert [s.close_code for s in fake.sessions[1:3]] == [1000, 1000]
        assert all('"Terminate"' in "".join(s.texts) for s in fake.sessions[1:3])
