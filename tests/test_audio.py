"""Tests for daemon.audio: the source protocol, the callback bridge, microphone, devices."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.audio import (
    CaptureBridge,
    DeviceInfo,
    MicrophoneSource,
    PcmFormat,
    WavFileSource,
    format_devices,
    list_devices,
    resolve_device,
)
from daemon.audio_base import AudioSource
from daemon.errors import AudioError
from daemon.events import AudioChunk
from tests.audio_samples import SPEECH, Int16s, dominant_hz, encode, pcm_of, sine, speech_pcm
from tests.vmic import VirtualMic

CHUNK_BYTES = 3200  # 100 ms at 16 kHz, 16-bit


def test_sources_implement_the_protocol(tmp_path: Path) -> None:
    """Both sources satisfy AudioSource (checked by mypy) and name themselves for turn records."""
    sources: list[AudioSource] = [WavFileSource(tmp_path / "x.wav"), MicrophoneSource()]
    assert [s.name for s in sources] == ["file", "microphone"]
    assert [s.dropped_chunks for s in sources] == [0, 0]


def _feed_from_thread(
    bridge: CaptureBridge, buffers: list[bytes], frames: int, loop: asyncio.AbstractEventLoop,
    statuses: list[int] | None = None,
) -> asyncio.Event:
    """Call the PortAudio callback from a real thread; the event is set once all are offered."""
    done = asyncio.Event()

    def produce() -> None:
        for data, status in zip(buffers, statuses or [0] * len(buffers), strict=True):
            bridge.on_audio(data, frames, {}, status)
        loop.call_soon_threadsafe(done.set)  # FIFO: runs after every offer

    threading.Thread(target=produce, name="fake-portaudio").start()
    return done


async def drain(bridge: CaptureBridge) -> list[AudioChunk]:
    """Finish the bridge and return everything still queued."""
    bridge.finish()
    out = []
    while (chunk := await bridge.get(1.0)) is not None:
        out.append(chunk)
    return out


class TestCaptureBridge:
    async def test_drops_oldest_when_consumer_lags(self) -> None:
        """A producer thread outrunning the consumer loses the oldest chunks, counted and logged."""
        loop = asyncio.get_running_loop()
        bridge = CaptureBridge(
            loop, PcmFormat(16000, 1, 2), sample_rate=16000, chunk_ms=100, queue_chunks=5
        )
        buffers = [np.full(1600, i, "<i2").tobytes() for i in range(20)]
        with capture_logs() as logs:
            async with asyncio.timeout(5):
                await _feed_from_thread(bridge, buffers, 1600, loop).wait()
            kept = await drain(bridge)
        assert [int(pcm_of([c])[0]) for c in kept] == [15, 16, 17, 18, 19]
        assert bridge.dropped == 15
        drops = [e for e in logs if e["event"] == "audio.chunks_dropped"]
        assert sum(e["dropped"] for e in drops) == 15
        assert len(drops) == 2  # the first at once, the rest rate-limited then flushed at finish

    async def test_input_overflow_is_counted_and_logged(self) -> None:
        """Buffers PortAudio flags as overflowed (input lost before it reached us, e.g. an ALSA
        overrun) are counted and logged like our own drops, never silent."""
        loop = asyncio.get_running_loop()
        bridge = CaptureBridge(
            loop, PcmFormat(16000, 1, 2), sample_rate=16000, chunk_ms=100, queue_chunks=50
        )
        overflow = 2  # paInputOverflow
        statuses = [0, overflow, 0, overflow, overflow, 1, 0]  # 1: paInputUnderflow, no loss
        with capture_logs() as logs:
            async with asyncio.timeout(5):
                await _feed_from_thread(bridge, [bytes(3200)] * 7, 1600, loop, statuses).wait()
            kept = await drain(bridge)
        assert len(kept) == 7 and bridge.dropped == 0
        assert bridge.overflows == 3
        lines = [e for e in logs if e["event"] == "audio.input_overflow"]
        assert sum(e["overflows"] for e in lines) == 3 and lines[-1]["total_overflows"] == 3
        assert all(e["log_level"] == "warning" and e["source"] == "microphone" for e in lines)

    async def test_resamples_and_downmixes_seamlessly(self) -> None:
        """48 kHz stereo callback buffers become exact 16 kHz chunks of a continuous sine."""
        loop = asyncio.get_running_loop()
        bridge = CaptureBridge(
            loop, PcmFormat(48000, 2, 2), sample_rate=16000, chunk_ms=100, queue_chunks=100
        )
        pcm = encode(sine(500, 2.0, 48000, 2), 2)
        buffers = [pcm[i : i + 4800 * 4] for i in range(0, len(pcm), 4800 * 4)]
        async with asyncio.timeout(5):
            await _feed_from_thread(bridge, buffers, 4800, loop).wait()
        chunks = await drain(bridge)
        assert {len(c.pcm) for c in chunks} == {CHUNK_BYTES}
        samples = pcm_of(chunks)[1600:17600]
        assert abs(dominant_hz(samples, 16000) - 500) <= 2
        slope = 0.5 * 32767 * 2 * np.pi * 500 / 16000  # steepest step of the sine itself
        assert np.abs(np.diff(samples.astype(np.int32))).max() < 1.05 * slope  # no seams

    async def test_captured_at_uses_adc_time(self) -> None:
        """The ADC time's age before the callback sets captured_at; chunks follow at 100 ms."""
        loop = asyncio.get_running_loop()
        bridge = CaptureBridge(
            loop, PcmFormat(16000, 1, 2), sample_rate=16000, chunk_ms=100, queue_chunks=10
        )
        before = time.time()
        bridge.on_audio(bytes(6400), 3200, {"input_buffer_adc_time": 50.0, "current_time": 50.3}, 0)
        chunks = [await bridge.get(1.0), await bridge.get(1.0)]
        assert None not in chunks
        first, second = (c.captured_at for c in chunks if c is not None)
        assert first == pytest.approx(before - 0.3, abs=0.05)
        assert second - first == pytest.approx(0.1)

    async def test_stall_raises_audio_error(self) -> None:
        """No audio within the stall time raises AudioError naming the source."""
        bridge = CaptureBridge(
            asyncio.get_running_loop(),
            PcmFormat(16000, 1, 2),
            sample_rate=16000,
            chunk_ms=100,
            queue_chunks=10,
            label="microphone 'usb'",
        )
        with pytest.raises(AudioError, match=r"microphone 'usb': no audio for 0\.05 s"):
            await bridge.get(0.05)


