"""The AssemblyAI v3 engine: one websocket session at a time, reconnected forever.

Audio flows source → ``Ledger`` → session. Each connection attempt mints a fresh temporary token.
A session replays the ledger's uncovered audio first (paced so the session's audio never runs ahead
of its elapsed time, skipping silence while behind live), then follows live audio. Close codes are
classified (``protocol.classify_close``): transient problems back off with jitter (the first retry
after a healthy session is immediate), rejected credentials get one retry with a fresh token and
then ``AuthError`` (exit 77), rejected settings raise ``ConfigError`` (exit 78).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Final

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from daemon import __version__
from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.engine import EngineListener
from daemon.errors import AuthError, ConfigError
from daemon.events import AudioChunk, SessionInfo, SessionSummary, SourceName
from daemon.ledger import Ledger, Piece, Timeline, rms
from daemon.protocol import (
    TERMINATE,
    Begin,
    CloseKind,
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
from daemon.tokens import TokenError, TokenProvider
from daemon.turns import TurnAssembler

log = structlog.get_logger("daemon.stream")

HEALTHY_AFTER_S: Final = 5.0  # a session this old counts as healthy: backoff resets
SILENCE_RMS: Final = 200.0  # below this a chunk counts as silence (about -44 dBFS)
CATCH_UP_AFTER_S: Final = 0.5  # skip silence while this far behind live
HANGOVER_MS: Final = 300  # audio kept around speech when skipping silence
COVER_LOOKBACK_MS: Final = 5000  # with no open turn, audio older than this is covered


def backoff(initial: float, maximum: float) -> Iterator[float]:
    """Reconnect delays: immediate first, then exponential with full jitter, capped."""
    yield 0.0
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, maximum)


@dataclass
class Outcome:
    """How a session ended."""

    kind: CloseKind
    reason: str
    began: bool = False
    healthy: bool = False
    finished: bool = False  # Termination received after the input ended


class AssemblyAIEngine:
    """Streams the ledger to AssemblyAI Universal Streaming v3 and reports turns."""

    name: Final = "assemblyai"

    def __init__(
        self,
        config: AssemblyAIConfig,
        reconnect: ReconnectConfig,
        tokens: TokenProvider,
        *,
        sample_rate: int,
        chunk_ms: int,
        source: SourceName,
        host: str,
        delays: Callable[[], Iterator[float]] | None = None,
    ) -> None:
        self._config = config
        self._reconnect = reconnect
        self._tokens = tokens
        self._rate = sample_rate
        self._chunk_samples = sample_rate * chunk_ms // 1000
        self._source: SourceName = source
        self._host = host
        self._delays = delays or (lambda: backoff(reconnect.initial_delay, reconnect.max_delay))
        self.ledger = Ledger(sample_rate, reconnect.backlog_seconds)
        self.reconnects = 0
        self.live = False  # a session is open and audio is flowing

    async def run(self, chunks: AsyncIterator[AudioChunk], listener: EngineListener) -> None:
        """Stream until the input ends and the last session has terminated."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pump(chunks), name="ledger-pump")
            await self._sessions(listener)

    async def _pump(self, chunks: AsyncIterator[AudioChunk]) -> None:
        try:
            async for chunk in chunks:
                self.ledger.append(chunk)
        finally:
            self.ledger.finish()

    def _done(self) -> bool:
        return self.ledger.eof and self.ledger.head >= self.ledger.end

    async def _sessions(self, listener: EngineListener) -> None:
        delays = self._delays()
        auth_failures = 0
        dropped_before = 0
        while not self._done():
            try:
                outcome = await self._session(listener)
            except TokenError as exc:
                if exc.rejected:
                    auth_failures += 1
                    if auth_failures >= 2:
                        raise AuthError(_auth_message(str(exc))) from None
                delay = exc.retry_after if exc.retry_after is not None else next(delays)
                log.warning("stream.token_failed", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            if outcome.finished:
                return
            if outcome.kind is CloseKind.AUTH:
                auth_failures += 1
                if auth_failures >= 2:
                    raise AuthError(_auth_message(outcome.reason))
                log.warning("stream.auth_rejected", reason=outcome.reason, retrying=True)
                continue
            if outcome.began:
                auth_failures = 0
            if outcome.kind is CloseKind.CONFIG:
                raise ConfigError(
                    f"assemblyai: the service rejected our settings: {outcome.reason}"
                )
            if outcome.healthy:
                delays = self._delays()
            if self.ledger.dropped_samples > dropped_before:
                lost = (self.ledger.dropped_samples - dropped_before) / self._rate
                dropped_before = self.ledger.dropped_samples
                log.error(
                    "stream.backlog_dropped",
                    lost_s=round(lost, 3),
                    backlog_seconds=self._reconnect.backlog_seconds,
                )
            delay = self._delay_for(outcome, delays)
            self.reconnects += 1
            log.info(
                "stream.reconnecting",
                kind=outcome.kind.value,
                reason=outcome.reason,
                retry_in_s=round(delay, 2),
                backlog_s=round(self.ledger.seconds_held(), 2),
            )
            await asyncio.sleep(delay)

    def _delay_for(self, outcome: Outcome, delays: Iterator[float]) -> float:
        expired = outcome.kind is CloseKind.EXPIRED
        if expired or (outcome.kind is CloseKind.NORMAL and outcome.began):
            return 0.0
        delay = next(delays)
        if outcome.kind is CloseKind.RATE:
            return max(delay, self._reconnect.max_delay)
        if outcome.kind is CloseKind.CLIENT_BUG:
            log.error("stream.client_rejected", reason=outcome.reason)
        return delay

    async def _session(self, listener: EngineListener) -> Outcome:
        token = await self._tokens.fresh()
        url = streaming_url(self._config, sample_rate=self._rate, token=token)
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                ws = await connect(
                    url,
                    open_timeout=None,
                    close_timeout=2,
                    max_size=2**20,
                    user_agent_header=f"transcribed/{__version__}",
                )
                first = await ws.recv()
        except InvalidStatus as exc:
            status = exc.response.status_code
            kind = CloseKind.AUTH if status in (401, 403) else CloseKind.TRANSIENT
            return Outcome(kind, f"handshake answered HTTP {status}")
        except ConnectionClosed as exc:
            code, reason = _close_of(exc)
            return Outcome(classify_close(code, reason), f"closed before Begin: {code} {reason}")
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return Outcome(CloseKind.TRANSIENT, f"connect failed: {type(exc).__name__}: {exc}")
        try:
            begin = parse_message(first)
        except ProtocolError as exc:
            await ws.close()
            return Outcome(CloseKind.TRANSIENT, f"first frame unreadable: {exc}")
        if isinstance(begin, ServerError):
            await ws.close()
            return Outcome(classify_close(begin.code, begin.message), begin.message)
        if not isinstance(begin, Begin):
            await ws.close()
            return Outcome(CloseKind.TRANSIENT, "first frame was not Begin")
        return await _Session(self, ws, begin, listener).run()


def _close_of(exc: ConnectionClosed) -> tuple[int | None, str]:
    frame = exc.rcvd
    return (frame.code, frame.reason) if frame is not None else (None, "connection lost")


def _auth_message(reason: str) -> str:
    return (
        f"AssemblyAI rejected the credentials twice ({reason}); check assemblyai.api_key "
        "(or api_key_file / the assemblyai_api_key credential)"
    )


class _Session:
    """One websocket session: a paced sender and a message reader."""

    def __init__(
        self, engine: AssemblyAIEngine, ws: ClientConnection, begin: Begin, listener: EngineListener
    ) -> None:
        self.engine = engine
        self.ws = ws
        self.begin = begin
        self.listener = listener
        self.timeline = Timeline(engine._rate)
        self.started = time.monotonic()
        self.error: ServerError | None = None
        self.terminating = False
        self.terminate_sent = 0.0
        self.assembler = TurnAssembler(
            begin.id,
            self.timeline,
            format_turns=engine._config.format_turns,
            source=engine._source,
            host=engine._host,
            emit=listener.turn,
            partial=listener.partial,
            cover=engine.ledger.cover,
        )
        self.log = log.bind(session_id=begin.id)

    async def run(self) -> Outcome:
        self.log.info(
            "session.began",
            expires_at=str(self.begin.expires_at),
            model=self.begin.configuration.get("model"),
            replay_s=round(self.engine.ledger.seconds_held(), 2),
        )
        self.listener.session_started(
            SessionInfo(self.begin.id, "assemblyai", self.begin.expires_at)
        )
        self.engine.live = True
        outcome = Outcome(CloseKind.TRANSIENT, "session ended", began=True)
        try:
            async with asyncio.TaskGroup() as group:
                sender = group.create_task(self._send(), name="session-send")
                outcome = await self._receive()
                sender.cancel()
        finally:
            self.engine.live = False
            self.assembler.flush()
            await self.ws.close()
            self._summarise(outcome)
        outcome.healthy = time.monotonic() - self.started >= HEALTHY_AFTER_S
        return outcome

    async def _send(self) -> None:
        try:
            await self._send_all()
        except ConnectionClosed:
            return  # the reader reports why

    async def _send_all(self) -> None:
        ledger = self.engine.ledger
        position = ledger.head
        while True:
            await ledger.wait_beyond(position)
            piece = self._next_piece(position)
            if piece is None:
                break
            position = piece.end
            if self._skippable(piece):
                continue
            await self._pace()
            await self.ws.send(piece.pcm)
            self.timeline.add(piece)
        self.terminating = True
        self.terminate_sent = time.monotonic()
        await self.ws.send(TERMINATE)

    def _next_piece(self, position: int) -> Piece | None:
        """The next chunk to send: whole chunks, never under 50 ms (merged or padded)."""
        ledger = self.engine.ledger
        piece = ledger.read(position, self.engine._chunk_samples)
        if piece is None:
            return None
        minimum = self.engine._rate // 20
        while piece.samples < minimum:
            more = ledger.read(piece.end, self.engine._chunk_samples - piece.samples)
            if more is None or more.start != piece.end:
                pad = bytes(2 * (minimum - piece.samples))
                return Piece(piece.start, piece.pcm + pad, piece.captured_at)
            piece = Piece(piece.start, piece.pcm + more.pcm, piece.captured_at)
        return piece

    def _skippable(self, piece: Piece) -> bool:
        """While behind live, skip silence that is not within the hangover of speech."""
        ledger = self.engine.ledger
        behind = (ledger.end - piece.end) / ledger.sample_rate
        if behind < CATCH_UP_AFTER_S or self.assembler.open_turn is not None:
            return False
        span = ledger.sample_rate * HANGOVER_MS // 1000
        stop = piece.end + span
        position = max(ledger.head, piece.start - span)
        while position < stop:
            part = ledger.read(position, stop - position)
            if part is None:
                break
            if rms(part.pcm) >= SILENCE_RMS:
                return False
            position = part.end
        return position >= stop

    async def _pace(self) -> None:
        """Never let the session's audio run ahead of its elapsed time."""
        ahead = self.timeline.sent_seconds - (time.monotonic() - self.started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def _receive(self) -> Outcome:
        while True:
            try:
                async with asyncio.timeout(self._recv_timeout()):
                    frame = await self.ws.recv()
            except TimeoutError:
                if self.terminating:
                    self.log.warning(
                        "session.termination_timeout",
                        timeout_s=self.engine._config.terminate_timeout,
                    )
                    return Outcome(CloseKind.NORMAL, "no Termination", began=True, finished=True)
                self._tick()
                continue
            except ConnectionClosed as exc:
                return self._closed(exc)
            outcome = self._handle(frame)
            if outcome is not None:
                return outcome

    def _recv_timeout(self) -> float:
        if self.terminating:
            waited = time.monotonic() - self.terminate_sent
            return max(0.05, self.engine._config.terminate_timeout - waited)
        return 1.0

    def _tick(self) -> None:
        """Once a second without frames: release late finals, forget covered silence."""
        self.assembler.expire()
        if self.assembler.open_turn is None:
            sent_ms = self.timeline.sent_samples * 1000 // self.engine._rate
            located = self.timeline.locate(sent_ms - COVER_LOOKBACK_MS)
            if located is not None and sent_ms > COVER_LOOKBACK_MS:
                self.engine.ledger.cover(located[0])

    def _handle(self, frame: str | bytes) -> Outcome | None:
        try:
            message = parse_message(frame)
        except ProtocolError as exc:
            self.log.warning("session.bad_frame", error=str(exc))
            return None
        if isinstance(message, Turn):
            self.assembler.handle(message)
            if self.assembler.open_turn is None:
                self._tick()
        elif isinstance(message, Termination):
            self.assembler.flush()
            if self.terminating and self.engine.ledger.eof:
                return Outcome(CloseKind.NORMAL, "terminated", began=True, finished=True)
            return Outcome(CloseKind.EXPIRED, "terminated by the service", began=True)
        elif isinstance(message, ServerError):
            self.error = message
            self.log.warning("session.error", code=message.code, error=message.message)
        elif isinstance(message, ServerWarning):
            self.log.warning("session.warning", code=message.code, warning=message.message)
        elif isinstance(message, Unknown):
            self.log.debug("session.message_ignored", type=message.type)
        return None

    def _closed(self, exc: ConnectionClosed) -> Outcome:
        code, reason = _close_of(exc)
        if self.error is not None:
            code = self.error.code if self.error.code is not None else code
            reason = self.error.message or reason
        kind = classify_close(code, reason)
        if kind is CloseKind.NORMAL and not self.terminating:
            kind = CloseKind.TRANSIENT
        return Outcome(kind, f"{code} {reason}".strip(), began=True)

    def _summarise(self, outcome: Outcome) -> None:
        duration = time.monotonic() - self.started
        summary = SessionSummary(
            self.begin.id,
            "assemblyai",
            round(duration, 3),
            round(self.timeline.sent_seconds, 3),
            self.assembler.emitted,
            outcome.reason,
        )
        self.log.info(
            "session.ended",
            duration_s=summary.duration_s,
            audio_s=summary.audio_s,
            turns=summary.turns,
            reconnects=self.engine.reconnects,
            reason=outcome.reason,
        )
        self.listener.session_ended(summary)
