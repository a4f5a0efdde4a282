"""Audio sources: the microphone (pyaudio in callback mode) here, WAV files in ``filesource``.

Both implement :class:`daemon.audio_base.AudioSource`: they yield exact ``chunk_ms`` chunks of
16-bit mono PCM at ``sample_rate``, whatever the device or file delivers (any rate, width or
channel count is downmixed, resampled with soxr and re-chunked: see :mod:`daemon.pcm`).
Device listing and selection live in :mod:`daemon.devices`; they and ``WavFileSource`` are
re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import structlog

if TYPE_CHECKING:  # PortAudio loads only when the microphone is opened
    import pyaudio

from daemon.audio_noise import stderr_silenced
from daemon.backoff import backoff
from daemon.capture import QUEUE_S, CaptureBridge, queue_chunks_for
from daemon.devices import (
    AmbiguousDevice,
    DeviceInfo,
    blocking,
    close_pyaudio,
    describe_devices,
    format_devices,
    input_devices,
    list_devices,
    new_pyaudio,
    resolve_device,
    shut,
    stop_stream,
)
from daemon.errors import AudioError
from daemon.events import AudioChunk, SourceName
from daemon.filesource import WavFileSource
from daemon.health import Heartbeat
from daemon.pcm import PcmFormat

__all__ = [
    "CaptureBridge",
    "DeviceInfo",
    "MicrophoneSource",
    "PcmFormat",
    "WavFileSource",
    "format_devices",
    "list_devices",
    "resolve_device",
]

log = structlog.get_logger("daemon.audio")

_PA_INT16: Final = 8      # pyaudio.paInt16
OPEN_LIMIT_S: Final = 20.0  # opening (or closing) a device taking longer than this is stuck
CLOSE_LIMIT_S: Final = 5.0  # at the end, a close taking longer (a hung sound server) is left
REOPEN_INITIAL_S: Final = 0.5  # device recovery backoff: first delay after an immediate retry…
REOPEN_MAX_S: Final = 30.0  # …doubling up to this
GAP_LOG_S: Final = 0.5  # a jump in capture time bigger than this is logged as a gap


class MicrophoneSource:
    """Captures a PortAudio input device in callback mode as exact chunks.

    Args:
        device: '' = the default input; an integer string = a device index; else a
            case-insensitive substring of the device name.
        sample_rate: output rate; the device is opened at it when supported, else at its
            default rate and resampled (streaming, seamless across chunks).
        chunk_ms: output chunk length.
        queue_s: seconds of audio held for a slow (or frozen) consumer before the oldest
            chunks are dropped, whatever ``chunk_ms`` is.
        stall_seconds: no audio for this long counts as a stalled device.
        heartbeat: beaten on every chunk and every reopen attempt (see :mod:`daemon.health`).
        recover: on a capture error or stall, reopen the device with backoff and keep going
            (the gap is logged), and wait the same way at start for a device that cannot be
            found or opened yet; with False, both raise :class:`AudioError` instead.
    """

    name: SourceName = "microphone"

    def __init__(
        self,
        device: str = "",
        *,
        sample_rate: int = 16000,
        chunk_ms: int = 100,
        queue_s: float = QUEUE_S,
        stall_seconds: float = 5.0,
        heartbeat: Heartbeat | None = None,
        recover: bool = True,
    ) -> None:
        self.device = device
        self.sample_rate = sample_rate
        self.chunk_ms = chunk_ms
        self.queue_s = queue_s
        self.stall_seconds = stall_seconds
        self.device_info: DeviceInfo | None = None
        self.capture_format: PcmFormat | None = None
        self._pa: pyaudio.PyAudio | None = None
        self._stream: pyaudio.Stream | None = None
        self._bridge: CaptureBridge | None = None
        self.heartbeat = heartbeat or Heartbeat("capture")
        self.recover = recover
        self.recovering = False  # capture paused: the device is being reopened (or waited for)
        self.waiting = False  # at start: the device is not there yet and is waited for
        self.recoveries = 0
        self._listed: list[DeviceInfo] = []  # the input devices the last open attempt saw
        self._stopped = asyncio.Event()
        self._last_end: float | None = None  # wall-clock end of the last chunk yielded
        self._lost_at: float | None = None  # set while a gap is open (device lost)

    @property
    def dropped_chunks(self) -> int:
        """Chunks dropped because the consumer fell behind."""
        return self._bridge.dropped if self._bridge is not None else 0

    @property
    def input_overflows(self) -> int:
        """Callback buffers PortAudio flagged as overflowed (input lost before them)."""
        return self._bridge.overflows if self._bridge is not None else 0

    async def __aenter__(self) -> Self:
        """Open the device; with ``recover``, wait for it (until ``stop()``) while it is missing."""
        try:
            if self.recover:
                await self._open_waiting()
            else:
                self._pa = await blocking(new_pyaudio, close_pyaudio)
                await self._open()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    def stop(self) -> None:
        """End ``chunks()`` once what is already queued has been consumed."""
        self._stopped.set()
        if self._bridge is not None:
            self._bridge.finish()

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """Yield chunks until ``stop()``, recovering from capture errors and stalls."""
        bridge = self._bridge
        if bridge is None and self._stopped.is_set():  # stopped while waiting for the device
            return
        if bridge is None:
            raise AudioError(f"microphone {self.device!r}: source used outside 'async with'")
        while True:
            self.heartbeat.beat(self.stall_seconds + OPEN_LIMIT_S)
            try:
                chunk = await bridge.get(self.stall_seconds)
            except AudioError as exc:
                if not self.recover or self._stopped.is_set():
                    raise
                await self._recover(exc)
                continue
            if chunk is None:
                self.heartbeat.idle()
                return
            self._note_continuity(chunk)
            yield chunk

    def _note_continuity(self, chunk: AudioChunk) -> None:
        """Log the gap when audio resumes after a loss, a suspend or a device hiccup."""
        if self._last_end is not None:
            gap = chunk.captured_at - self._last_end
            if self._lost_at is not None:
                log.warning(
                    "audio.device_recovered",
                    gap_s=round(chunk.captured_at - self._lost_at, 3),
                    recoveries=self.recoveries,
                )
            elif gap > GAP_LOG_S:
                log.warning("audio.gap", gap_s=round(gap, 3))
        self._lost_at = None
        self._last_end = chunk.captured_at + self.chunk_ms / 1000

    async def _recover(self, error: AudioError) -> None:
        """Reopen the device (fresh PortAudio, so replugged devices are found) with backoff."""
        self.recovering = True
        if self._lost_at is None:
            self._lost_at = self._last_end if self._last_end is not None else time.time()
        log.warning("audio.device_lost", error=str(error), device=self.device or "default")

        def failed(attempt: int, exc: AudioError) -> None:
            log.warning("audio.reopen_failed", attempt=attempt, error=str(exc))

        try:
            if await self._reopen_with_backoff(failed):
                self.recoveries += 1
        finally:
            self.recovering = False

    async def _open_waiting(self) -> None:
        """Open the device, waiting for it with the recovery backoff while it cannot be opened.

        Each attempt beats the heartbeat (a promise kept); each new reason is logged once
        (``audio.device_waiting``). Returns with nothing opened if ``stop()`` comes first.

        Raises:
            AmbiguousDevice: ``audio.device`` matches several devices (a config error).
        """
        reasons: set[str] = set()

        def failed(attempt: int, exc: AudioError) -> None:
            if isinstance(exc, AmbiguousDevice):
                raise exc
            self._note_waiting(attempt, str(exc), reasons)

        try:
            await self._reopen_with_backoff(failed)
        finally:
            self.heartbeat.idle()  # chunks() promises from its first read on
            self.waiting = self.recovering = False

    async def _reopen_with_backoff(self, failed: Callable[[int, AudioError], None]) -> bool:
        """Reopen the device until it opens (True) or ``stop()`` comes (False).

        Attempts at once, then after 0.5 s doubling to 30 s (jittered); each beats the heartbeat
        (a promise kept). ``failed(attempt, error)`` hears each failed attempt (it may raise).
        """
        for attempt, delay in enumerate(backoff(REOPEN_INITIAL_S, REOPEN_MAX_S), start=1):
            self.heartbeat.beat(delay + OPEN_LIMIT_S)
            if await self._stopped_within(delay):
                return False
            self._listed = []
            try:
                return await self._reopened_unless_stopped()
            except AudioError as exc:
                failed(attempt, exc)
        raise AssertionError("the backoff never ends")

    def _note_waiting(self, attempt: int, reason: str, reasons: set[str]) -> None:
        """Log a reason the device cannot be opened yet, once each."""
        self.waiting = self.recovering = True
        if reason in reasons:
            return
        reasons.add(reason)
        log.error("audio.device_waiting", device=self.device or "default", attempt=attempt,
                  error=reason, available=describe_devices(self._listed),
                  effect="waiting for the device (retried with backoff up to "
                         f"{REOPEN_MAX_S:g} s); capture starts when it appears")

    async def _reopened_unless_stopped(self) -> bool:
        """Reopen the device; False if ``stop()`` came first.

        A reopen hung in PortAudio is then left behind: the stream must end even when the
        sound server never answers.
        """
        reopen = asyncio.create_task(self._reopen_fresh())
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait((reopen, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not reopen.done():
                reopen.cancel()
        if not reopen.done() or reopen.cancelled():  # left behind (cancelling)
            return False
        reopen.result()  # its AudioError, if it failed
        return True

    async def _stopped_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds; True if ``stop()`` was called meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopped.wait()
        return self._stopped.is_set()

    async def _reopen_fresh(self) -> None:
        """Close the stream and PortAudio, then open both again."""
        await self._close_stream()
        pa, self._pa = self._pa, None
        if pa is not None:
            await blocking(functools.partial(close_pyaudio, pa))
        self._pa = await blocking(new_pyaudio, close_pyaudio)
        await self._open()

    async def reopen(self) -> None:
        """Close and reopen the device, keeping the queue and counters (for reconnects)."""
        await self._close_stream()
        await self._open()

    async def _open(self) -> None:
        pa = self._pa
        assert pa is not None  # set by __aenter__
        info, fmt = await blocking(functools.partial(self._choose, pa))
        if self._bridge is None:
            self._bridge = CaptureBridge(
                asyncio.get_running_loop(),
                fmt,
                sample_rate=self.sample_rate,
                chunk_ms=self.chunk_ms,
                queue_chunks=queue_chunks_for(self.queue_s, self.chunk_ms),
                label=f"microphone {info.name!r}",
            )
        else:
            self._bridge.retune(fmt)
        bridge = self._bridge
        self._stream = await blocking(
            functools.partial(self._open_stream, pa, info, fmt, bridge), stop_stream
        )
        self.device_info, self.capture_format = info, fmt
        log.info(
            "audio.device_opened",
            device=info.name,
            index=info.index,
            capture_rate=fmt.rate,
            channels=fmt.channels,
            sample_rate=self.sample_rate,
        )

    def _choose(self, pa: pyaudio.PyAudio) -> tuple[DeviceInfo, PcmFormat]:
        """Blocking: resolve the device and a 16-bit format it supports."""
        self._listed = input_devices(pa)
        info = resolve_device(self._listed, self.device, self.device_info)
        with stderr_silenced():  # a device that cannot be opened makes ALSA print
            return info, self._supported_format(pa, info)

    def _supported_format(self, pa: pyaudio.PyAudio, info: DeviceInfo) -> PcmFormat:
        """Blocking: the first of our rate (else the device's) and mono (else stereo) it takes."""
        for rate in dict.fromkeys((self.sample_rate, info.default_sample_rate)):
            for channels in dict.fromkeys((1, min(2, info.max_input_channels))):
                with contextlib.suppress(ValueError):
                    if pa.is_format_supported(
                        rate,
                        input_device=info.index,
                        input_channels=channels,
                        input_format=_PA_INT16,
                    ):
                        return PcmFormat(rate, channels, 2)
        raise AudioError(
            f"microphone {info.name!r} (device {info.index}): no 16-bit input at "
            f"{self.sample_rate} Hz or {info.default_sample_rate} Hz"
        )

    def _open_stream(
        self, pa: pyaudio.PyAudio, info: DeviceInfo, fmt: PcmFormat, bridge: CaptureBridge
    ) -> pyaudio.Stream:
        """Blocking: open and start the callback-mode input stream."""
        try:
            with stderr_silenced():  # ALSA prints when the device cannot be opened
                return pa.open(rate=fmt.rate, channels=fmt.channels, format=_PA_INT16, input=True,
                               input_device_index=info.index,
                               frames_per_buffer=fmt.rate * self.chunk_ms // 1000,
                               stream_callback=bridge.on_audio)
        except OSError as exc:
            raise AudioError(
                f"microphone {info.name!r} (device {info.index}): cannot open at "
                f"{fmt.rate} Hz ({exc})"
            ) from None

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await blocking(functools.partial(stop_stream, stream))

    async def _close(self) -> None:
        """Close the stream and PortAudio, leaving them after :data:`CLOSE_LIMIT_S` (logged)."""
        stream, self._stream = self._stream, None
        pa, self._pa = self._pa, None
        try:
            async with asyncio.timeout(CLOSE_LIMIT_S):
                await blocking(functools.partial(shut, stream, pa))
        except TimeoutError:  # its thread finishes the job if the sound server comes back
            log.warning("audio.close_stuck", device=self.device or "default",
                        limit_s=CLOSE_LIMIT_S, hint="the sound server does not answer")
        if self._bridge is not None:
            self._bridge.finish()
