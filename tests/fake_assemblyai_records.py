"""Records, settings and scripted faults of the fake AssemblyAI service (``fake_assemblyai``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from websockets.asyncio.server import ServerConnection

from tests.fake_assemblyai_turns import TurnSettings

CLOSE_REASONS: Final[Mapping[int, str]] = {
    1008: "Unauthorized Connection: Invalid credentials",
    1011: "Internal error while establishing the connection",
    3005: "Session Cancelled: An error occurred",
    3006: "Invalid Message: rejected by the fake",
    3007: "Input duration violation: rejected by the fake",
    3008: "Session Expired: Maximum session duration exceeded",
    3009: "Unauthorized Connection: Too many concurrent sessions",
}
GARBAGE: Final[Mapping[str, str | bytes]] = {
    "non_json": "<<this is not json>>",
    "unknown_type": json.dumps({"type": "FancyNewThing", "payload": 1}),
    "malformed": json.dumps({"type": "Turn", "turn_order": "zero", "words": "none"}),
    "binary": b"\x00\xffnot text",
}


class InputError(Exception):
    """A client input the service rejects with 3006."""


@dataclass(slots=True)
class SessionFault:
    """A fault armed for one session, triggered once the session has received enough audio."""

    kind: Literal["drop", "error", "garbage", "deaf", "stall", "freeze"]
    after_audio_ms: int
    code: int = 3005
    message: str = ""
    payload: str | bytes = ""


@dataclass
class Faults:
    """Scripted failures. Queues (lists) are consumed one entry per request or session.

    Attributes:
        token_status: statuses for the next token requests (e.g. ``[500, 429]``).
        token_retry_after: the ``Retry-After`` of an injected 429 or 503 ("" = none).
        token_raw_body: the body of injected token failures, as text/html (a proxy's page)
            instead of the service's JSON ``{"error": …}``.
        http_status_on_upgrade: HTTP statuses for the next ``/v3/ws`` upgrades (e.g. ``[503]``).
        reject_handshake: close codes (1008, 1011, 3009, …) for the next sessions: the upgrade is
            accepted (and its token consumed), then closed before ``Begin``.
        begin_delay_s: seconds the next accepted sessions wait before sending ``Begin`` (a slow
            service).
        key_revoked: the API key is rejected from now on: 401 on tokens, 1008 on sessions.
        echo_key: a rejected key is quoted back in the 401's error text (as some services do).
        no_termination: ``Terminate`` is recorded but never answered.
        close_without_termination: ``Terminate`` is answered with the last finals and a close
            1000, but no ``Termination`` frame.
        termination_without_finals: ``Terminate`` is answered with ``Termination`` and a close
            1000, but the open turn gets no final (the reference says the service flushes them).
        termination_delay_s: ``Terminate`` is answered this many seconds late (a slow service).
        abandon_turns: in every session, this many turns that end mid-session get no final;
            the next turn follows with the next ``turn_order`` (a service abandoning a turn).
        session_faults: faults for the next sessions that reach ``Begin`` (see the methods).
    """

    token_status: list[int] = field(default_factory=list)
    token_retry_after: str = "1"
    token_raw_body: str | None = None
    http_status_on_upgrade: list[int] = field(default_factory=list)
    reject_handshake: list[int] = field(default_factory=list)
    begin_delay_s: list[float] = field(default_factory=list)
    key_revoked: bool = False
    echo_key: bool = False
    no_termination: bool = False
    close_without_termination: bool = False
    termination_without_finals: bool = False
    termination_delay_s: float = 0.0
    abandon_turns: int = 0
    session_faults: list[SessionFault] = field(default_factory=list)

    def drop_after_audio_ms(self, ms: int) -> None:
        """Next session: abort the TCP connection (no close frame) after ``ms`` of audio."""
        self.session_faults.append(SessionFault("drop", ms))

    def error_after_audio_ms(self, ms: int, code: int = 3005, message: str | None = None) -> None:
        """Next session: send ``Error`` with ``code`` and close with ``code`` after ``ms``."""
        text = message or CLOSE_REASONS.get(code, "Session Cancelled: An error occurred")
        self.session_faults.append(SessionFault("error", ms, code, text))

    def deaf_after_audio_ms(self, ms: int) -> None:
        """Next session: after ``ms`` of audio, read and discard everything (no more turns) and
        never answer ``Terminate`` (a service that stopped working but keeps the socket).
        Heartbeats stop too."""
        self.session_faults.append(SessionFault("deaf", ms))

    def stall_after_audio_ms(self, ms: int) -> None:
        """Next session: after ``ms`` of audio, stop reading the socket (what the client sends
        piles up in buffers) while heartbeats go on, their received audio frozen."""
        self.session_faults.append(SessionFault("stall", ms))

    def freeze_after_audio_ms(self, ms: int) -> None:
        """Next session: after ``ms`` of audio, stop altogether, socket open (a frozen process):
        nothing more is read (what the client sends piles up in buffers, its pings and its
        close go unanswered) and nothing more is sent, heartbeats included."""
        self.session_faults.append(SessionFault("freeze", ms))

    def send_garbage(self, kind: str = "non_json", after_audio_ms: int = 0) -> None:
        """Next session: send one bad frame (``kind`` is a key of ``GARBAGE``).

        Raises:
            ValueError: for an unknown kind.
        """
        if kind not in GARBAGE:
            raise ValueError(
                f"send_garbage: unknown kind {kind!r}, expected one of {list(GARBAGE)}"
            )
        self.session_faults.append(SessionFault("garbage", after_audio_ms, payload=GARBAGE[kind]))


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request to ``/v3/token`` as the fake saw it."""

    headers: dict[str, str]
    params: dict[str, list[str]]
    status: int


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One binary frame: its size, duration and arrival (loop time since ``Begin``)."""

    nbytes: int
    duration_ms: float
    at_s: float


@dataclass(slots=True)
class SessionParams:
    """The parsed connection query parameters."""

    sample_rate: int = 16_000
    encoding: str = "pcm_s16le"
    speech_model: str | None = None
    keyterms_prompt: list[str] | None = None
    session_heartbeat: bool = False
    turns: TurnSettings = field(default_factory=TurnSettings)

    @classmethod
    def parse(cls, query: dict[str, list[str]]) -> SessionParams:
        """Parse and validate the query.

        Raises:
            InputError: naming the bad parameter.
        """
        one = {k: v[-1] for k, v in query.items()}
        params = cls(speech_model=one.get("speech_model"))
        if "sample_rate" in one:
            params.sample_rate = parse_number(one, "sample_rate", int, 8000, 96000)
        params.encoding = one.get("encoding", "pcm_s16le")
        if params.encoding not in ("pcm_s16le", "pcm_mulaw"):
            raise InputError(f"Invalid 'encoding': {params.encoding!r}")
        if "keyterms_prompt" in query:
            params.keyterms_prompt = parse_keyterms_query(query["keyterms_prompt"])
        apply_turn_settings(params.turns, one)
        if "language_detection" in one:
            params.turns.language_detection = parse_bool(one, "language_detection")
        if "session_heartbeat" in one:
            params.session_heartbeat = parse_bool(one, "session_heartbeat")
        return params


def parse_number(
    values: Mapping[str, Any], name: str, kind: type[Any], low: float, high: float
) -> Any:
    """Parse ``values[name]`` with ``kind`` and check it lies in ``low..high``."""
    try:
        value = kind(values[name])
    except (TypeError, ValueError):
        raise InputError(f"Invalid '{name}': {values[name]!r} is not a number") from None
    if not low <= value <= high:
        raise InputError(f"Invalid '{name}': {value} is outside {low}..{high}")
    return value


def parse_bool(values: Mapping[str, Any], name: str) -> bool:
    """Parse a boolean query value: ``true``/``True``/``false``/``False``."""
    value = values[name]
    if isinstance(value, bool):
        return value
    if value in ("true", "True", "false", "False"):
        return value in ("true", "True")
    raise InputError(f"Invalid '{name}': {value!r} is not true or false")


def parse_keyterms(value: Any) -> list[str]:
    """Validate a decoded keyterms list (≤100 strings)."""
    if (
        not isinstance(value, list)
        or not all(isinstance(t, str) for t in value)
        or len(value) > 100
    ):
        raise InputError("Invalid 'keyterms_prompt': Value error, Invalid JSON array")
    return list(value)


def parse_keyterms_query(values: list[str]) -> list[str]:
    """Decode ``keyterms_prompt`` from the query: exactly one JSON array parameter."""
    if len(values) != 1:
        raise InputError("Invalid 'keyterms_prompt': Value error, Invalid JSON array")
    try:
        return parse_keyterms(json.loads(values[0]))
    except json.JSONDecodeError:
        raise InputError("Invalid 'keyterms_prompt': Value error, Invalid JSON array") from None


def apply_turn_settings(turns: TurnSettings, values: Mapping[str, Any]) -> None:
    """Apply turn-detection settings from a query or an ``UpdateConfiguration`` message."""
    if "format_turns" in values:
        turns.format_turns = parse_bool(values, "format_turns")
    if "end_of_turn_confidence_threshold" in values:
        name = "end_of_turn_confidence_threshold"
        turns.end_of_turn_confidence_threshold = parse_number(values, name, float, 0.0, 1.0)
    for old, new in (("min_end_of_turn_silence_when_confident", "min_turn_silence"),):
        if old in values and new not in values:
            values = {**values, new: values[old]}
    if "min_turn_silence" in values:
        turns.min_turn_silence = parse_number(values, "min_turn_silence", int, 0, 60_000)
    if "max_turn_silence" in values:
        turns.max_turn_silence = parse_number(values, "max_turn_silence", int, 0, 60_000)


@dataclass(eq=False)
class SessionRecord:
    """Everything one WebSocket session did (one per accepted upgrade, including rejected ones)."""

    index: int
    path: str
    headers: dict[str, str]
    query: dict[str, list[str]]
    _changed: asyncio.Condition = field(repr=False)
    params: SessionParams | None = None
    auth: str = ""
    id: str = ""
    expires_at: int | str | None = None
    began_at: float | None = None
    frames: list[FrameRecord] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    texts: list[str] = field(default_factory=list)
    sent: list[Any] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_by: Literal["", "server", "client", "abort"] = ""
    closed: bool = False
    _connection: ServerConnection | None = field(default=None, repr=False)

    @property
    def audio_ms(self) -> float:
        """Duration of the audio received, in milliseconds (by the session's encoding)."""
        return sum(f.duration_ms for f in self.frames)

    def messages(self, kind: str) -> list[dict[str, Any]]:
        """The JSON messages of one ``type`` that the fake sent, in order."""
        return [m for m in self.sent if isinstance(m, dict) and m.get("type") == kind]

    def finals(self, *, formatted: bool | None = None) -> list[dict[str, Any]]:
        """End-of-turn ``Turn`` messages; by default the formatted ones if ``format_turns``."""
        if formatted is None:
            formatted = bool(self.params and self.params.turns.format_turns)
        turns = self.messages("Turn")
        return [t for t in turns if t["end_of_turn"] and t["turn_is_formatted"] == formatted]

    async def wait_for(self, predicate: Callable[[SessionRecord], bool]) -> None:
        """Wait until ``predicate(self)`` holds (callers bound it with ``asyncio.timeout``)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_begun(self) -> None:
        """Wait until ``Begin`` was sent (or the session closed without it)."""
        await self.wait_for(lambda s: bool(s.id) or s.closed)

    async def wait_closed(self) -> None:
        """Wait until the session is over, however it ended."""
        await self.wait_for(lambda s: s.closed)

    def abort(self) -> None:
        """Drop the TCP connection now, without a close frame."""
        if self._connection is not None and self._connection.transport is not None:
            self.closed_by = self.closed_by or "abort"
            self._connection.transport.abort()
