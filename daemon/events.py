"""Plain, frozen event types that cross module boundaries. No I/O here.

``TurnRecord`` is the product's contract (SPEC "The turn record"): every sink receives it and the
file sink writes ``to_json()`` as one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

EngineName = Literal["assemblyai", "local"]
SourceName = Literal["microphone", "file", "test"]


def iso_utc(moment: datetime) -> str:
    """Format a UTC datetime as ``2026-11-23T23:10:01.120Z`` (millisecond precision)."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso_utc(text: str) -> datetime:
    """Parse the output of :func:`iso_utc` (or any ISO-8601 timestamp) into an aware datetime."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Word:
    """One recognised word; times are milliseconds relative to the turn's ``started_at``."""

    text: str
    start_ms: int
    end_ms: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """Return the SPEC's JSON form."""
        return {
            "text": self.text,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "confidence": self.confidence,
        }


def json_line(value: Any) -> str:
    """``value`` as one compact JSON line (no trailing newline).

    UTF-8 as is, but U+2028 and U+2029 escaped: valid raw in JSON, they end a line for
    ``str.splitlines`` and JavaScript, and a JSONL reader must not see a break there. A lone
    surrogate (it has no UTF-8 form) is written as its JSON escape sequence, so the line
    can always be encoded and reads back as the same text.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:      # only inside strings: backslashreplace is the JSON escape
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """A finished turn: what every sink receives, exactly once per turn."""

    session_id: str
    turn_order: int
    transcript: str
    started_at: datetime
    ended_at: datetime
    end_of_turn_confidence: float
    words: tuple[Word, ...]
    language_code: str | None
    engine: EngineName
    source: SourceName
    host: str

    @property
    def id(self) -> str:
        """Stable identity of the turn (``<session_id>:<turn_order>``); receivers dedupe on it."""
        return f"{self.session_id}:{self.turn_order}"

    def to_dict(self) -> dict[str, Any]:
        """Return the SPEC's JSON form, keys in the documented order."""
        return {
            "id": self.id,
            "session_id": self.session_id,
            "turn_order": self.turn_order,
            "transcript": self.transcript,
            "started_at": iso_utc(self.started_at),
            "ended_at": iso_utc(self.ended_at),
            "end_of_turn_confidence": self.end_of_turn_confidence,
            "words": [w.to_dict() for w in self.words],
            "language_code": self.language_code,
            "engine": self.engine,
            "source": self.source,
            "host": self.host,
        }

    def to_json(self) -> str:
        """Return the record as one compact JSON line (no trailing newline): ``json_line``."""
        return json_line(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnRecord:
        """Rebuild a record from :meth:`to_dict` output (used by durable queues)."""
        return cls(
            session_id=str(data["session_id"]),
            turn_order=int(data["turn_order"]),
            transcript=str(data["transcript"]),
            started_at=parse_iso_utc(data["started_at"]),
            ended_at=parse_iso_utc(data["ended_at"]),
            end_of_turn_confidence=float(data["end_of_turn_confidence"]),
            words=tuple(
                Word(str(w["text"]), int(w["start_ms"]), int(w["end_ms"]), float(w["confidence"]))
                for w in data.get("words", [])
            ),
            language_code=data.get("language_code"),
            engine=data["engine"],
            source=data["source"],
            host=str(data["host"]),
        )


@dataclass(frozen=True, slots=True)
class PartialTurn:
    """An unfinished turn's text so far: for live views only, never for durable sinks."""

    session_id: str
    turn_order: int
    transcript: str
    engine: EngineName

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready form."""
        return {
            "session_id": self.session_id,
            "turn_order": self.turn_order,
            "transcript": self.transcript,
            "engine": self.engine,
        }


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """``pcm`` is 16-bit little-endian mono at the configured rate.

    ``captured_at`` is the wall-clock time (POSIX seconds) of the chunk's first sample; it is
    what turns word offsets back into wall-clock times across sessions and replays.
    """

    pcm: bytes
    captured_at: float
    sample_rate: int = 16000

    @property
    def duration(self) -> float:
        """Length of the chunk in seconds."""
        return len(self.pcm) / 2 / self.sample_rate

    @property
    def duration_ms(self) -> int:
        """Length of the chunk in whole milliseconds."""
        return len(self.pcm) * 1000 // (2 * self.sample_rate)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A transcription session that has begun (cloud ``Begin`` or local engine start)."""

    session_id: str
    engine: EngineName
    expires_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A session that has ended, with the figures of its one summary log line."""

    session_id: str
    engine: EngineName
    duration_s: float
    audio_s: float
    turns: int
    reason: str
