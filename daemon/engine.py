"""The transcription engine contract: the cloud client and the local engine both implement it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from daemon.events import (
    AudioChunk,
    EngineName,
    PartialTurn,
    SessionInfo,
    SessionSummary,
    TurnRecord,
)


class EngineListener(Protocol):
    """Where an engine reports what happens. Every method is synchronous and must not block."""

    def turn(self, record: TurnRecord) -> None:
        """A turn finished: called exactly once per turn."""

    def partial(self, partial: PartialTurn) -> None:
        """A turn's text so far (best effort)."""

    def session_started(self, session: SessionInfo) -> None:
        """A session began (cloud ``Begin``, or the local engine is ready)."""

    def session_ended(self, summary: SessionSummary) -> None:
        """A session ended."""


class Engine(Protocol):
    """Turns a stream of audio chunks into turn records.

    ``run`` consumes ``chunks`` until it ends, then finishes cleanly (for the cloud: ``Terminate``
    and wait for ``Termination``), reports every finished turn to the listener and returns.
    Fatal problems raise ``AuthError``/``ConfigError``/``StreamError``/``EngineError``.
    """

    @property
    def name(self) -> EngineName:
        """``"assemblyai"`` or ``"local"``."""

    async def run(self, chunks: AsyncIterator[AudioChunk], listener: EngineListener) -> None:
        """Transcribe ``chunks`` until they end; report through ``listener``."""
