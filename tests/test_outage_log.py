"""What an operator tailing the log learns about a streaming outage, and at which level.

One warning when an outage starts (the reason in plain words) and one when its reason changes,
the retries of the same reason at debug, a ``stream.still_down`` summary while it lasts, and
``stream.recovered`` (info) before the session lines; a stop during an outage says so and
announces no retry the shutdown deadline will cut off. The real daemon (or engine) runs against
the fake service, which is absent (a port nothing listens on) or answers with scripted faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import structlog
from websockets.asyncio.server import serve

from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.events import AudioChunk
from daemon.stream import AssemblyAIEngine
from daemon.tokens import TokenProvider
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, Finished, cloud_config, read_turns
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.listeners import TurnsListener

S1 = "espeak-s1.wav"
RATE_HINT_WORDS = "another program, using this API key"


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class FakeOnPort(FakeAssemblyAI):
    """The fake service, started on a given port (where the daemon was told it is)."""

    def __init__(self, port: int) -> None:
        super().__init__(load_speech_references(SPEECH_DIR, S1))
        self.port = port                # its URLs are known before it starts

    async def __aenter__(self) -> FakeOnPort:
        self._server = await serve(self._handle, "127.0.0.1", self.port,
                                   process_request=self._process_request, max_size=128 * 1024)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await super().__aexit__(exc_type, exc, tb)


class LogReader:
    """A running daemon's JSON log lines, read as they come and kept in order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []

    async def until(self, event: str, count: int = 1) -> dict[str, Any]:
        """Read stderr until the ``count``-th line with this event; return it."""
        stream = self.daemon.process.stderr
        assert stream is not None
        while len(self.events(event)) < count:
            line = (await stream.readline()).decode()
            assert line, f"the daemon ended before {event}: {''.join(self.text)[-3000:]}"
            self.text.append(line)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))
        return self.events(event)[count - 1]

    def events(self, event: str) -> list[dict[str, Any]]:
        """The lines read so far with this event."""
        return [line for line in self.lines if line.get("event") == event]

    async def finish(self, limit_s: float) -> Finished:
        """Wait for the exit; the result's stderr holds every line, those read here first."""
        rest = await self.daemon.finish(limit_s)
        return Finished(rest.code, rest.stdout, "".join(self.text) + rest.stderr)


def index_of(lines: list[dict[str, Any]], event: str) -> int:
    """The position of the first line with this event (past the end if there is none)."""
    return next((i for i, line in enumerate(lines) if line.get("event") == event), len(lines))


def long_file(tmp_path: Path, silence_s: float) -> Path:
    """Sentence S1, then ``silence_s`` of silence: a file run that lasts that long."""
    wav = tmp_path / "speech-then-silence.wav"
    with wave.open(str(SPEECH_DIR / S1)) as source, wave.open(str(wav), "wb") as out:
        out.setparams(source.getparams())
        out.writeframes(source.readframes(source.getnframes()))
        out.writeframes(bytes(2 * source.getframerate() * int(silence_s)))
    return wav


