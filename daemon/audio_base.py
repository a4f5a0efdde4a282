"""The audio source contract shared by the microphone, the WAV file and test sources."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol, Self

from daemon.events import AudioChunk, SourceName


class AudioSource(Protocol):
    """A source of exact ``chunk_ms`` chunks of 16-bit mono PCM at ``sample_rate``.

    ``chunks()`` yields until end of input (a file) or until ``stop()`` is called (SIGTERM);
    a microphone never ends by itself. ``dropped_chunks`` counts chunks lost because the
    consumer fell behind (always logged, never silent).
    """

    name: SourceName
    sample_rate: int
    chunk_ms: int

    @property
    def dropped_chunks(self) -> int:
        """Chunks lost because the consumer fell behind."""

    async def __aenter__(self) -> Self:
        """Open the device or file."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the device or file."""

    def chunks(self) -> AsyncIterator[AudioChunk]:
        """Yield chunks until the input ends or ``stop()`` is called."""

    def stop(self) -> None:
        """Ask ``chunks()`` to end soon (safe to call from a signal handler)."""
