"""Parallel catch-up: after an outage, a live session and a replay session run side by side.

A session is paced to real time, so one session replaying a long backlog of continuous speech
stays behind live for about as long as the backlog. Instead, when a (re)connect finds the stream
at least ``SPLIT_AFTER_S`` behind live, the backlog is split at a silence ``split`` close to
live: the *live* session starts there and follows live audio, and a *replay* session sends the
older part ``[ledger head, split)`` at real time, then terminates. Both are paced on their own.

While the replay runs, the live session's finished turns are held (``HoldingListener``) and its
ledger covers are only noted (``CatchUp.cover_live``), because ``Ledger.cover`` drops everything
before a position, including audio the replay has not sent yet. When the replay ends, the
ledger is covered up to the split and then to the live session's last cover, and the held
records are released in order, so sinks still receive every turn once, chronologically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from daemon.engine import EngineListener
from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.ledger import Ledger, rms

SPLIT_AFTER_S: Final = 3.0        # a (re)connect this far behind live splits the backlog
MIN_REPLAY_S: Final = 1.0         # the replayed part is at least this long


def find_split(ledger: Ledger, silence_rms: float) -> int | None:
    """A silence boundary in the backlog, searched back from live; None in continuous speech.

    Prefers the newest chunk that is silent with silent chunks on both sides (its start), then
    the newest with a silent predecessor (its start), then the middle of any silent chunk. The
    replayed part before it is at least ``MIN_REPLAY_S`` long.
    """
    pieces = ledger.pieces()
    lowest = ledger.head + int(MIN_REPLAY_S * ledger.sample_rate)
    silent = [rms(piece.pcm) < silence_rms for piece in pieces]
    paired: int | None = None
    single: int | None = None
    for index in range(len(pieces) - 1, 0, -1):
        piece = pieces[index]
        if piece.start < lowest:
            break
        if not silent[index]:
            continue
        if silent[index - 1]:
            if index + 1 < len(pieces) and silent[index + 1]:
                return piece.start
            paired = piece.start if paired is None else paired
        elif single is None:
            single = piece.start + piece.samples // 2
    return paired if paired is not None else single


@dataclass
class CatchUp:
    """The state of one parallel catch-up, from the split until the replay has finished."""

    split: int                        # ledger position where the live session starts
    head: int                         # ledger head when the catch-up began
    end: int                          # ledger end (live) when it began
    sample_rate: int
    started: float = field(default_factory=time.monotonic)
    pending_cover: int = 0            # the live session's newest cover, applied at the end
    held: list[TurnRecord] = field(default_factory=list)
    skipped_samples: int = 0          # silence the replay sessions skipped

    @property
    def replay_s(self) -> float:
        """Seconds of audio the replay covers."""
        return (self.split - self.head) / self.sample_rate

    @property
    def live_behind_s(self) -> float:
        """How far behind live the live session started."""
        return (self.end - self.split) / self.sample_rate

    def cover_live(self, position: int) -> None:
        """The live session's turns cover audio before ``position``: note it for later."""
        self.pending_cover = max(self.pending_cover, position)

    def live_start(self) -> int:
        """Where a new live session starts: after the split and after its covered turns."""
        return max(self.split, self.pending_cover)

    def finish(self, ledger: Ledger) -> list[TurnRecord]:
        """The replay is done: cover the ledger; return the held records, oldest first."""
        ledger.cover(self.split)
        ledger.cover(self.pending_cover)
        held = sorted(self.held, key=lambda record: record.started_at)
        self.held = []
        return held


class HoldingListener:
    """The live sessions' listener: holds finished turns while a replay is still running."""

    def __init__(self, listener: EngineListener, current: Callable[[], CatchUp | None]) -> None:
        self._listener = listener
        self._current = current

    def turn(self, record: TurnRecord) -> None:
        """Pass the record on, or hold it until the replay has delivered the older ones."""
        catch_up = self._current()
        if catch_up is None:
            self._listener.turn(record)
        else:
            catch_up.held.append(record)

    def partial(self, partial: PartialTurn) -> None:
        """Partials pass straight through."""
        self._listener.partial(partial)

    def session_started(self, session: SessionInfo) -> None:
        """Pass through."""
        self._listener.session_started(session)

    def session_ended(self, summary: SessionSummary) -> None:
        """Pass through."""
        self._listener.session_ended(summary)
