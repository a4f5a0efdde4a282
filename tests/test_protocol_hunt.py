"""Odd server messages: each bad one gets a clear line, and no turn or end of session is lost.

Pure parsing questions call ``parse_message``; what a message does to a session runs the real
``StreamSession`` against a scripted v3 service on 127.0.0.1 (tokens from the fake service).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import structlog
from websockets.asyncio.server import ServerConnection, serve

from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.events import AudioChunk, TurnRecord
from daemon.ledger import Piece, Timeline
from daemon.liveness import Liveness
from daemon.logs import configure
from daemon.outcome import Outcome
from daemon.protocol import (
    CloseKind,
    Heartbeat,
    ProtocolError,
    ServerError,
    ServerWarning,
    Termination,
    Turn,
    parse_message,
)
from daemon.stream import AssemblyAIEngine
from daemon.tokens import TokenProvider
from daemon.turns import TurnAssembler
from tests.fake_assemblyai import FakeAssemblyAI
from tests.listeners import TurnsListener

Frames = Sequence[str | bytes]


@asynccontextmanager
async def _scripted(on_audio: Frames, on_terminate: Frames,
                    close: tuple[int, str]) -> AsyncIterator[str]:
    """A v3 service that sends ``Begin``, ``on_audio`` at the first audio frame and
    ``on_terminate`` at ``Terminate``, then closes with ``close``; yields its URL."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "Begin", "id": "scripted-1", "expires_at": None}))
        sent = False
        async for message in ws:
            if isinstance(message, bytes) and not sent:
                sent = True
                for frame in on_audio:
                    await ws.send(frame)
                if close[0] != 1000:
                    await ws.close(*close)
                    return
            elif isinstance(message, str) and "Terminate" in message:
                for frame in on_terminate:
                    await ws.send(frame)
                await ws.close(*close)
                return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v3/ws"


async def _session(url: str, listener: TurnsListener, *, seconds: float = 1.0) -> Outcome:
    """One real session over ``seconds`` of captured silence, then the end of the input."""
    async with FakeAssemblyAI({}) as fake, httpx.AsyncClient() as client:
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=url,
                                  token_url=fake.token_url, terminate_timeout=3.0)
        engine = AssemblyAIEngine(config, ReconnectConfig(), TokenProvider(config, client),
                                  sample_rate=16000, chunk_ms=100, source="file", host="h")
        now = time.time()
        chunks = round(seconds * 10)
        for i in range(chunks):
            engine.ledger.append(AudioChunk(bytes(3200), now - seconds + i / 10))
        engine.ledger.finish()
        async with asyncio.timeout(20):
            session = await engine._open(listener, None)
            return await session.run(engine.ledger.head)


def _turn(**fields: Any) -> str:
    frame = {"type": "Turn", "turn_order": 0, "end_of_turn": True, "turn_is_formatted": True,
             "transcript": "hello there", "end_of_turn_confidence": 0.9,
             "words": [{"text": "hello", "start": 0, "end": 300, "confidence": 0.9},
                       {"text": "there", "start": 300, "end": 600, "confidence": 0.9}]}
    return json.dumps({**frame, **fields})


def _records(*frames: str) -> list[TurnRecord]:
    """The records a real assembler makes of ``frames`` (10 s of sent audio)."""
    timeline = Timeline(16000)
    timeline.add(Piece(0, bytes(2 * 16000 * 10), 1_700_000_000.0))
    out: list[TurnRecord] = []
    assembler = TurnAssembler("s", timeline, format_turns=False, source="file", host="h",
                              emit=out.append, partial=lambda _p: None, cover=lambda _p: None)
    for frame in frames:
        message = parse_message(frame)
        assert isinstance(message, Turn)
        assembler.handle(message)
    assembler.flush()
    return out


def _repairs(action: Callable[[], object]) -> list[MutableMapping[str, Any]]:
    with structlog.testing.capture_logs() as logs:
        action()
    return [e for e in logs if e["event"] == "protocol.values_repaired"]