# ----------------------------------------------------------------------------- devices (pure)


DEVICES = [
    DeviceInfo(0, "HDA Intel PCH: ALC892 Analog (hw:0,0)", 44100, 2, False),
    DeviceInfo(4, "USB Audio Mic", 48000, 1, False),
    DeviceInfo(7, "pulse", 44100, 32, False),
    DeviceInfo(8, "default", 44100, 32, True),
]


class TestDeviceSelection:
    @pytest.mark.parametrize(
        ("spec", "index"),
        [("", 8), ("4", 4), (" 7 ", 7), ("usb", 4), ("ALC892", 0), ("DEFAULT", 8), ("Pulse", 7)],
    )
    def test_spec_selects_device(self, spec: str, index: int) -> None:
        """'' picks the default, digits an index, anything else a case-insensitive substring."""
        assert resolve_device(DEVICES, spec).index == index

    @pytest.mark.parametrize("spec", ["3", "bluetooth"])
    def test_not_found_lists_inputs(self, spec: str) -> None:
        """An unknown device is an error listing every available input device."""
        with pytest.raises(AudioError) as info:
            resolve_device(DEVICES, spec)
        assert "available input devices: 0 'HDA Intel" in str(info.value)
        assert "4 'USB Audio Mic'" in str(info.value)

    @pytest.mark.parametrize(("spec", "indices"), [("a", [0, 4, 8]), ("U", [4, 7, 8])])
    def test_name_matching_several_is_an_error(self, spec: str, indices: list[int]) -> None:
        """A substring that several devices contain is an error naming them, not a guess."""
        with pytest.raises(AudioError) as info:
            resolve_device(DEVICES, spec)
        message = str(info.value)
        assert message.startswith(f"audio device {spec!r} matches {len(indices)} input devices: ")
        named = [d for d in DEVICES if f"{d.index} {d.name!r}" in message]
        assert [d.index for d in named] == indices
        assert "index" in message and "\n" not in message

    def test_full_name_wins_over_substring(self) -> None:
        """A name given in full picks that device even when longer names contain it."""
        devices = [DeviceInfo(2, "USB Mic (hw:2,0)", 48000, 1, False),
                   DeviceInfo(3, "USB Mic", 48000, 1, False)]
        assert resolve_device(devices, "usb mic").index == 3
        with pytest.raises(AudioError, match="matches 2 input devices"):
            resolve_device(devices, "USB")

    def test_reopen_by_index_follows_the_opened_device(self) -> None:
        """On a reopen an index means the device opened before: found by name where it moved to
        (also when a replug changed its ALSA card number), missing while it is not listed."""
        opened = DeviceInfo(4, "USB Audio Mic: - (hw:2,0)", 48000, 1, False)
        moved = [DeviceInfo(4, "Webcam Mic: - (hw:3,0)", 48000, 1, False),
                 DeviceInfo(5, "USB Audio Mic: - (hw:4,0)", 48000, 1, False)]
        assert resolve_device(moved, "4", opened).index == 5
        assert resolve_device(moved, "4").index == 4  # at start-up the index is all there is
        with pytest.raises(AudioError, match=r"^audio device 4 \('USB Audio Mic.*'\) is gone; "
                           r"available input devices: 4 'Webcam Mic"):
            resolve_device(moved[:1], "4", opened)

    def test_no_default_device(self) -> None:
        """Without any input device, the default is an error that says there are none."""
        with pytest.raises(AudioError, match=r"no default audio input device.*: none"):
            resolve_device([], "")

    def test_table_lists_devices_and_marks_default(self) -> None:
        """The devices table has a header, one row per device and a star on the default."""
        lines = format_devices(DEVICES).splitlines()
        assert lines[0].split() == ["INDEX", "NAME", "RATE", "CHANNELS", "DEFAULT"]
        assert len(lines) == 5
        assert lines[4].split() == ["8", "default", "44100", "32", "*"]
        assert format_devices([]) == "no audio input devices found"


