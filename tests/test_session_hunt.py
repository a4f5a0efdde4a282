"""Odd messages from the v3 service, part two: each gets one clear line and loses nothing.

The real ``AssemblyAIEngine`` and ``StreamSession`` run against a scripted v3 service on
127.0.0.1 (tokens from the fake service); ``Liveness`` runs on a hand-moved clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import struct
import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.events import AudioChunk
from daemon.liveness import Liveness
from daemon.outcome import Outcome, close_of
from daemon.protocol import CloseKind, Heartbeat
from daemon.rollover import rollover_plan
from daemon.stream import AssemblyAIEngine, _Failed
from daemon.tokens import TokenProvider
from tests.fake_assemblyai import FakeAssemblyAI
from tests.listeners import TurnsListener

RATE = 16000
TONE_CHUNK = struct.pack("<1600h", *(round(8000 * math.sin(2 * math.pi * 440 * i / RATE))
                                     for i in range(1600)))      # 100 ms: never skipped
TERMINATION = json.dumps({"type": "Termination", "audio_duration_seconds": 1,
                          "session_duration_seconds": 1})


def _begin(session_id: str = "scripted-1", expires_at: Any = None) -> str:
    return json.dumps({"type": "Begin", "id": session_id, "expires_at": expires_at})


def _final(transcript: str = "hello there") -> str:
    return json.dumps({"type": "Turn", "turn_order": 0, "end_of_turn": True,
                       "turn_is_formatted": True, "transcript": transcript,
                       "end_of_turn_confidence": 0.9,
                       "words": [{"text": "hello", "start": 0, "end": 300, "confidence": 0.9},
                                 {"text": "there", "start": 300, "end": 600,
                                  "confidence": 0.9}]})


@dataclass
class Script:
    """One connection of the scripted service: ``first`` frame, ``on_audio`` at the first
    audio frame, ``on_terminate`` at ``Terminate``, then a close with ``close``."""

    first: str | bytes = field(default_factory=_begin)
    on_audio: Sequence[str | bytes] = ()
    on_terminate: Sequence[str | bytes] = (TERMINATION,)
    close: tuple[int, str] = (1000, "")


@dataclass
class Service:
    """The scripted service's URL and the audio bytes each connection received."""

    url: str
    audio: list[int]


@asynccontextmanager
async def _scripted(*scripts: Script) -> AsyncIterator[Service]:
    """A v3 service whose n-th connection follows ``scripts[n]`` (the last one thereafter)."""
    audio: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        audio.append(0)
        try:
            await play(ws, scripts[min(len(audio) - 1, len(scripts) - 1)], len(audio) - 1)
        except ConnectionClosed:
            return                          # the client closed it (a 1009 of its own)

    async def play(ws: ServerConnection, script: Script, index: int) -> None:
        await ws.send(script.first)
        async for message in ws:
            if isinstance(message, bytes):
                audio[index] += len(message)
                if audio[index] == len(message):
                    for frame in script.on_audio:
                        await ws.send(frame)
            elif "Terminate" in message:
                for frame in script.on_terminate:
                    await ws.send(frame)
                await ws.close(*script.close)
                return

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield Service(f"ws://127.0.0.1:{port}/v3/ws", audio)


@asynccontextmanager
async def _engine(url: str) -> AsyncIterator[AssemblyAIEngine]:
    """A real engine on ``url``, tokens from the fake service, retries after 10 ms."""
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=url,
                                  token_url=fake.token_url, terminate_timeout=3.0)
        yield AssemblyAIEngine(config, ReconnectConfig(), TokenProvider(config, client),
                               sample_rate=RATE, chunk_ms=100, source="file", host="h",
                               delays=lambda: itertools.repeat(0.01))


def _chunks(seconds: float) -> list[AudioChunk]:
    """``seconds`` of captured tone, ending now."""
    now = time.time()
    count = round(seconds * 10)
    return [AudioChunk(TONE_CHUNK, now - seconds + i / 10) for i in range(count)]