class TestSessionLevel:
    async def test_error_code_true_does_not_hide_a_settings_close(self) -> None:
        """``error_code: true`` was read as close code 1, which replaced the 3006 that followed:
        a rejected setting became a retry loop instead of exit 78. The code is read as none
        now (a repair line names it) and the close code decides."""
        error = json.dumps({"type": "Error", "error_code": True,
                            "error": "User Input Validation Error: bad sample_rate"})
        async with _scripted([error], [], (3006, "See Error message for details")) as url:
            with structlog.testing.capture_logs() as logs:
                outcome = await _session(url, TurnsListener())
        assert outcome.kind is CloseKind.CONFIG, outcome
        assert "bad sample_rate" in outcome.reason
        [repaired] = [e for e in logs if e["event"] == "protocol.values_repaired"]
        assert repaired["problems"] == ["error_code True is not a close code: read as none"]

    async def test_the_same_repair_in_every_partial_is_one_line(self) -> None:
        """A service sending the same odd value in every partial logged a line for each (several
        a second); a session says it once a minute per kind of repair."""
        partials = [_turn(turn_order=0, end_of_turn=False, turn_is_formatted=False,
                          end_of_turn_confidence=5) for _ in range(3)]
        async with _scripted(partials, [], (1000, "")) as url:
            with structlog.testing.capture_logs() as logs:
                await _session(url, TurnsListener())
        repaired = [e for e in logs if e["event"] == "protocol.values_repaired"]
        assert len(repaired) == 1, repaired
        assert repaired[0]["problems"] == ["end_of_turn_confidence 5 is not a confidence: "
                                           "read as 1"]

    async def test_termination_with_odd_figures_still_ends_the_session(self) -> None:
        """A Termination whose figures are not numbers (``"7 s"``) was a bad frame: the session
        waited for a Termination that had come, ended as ``closed_without_termination`` and the
        open turn's last partial was never delivered. It is a Termination with one line."""
        partial = _turn(end_of_turn=False, turn_is_formatted=False)
        termination = json.dumps({"type": "Termination", "audio_duration_seconds": "7 s",
                                  "session_duration_seconds": 8})
        listener = TurnsListener()
        async with _scripted([partial], [termination], (1000, "")) as url:
            with structlog.testing.capture_logs() as logs:
                outcome = await _session(url, listener)
        assert [r.transcript for r in listener.turns] == ["hello there"]
        assert outcome.reason == "terminated", outcome
        events = [e["event"] for e in logs]
        assert "session.bad_frame" not in events
        assert "session.closed_without_termination" not in events
        repaired = [e for e in logs if e["event"] == "protocol.values_repaired"]
        assert repaired[0]["type"] == "Termination"
        assert "audio_duration_seconds" in repaired[0]["problems"][0]


