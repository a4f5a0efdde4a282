"""An engine listener for the in-process benchmarks: notes each finished turn and when it came."""

from __future__ import annotations

import time

from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord


class Recorder:
    """An EngineListener that keeps ``(monotonic time, record)`` for every finished turn."""

    def __init__(self) -> None:
        self.turns: list[tuple[float, TurnRecord]] = []

    def turn(self, record: TurnRecord) -> None:
        self.turns.append((time.monotonic(), record))

    def partial(self, partial: PartialTurn) -> None:
        pass

    def session_started(self, session: SessionInfo) -> None:
        pass

    def session_ended(self, summary: SessionSummary) -> None:
        pass
