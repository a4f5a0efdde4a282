"""Parsing the v3 wire format, old and new forms; URL building; close-code classification."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from daemon.config import AssemblyAIConfig
from daemon.protocol import (
    Begin,
    CloseKind,
    Heartbeat,
    ProtocolError,
    ServerError,
    ServerWarning,
    Termination,
    Turn,
    Unknown,
    classify_close,
    parse_message,
    streaming_url,
)


class TestParse:
    def test_begin_int_and_iso(self) -> None:
        """expires_at is accepted as Unix seconds or as an ISO-8601 string."""
        a = parse_message('{"type":"Begin","id":"s1","expires_at":1759796682}')
        b = parse_message('{"type":"Begin","id":"s1","expires_at":"2025-10-07T00:24:42Z"}')
        assert isinstance(a, Begin) and isinstance(b, Begin)
        assert a.expires_at == b.expires_at == datetime(2025, 10, 7, 0, 24, 42, tzinfo=UTC)

    def test_turn(self) -> None:
        """A Turn with words parses into typed fields."""
        frame = {"type": "Turn", "turn_order": 2, "end_of_turn": True, "turn_is_formatted": True,
                 "transcript": "Hi.", "end_of_turn_confidence": 0.9, "language_code": "en",
                 "words": [{"text": "Hi.", "start": 10, "end": 200, "confidence": 0.8,
                            "word_is_final": True}]}
        turn = parse_message(json.dumps(frame))
        assert isinstance(turn, Turn)
        assert (turn.turn_order, turn.words[0].end, turn.language_code) == (2, 200, "en")

    def test_termination_floats(self) -> None:
        """Termination figures may be floats."""
        msg = parse_message('{"type":"Termination","audio_duration_seconds":7.5,'
                            '"session_duration_seconds":8}')
        assert msg == Termination(7.5, 8.0)

    def test_errors_typed_and_legacy(self) -> None:
        """Typed Error frames and legacy untyped {"error": …} frames are both errors."""
        assert parse_message('{"type":"Error","error_code":3006,"error":"bad"}') == \
            ServerError(3006, "bad")
        legacy = parse_message('{"error":"Model deprecated"}')
        assert legacy == ServerError(None, "Model deprecated")
        assert parse_message('{"type":"Warning","warning_code":7,"warning":"slow"}') == \
            ServerWarning(7, "slow")

    def test_unknown_type_is_not_an_error(self) -> None:
        """New message types are returned as Unknown, to be ignored."""
        assert parse_message('{"type":"SpeechStarted","timestamp":1}') == Unknown("SpeechStarted")

    def test_heartbeat(self) -> None:
        """A Heartbeat (the reference's example) and one whose reported figures are odd."""
        beat = parse_message('{"type":"Heartbeat","total_audio_received_ms":45000,'
                             '"total_duration_ms":45205,"realtime_factor":0.9964,'
                             '"max_speech_probability":0.999954}')
        assert beat == Heartbeat(45000, 45205.0, 0.9964, 0.999954)
        odd = parse_message('{"type":"Heartbeat","total_audio_received_ms":5000.4,'
                            '"realtime_factor":"fast","max_speech_probability":NaN}')
        assert odd == Heartbeat(5000, 0.0, 0.0, 0.0)

    @pytest.mark.parametrize("received", ["null", '"45000"', "-100", "true", "NaN"])
    def test_heartbeat_without_a_received_figure(self, received: str) -> None:
        """The audio received is what the daemon uses: without it the frame is malformed."""
        with pytest.raises(ProtocolError, match="malformed Heartbeat frame"):
            parse_message(f'{{"type":"Heartbeat","total_audio_received_ms":{received}}}')

    @pytest.mark.parametrize("value", ["1795636993000", "1795636993000000000", "1e400",
                                       '"next tuesday"', "[1]"])
    def test_begin_with_unreadable_expiry_still_begins(self, value: str) -> None:
        """An expires_at in ms, ns, out of range or of a strange type: no expiry, not a failure."""
        begin = parse_message(f'{{"type":"Begin","id":"s1","expires_at":{value}}}')
        assert isinstance(begin, Begin) and begin.id == "s1"
        assert begin.expires_at is None and begin.unreadable_expiry is not None

    @pytest.mark.parametrize("frame", ["garbage", "[1,2]", '{"type":"Turn"}', '{"x":1}',
                                       '{"type":"Begin"}', b"\xff\xfe",
                                       '{"type":"Turn","turn_order":1e400}'])
    def test_garbage_raises_protocol_error(self, frame: str | bytes) -> None:
        """Malformed frames raise ProtocolError (the caller logs and survives)."""
        with pytest.raises(ProtocolError):
            parse_message(frame)

    @pytest.mark.parametrize("fields", [
        {"transcript": None, "end_of_turn": "false"},      # a string is not a flag
        {"transcript": 12},
        {"turn_order": 1.5}, {"turn_order": True},
        {"words": [{"text": 7, "start": 0, "end": 1}]},
        {"words": [{"text": "a", "start": "0", "end": 1}]},
        {"words": "hello"},
    ])
    def test_turn_fields_of_the_wrong_type(self, fields: dict[str, object]) -> None:
        """null is not the text "None" and "false" not a true flag: the frame is malformed."""
        frame = {"type": "Turn", "turn_order": 1, "end_of_turn": True, "transcript": "Hi.",
                 "words": [], **fields}
        with pytest.raises(ProtocolError):
            parse_message(json.dumps(frame))

    def test_turn_values_that_must_not_cost_the_turn(self) -> None:
        """A null transcript is empty; a lone surrogate becomes U+FFFD (no UTF-8 file or request
        can carry it); a NaN or infinite confidence reads as 0.0 (not non-standard JSON)."""
        frame = ('{"type":"Turn","turn_order":3,"end_of_turn":true,"transcript":"caf\\ud800e",'
                 '"end_of_turn_confidence":NaN,"words":[{"text":"caf\\ud800e","start":0,'
                 '"end":5,"confidence":Infinity}]}')
        turn = parse_message(frame)
        assert isinstance(turn, Turn)
        assert turn.transcript == turn.words[0].text
        assert turn.transcript.encode("utf-8").decode("utf-8") == turn.transcript
        assert turn.transcript.startswith("caf") and turn.transcript.endswith("e")
        assert "\ufffd" in turn.transcript
        assert (turn.end_of_turn_confidence, turn.words[0].confidence) == (0.0, 0.0)
        empty = parse_message('{"type":"Turn","turn_order":1,"transcript":null,"words":null}')
        assert isinstance(empty, Turn) and empty.transcript == "" and empty.words == ()

    def test_transcript_missing_but_words_there(self) -> None:
        """A final whose transcript is null or missing is its words (it was dropped silently)."""
        frame = ('{"type":"Turn","turn_order":1,"end_of_turn":true,"transcript":null,"words":['
                 '{"text":"Hi","start":0,"end":5},{"text":"there.","start":6,"end":9}]}')
        turn = parse_message(frame)
        assert isinstance(turn, Turn) and turn.transcript == "Hi there."

    def test_error_text_any_output_can_carry(self) -> None:
        """An Error's text with a lone surrogate (it broke the live feed's JSON) or of another
        type is text every UTF-8 output can carry."""
        error = parse_message('{"type":"Error","error_code":3005,"error":"bad \\ud800 thing"}')
        assert isinstance(error, ServerError)
        assert error.message.encode("utf-8") and error.message.startswith("bad ")
        odd = parse_message('{"type":"Warning","warning_code":1,"warning":{"a":1}}')
        assert odd == ServerWarning(1, "{'a': 1}")

    @pytest.mark.parametrize("session_id", ["null", "12", '""', '"a/b"', '"a\\nb"', '"x y"',
                                            '"' + "a" * 200 + '"'])
    def test_begin_id_must_be_a_session_id(self, session_id: str) -> None:
        """The id becomes every record's id and an MQTT topic level: null, '/', a newline..."""
        with pytest.raises(ProtocolError):
            parse_message(f'{{"type":"Begin","id":{session_id},"expires_at":1759796682}}')

    def test_deeply_nested_frame(self) -> None:
        """200 KB of ``[[[[`` is a malformed frame, not a RecursionError that kills the daemon."""
        with pytest.raises(ProtocolError):
            parse_message("[" * 200_000 + "]" * 200_000)


class TestUrl:
    def test_all_parameters_in_query(self) -> None:
        """Every setting is in the query; keyterms are one JSON array; the key is absent."""
        config = AssemblyAIConfig(api_key=SecretStr("raw-key"), keyterms=["Ada", "Linux"],
                                  language_detection=True, streaming_url="ws://127.0.0.1:9/v3/ws")
        url = streaming_url(config, sample_rate=16000, token="tok")
        query = parse_qs(urlsplit(url).query)
        assert query["keyterms_prompt"] == ['["Ada", "Linux"]']
        assert query["speech_model"] == ["universal-streaming-english"]
        assert query["format_turns"] == ["true"] and query["token"] == ["tok"]
        assert query["sample_rate"] == ["16000"] and query["encoding"] == ["pcm_s16le"]
        assert query["session_heartbeat"] == ["true"]
        assert "raw-key" not in url


class TestClassify:
    @pytest.mark.parametrize(("code", "reason", "kind"), [
        (1000, "", CloseKind.NORMAL),
        (1006, "", CloseKind.TRANSIENT),
        (1011, "", CloseKind.TRANSIENT),
        (1008, "Unauthorized Connection: Missing Authorization header", CloseKind.AUTH),
        (1008, "Unauthorized Connection: Too many concurrent sessions", CloseKind.RATE),
        (3005, "Session Cancelled: An error occurred", CloseKind.TRANSIENT),
        (3005, "Session Expired: Maximum session duration exceeded", CloseKind.EXPIRED),
        (3006, "Invalid JSON", CloseKind.CONFIG),
        (3007, "Input duration violation: 20 ms", CloseKind.CLIENT_BUG),
        (3008, "Session Expired", CloseKind.EXPIRED),
        (3009, "Too many concurrent sessions", CloseKind.RATE),
        (4001, "Not Authorized", CloseKind.AUTH),
        (None, "", CloseKind.TRANSIENT),
    ])
    def test_codes(self, code: int | None, reason: str, kind: CloseKind) -> None:
        """Close codes (and pre-2026 reason texts) map to the documented action."""
        assert classify_close(code, reason) is kind
