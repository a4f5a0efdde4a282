"""The WAV file source: any PCM WAV streamed as exact chunks, paced like a microphone."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog

from daemon.errors import AudioError
from daemon.events import AudioChunk, SourceName
from daemon.pcm import Converter, Rechunker, WavReader, open_wav

log = structlog.get_logger("daemon.filesource")

# WAV decode block, read and converted in one thread hop (each hop wakes an executor thread and
# the loop's self-pipe); 2 s of 48 kHz stereo float is 0.8 MB.
_READ_SECONDS: Final = 2.0
# A consumer that takes a chunk this much later than it was due paused the file (the cloud engine
# waits while its backlog is full): the file goes on at real time from then, not in a burst.
_PAUSED_AFTER_S: Final = 1.0


class WavFileSource:
    """Streams a WAV file as exact chunks, at real-time pace or as fast as it is consumed.

    At real-time pace, a consumer that pauses the file (takes the next chunk over a second late)
    gets the rest at real time from then on; ``captured_at`` stays the start plus the offset.

    Args:
        path: any PCM (8/16/24/32-bit) or float WAV, any rate and channel count.
        sample_rate: output rate in Hz.
        chunk_ms: output chunk length; the last chunk is padded with silence to full length.
        realtime: deliver each chunk when it would have been captured live.
        clock: wall clock (POSIX seconds) used for ``captured_at``.
    """

    name: SourceName = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int = 16000,
        chunk_ms: int = 100,
        realtime: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.chunk_ms = chunk_ms
        self.realtime = realtime
        self._clock = clock
        self._reader: WavReader | None = None
        self._stopped = asyncio.Event()

    @property
    def dropped_chunks(self) -> int:
        """Always 0: a file is read no faster than it is consumed."""
        return 0

    @property
    def duration(self) -> float:
        """Length of the file's audio in seconds (after ``__aenter__``)."""
        reader = self._require_open()
        return reader.frames / reader.fmt.rate

    async def __aenter__(self) -> Self:
        self._reader = reader = await asyncio.to_thread(open_wav, self.path)
        if reader.truncated:
            log.warning("audio.file_truncated", path=str(self.path),
                        header_s=round(reader.declared / reader.fmt.rate, 2),
                        present_s=round(reader.frames / reader.fmt.rate, 2))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await asyncio.to_thread(reader.close)

    def stop(self) -> None:
        """End ``chunks()`` promptly (at most one chunk later)."""
        self._stopped.set()

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """Yield the file's audio as exact chunks, then end."""
        loop = asyncio.get_running_loop()
        start_wall, start_loop = self._clock(), loop.time()
        # paced by samples, not chunks: at 22050 Hz a 50 ms chunk holds 1102 samples, not 1102.5
        played = 0
        async for chunk in self._converted(start_wall):
            played += len(chunk.pcm) // 2
            due = start_loop + played / self.sample_rate
            if self.realtime and not await self._wait_until(due):
                return
            if self._stopped.is_set():
                return
            yield chunk
            paused = loop.time() - due
            if self.realtime and paused > _PAUSED_AFTER_S:
                start_loop += paused        # re-anchored: what the pause "owes" is not burst

    async def _converted(self, start_wall: float) -> AsyncIterator[AudioChunk]:
        """Decode, convert and re-chunk the file block by block, off the event loop."""
        reader = self._require_open()
        converter = Converter(reader.fmt, self.sample_rate)
        rechunker = Rechunker(self.sample_rate, self.chunk_ms)
        block, produced = max(1, int(reader.fmt.rate * _READ_SECONDS)), 0
        while not self._stopped.is_set():
            pcm, last = await asyncio.to_thread(_read_block, reader, converter, block)
            for chunk in rechunker.push(pcm, start_wall + produced / self.sample_rate):
                yield chunk
            produced += len(pcm) // 2
            if last:
                break
        tail = rechunker.flush()
        if tail is not None and not self._stopped.is_set():
            yield tail

    async def _wait_until(self, deadline: float) -> bool:
        """Sleep until ``deadline`` (loop time); return False if stopped meanwhile."""
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0 and not self._stopped.is_set():
            await asyncio.sleep(delay)
        return not self._stopped.is_set()

    def _require_open(self) -> WavReader:
        if self._reader is None:
            raise AudioError(f"audio file {self.path}: source used outside 'async with'")
        return self._reader


def _read_block(reader: WavReader, converter: Converter, block: int) -> tuple[bytes, bool]:
    """Read and convert up to ``block`` frames (blocking); also whether it was the last block."""
    data = reader.read(block)
    last = len(data) < block * reader.fmt.width * reader.fmt.channels
    return converter.convert(data, last=last), last
