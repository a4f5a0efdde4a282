"""The Universal Streaming v3 wire format: URL building, typed server messages, close codes.

Parsing is tolerant of the old and new forms the service has used (``expires_at`` as an int or an
ISO string, untyped ``{"error": …}`` frames, ``Termination`` figures as floats, a UTF-8 BOM).
Unknown message types parse to ``Unknown`` and are ignored by the caller; frames that are not what
they claim raise ``ProtocolError`` (logged by the caller, never fatal). A value that is only out
of range (a confidence of 5, a word that ends before it starts, a Termination figure in words) is
repaired instead, so the turn or the end is kept, and the frame gets one warning line,
``protocol.values_repaired``, naming its type and each field. No other I/O here.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import structlog

from daemon import wirefields as field
from daemon.config import AssemblyAIConfig

log = structlog.get_logger("daemon.protocol")


class ProtocolError(ValueError):
    """A server frame that cannot be understood; ``frame`` is its start when that is the clue.

    The start is kept out of the message: it may be transcript text, which a log line carries
    only as a field ``log.transcripts = false`` hides.
    """

    def __init__(self, message: str, frame: str = "") -> None:
        super().__init__(message)
        self.frame = frame


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


class RepairLog:
    """Says ``protocol.values_repaired``: once per kind of repair a minute, within a session.

    A service that sends the same odd value in every partial would otherwise log a line for
    each, several a second; the next line counts the frames repaired alike in between.
    """

    EVERY_S: Final = 60.0

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}   # kind of repair -> (logged at, since)

    def note(self, kind: object, message: Message, repairs: list[str]) -> None:
        """Log ``repairs`` of ``message`` unless the same kind was logged within a minute."""
        fields = sorted({_INDEX.sub("[]", problem.split(" ", 1)[0]) for problem in repairs})
        key = f"{kind}|{','.join(fields)}"
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.EVERY_S:
            self._last[key] = (last[0], last[1] + 1)
            return
        self._last[key] = (now, 0)
        more = {"alike_since": last[1]} if last is not None and last[1] else {}
        turn = {"turn_order": message.turn_order} if isinstance(message, Turn) else {}
        log.warning("protocol.values_repaired", type=kind, **turn, problems=repairs, **more,
                    effect="the message is used with these values")


_INDEX: Final = re.compile(r"\[\d+\]")


def parse_message(frame: str | bytes, repairs_to: RepairLog | None = None) -> Message:
    """Parse one server frame; values it repairs are logged through ``repairs_to``.

    Raises:
        ProtocolError: the frame is not JSON, not an object, or a known type with bad fields.
    """
    data = _json(frame)
    kind = data.get("type")
    repairs: list[str] = []
    try:
        message = _typed(kind, data, repairs)
    except KeyError as exc:
        raise ProtocolError(f"malformed {kind} frame: {exc.args[0]} is missing") from None
    except (TypeError, ValueError, OverflowError) as exc:   # 1e400 is inf to JSON
        raise ProtocolError(f"malformed {kind} frame ({type(exc).__name__}: {exc})") from None
    if message is None:
        if kind is None:
            raise ProtocolError("frame without a type", field.preview(frame))
        raise ProtocolError(f"type is {repr(kind)[:40]}, not a string", field.preview(frame))
    if repairs:
        (repairs_to or RepairLog()).note(kind, message, repairs)
    return message


def _json(frame: str | bytes) -> dict[str, Any]:
    """The frame's JSON object; a UTF-8 BOM before it is allowed (RFC 8259 §8.1)."""
    if isinstance(frame, str):
        frame = frame.removeprefix("\ufeff")
    try:
        data = json.loads(frame)            # bytes: a BOM is skipped by the json module
    except (ValueError, UnicodeDecodeError, RecursionError):    # RecursionError: [[[[…
        raise ProtocolError("not JSON", field.preview(frame)) from None
    if not isinstance(data, dict):
        raise ProtocolError("not a JSON object", field.preview(frame))
    return data


def _typed(kind: object, data: dict[str, Any], repairs: list[str]) -> Message | None:
    """The message of a frame by its ``type``; None when the type is not a string."""
    if kind == "Turn":
        return _turn(data, repairs)
    if kind == "Begin":
        return _begin(data)
    if kind == "Termination":               # only reported: odd figures must not cost the end
        return Termination(field.figure(data, "audio_duration_seconds", repairs),
                           field.figure(data, "session_duration_seconds", repairs))
    if kind == "Error" or (kind is None and "error" in data):
        return ServerError(field.code(data, "error_code", "error", repairs),
                           field.message(data, "error"))
    if kind == "Heartbeat":
        return _heartbeat(data, repairs)
    if kind == "Warning":
        return ServerWarning(field.code(data, "warning_code", "warning", repairs,
                                        range(-2**63, 2**63)), field.message(data, "warning"))
    return Unknown(kind) if isinstance(kind, str) else None


def _heartbeat(data: dict[str, Any], repairs: list[str]) -> Heartbeat:
    """``daemon.liveness`` times the service by ``total_duration_ms``: it must be plausible."""
    duration = field.figure(data, "total_duration_ms", repairs)
    if duration > MAX_SESSION_MS:
        repairs.append(f"total_duration_ms {duration:.6g} is beyond any session: read as 0")
        duration = 0.0
    return Heartbeat(field.count(data, "total_audio_received_ms"), duration,
                     field.figure(data, "realtime_factor", repairs),
                     field.confidence(data, "max_speech_probability", repairs))


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
MAX_SESSION_MS: Final = 86_400_000      # a day: sessions last 3 h at most (reference §5.2)


def _turn(data: dict[str, Any], repairs: list[str]) -> Turn:
    words = tuple(_word(w, f"words[{i}]", repairs) for i, w in enumerate(field.words(data)))
    # a transcript missing (or null) while the words are there: the words say what was said
    transcript = field.text(data, "transcript") or " ".join(w.text for w in words if w.text)
    return Turn(
        turn_order=field.integer(data, "turn_order"),
        end_of_turn=field.flag(data, "end_of_turn", False),
        turn_is_formatted=field.flag(data, "turn_is_formatted", False),
        transcript=transcript,
        end_of_turn_confidence=field.confidence(data, "end_of_turn_confidence", repairs),
        words=words,
        language_code=field.text(data, "language_code") or None,
    )


def _word(data: dict[str, Any], where: str, repairs: list[str]) -> WireWord:
    """One word; a word that ends before it starts ends where it starts (no negative length)."""
    try:
        start, end = field.integer(data, "start"), field.integer(data, "end")
        word = WireWord(field.text(data, "text"), start, end,
                        field.confidence(data, "confidence", repairs, where),
                        field.flag(data, "word_is_final", True))
    except KeyError as exc:
        raise KeyError(f"{where}.{exc.args[0]}") from None
    except TypeError as exc:
        raise TypeError(f"{where}.{exc}") from None
    if end < start:
        repairs.append(f"{where}.end {field.shown(end)} is before its start {field.shown(start)}: "
                       f"read as {field.shown(start)}")
        word = WireWord(word.text, start, start, word.confidence, word.word_is_final)
    return word


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
