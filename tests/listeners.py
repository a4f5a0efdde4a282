"""An engine listener for tests that only look at the records (``daemon.engine.EngineListener``)."""

from __future__ import annotations

from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord


class TurnsListener:
    """Keeps every finished turn's record; partials and session events are ignored."""

    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []

    def turn(self, record: TurnRecord) -> None:
        self.turns.append(record)

    def partial(self, value: PartialTurn) -> None: ...
    def session_started(self, session: SessionInfo) -> None: ...
    def session_ended(self, summary: SessionSummary) -> None: ...
