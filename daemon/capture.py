"""The microphone's capture bridge: PortAudio's callback thread → the event loop.

PortAudio calls :meth:`CaptureBridge.on_audio` on its own thread for every buffer; the bridge
only stamps it (PortAudio's ADC time, else the samples counted since the last buffer it timed)
and schedules the rest on the loop (convert, re-chunk, queue: bounded, dropping the oldest,
every loss counted and logged). :class:`daemon.audio.MicrophoneSource` owns one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Final

import structlog

from daemon.errors import AudioError
from daemon.events import AudioChunk
from daemon.pcm import Converter, PcmFormat, Rechunker

log = structlog.get_logger("daemon.audio")

_PA_CONTINUE: Final = 0   # pyaudio.paContinue
_PA_COMPLETE: Final = 1   # pyaudio.paComplete
_PA_INPUT_OVERFLOW: Final = 2  # pyaudio.paInputOverflow: input was lost before the callback
_DROP_LOG_INTERVAL: Final = 5.0  # seconds between two ``audio.chunks_dropped`` lines
LATE_S: Final = 1.0  # a stall timer this late means the daemon was frozen, not the device
ADC_AGE_LIMIT_S: Final = 10.0  # an ADC time older than this (or negative) is not believed
HELD_MAX_S: Final = 300.0  # a count this far behind arrival is not believed (PulseAudio: 131 s)
QUEUE_S: Final = 60.0  # audio the capture queue holds (about 2 MB at 16 kHz): see queue_chunks_for


def queue_chunks_for(seconds: float, chunk_ms: int) -> int:
    """The number of ``chunk_ms`` chunks that hold ``seconds`` of audio (at least one).

    The queue is sized in time, not chunks: what it must hold is the audio a sound server kept
    for a daemon that was frozen (SIGSTOP, swapping, a debugger), delivered at once on waking;
    PulseAudio keeps about 131 s of it at 16 kHz mono (4 MiB, measured), then drops the rest.
    """
    return max(1, math.ceil(seconds * 1000 / chunk_ms))


def _capture_time(
    time_info: Mapping[str, float], frames: int, rate: int, now: float
) -> tuple[float, float | None]:
    """Wall-clock times of a callback buffer's first sample: (filled up, ADC).

    The first assumes the buffer just filled up; the second is by PortAudio's ADC time, None
    if it gives no usable one. That is on PortAudio's own clock, so only its age relative to
    ``current_time`` is used, and only up to :data:`ADC_AGE_LIMIT_S`.
    """
    filled = now - frames / rate
    adc = time_info.get("input_buffer_adc_time", 0.0)
    current = time_info.get("current_time", 0.0)
    if adc > 0 and current > 0 and 0 <= current - adc < ADC_AGE_LIMIT_S:
        return filled, now - (current - adc)
    return filled, None


class _StreamClock:
    """Stamps one continuous stream's callback buffers (PortAudio's thread only).

    A buffer with a usable ADC time is stamped by it and becomes the anchor, unless it is part
    of a burst (here less than half its length after the one before: the audio a frozen
    daemon's sound server kept, all arriving on waking). A burst's buffers, and any without a
    usable ADC time, are stamped by the frames counted since the anchor, never later than they
    filled up: no input is lost between buffers unless PortAudio flags an overflow (the anchor
    is dropped) or the device is reopened (a new clock). Measured on PulseAudio, the ADC time
    of a burst is right until the server drops some of what it kept (past 131 s at 16 kHz
    mono): then it is the age of what is left, too young; the count is not.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.time) -> None:
        self._rate, self._clock = rate, clock
        self._anchor: float | None = None
        self._frames = 0  # frames since the anchor's first sample
        self._last = -math.inf  # when the previous buffer arrived

    def stamp(self, time_info: Mapping[str, float], frames: int, overflowed: bool) -> float:
        """The wall-clock time of this buffer's first sample."""
        filled, adc = _capture_time(time_info, frames, self._rate, self._clock())
        length = frames / self._rate
        in_burst, self._last = filled + length - self._last < length / 2, filled + length
        if overflowed:
            self._anchor = None
        counted = None if self._anchor is None else self._anchor + self._frames / self._rate
        if counted is not None and filled - counted > HELD_MAX_S:
            self._anchor = counted = None   # no server holds that much: input was lost unsaid
        if adc is not None and (counted is None or not in_burst):
            at, self._anchor, self._frames = adc, adc, 0
        elif counted is not None:
            at = min(filled, counted)
        else:
            at = filled
        self._frames += frames
        return at