class TestRecordsSinksCanUse:
    def test_a_word_that_ends_before_it_starts(self) -> None:
        """A word with ``start > end`` reached the sinks with ``end_ms < start_ms`` (a negative
        length); it now ends where it starts, and the line names the word."""
        words = [{"text": "hello", "start": 0, "end": 300, "confidence": 0.9},
                 {"text": "there", "start": 900, "end": 400, "confidence": 0.9}]
        frame = _turn(words=words)
        repaired = _repairs(lambda: parse_message(frame))
        (record,) = _records(frame)
        assert all(w.end_ms >= w.start_ms for w in record.words), record.words
        assert record.ended_at >= record.started_at
        assert repaired[0]["type"] == "Turn" and repaired[0]["turn_order"] == 0
        assert repaired[0]["problems"] == ["words[1].end 400 is before its start 900: read as 900"]

    @pytest.mark.parametrize(("value", "read"), [("5", 1.0), ("-3", 0.0), ("1e308", 1.0),
                                                 ("1" + "0" * 400, 1.0)])
    def test_confidences_outside_0_to_1(self, value: str, read: float) -> None:
        """A confidence of 5, -3 or 1e308 went to the sinks as is (the SPEC's are 0..1); an
        integer of 400 digits cost the whole turn. Each is the nearest end, with a line."""
        frame = _turn(words=[{"text": "hi", "start": 0, "end": 100, "confidence": 0.5}])
        frame = frame.replace('"confidence": 0.5', f'"confidence": {value}')
        frame = frame.replace('"end_of_turn_confidence": 0.9',
                              f'"end_of_turn_confidence": {value}')
        repaired = _repairs(lambda: parse_message(frame))
        (record,) = _records(frame)
        assert (record.end_of_turn_confidence, record.words[0].confidence) == (read, read)
        problems = repaired[0]["problems"]
        assert [p.split(" ")[0] for p in problems] == ["words[0].confidence",
                                                       "end_of_turn_confidence"]

    def test_nan_confidence_gets_a_line(self) -> None:
        """A NaN confidence read as 0.0 without a word said; now the line names it."""
        frame = _turn().replace('"end_of_turn_confidence": 0.9', '"end_of_turn_confidence": NaN')
        repaired = _repairs(lambda: parse_message(frame))
        assert repaired and "end_of_turn_confidence nan" in repaired[0]["problems"][0]

    def test_termination_figures_are_finite(self) -> None:
        """NaN, Infinity or -5 seconds were handed on as they came."""
        message = parse_message('{"type":"Termination","audio_duration_seconds":NaN,'
                                '"session_duration_seconds":-5}')
        assert message == Termination(0.0, 0.0)

    def test_a_lone_surrogate_is_one_replacement_character(self) -> None:
        """``\\ud800`` became three U+FFFD (its three surrogate-escaped bytes)."""
        message = parse_message('{"type":"Turn","turn_order":1,"transcript":"caf\\ud800e"}')
        assert isinstance(message, Turn) and message.transcript == "caf\ufffde"


class TestUnusualButValid:
    @pytest.mark.parametrize("frame", [
        "\ufeff" + _turn(),
        ("\ufeff" + _turn()).encode(),
    ])
    def test_a_utf8_bom_before_the_json(self, frame: str | bytes) -> None:
        """A BOM before the JSON (RFC 8259 lets a parser ignore it) cost the turn when the
        frame was text; as bytes it was already read."""
        message = parse_message(frame)
        assert isinstance(message, Turn) and message.transcript == "hello there"

    def test_a_heartbeat_with_an_absurd_duration_keeps_liveness_bounded(self) -> None:
        """One Heartbeat saying the session has lasted 1e308 ms made ``daemon.liveness`` wait
        3e305 s for the next frame: a service that then fell silent was never noticed."""
        now = [0.0]
        liveness = Liveness(clock=lambda: now[0])
        first = parse_message('{"type":"Heartbeat","total_audio_received_ms":5000,'
                              '"total_duration_ms":5000}')
        odd = '{"type":"Heartbeat","total_audio_received_ms":10000,"total_duration_ms":1e308}'
        assert isinstance(first, Heartbeat)
        liveness.beat(first, 5.0)
        now[0] = 5.0
        repaired = _repairs(lambda: liveness.beat(_heartbeat(odd), 10.0))
        assert liveness.limit_s < 60
        assert "total_duration_ms 1e+308" in repaired[0]["problems"][0]

    def test_a_huge_error_text_is_cut(self) -> None:
        """An Error text of 100 KB was one log line, outcome and exit message of 100 KB."""
        message = parse_message(json.dumps({"type": "Error", "error_code": 3005,
                                            "error": "x" * 100_000}))
        assert isinstance(message, ServerError) and message.code == 3005
        assert len(message.message) < 600 and message.message.endswith("(100000 characters)")


def _heartbeat(frame: str) -> Heartbeat:
    message = parse_message(frame)
    assert isinstance(message, Heartbeat)
    return message


