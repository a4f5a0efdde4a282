"""The Universal Streaming v3 wire format: URL building, typed server messages, close codes.

Parsing is tolerant of the old and new forms the service has used (``expires_at`` as an int or an
ISO string, untyped ``{"error": …}`` frames, ``Termination`` figures as floats). Unknown message
types parse to ``Unknown`` and are ignored by the caller; frames that are not what they claim raise
``ProtocolError`` (logged by the caller, never fatal). No I/O here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

from daemon.config import AssemblyAIConfig


class ProtocolError(ValueError):
    """A server frame that cannot be understood."""


@dataclass(frozen=True, slots=True)
class Begin:
    """The session has started."""

    id: str
    expires_at: datetime | None
    configuration: dict[str, Any]
    unreadable_expiry: str | None = None   # an ``expires_at`` we could not read (then None)


@dataclass(frozen=True, slots=True)
class WireWord:
    """A word as the service sends it: times in ms from the start of the session's audio."""

    text: str
    start: int
    end: int
    confidence: float
    word_is_final: bool


@dataclass(frozen=True, slots=True)
class Turn:
    """A partial or final transcript of one turn."""

    turn_order: int
    end_of_turn: bool
    turn_is_formatted: bool
    transcript: str
    end_of_turn_confidence: float
    words: tuple[WireWord, ...]
    language_code: str | None


@dataclass(frozen=True, slots=True)
class Termination:
    """The session ended after ``Terminate`` (or expiry)."""

    audio_duration_seconds: float
    session_duration_seconds: float


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``Error`` frame; ``code`` equals the close code that follows."""

    code: int | None
    message: str


@dataclass(frozen=True, slots=True)
class ServerWarning:
    """A non-fatal ``Warning`` frame."""

    code: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The service's sign of life (asked for with ``session_heartbeat``; every 5 s).

    ``received_ms``: session audio the service has received so far.
    """

    received_ms: int
    duration_ms: float
    realtime_factor: float
    max_speech_probability: float


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message type we do not use (``SpeechStarted``, newer ones)."""

    type: str


Message = Begin | Turn | Termination | ServerError | ServerWarning | Heartbeat | Unknown


def parse_message(frame: str | bytes) -> Message:
    """Parse one server frame.

    Raises:
        ProtocolError: the frame is not JSON, not an object, or a known type with bad fields.
    """
    try:
        data = json.loads(frame)
    except (ValueError, UnicodeDecodeError, RecursionError):    # RecursionError: [[[[…
        raise ProtocolError(f"not JSON: {_preview(frame)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"not a JSON object: {_preview(frame)}")
    kind = data.get("type")
    try:
        if kind == "Turn":
            return _turn(data)
        if kind == "Begin":
            return _begin(data)
        if kind == "Termination":
            return Termination(
                float(data.get("audio_duration_seconds") or 0),
                float(data.get("session_duration_seconds") or 0),
            )
        if kind == "Error" or (kind is None and "error" in data):
            code = data.get("error_code")
            return ServerError(int(code) if code is not None else None, _message(data, "error"))
        if kind == "Heartbeat":
            return Heartbeat(_count(data, "total_audio_received_ms"),
                             _finite(data, "total_duration_ms"), _finite(data, "realtime_factor"),
                             _finite(data, "max_speech_probability"))
        if kind == "Warning":
            code = data.get("warning_code")
            return ServerWarning(int(code) if code is not None else None,
                                 _message(data, "warning"))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:   # 1e400 is inf to JSON
        raise ProtocolError(f"malformed {kind} frame ({type(exc).__name__}: {exc})") from None
    if not isinstance(kind, str):
        raise ProtocolError(f"frame without a type: {_preview(frame)}")
    return Unknown(kind)


def _begin(data: dict[str, Any]) -> Begin:
    """A session with an ``expires_at`` we cannot read still begins: it just has no expiry."""
    raw = data.get("expires_at")
    try:
        expires, unreadable = parse_expires_at(raw), None
    except (TypeError, ValueError, OverflowError, OSError):
        expires, unreadable = None, repr(raw)[:40]
    session_id = data["id"]
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        # it becomes every record's id, a dead-letter line and an MQTT topic level
        raise ValueError(f"id {repr(session_id)[:60]} is not a session id")
    configuration = data.get("configuration") or {}
    if not isinstance(configuration, dict):
        raise TypeError("configuration is not an object")
    return Begin(session_id, expires, configuration, unreadable)


_SESSION_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _turn(data: dict[str, Any]) -> Turn:
    words = tuple(
        WireWord(
            _text(w, "text"),
            _integer(w, "start"),
            _integer(w, "end"),
            _finite(w, "confidence"),
            _flag(w, "word_is_final", True),
        )
        for w in _words(data)
    )
    # a transcript missing (or null) while the words are there: the words say what was said
    transcript = _text(data, "transcript") or " ".join(w.text for w in words if w.text)
    return Turn(
        turn_order=_integer(data, "turn_order"),
        end_of_turn=_flag(data, "end_of_turn", False),
        turn_is_formatted=_flag(data, "turn_is_formatted", False),
        transcript=transcript,
        end_of_turn_confidence=_finite(data, "end_of_turn_confidence"),
        words=words,
        language_code=_text(data, "language_code") or None,
    )


# Field readers: a value of the wrong type makes the frame malformed (``ProtocolError``, the
# caller logs it), so ``null`` never becomes the text "None" nor ``"false"`` a true flag. A
# confidence (or any figure we only report) that is not a finite number reads as 0.0 instead:
# it must not cost the turn.

def _words(data: dict[str, Any]) -> list[dict[str, Any]]:
    words = data.get("words") or []
    if not isinstance(words, list) or not all(isinstance(w, dict) for w in words):
        raise TypeError("words is not a list of objects")
    return words


def _message(data: dict[str, Any], key: str) -> str:
    """An Error or Warning text, whatever its type, as text any UTF-8 output can carry.

    It is logged and shown to live viewers.
    """
    value = data.get(key)
    return "" if value is None else _utf8(value if isinstance(value, str) else str(value))


def _text(data: dict[str, Any], key: str) -> str:
    """A string field, missing or ``null`` read as empty."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key} is {type(value).__name__}, not a string")
    return _utf8(value)