# ----------------------------------------------------------------------------- virtual mic


@pytest.fixture
def mic_env(vmic: VirtualMic) -> Iterator[VirtualMic]:
    """The virtual mic, with this process's PortAudio pointed at it."""
    with vmic.activated():
        yield vmic


async def _until_clip_captured(
    chunks: AsyncIterator[AudioChunk], expected: Int16s
) -> tuple[list[AudioChunk], int]:
    """Read chunks until the clip has been heard in full; return them and where it starts."""
    lead = int(np.flatnonzero(expected)[0])
    captured: list[AudioChunk] = []
    async for chunk in chunks:
        captured.append(chunk)
        heard = np.flatnonzero(pcm_of(captured))
        if heard.size and len(captured) * 1600 >= heard[0] - lead + expected.size:
            return captured, int(heard[0]) - lead
    raise AssertionError("microphone ended before the clip was heard")


class TestMicrophone:
    async def test_captures_played_speech_bit_exact(self, mic_env: VirtualMic) -> None:
        """Speech played into the virtual mic is captured bit-exact in exact 100 ms chunks."""
        expected = speech_pcm()
        async with MicrophoneSource() as mic, asyncio.timeout(20):
            chunks = mic.chunks()
            first = await anext(chunks)  # capture is running before playback starts
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(mic_env.play(SPEECH))
                captured, start = await _until_clip_captured(chunks, expected)
        captured.insert(0, first)
        start += 1600
        samples = pcm_of(captured)
        assert np.array_equal(samples[start : start + expected.size], expected)
        assert {len(c.pcm) for c in captured} == {CHUNK_BYTES}
        steps = np.diff([c.captured_at for c in captured])
        assert steps.min() > 0
        assert abs(steps.mean() - 0.1) < 0.02
        assert abs(captured[-1].captured_at - time.time()) < 2
        assert mic.dropped_chunks == 0 and mic.input_overflows == 0

    async def test_raw_pcm_round_trip(self, mic_env: VirtualMic) -> None:
        """Raw PCM fed with pacat is captured unchanged."""
        expected = (sine(700, 0.5, 16000)[:, 0] * 32767).astype("<i2")
        async with MicrophoneSource() as mic, asyncio.timeout(20):
            chunks = mic.chunks()
            await anext(chunks)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(mic_env.play_pcm(expected.tobytes()))
                captured, start = await _until_clip_captured(chunks, expected)
        assert np.array_equal(pcm_of(captured)[start : start + expected.size], expected)

    @pytest.mark.parametrize("spec", ["PULS", "index"])
    async def test_device_by_name_or_index(self, mic_env: VirtualMic, spec: str) -> None:
        """A name substring or a device index opens that device and yields audio."""
        pulse = next(d for d in await asyncio.to_thread(list_devices) if d.name == "pulse")
        device = str(pulse.index) if spec == "index" else spec
        async with MicrophoneSource(device) as mic, asyncio.timeout(5):
            chunk = await anext(mic.chunks())
        assert mic.device_info == pulse
        assert len(chunk.pcm) == CHUNK_BYTES

    async def test_unknown_device_lists_available(self, mic_env: VirtualMic) -> None:
        """Without recovery, a device that is not there is an AudioError listing the real input
        devices (with it, it is waited for: see test_device_recovery)."""
        with pytest.raises(
            AudioError, match=r"no audio input device matches 'no-such-mic'.*'pulse'"
        ):
            async with MicrophoneSource("no-such-mic", recover=False):
                pass

    async def test_ambiguous_name_is_an_error(self, mic_env: VirtualMic) -> None:
        """'e' is in both 'pulse' and 'default': an error naming both, not the first one."""
        both = r"audio device 'e' matches 2 input devices: \d+ 'pulse', \d+ 'default'"
        with pytest.raises(AudioError, match=both):
            async with MicrophoneSource("e"):
                pass

    async def test_stop_ends_chunks(self, mic_env: VirtualMic) -> None:
        """stop() ends the microphone's iterator once the queue is drained."""
        async with MicrophoneSource() as mic, asyncio.timeout(5):
            chunks = mic.chunks()
            await anext(chunks)
            mic.stop()
            rest = [chunk async for chunk in chunks]
        assert len(rest) < 50

    async def test_reopen_keeps_the_chunk_stream(self, mic_env: VirtualMic) -> None:
        """reopen() swaps the device stream under a running iterator, which keeps yielding."""
        async with MicrophoneSource() as mic, asyncio.timeout(5):
            chunks = mic.chunks()
            await anext(chunks)
            await mic.reopen()
            after = [await anext(chunks) for _ in range(3)]
        assert {len(c.pcm) for c in after} == {CHUNK_BYTES}

    async def test_other_rate_and_chunk_length(self, mic_env: VirtualMic) -> None:
        """A different output rate and chunk length are honoured exactly."""
        async with MicrophoneSource(sample_rate=8000, chunk_ms=200) as mic, asyncio.timeout(5):
            chunks = mic.chunks()
            sizes = [len((await anext(chunks)).pcm) for _ in range(3)]
        assert sizes == [3200, 3200, 3200]

    def test_stderr_lines_survive_device_listing(
        self, mic_env: VirtualMic, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Log lines written (one write each, as the logger does) while another thread lists
        devices all reach stderr, and none of PortAudio's probing noise does."""
        done = threading.Event()

        def lister() -> None:
            try:
                for _ in range(3):
                    list_devices()
            finally:
                done.set()

        thread = threading.Thread(target=lister, name="lister")
        thread.start()
        written = 0
        while not done.wait(0.001):
            os.write(2, f"line {written}\n".encode())
            written += 1
        thread.join()
        assert written > 10
        lines = capfd.readouterr().err.splitlines()  # in order, but for the instant of a swap
        assert sorted(lines, key=lambda line: int(line.split()[-1])) == [
            f"line {i}" for i in range(written)
        ]

    def test_list_devices_shows_virtual_mic_quietly(
        self, mic_env: VirtualMic, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """list_devices() sees the virtual mic as the default input; PortAudio prints nothing."""
        devices = list_devices()
        print("after", file=sys.stderr)
        assert any(d.name == "pulse" for d in devices)
        assert [d.name for d in devices if d.is_default] == ["default"]
        assert capfd.readouterr().err == "after\n"
        assert "pulse" in format_devices(devices)