class TestClearLines:
    @pytest.mark.parametrize(("frame", "line"), [
        ('{"type":5}', "type is 5, not a string"),
        ('{"type":["Turn"]}', "type is ['Turn'], not a string"),
        ('{"type":"Begin","expires_at":1}', "malformed Begin frame: id is missing"),
        ('{"type":"Turn","turn_order":1,"words":[{"text":"a","start":0,"end":1},{"text":"b"}]}',
         "malformed Turn frame: words[1].start is missing"),
        ('{"type":"Turn","turn_order":1,"words":[{"text":"a","start":"0","end":1}]}',
         "words[0].start is '0', not an integer"),
    ])
    def test_the_line_names_the_field(self, frame: str, line: str) -> None:
        """``frame without a type`` for a type of 5, ``KeyError: 'start'`` for the second
        word: the line now says which field is wrong, and how."""
        with pytest.raises(ProtocolError) as caught:
            parse_message(frame)
        assert line in str(caught.value)

    @pytest.mark.parametrize(("frame", "expected", "problem"), [
        ('{"type":"Error","error_code":-1,"error":"boom"}', ServerError(None, "boom"),
         "error_code -1 is not a close code: read as none"),
        ('{"type":"Error","error_code":1e400,"error":"Too many concurrent sessions"}',
         ServerError(None, "Too many concurrent sessions"),
         "error_code inf is not a close code: read as none"),
        ('{"type":"Warning","warning_code":true,"warning":"slow"}', ServerWarning(None, "slow"),
         "warning_code True is not an integer: read as none"),
    ])
    def test_a_code_that_is_no_code_keeps_the_text(self, frame: str, expected: object,
                                                   problem: str) -> None:
        """A code that is no close code (``true`` was read as 1) is read as none, so the close
        code decides; the text stays (classifying the close may need it: "Too many concurrent
        sessions" is a rate limit, whatever the close code)."""
        logs = _repairs(lambda: parse_message(frame))
        assert parse_message(frame) == expected
        assert logs[0]["problems"] == [problem]

    def test_a_confidence_a_hair_above_1_is_a_rounding_slip(self) -> None:
        """``1.0000001`` is clamped without a line (every partial would say it); ``1.01`` is
        repaired with one."""
        slip = _turn(end_of_turn_confidence=1.0000001)
        assert _repairs(lambda: parse_message(slip)) == []
        assert parse_message(slip) == parse_message(_turn(end_of_turn_confidence=1.0))
        assert len(_repairs(lambda: parse_message(_turn(end_of_turn_confidence=1.01)))) == 1

    def test_error_codes_that_stand_for_close_codes(self) -> None:
        """A close code as a number, a whole float or a numeric string is read as before."""
        for code in ("3008", "3008.0", '"3008"'):
            message = parse_message(f'{{"type":"Error","error_code":{code},"error":"x"}}')
            assert message == ServerError(3008, "x")


async def test_an_unreadable_frame_keeps_its_text_out_when_transcripts_are_hidden() -> None:
    """``session.bad_frame`` showed the frame's first 80 characters inside its error text, so a
    cut-off ``Turn`` put transcript words in the log with ``log.transcripts = false``. The start
    is its own field now (``frame``), hidden with the transcripts, shown otherwise."""
    cut_off = '{"type": "Turn", "turn_order": 0, "transcript": "my secret plans'
    for hidden in (True, False):
        out = io.StringIO()
        configure(fmt="json", transcripts=not hidden, stream=out)
        async with _scripted([cut_off], [], (1000, "")) as url:
            await _session(url, TurnsListener())
        bad = [line for line in map(json.loads, out.getvalue().splitlines())
               if line["event"] == "session.bad_frame"]
        assert len(bad) == 1, out.getvalue()
        assert bad[0]["error"] == "not JSON"
        assert ("my secret plans" in out.getvalue()) is not hidden
        assert bad[0]["frame"] == ("[hidden]" if hidden else repr(cut_off[:80]))