def _utf8(text: str) -> str:
    """Lone surrogates (valid JSON escapes that no UTF-8 file or request can carry) as U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _integer(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value != int(value):
        raise TypeError(f"{key} is {repr(value)[:30]}, not an integer")
    return int(value)


def _count(data: dict[str, Any], key: str) -> int:
    """A non-negative figure the daemon relies on, rounded (``45000.5`` is not a bad frame)."""
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise TypeError(f"{key} is {repr(value)[:30]}, not a count")
    return round(value)


def _flag(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{key} is {repr(value)[:30]}, not true or false")
    return value


def _finite(data: dict[str, Any], key: str) -> float:
    """A number we only report (a confidence, a heartbeat's figures): anything else is 0.0."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def parse_expires_at(value: Any) -> datetime | None:
    """Accept Unix seconds (int/float/numeric string) or an ISO-8601 string."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except ValueError:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    raise ValueError(f"expires_at of unexpected type {type(value).__name__}")


def _preview(frame: str | bytes, limit: int = 80) -> str:
    text = frame if isinstance(frame, str) else frame[:limit].decode("utf-8", "replace")
    return repr(text[:limit])


TERMINATE: Final = json.dumps({"type": "Terminate"})
FORCE_ENDPOINT: Final = json.dumps({"type": "ForceEndpoint"})


def streaming_url(config: AssemblyAIConfig, *, sample_rate: int, token: str) -> str:
    """The socket URL: every setting in the query, ``speech_model`` always explicit."""
    params: dict[str, str | int | float] = {
        "sample_rate": sample_rate,
        "encoding": "pcm_s16le",
        "speech_model": config.speech_model,
        "format_turns": _bool(config.format_turns),
        "end_of_turn_confidence_threshold": config.end_of_turn_confidence_threshold,
        "min_turn_silence": config.min_turn_silence,
        "max_turn_silence": config.max_turn_silence,
    }
    if config.keyterms:
        params["keyterms_prompt"] = json.dumps(config.keyterms)
    if config.language_detection:
        params["language_detection"] = "true"
    params["session_heartbeat"] = "true"   # liveness (daemon.session); older servers ignore it
    params["token"] = token
    parts = urlsplit(config.streaming_url)
    query = urlencode(params)
    if parts.query:
        query = f"{parts.query}&{query}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _bool(value: bool) -> str:
    return "true" if value else "false"


class CloseKind(Enum):
    """What a close (or an ``Error`` frame) means for the reconnect loop."""

    NORMAL = "normal"  # 1000 after Termination
    TRANSIENT = "transient"  # network, 1006, 1011, 3005: back off and reconnect
    AUTH = "auth"  # 1008 and legacy 4001-4003: one retry with a fresh token
    CONFIG = "config"  # 3006: our parameters are wrong, exit 78
    RATE = "rate"  # 3009 and too-many-sessions: long backoff
    EXPIRED = "expired"  # 3008: the session cap was reached, reconnect at once
    CLIENT_BUG = "client_bug"  # 3007: chunk size or pacing; reconnect with backoff, loudly


_CODES: Final = {
    1000: CloseKind.NORMAL,
    1008: CloseKind.AUTH,
    3005: CloseKind.TRANSIENT,
    3006: CloseKind.CONFIG,
    3007: CloseKind.CLIENT_BUG,
    3008: CloseKind.EXPIRED,
    3009: CloseKind.RATE,
    4001: CloseKind.AUTH,
    4002: CloseKind.AUTH,
    4003: CloseKind.AUTH,
    4008: CloseKind.EXPIRED,
    4029: CloseKind.CLIENT_BUG,
    4102: CloseKind.RATE,
}


def classify_close(code: int | None, reason: str = "") -> CloseKind:
    """Classify a close code, reading the reason too (pre-2026 servers used 3005/1008 broadly)."""
    text = reason.lower()
    if "too many concurrent" in text or "rate limit" in text:
        return CloseKind.RATE
    if code == 3005 and "session expired" in text:
        return CloseKind.EXPIRED
    if code == 3005 and ("invalid" in text or "validation" in text):
        return CloseKind.CONFIG
    if code == 3005 and ("input duration" in text or "transmission rate" in text):
        return CloseKind.CLIENT_BUG
    if code is None:
        return CloseKind.TRANSIENT
    return _CODES.get(code, CloseKind.TRANSIENT)
