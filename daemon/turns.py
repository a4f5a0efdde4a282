"""Assembles a session's ``Turn`` messages into exactly one ``TurnRecord`` per ``turn_order``.

With ``format_turns`` the service sends an unformatted final and then a formatted one for the same
turn; the formatted one is the record. If it never comes (the session dies, or a model that does
not send it), the unformatted final is emitted after ``format_wait_s`` or when the session ends,
so no turn is ever lost or doubled.

A turn with words that gets no final at all is delivered once from its last partial, with the
warning ``turn.final_missing``: when ``Termination`` comes (``finish_open``) or when the service
moves on to a newer turn mid-session (it abandoned the older one). A final that comes after that
is a duplicate. A sealed session (rollover) delivers neither: the next session redoes its open
turn from the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import structlog

from daemon.events import PartialTurn, SourceName, TurnRecord, Word
from daemon.ledger import Timeline
from daemon.protocol import Turn

log = structlog.get_logger("daemon.turns")
PRE_SPEECH_MS: Final = 300  # audio kept before an open turn's first word


class TurnAssembler:
    """Per-session turn bookkeeping; calls ``emit`` once per finished turn."""

    def __init__(
        self,
        session_id: str,
        timeline: Timeline,
        *,
        format_turns: bool,
        source: SourceName,
        host: str,
        emit: Callable[[TurnRecord], None],
        partial: Callable[[PartialTurn], None],
        cover: Callable[[int], None],
        format_wait_s: float = 3.0,
    ) -> None:
        self.session_id = session_id
        self._timeline = timeline
        self._format_turns = format_turns
        self._source: SourceName = source
        self._host = host
        self._emit = emit
        self._partial = partial
        self._cover = cover
        self._format_wait_s = format_wait_s
        self._done: set[int] = set()
        self._held: dict[int, tuple[Turn, float]] = {}
        self.open_turn: int | None = None  # turn_order of an unfinished turn with words
        self.emitted = 0
        self._sealed: set[int] | None = None  # after a rollover: the turns still ours
        self._partial_turn: Turn | None = None  # the open turn's latest partial with words

    @property
    def holding(self) -> bool:
        """An ended turn waits for its formatted final."""
        return bool(self._held)

    def seal(self) -> None:
        """Rollover: keep only turns that have ended; the next session redoes the others."""
        self._sealed = self._done | set(self._held)
        self.open_turn = None
        self._partial_turn = None

    def handle(self, turn: Turn) -> None:
        """Process one ``Turn`` message."""
        self.expire()
        if turn.turn_order in self._done:
            return  # a late duplicate: already delivered
        if self._sealed is not None and turn.turn_order not in self._sealed:
            return  # after a rollover the next session transcribes it again
        self._end_older(turn.turn_order)
        if not turn.end_of_turn:
            self._on_partial(turn)
            return
        self._cover_until(turn.words[-1].end if turn.words else None)
        if self.open_turn == turn.turn_order:
            self.open_turn = None
            self._partial_turn = None
        if turn.turn_is_formatted or not self._format_turns:
            self._held.pop(turn.turn_order, None)
            self._finish(turn)
        else:
            self._held[turn.turn_order] = (turn, time.monotonic())

    def expire(self) -> None:
        """Emit unformatted finals whose formatted version did not arrive in time."""
        now = time.monotonic()
        for order, (_turn, since) in list(self._held.items()):
            if now - since >= self._format_wait_s:
                log.info("turn.format_timeout", session_id=self.session_id, turn_order=order)
                self._release(order)

    def flush(self) -> None:
        """The session is over: emit every held final."""
        for order in sorted(self._held):
            self._release(order)

    def finish_open(self) -> None:
        """``Termination`` came without the open turn's final: its last partial is the record.

        The service has ended the session, so no final can follow and no session replays it.
        """
        turn = self._partial_turn
        self._partial_turn = None
        self.open_turn = None
        if turn is not None:
            self._from_partial(turn, "the session ended")

    def _end_older(self, order: int) -> None:
        """A message of turn ``order``: every older turn is over, delivered in turn order.

        A held final is complete; an open turn with words and no final was abandoned by the
        service, and its last partial is all there will be of it.
        """
        partial = self._partial_turn
        abandoned = partial if partial is not None and partial.turn_order < order else None
        if abandoned is not None:
            self._partial_turn = self.open_turn = None
        ended = {o for o in self._held if o < order}
        if abandoned is not None:
            ended.add(abandoned.turn_order)
        for older in sorted(ended):
            if older in self._held:
                self._release(older)     # a held final beats the partial of the same turn
            elif abandoned is not None:
                self._from_partial(abandoned, "a newer turn began")

    def _from_partial(self, turn: Turn, reason: str) -> None:
        """Deliver a turn that got no final from its last partial (with words), once."""
        if turn.turn_order in self._done or turn.turn_order in self._held:
            return
        log.warning("turn.final_missing", session_id=self.session_id, turn_order=turn.turn_order,
                    reason=reason, effect="the turn is delivered from its last partial")
        self._cover_until(turn.words[-1].end)
        self._finish(turn)

    def _release(self, order: int) -> None:
        turn, _since = self._held.pop(order)
        self._finish(turn)

    def _on_partial(self, turn: Turn) -> None:
        if turn.words:
            self.open_turn = turn.turn_order
            self._partial_turn = turn
            self._cover_until(turn.words[0].start - PRE_SPEECH_MS)
        self._partial(PartialTurn(self.session_id, turn.turn_order, turn.transcript, "assemblyai"))

    def _cover_until(self, session_ms: int | None) -> None:
        if session_ms is None:
            return
        located = self._timeline.locate(max(0, session_ms))
        if located is not None:
            self._cover(located[0])

    def _finish(self, turn: Turn) -> None:
        self._done.add(turn.turn_order)
        record = self.record(turn)
        if not record.transcript.strip():
            return  # an empty final carries nothing to deliver
        self.emitted += 1
        self._emit(record)

    def record(self, turn: Turn) -> TurnRecord:
        """Build the SPEC record, with wall-clock times from the session's timeline."""
        if turn.words:
            start_wall = self._wall(turn.words[0].start)
            end_wall = self._wall(turn.words[-1].end)
        else:
            start_wall = end_wall = self._wall(
                self._timeline.sent_samples * 1000 // self._timeline.sample_rate
            )
        words = tuple(
            Word(
                w.text,
                max(0, round((self._wall(w.start) - start_wall) * 1000)),
                max(0, round((self._wall(w.end) - start_wall) * 1000)),
                w.confidence,
            )
            for w in turn.words
        )
        return TurnRecord(
            session_id=self.session_id,
            turn_order=turn.turn_order,
            transcript=turn.transcript,
            started_at=datetime.fromtimestamp(start_wall, UTC),
            ended_at=datetime.fromtimestamp(max(end_wall, start_wall), UTC),
            end_of_turn_confidence=turn.end_of_turn_confidence,
            words=words,
            language_code=turn.language_code,
            engine="assemblyai",
            source=self._source,
            host=self._host,
        )

    def _wall(self, session_ms: int) -> float:
        located = self._timeline.locate(session_ms)
        return located[1] if located is not None else time.time()