class TestOutageInTheDaemon:
    async def test_refused_then_back(self, tmp_path: Path) -> None:
        """Nothing listens at the service's port: one warning in plain words (the endpoint
        named, no Python wording), the retries at debug, and when the service comes up, one
        ``stream.recovered`` before the session begins. (Each retry was the same ~220-character
        warning, and nothing said the service was back.)"""
        port = free_port()
        fake = FakeOnPort(port)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        daemon = await Daemon.start("run", "--config", str(config))
        log = LogReader(daemon)
        try:
            async with asyncio.timeout(30):
                first = await log.until("stream.token_failed")
                second = await log.until("stream.token_failed", 2)
                async with fake:
                    recovered = await log.until("stream.recovered")
                    result = await log.finish(30)
        finally:
            await daemon.kill_if_running()
        assert result.code == 0, result.stderr[-3000:]
        reason = f"connection refused by the token endpoint 127.0.0.1:{port}"
        assert (first["level"], first["error"], first["outage"]) == ("warning", reason, "started")
        assert "Errno" not in first["error"] and "ConnectError" not in first["error"]
        assert first["dropped_s"] == 0 and "nothing is lost" in first["effect"]
        assert (second["level"], second["error"]) == ("debug", reason)
        warned = [e for e in log.events("stream.token_failed") if e["level"] == "warning"]
        assert warned == [first]
        assert recovered["level"] == "info" and recovered["last_reason"] == reason
        assert recovered["attempts"] == len(log.events("stream.token_failed")) >= 2
        assert recovered["down_for_s"] >= 0
        lines = result.logs()
        assert index_of(lines, "stream.recovered") < index_of(lines, "session.began")
        assert index_of(lines, "stream.recovered") < index_of(lines, "stream.catch_up_started")
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_a_new_reason_is_said_once_and_too_many_sessions_gets_a_hint(
            self, tmp_path: Path) -> None:
        """Upgrades answered 503 three times, then sessions closed 3009 (too many concurrent
        sessions) twice: a warning for the 503, one for the 3009 with a hint about another
        program on the same key, the repeats at debug, one ``stream.recovered``. (The 503 and
        the 3009 were info lines, each retry alike, the 3009 without a hint.)"""
        async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as fake:
            fake.faults.http_status_on_upgrade = [503, 503, 503]
            fake.faults.reject_handshake = [3009, 3009]
            config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
            daemon = await Daemon.start("run", "--config", str(config))
            log = LogReader(daemon)
            try:
                async with asyncio.timeout(30):
                    await log.until("stream.recovered")
                    result = await log.finish(30)
            finally:
                await daemon.kill_if_running()
        assert result.code == 0, result.stderr[-3000:]
        retries = log.events("stream.reconnecting")
        assert [r["level"] for r in retries] == ["warning", "debug", "debug", "warning", "debug"]
        assert retries[0]["reason"] == "handshake answered HTTP 503"
        assert retries[0]["outage"] == "started" and retries[0]["backlog_seconds"] == 120
        changed = retries[3]
        assert changed["kind"] == "rate" and "3009" in changed["reason"]
        assert changed["outage"] == "reason changed"
        assert changed["previous"] == "handshake answered HTTP 503"
        assert changed["attempts"] == 4 and RATE_HINT_WORDS in changed["hint"]
        assert "hint" not in retries[0]
        [recovered] = result.events("stream.recovered")
        assert recovered["attempts"] == 5 and recovered["last_reason"] == changed["reason"]
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_a_stop_during_an_outage_says_stopping_and_no_retry(
            self, tmp_path: Path) -> None:
        """SIGTERM while the service is down and the backoff is long: the attempt made at once
        says ``stopping`` (not "the input ended"), and its failure announces no retry, since
        the shutdown deadline comes first; exit 0. (It said the input ended and announced a
        retry in 30-60 s that never came.)"""
        port = free_port()
        fake = FakeOnPort(port)
        config = cloud_config(tmp_path, fake, long_file(tmp_path, 40))
        daemon = await Daemon.start("run", "--config", str(config), env={
            "TRANSCRIBED_RECONNECT__INITIAL_DELAY": "8", "TRANSCRIBED_RECONNECT__MAX_DELAY": "60"})
        log = LogReader(daemon)
        try:
            async with asyncio.timeout(60):
                # retries at once, in 4-8 s, then in 8-16 s: audio is held by then
                waiting = await log.until("stream.token_failed", 3)
                daemon.signal()
                now = await log.until("stream.retrying_now")
                last = await log.until("stream.token_failed", 4)     # the next wait: 16-32 s
                result = await log.finish(30)
        finally:
            await daemon.kill_if_running()
        assert result.code == 0, result.stderr[-3000:]
        assert waiting["retry_in_s"] >= 8
        assert now["reason"] == "stopping"
        assert "retry_in_s" not in last and last["next_attempt"].startswith("none: stopping")
        assert len(log.events("stream.token_failed")) == 4
        assert result.events("daemon.shutdown_deadline")
        assert result.events("stream.untranscribed")


async def _held_input(seconds: float, done: asyncio.Event) -> AsyncIterator[AudioChunk]:
    """``seconds`` of silence captured at once (a microphone during an outage), then nothing
    until ``done``."""
    for _ in range(int(seconds * 10)):
        yield AudioChunk(bytes(3200), 0.0)
    await done.wait()


def _every(delay_s: float) -> Iterator[float]:
    return itertools.repeat(delay_s)


async def test_still_down_sums_the_outage_up_while_it_lasts() -> None:
    """An outage that lasts: ``stream.still_down`` every ``summary_every_s`` (5 minutes in the
    daemon), a warning with how long, how many attempts, the last reason and the audio held,
    not one per attempt; none once the service is back."""
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        fake.faults.token_status = [503] * 12
        fake.faults.token_retry_after = ""
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                                  token_url=fake.token_url)
        engine = AssemblyAIEngine(config, ReconnectConfig(backlog_seconds=60),
                                  TokenProvider(config, client), sample_rate=16000, chunk_ms=100,
                                  source="microphone", host="h", delays=lambda: _every(0.1),
                                  summary_every_s=0.35)
        done = asyncio.Event()
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(30):
                running = asyncio.create_task(engine.run(_held_input(2, done), TurnsListener()))
                session = await fake.wait_for_session(0)
                await session.wait_begun()
                done.set()
                await running
    summaries = [e for e in logs if e["event"] == "stream.still_down"]
    failed = [e for e in logs if e["event"] == "stream.token_failed"]
    assert len(failed) == 12 and 1 <= len(summaries) < len(failed)
    assert all(s["log_level"] == "warning" for s in summaries)
    assert [s["attempts"] for s in summaries] == sorted({s["attempts"] for s in summaries})
    for summary in summaries:
        assert summary["reason"].startswith("token endpoint answered 503")
        assert summary["down_for_s"] >= 0.3 and summary["backlog_seconds"] == 60
        assert 0 < summary["backlog_s"] <= 2 and summary["dropped_s"] == 0
    [recovered] = [e for e in logs if e["event"] == "stream.recovered"]
    assert recovered["attempts"] == 12
    assert recovered["down_for_s"] >= summaries[-1]["down_for_s"]
    names = [e["event"] for e in logs]
    assert names.index("stream.recovered") > max(i for i, n in enumerate(names)
                                                 if n == "stream.still_down")


def test_reasons_past_the_cap_are_not_news_at_every_attempt() -> None:
    """A service whose error text differs at each attempt (a request id in it): past the
    reasons an outage remembers, each attempt warned again."""
    from structlog.testing import capture_logs

    from daemon.outcome import Outage

    outage = Outage(lambda: {"backlog_s": 0.0, "dropped_s": 0.0})
    with capture_logs() as logs:
        for attempt in range(100):
            outage.failed("stream.token_failed", f"HTTP 503 (request {attempt})")
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert 1 < len(warned) <= 33        # the start, then each new reason while it remembers