class _Tally:
    """A count of losses, logged as a warning at once, then at most every few seconds.

    What comes within the interval is logged when it is up, not with the next loss: a burst
    (the audio a frozen daemon's sound server kept, arriving at once on waking) was "1 dropped",
    the rest said only at exit or with a loss days later.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, event: str, field: str,
                 **context: object) -> None:
        self.total = 0
        self._loop = loop
        self._event, self._field, self._context = event, field, context
        self._unlogged, self._last_log = 0, -math.inf
        self._later: asyncio.TimerHandle | None = None

    def add(self) -> None:
        """Count one loss (on the loop)."""
        self.total += 1
        self._unlogged += 1
        wait = self._last_log + _DROP_LOG_INTERVAL - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._later is None:
            self._later = self._loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Log what is not yet reported (call once more at the end)."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._unlogged:
            log.warning(self._event, **{self._field: self._unlogged,
                                        f"total_{self._field}": self.total}, **self._context)
            self._unlogged, self._last_log = 0, time.monotonic()


class CaptureBridge:
    """Carries PortAudio callback buffers into the event loop: bounded, drop-oldest, counted.

    :meth:`on_audio` is the pyaudio stream callback. It runs on PortAudio's thread and only
    schedules :meth:`_offer` on the loop, which converts, re-chunks and queues the audio.
    Both losses are counted and logged: chunks dropped as the consumer lags
    (``audio.chunks_dropped``, with the queue's size in chunks and seconds), input PortAudio
    lost before the callback (``audio.input_overflow``, e.g. an ALSA overrun). Each buffer is
    stamped on PortAudio's thread (:class:`_StreamClock`), so a burst keeps the times it was
    recorded at.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fmt: PcmFormat,
        *,
        sample_rate: int,
        chunk_ms: int,
        queue_chunks: int,
        label: str = "microphone",
    ) -> None:
        self._loop = loop
        self._sample_rate, self._chunk_ms, self._label = sample_rate, chunk_ms, label
        self._queue: asyncio.Queue[AudioChunk | None] = asyncio.Queue(queue_chunks)
        self._drops = _Tally(loop, "audio.chunks_dropped", "dropped", source=label,
                             queue_chunks=queue_chunks, queue_s=queue_chunks * chunk_ms / 1000)
        self._overflows = _Tally(loop, "audio.input_overflow", "overflows", source=label)
        self._ended = False
        self._error: AudioError | None = None
        self.retune(fmt)

    def retune(self, fmt: PcmFormat) -> None:
        """Start a new continuous stream in ``fmt`` (after a device reopen)."""
        self._fmt = fmt
        self._converter = Converter(fmt, self._sample_rate)
        self._rechunker = Rechunker(self._sample_rate, self._chunk_ms)
        self._clock = _StreamClock(fmt.rate)

    def on_audio(
        self, data: bytes | None, frames: int, time_info: Mapping[str, float], status: int
    ) -> tuple[None, int]:
        """The PortAudio callback: stamp the buffer and hand it to the loop, nothing else."""
        overflowed = bool(status & _PA_INPUT_OVERFLOW)
        captured_at = self._clock.stamp(time_info, frames, overflowed)
        try:
            self._loop.call_soon_threadsafe(self._offer, data or b"", captured_at, overflowed)
        except RuntimeError:  # the loop has closed: end the stream instead of raising in C
            return None, _PA_COMPLETE
        return None, _PA_CONTINUE

    @property
    def dropped(self) -> int:
        """Chunks dropped because the consumer fell behind."""
        return self._drops.total

    @property
    def overflows(self) -> int:
        """Callback buffers PortAudio flagged as overflowed (input lost before them)."""
        return self._overflows.total

    def _offer(self, data: bytes, captured_at: float, overflowed: bool = False) -> None:
        """On the loop: convert, re-chunk and queue, dropping the oldest chunk when full."""
        if self._ended:
            return
        if overflowed:
            self._overflows.add()
        for chunk in self._rechunker.push(self._converter.convert(data), captured_at):
            if self._queue.full():
                self._queue.get_nowait()
                self._drops.add()
            self._queue.put_nowait(chunk)

    def log_drops(self) -> None:
        """Log losses not yet reported (rate-limited meanwhile; call once more at the end)."""
        self._drops.flush()
        self._overflows.flush()

    def finish(self, error: AudioError | None = None) -> None:
        """End the stream: the consumer drains what is queued, then ends (or gets ``error``)."""
        if self._ended:
            return
        self._ended, self._error = True, error
        if not self._queue.full():
            self._queue.put_nowait(None)  # wakes a consumer blocked in get()
        self.log_drops()

    async def get(self, stall_seconds: float) -> AudioChunk | None:
        """Next chunk, or None once finished and drained.

        Raises:
            AudioError: no audio arrived for ``stall_seconds``, or the stream failed.
        """
        while not (self._ended and self._queue.empty()):
            item = await self._next(stall_seconds)
            if item is not None:
                return item
        if self._error is not None:
            raise self._error
        return None

    async def _next(self, stall_seconds: float) -> AudioChunk | None:
        """The next item, waiting ``stall_seconds`` of the loop's running time.

        A wait that ends :data:`LATE_S` or more after its deadline says the loop was not
        running (the daemon stopped with SIGSTOP or a cgroup freeze, a paused VM, a blocked
        loop), not that the device went quiet: the wait starts again, so the audio PortAudio
        delivers on waking comes first (``audio.gap``) instead of a device reopened for nothing.
        """
        while True:
            deadline = self._loop.time() + stall_seconds
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._queue.get()
            except TimeoutError:
                if self._loop.time() - deadline < LATE_S:
                    raise AudioError(f"{self._label}: no audio for {stall_seconds:g} s "
                                     "(device stalled or gone)") from None