async def _session(url: str, listener: TurnsListener) -> Outcome:
    """One real session over a second of captured tone, then the end of the input."""
    async with _engine(url) as engine:
        for chunk in _chunks(1.0):
            engine.ledger.append(chunk)
        engine.ledger.finish()
        async with asyncio.timeout(20):
            session = await engine._open(listener, None)
            assert rollover_plan(session.begin, session.began_wall, session.began_at) is None
            return await session.run(engine.ledger.head)


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


class TestBegin:
    async def test_a_second_begin_is_one_warning_and_the_session_goes_on(self) -> None:
        """A second ``Begin`` matched no branch and vanished without a word; it is one warning
        naming the new id, and the session's turns and end still come."""
        script = Script(on_audio=[_begin("scripted-2"), _final()])
        listener = TurnsListener()
        async with _scripted(script) as service:
            with structlog.testing.capture_logs() as logs:
                outcome = await _session(service.url, listener)
        (warning,) = _events(logs, "session.unexpected_begin")
        assert warning["new_id"] == "scripted-2"
        assert warning["effect"] == "ignored; the session goes on"
        assert warning["log_level"] == "warning"
        assert outcome.reason == "terminated", outcome
        assert [(r.session_id, r.transcript) for r in listener.turns] == [
            ("scripted-1", "hello there")]

    @pytest.mark.parametrize("expires_at", [
        lambda: int(time.time()) - 60,
        lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600)),
    ])
    async def test_an_expiry_already_past_is_one_warning(self, expires_at: Any) -> None:
        """A ``Begin`` that expired before the session began was taken without a word (and no
        rollover was planned): one warning now, and the session still runs to its end."""
        script = Script(first=_begin(expires_at=expires_at()))
        async with _scripted(script) as service:
            with structlog.testing.capture_logs() as logs:
                outcome = await _session(service.url, TurnsListener())
        (warning,) = _events(logs, "session.expiry_past")
        assert warning["log_level"] == "warning"
        assert warning["expires_at"].endswith("Z")
        assert "no rollover is planned" in warning["effect"]
        assert "the service's close is handled" in warning["effect"]
        assert outcome.reason == "terminated", outcome

    async def test_an_expiry_ahead_is_no_warning(self) -> None:
        """An expiry an hour ahead is the normal case: no ``session.expiry_past``."""
        script = Script(first=_begin(expires_at=int(time.time()) + 3600))
        async with _scripted(script) as service, _engine(service.url) as engine:
            engine.ledger.append(_chunks(0.1)[0])
            with structlog.testing.capture_logs() as logs:
                async with asyncio.timeout(20):
                    session = await engine._open(TurnsListener(), None)
                    engine.ledger.finish()
                    await session.run(engine.ledger.head)
        assert not _events(logs, "session.expiry_past")
        assert _events(logs, "session.began")


class TestFirstFrame:
    @pytest.mark.parametrize(("first", "named"), [
        (TERMINATION, "Termination"),
        (_final(), "Turn"),
        ('{"type":"Warning","warning_code":1,"warning":"slow"}', "Warning"),
        ('{"type":"Heartbeat","total_audio_received_ms":0,"total_duration_ms":0}', "Heartbeat"),
        (json.dumps({"type": "SpeechStarted" + "x" * 100}), "type 'SpeechStarted" + "x" * 27 + "'"),
    ])
    async def test_the_outcome_names_what_came_instead_of_begin(self, first: str,
                                                                 named: str) -> None:
        """"first frame was not Begin" left the reader guessing; it names the frame's type
        (one we do not know quoted, cut to 40 characters)."""
        async with _scripted(Script(first=first)) as service, _engine(service.url) as engine:
            with pytest.raises(_Failed) as failed:
                async with asyncio.timeout(20):
                    await engine._open(TurnsListener(), None)
        assert failed.value.outcome.reason == f"first frame was {named}, not Begin"
        assert failed.value.outcome.kind is CloseKind.TRANSIENT


    async def test_a_handshake_answer_with_a_huge_header_is_one_short_line(self) -> None:
        """"connect failed: …" repeated what the server sent (here an 8000-character
        Sec-WebSocket-Accept) whole, into every log line and status; it is one line, bounded."""
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + b"A" * 8000
                         + b"\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, _engine(f"ws://127.0.0.1:{port}/v3/ws") as engine:
            with pytest.raises(_Failed) as failed:
                async with asyncio.timeout(20):
                    await engine._open(TurnsListener(), None)
        reason = failed.value.outcome.reason
        assert reason.startswith("connect failed: "), reason
        assert len(reason) < 600 and "\n" not in reason, reason


