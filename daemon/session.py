"""One v3 websocket session: a paced audio sender and a message reader.

The sender replays the ledger from a start position, then follows live audio. It never lets the
session's audio run ahead of the time since its first send (the service closes 3007 otherwise),
and while it is behind live it skips silence outside a hangover around speech, to catch up.

``switch_over`` ends a session for a rollover: at a turn boundary (no open turn, silence) or at a
hard deadline, the sender stops and sends ``Terminate``; finals of turns that had not ended by
then are discarded, because the next session replays their audio from the ledger's head.

A replay session (``stop`` set, see ``daemon.catchup``) sends the ledger only up to ``stop``,
then terminates; its Termination means that range is done.

The reader covers the ledger as turns finish, and silence once it is old enough (``_tick``).
A service that sends heartbeats (asked for in the URL) says how much audio it has received:
silence is covered only up to that; one that falls silent or stops reading (``daemon.liveness``)
ends the session as one that never answered (its speech is replayed).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import structlog
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from daemon.engine import EngineListener
from daemon.events import SessionInfo, SessionSummary, iso_utc
from daemon.ledger import Piece, Timeline
from daemon.liveness import Liveness
from daemon.outcome import Outcome, close_of
from daemon.pieces import SILENCE_RMS, next_piece, silent_around, silent_boundary
from daemon.protocol import (
    TERMINATE,
    Begin,
    CloseKind,
    Heartbeat,
    ProtocolError,
    RepairLog,
    ServerError,
    ServerWarning,
    Termination,
    Turn,
    Unknown,
    classify_close,
    parse_message,
)
from daemon.turns import TurnAssembler

if TYPE_CHECKING:
    from daemon.stream import AssemblyAIEngine

log = structlog.get_logger("daemon.session")

HEALTHY_AFTER_S: Final = 5.0        # a session this old counts as healthy: backoff resets
CATCH_UP_AFTER_S: Final = 0.4      # skip silence while this far behind live (>= hangover)
LIVE_S: Final = 0.5                 # this close to live counts as caught up
COVER_LOOKBACK_MS: Final = 5000     # with no open turn, audio older than this is covered
PACE_AHEAD_S: Final = 0.15          # audio the service may hold beyond real time (it allows 0.3 s)


def _cover_of(session: StreamSession) -> Callable[[int], None]:
    """``session._cover`` for its assembler, without a reference cycle between the two.

    With the bound method, an ended session (its timeline: MBs for a 3-hour session) lived on
    as cyclic garbage until the next full collection, which a steady daemon makes rarely.
    """
    ref = weakref.ref(session)

    def cover(position: int) -> None:
        alive = ref()
        if alive is not None:
            alive._cover(position)
    return cover


class StreamSession:
    """One websocket session, from ``Begin`` to close."""

    def __init__(self, engine: AssemblyAIEngine, ws: ClientConnection, begin: Begin,
                 listener: EngineListener, *, stop: int | None = None) -> None:
        self.engine = engine
        self.stop = stop                    # a replay session ends here (see daemon.catchup)
        self.ws = ws
        self.begin = begin
        self.listener = listener
        self.timeline = Timeline(engine.sample_rate)
        self.began_at = time.monotonic()
        self.began_wall = time.time()
        self.error: ServerError | None = None
        self.terminating = False
        self.terminate_sent = 0.0
        self.rolled_over = False
        self._first_send: float | None = None
        self._switch_deadline: float | None = None
        self._switched = asyncio.Event()
        self._skipped = 0
        self._min_samples = engine.sample_rate // 20   # the shortest frame it takes: 50 ms
        self.liveness = Liveness()
        self.repairs = RepairLog()          # odd values: one line per kind a minute
        self.assembler = TurnAssembler(
            begin.id, self.timeline, format_turns=engine.config.format_turns,
            source=engine.source, host=engine.host, emit=listener.turn,
            partial=listener.partial, cover=_cover_of(self),
        )
        self.lane = "live" if stop is None else "replay"
        self.log = log.bind(session_id=begin.id)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, start: int) -> Outcome:
        """Stream from ledger position ``start`` until the session ends; return how it ended."""
        ledger = self.engine.ledger
        behind = (ledger.end - start) / ledger.sample_rate
        if self.begin.unreadable_expiry is not None:
            self.log.warning("session.expiry_unreadable", expires_at=self.begin.unreadable_expiry,
                             effect="no rollover before it; the service's close is handled")
        expires = self.begin.expires_at
        if expires is not None and expires.timestamp() <= self.began_wall:
            self.log.warning("session.expiry_past", expires_at=iso_utc(expires),
                             effect="no rollover is planned before it; the service's close "
                                    "is handled")
        self.log.info("session.began", expires_at=iso_utc(expires) if expires else None,
                      model=self.begin.configuration.get("model"), behind_live_s=round(behind, 2),
                      lane=self.lane)
        self.listener.session_started(SessionInfo(self.begin.id, "assemblyai",
                                                  self.begin.expires_at))
        outcome = Outcome(CloseKind.TRANSIENT, "session ended", began=True)
        self.liveness.restart()             # a rollover's next session waited unread until now
        try:
            async with asyncio.TaskGroup() as group:
                sender = group.create_task(self._send(start), name="session-send")
                outcome = await self._receive()
                sender.cancel()
        finally:
            self._switched.set()
            self.assembler.flush()
            await self.ws.close()
            self._summarise(outcome)
        outcome.healthy = not outcome.unanswered \
            and time.monotonic() - self.began_at >= HEALTHY_AFTER_S
        return outcome

    async def switch_over(self, deadline: float) -> None:
        """Stop sending at the next turn boundary (or at ``deadline``) and ``Terminate``."""
        self._switch_deadline = deadline
        await self._switched.wait()

    async def abandon(self) -> None:
        """Close a session that was opened but is not needed after all."""
        await self.ws.close()

    def _cover(self, position: int) -> None:
        if not self.rolled_over:            # the next session owns the ledger after a switch
            self.engine.cover(position, replay=self.stop is not None)

    # -- sending ----------------------------------------------------------------------------

    async def _send(self, start: int) -> None:
        self.engine.senders += 1
        try:
            await self._send_from(start)
            self.terminating = True
            self.terminate_sent = time.monotonic()
            await self.ws.send(TERMINATE)
        except ConnectionClosed:
            return                              # the reader reports why
        finally:
            self.engine.senders -= 1
            self._switched.set()

    async def _send_from(self, position: int) -> None:
        ledger = self.engine.ledger
        live = int(LIVE_S * ledger.sample_rate)
        catching_up = ledger.end - position >= live
        while True:
            if self.stop is not None and position >= self.stop:
                return                          # a replay session's range is sent
            await ledger.wait_beyond(position)
            piece = self._next_piece(position)
            while piece is not None and piece.samples < self._min_samples:
                await ledger.wait_beyond(piece.end)     # the newest audio: wait for the next
                piece = self._next_piece(position, ledger.sample_rate)   # chunk, take it all
            if piece is None:
                return                          # the input ended and everything is sent
            if self._should_switch(piece):
                self.rolled_over = True
                self.assembler.seal()
                self.log.info("session.switched", at_boundary=self._is_boundary(piece))
                return
            position = piece.end
            if self._skippable(piece):
                self._skipped += piece.samples
                self.engine.skipped(piece.samples, replay=self.stop is not None)
                continue
            await self._pace(piece.samples / ledger.sample_rate)
            await self.ws.send(piece.pcm)
            self.timeline.add(piece)
            if catching_up and self.stop is None and ledger.end - position < live:
                catching_up = False
                self._report_caught_up()

    def _report_caught_up(self) -> None:
        assert self._first_send is not None
        self.log.info("stream.caught_up", catch_up_s=round(time.monotonic() - self._first_send, 2),
                      silence_skipped_s=round(self._skipped / self.engine.sample_rate, 2))

    def _next_piece(self, position: int, merged: int = 0) -> Piece | None:
        """The next chunk to send (``daemon.pieces.next_piece``), never under 50 ms."""
        return next_piece(self.engine.ledger, position, chunk=self.engine.chunk_samples,
                          minimum=self._min_samples, stop=self.stop, merged=merged)

    def _should_switch(self, piece: Piece) -> bool:
        if self._switch_deadline is None:
            return False
        return time.monotonic() >= self._switch_deadline or self._is_boundary(piece)

    def _is_boundary(self, piece: Piece) -> bool:
        """No turn is open and both the last sent and the next chunk are silent."""
        if self.assembler.open_turn is not None or self.assembler.holding:
            return False
        return silent_boundary(self.engine.ledger, piece)

    def _skippable(self, piece: Piece) -> bool:
        """While behind live, skip silence that is not within the hangover of speech."""
        ledger = self.engine.ledger
        behind = (ledger.end - piece.end) / ledger.sample_rate
        if behind < CATCH_UP_AFTER_S or self.assembler.open_turn is not None:
            return False
        return silent_around(ledger, piece)

    async def _pace(self, seconds: float) -> None:
        """Send ``seconds`` of audio only when the service will not hear it ahead of real time.

        The service counts the audio it received against the time since the session began and
        closes 3007 beyond 0.3 s (protocol reference §5): with this piece counted, the session
        may be at most ``PACE_AHEAD_S`` ahead of the time since ``Begin`` (which the service
        sent a little before we read it). Live 100 ms chunks never wait (a sleep per chunk was a
        second wake-up, about a third of the steady CPU: bench/cloud.py); a replay, or a chunk
        longer than the tolerance, waits until the rule holds.
        """
        now = time.monotonic()
        if self._first_send is None:
            self._first_send = now
        ahead = self.timeline.sent_seconds + seconds - (now - self.began_at)
        if ahead > PACE_AHEAD_S:
            await asyncio.sleep(ahead - PACE_AHEAD_S)

    # -- receiving --------------------------------------------------------------------------

    async def _receive(self) -> Outcome:
        while True:
            try:
                async with asyncio.timeout(self._recv_timeout()):
                    frame = await self.ws.recv()
            except TimeoutError:
                if self._termination_overdue():
                    self.log.warning("session.termination_timeout",
                                     timeout_s=self.engine.config.terminate_timeout)
                    return self._without_termination("no Termination")
                if self.terminating:        # the idle timer of a wait begun before Terminate
                    continue                # went out: wait on for Termination
                if (silent := self.liveness.silent()) is not None:
                    return self._gone("session.service_silent", f"silent for {silent:.0f} s",
                                      silent_s=round(silent, 1))
                self._tick()
                continue
            except ConnectionClosed as exc:
                return self._closed(exc)
            self.liveness.frame()
            outcome = self._handle(frame)
            if outcome is not None:
                return outcome

    def _termination_left(self) -> float:
        """Seconds left to wait for ``Termination`` (after ``Terminate`` was sent)."""
        return self.engine.config.terminate_timeout - (time.monotonic() - self.terminate_sent)

    def _termination_overdue(self) -> bool:
        return self.terminating and self._termination_left() <= 0

    def _recv_timeout(self) -> float:
        return max(0.05, self._termination_left()) if self.terminating else 1.0

    def _tick(self) -> None:
        """Once a second without frames: release late finals, forget covered silence.

        With no turn open, audio more than ``COVER_LOOKBACK_MS`` before the end of what the
        service has is covered: the service says nothing about audio without words. What it has
        is what was sent, or, once it sends heartbeats, what the last one says it received (so
        what a service that stopped reading never got is never covered).
        """
        self.assembler.expire()
        if self.assembler.open_turn is None:
            has_ms = self.timeline.sent_samples * 1000 // self.engine.sample_rate
            if self.liveness.received_ms is not None:
                has_ms = min(has_ms, self.liveness.received_ms)
            located = self.timeline.locate(has_ms - COVER_LOOKBACK_MS)
            if located is not None and has_ms > COVER_LOOKBACK_MS:
                self._cover(located[0])

    def _beat(self, beat: Heartbeat) -> Outcome | None:
        missing = self.liveness.beat(beat, self.timeline.sent_seconds)
        if missing is None:
            return None
        return self._gone("session.service_behind", f"{missing:.0f} s behind the audio sent",
                          behind_s=round(missing, 1))

    def _gone(self, event: str, reason: str, **fields: float) -> Outcome:
        """The service stopped answering, socket open: end the session, replay what it missed."""
        self.log.warning(event, **fields,
                         received_s=round((self.liveness.received_ms or 0) / 1000, 1),
                         sent_s=round(self.timeline.sent_seconds, 1))
        return self._without_termination(f"service {reason}")

    def _handle(self, frame: str | bytes) -> Outcome | None:
        try:
            message = parse_message(frame, self.repairs)
        except ProtocolError as exc:
            shown = {"frame": exc.frame} if exc.frame else {}   # hidden with the transcripts
            self.log.warning("session.bad_frame", error=str(exc), **shown)
            return None
        if isinstance(message, Turn):
            self.assembler.handle(message)
            if self.assembler.open_turn is None:
                self._tick()
        elif isinstance(message, Heartbeat):
            return self._beat(message)
        elif isinstance(message, Termination):
            self.assembler.flush()
            if self.terminating:
                self.assembler.finish_open()
                return self._terminated("terminated")
            return Outcome(CloseKind.EXPIRED, "terminated by the service", began=True)
        elif isinstance(message, ServerError):
            self.error = message
            self.log.warning("session.error", code=message.code, error=message.message)
        elif isinstance(message, ServerWarning):
            self.log.warning("session.warning", code=message.code, warning=message.message)
        elif isinstance(message, Unknown):
            self.log.debug("session.message_ignored", type=message.type)
        elif isinstance(message, Begin):        # a session has one, its first frame: ours goes on
            self.log.warning("session.unexpected_begin", new_id=message.id,
                             effect="ignored; the session goes on")
        return None

    def _terminated(self, reason: str) -> Outcome:
        if self.rolled_over:
            return Outcome(CloseKind.NORMAL, "rolled over", began=True)
        done = self.stop is not None or self.engine.ledger.eof
        return Outcome(CloseKind.NORMAL, reason, began=True, finished=done)

    def _closed(self, exc: ConnectionClosed) -> Outcome:
        close = close_of(exc)
        code, reason, kind, text = close.code, close.reason, close.kind, str(close)
        if self.error is not None:
            code = self.error.code if self.error.code is not None else code
            reason = self.error.message or reason
            kind, text = classify_close(code, reason), f"{code} {reason}".strip()
        if kind is CloseKind.NORMAL and self.terminating:     # closed after Terminate, but
            self.log.warning("session.closed_without_termination", code=code, reason=reason)
            return self._without_termination(text)              # no Termination
        if kind is CloseKind.NORMAL:
            kind = CloseKind.TRANSIENT
        return Outcome(kind, text, began=True)

    def _without_termination(self, reason: str) -> Outcome:
        """``Terminate`` went out and ``Termination`` never came: did the service hear it all?

        Speech that no finished turn covers (a service that stopped reading, or closed before
        its last finals) is replayed by the next session, after the usual backoff; trailing
        silence is not worth a session. Held finals are released first: what they cover is
        not replayed (it would be delivered twice).
        """
        self.assembler.flush()
        speech_s = 0.0 if self.rolled_over else self.engine.ledger.held_speech_s(
            self.engine.chunk_samples, SILENCE_RMS, self.stop)
        if speech_s:
            self.log.warning("session.replaying_unanswered", speech_s=round(speech_s, 2))
            return Outcome(CloseKind.TRANSIENT, f"{reason}; {speech_s:.1f} s of speech unanswered",
                           began=True, unanswered=True)   # not healthy: the backoff grows
        return self._terminated(reason)

    def _summarise(self, outcome: Outcome) -> None:
        duration = time.monotonic() - self.began_at
        summary = SessionSummary(self.begin.id, "assemblyai", round(duration, 3),
                                 round(self.timeline.sent_seconds, 3), self.assembler.emitted,
                                 outcome.reason)
        self.log.info("session.ended", duration_s=summary.duration_s, audio_s=summary.audio_s,
                      turns=summary.turns, reconnects=self.engine.reconnects,
                      reason=outcome.reason, lane=self.lane,
                      silence_skipped_s=round(self._skipped / self.engine.sample_rate, 2))
        self.listener.session_ended(summary)