class TestOurOwnClose:
    async def test_a_10_mb_frame_is_our_1009_and_the_audio_is_replayed(self) -> None:
        """A 10 MB frame made websockets close 1009, reported as "1006 abnormal closure"; the
        reason is now ours, marked so, the close is transient, and the next session replays
        the whole second of audio, whose turn is delivered."""
        huge = json.dumps({"type": "Turn", "transcript": "x" * (10 * 2**20)})
        first = Script(on_audio=[huge], on_terminate=())
        second = Script(on_terminate=(_final(), TERMINATION))
        listener = TurnsListener()

        async def chunks() -> AsyncIterator[AudioChunk]:
            for chunk in _chunks(1.0):
                yield chunk

        async with _scripted(first, second) as service, _engine(service.url) as engine:
            with structlog.testing.capture_logs() as logs:
                async with asyncio.timeout(30):
                    await engine.run(chunks(), listener)
        ended = _events(logs, "session.ended")
        reason = ended[0]["reason"]
        assert reason.startswith("1009 (message too big) frame with"), reason
        assert reason.endswith("(closed by us)"), reason
        (reconnecting,) = _events(logs, "stream.reconnecting")
        assert (reconnecting["kind"], reconnecting["reason"]) == ("transient", reason)
        assert service.audio[1] == len(TONE_CHUNK) * 10      # all of it, again
        assert [r.transcript for r in listener.turns] == ["hello there"]
        assert ended[1]["reason"] == "terminated"

    @pytest.mark.parametrize(("exc", "text", "kind"), [
        (ConnectionClosed(None, Close(1011, "keepalive ping timeout")),
         "1011 (internal error) keepalive ping timeout (closed by us)", CloseKind.TRANSIENT),
        (ConnectionClosed(Close(1009, ""), Close(1009, "frame too big"), False),
         "1009 (message too big) frame too big (closed by us)", CloseKind.TRANSIENT),
        (ConnectionClosed(None, Close(1008, "")),
         "1008 (policy violation) (closed by us)", CloseKind.TRANSIENT),
        (ConnectionClosed(Close(3006, "bad"), Close(3006, "bad"), True),
         "3006 bad", CloseKind.CONFIG),
        (ConnectionClosed(None, None), "1006 abnormal closure", CloseKind.TRANSIENT),
    ])
    def test_who_closed_decides_the_reason_and_kind(self, exc: ConnectionClosed, text: str,
                                                    kind: CloseKind) -> None:
        """Our close (none came back, or only its echo) is ours and transient, never read as
        the service's verdict (a 1008 of ours is no credential rejection); the service's close
        is its own."""
        close = close_of(exc)
        assert (str(close), close.kind) == (text, kind)


class TestLiveness:
    def test_a_jump_in_the_service_clock_keeps_the_limit_bounded(self) -> None:
        """Heartbeats 10 minutes apart on the service's clock made the silence limit 30 min;
        the period is at most 30 s, so the limit is at most 91 s."""
        now = [1000.0]
        live = Liveness(clock=lambda: now[0])
        live.beat(Heartbeat(0, 5_000, 1.0, 0.0), 0.0)
        now[0] += 5
        live.frame()                                # the session notes every frame
        live.beat(Heartbeat(0, 605_000, 1.0, 0.0), 0.0)
        assert live.limit_s == 91
        now[0] += 92
        assert live.silent() is None                # doubted once
        assert live.silent() == pytest.approx(92)


def test_an_error_line_is_printable() -> None:
    """A server's (or a plugin's) text in an error line: a terminal escape came through raw."""
    from daemon.supervise import error_line

    line = error_line(ValueError("bad\x1b[2J\nthing\x00"))
    assert line == "ValueError: bad?[2J thing?" and line.isprintable()
