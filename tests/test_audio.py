"""Tests for daemon.audio: WAV conversion and pacing, the callback bridge, microphone, devices."""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import threading
import time
import warnings
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
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
from tests.conftest import SPEECH_DIR
from tests.vmic import VirtualMic

SPEECH = SPEECH_DIR / "espeak-s1.wav"
CHUNK_BYTES = 3200  # 100 ms at 16 kHz, 16-bit

Floats = npt.NDArray[np.float64]
Int16s = npt.NDArray[np.int16]


# ----------------------------------------------------------------------------- helpers


def sine(freq: float, seconds: float, rate: int, channels: int = 1) -> Floats:
    """A 0.5-amplitude sine as (frames, channels) floats."""
    t = np.arange(round(seconds * rate)) / rate
    wave_ = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.repeat(wave_[:, None], channels, axis=1)


def encode(samples: Floats, width: int) -> bytes:
    """Encode (frames, channels) floats as interleaved little-endian PCM of ``width`` bytes."""
    flat = samples.ravel()
    if width == 1:
        return bytes(np.round(flat * 127 + 128).astype(np.uint8).tobytes())
    ints = np.round(flat * (2 ** (8 * width - 1) - 1)).astype("<i4")
    if width == 3:
        return bytes(ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes())
    return bytes(ints.astype(f"<i{width}").tobytes())


def cut(path: Path, size: int) -> Path:
    """Truncate a file to ``size`` bytes (a copy that was interrupted)."""
    with path.open("r+b") as file:
        file.truncate(size)
    return path


def write_wav(path: Path, samples: Floats, rate: int, width: int) -> Path:
    """Write an integer PCM WAV with the stdlib ``wave`` module."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(encode(samples, width))
    return path


def write_riff(
    path: Path, tag: int, channels: int, rate: int, bits: int, data: bytes, extensible: bool = False
) -> Path:
    """Write a RIFF/WAVE file by hand (float, WAVE_FORMAT_EXTENSIBLE, compressed tags)."""
    align = channels * bits // 8
    fmt = struct.pack(
        "<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits
    )
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + guid_tail
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def pcm_of(chunks: list[AudioChunk]) -> Int16s:
    """All chunks' samples as one int16 array."""
    return np.frombuffer(b"".join(c.pcm for c in chunks), "<i2")


def dominant_hz(samples: Int16s, rate: int) -> float:
    """The frequency of the strongest FFT bin."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum)) * rate / samples.size


async def read_all(source: WavFileSource) -> list[AudioChunk]:
    """Every chunk of a WAV source."""
    async with source:
        return [chunk async for chunk in source.chunks()]


def speech_pcm() -> Int16s:
    """The reference speech clip (16 kHz mono 16-bit) as samples."""
    with wave.open(str(SPEECH), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2")


# ----------------------------------------------------------------------------- WAV files


def test_sources_implement_the_protocol(tmp_path: Path) -> None:
    """Both sources satisfy AudioSource (checked by mypy) and name themselves for turn records."""
    sources: list[AudioSource] = [WavFileSource(tmp_path / "x.wav"), MicrophoneSource()]
    assert [s.name for s in sources] == ["file", "microphone"]
    assert [s.dropped_chunks for s in sources] == [0, 0]


class TestWavConversion:
    @pytest.mark.parametrize(
        ("rate", "channels", "width"),
        [(8000, 2, 1), (44100, 1, 3), (48000, 2, 4), (16000, 1, 2), (22050, 6, 2)],
    )
    async def test_any_pcm_becomes_exact_16k_mono_chunks(
        self, tmp_path: Path, rate: int, channels: int, width: int
    ) -> None:
        """Any integer PCM WAV becomes exact 100 ms chunks, same length, same pitch, padded tail."""
        path = write_wav(tmp_path / "in.wav", sine(440, 1.23, rate, channels), rate, width)
        chunks = await read_all(WavFileSource(path, realtime=False))
        assert {len(c.pcm) for c in chunks} == {CHUNK_BYTES}
        assert all(c.sample_rate == 16000 for c in chunks)
        assert abs(len(chunks) * 0.1 - 1.23) < 0.1
        samples = pcm_of(chunks)
        assert abs(dominant_hz(samples[:16000], 16000) - 440) <= 2
        assert 0.3 < np.sqrt(np.mean((samples[:16000] / 32768.0) ** 2)) < 0.4
        assert not samples[-1000:].any()  # the tail is padded with silence

    async def test_float32_wav_is_decoded(self, tmp_path: Path) -> None:
        """A 32-bit float WAV, which the wave module rejects, is decoded by the RIFF fallback."""
        data = (sine(1000, 0.5, 32000, 2).astype("<f4")).tobytes()
        path = write_riff(tmp_path / "f.wav", 3, 2, 32000, 32, data)
        samples = pcm_of(await read_all(WavFileSource(path, realtime=False)))
        assert abs(dominant_hz(samples[:8000], 16000) - 1000) <= 2

    async def test_float_wav_with_nan_and_inf_samples(self, tmp_path: Path) -> None:
        """NaN samples read as silence and infinite ones as full scale, without numpy's
        two-line RuntimeWarning on stderr."""
        data = np.array([np.nan, np.inf, -np.inf, 0.5] * 4000, "<f4").tobytes()
        path = write_riff(tmp_path / "nan.wav", 3, 1, 16000, 32, data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            samples = pcm_of(await read_all(WavFileSource(path, realtime=False)))
        assert samples[:4].tolist() == [0, 32767, -32768, 16384]

    async def test_extensible_24bit_wav_is_decoded(self, tmp_path: Path) -> None:
        """A WAVE_FORMAT_EXTENSIBLE 24-bit PCM file is decoded like plain PCM."""
        data = encode(sine(300, 0.5, 48000, 2), 3)
        path = write_riff(tmp_path / "x.wav", 1, 2, 48000, 24, data, extensible=True)
        chunks = await read_all(WavFileSource(path, realtime=False))
        assert len(chunks) == 5
        assert abs(dominant_hz(pcm_of(chunks), 16000) - 300) <= 2

    async def test_16k_mono_16bit_passes_through_bit_exact(self, tmp_path: Path) -> None:
        """A file already in the target format comes out sample for sample, then zeros."""
        original = np.frombuffer(encode(sine(440, 0.25, 16000), 2), "<i2")
        path = write_wav(tmp_path / "s.wav", sine(440, 0.25, 16000), 16000, 2)
        samples = pcm_of(await read_all(WavFileSource(path, realtime=False)))
        assert samples.size == 3 * 1600
        assert np.array_equal(samples[: original.size], original)
        assert not samples[original.size :].any()

    async def test_chunk_ms_and_rate_are_honoured(self, tmp_path: Path) -> None:
        """Other rates and chunk lengths give chunks of exactly that many samples."""
        path = write_wav(tmp_path / "in.wav", sine(200, 1.0, 44100), 44100, 2)
        chunks = await read_all(WavFileSource(path, sample_rate=8000, chunk_ms=250, realtime=False))
        assert [len(c.pcm) for c in chunks] == [4000] * 4
        assert all(c.sample_rate == 8000 for c in chunks)

    async def test_captured_at_is_start_plus_offset(self, tmp_path: Path) -> None:
        """Each chunk's captured_at is the start wall time plus the chunk's offset in the file."""
        path = write_wav(tmp_path / "in.wav", sine(440, 0.55, 16000), 16000, 2)
        source = WavFileSource(path, realtime=False, clock=lambda: 1000.0)
        chunks = await read_all(source)
        assert [c.captured_at for c in chunks] == pytest.approx([1000 + i / 10 for i in range(6)])
        assert source.dropped_chunks == 0


class TestWavErrors:
    @pytest.mark.parametrize(
        ("make", "reason"),
        [
            (lambda p: p, "No such file"),
            (lambda p: (p.mkdir(), p)[1], "cannot open"),
            (lambda p: (p.write_text("hello, not audio\n" * 10), p)[1], "not"),
            (lambda p: (p.write_bytes(b""), p)[1], "not a WAV file"),
            (lambda p: write_riff(p, 1, 1, 16000, 16, b""), "no audio"),
            (lambda p: write_riff(p, 0x55, 1, 16000, 16, b"\x01" * 100), "compressed"),
            (lambda p: write_riff(p, 3, 1, 16000, 16, b"\x01" * 100), "unsupported WAV format"),
            (lambda p: (p.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk"), p)[1], "not"),
            (lambda p: cut(write_wav(p, sine(440, 1.0, 16000), 16000, 2), 44),
             "contains no audio (0 frames of the 16000 its header declares)"),
            (lambda p: write_riff(p, 1, 1, 1_000_000_000, 16, b"\x01" * 100),
             "unsupported WAV format (16-bit, 1 ch, 1000000000 Hz)"),
        ],
        ids=["missing", "directory", "text", "empty", "zero-frames", "mp3", "float16", "truncated",
             "header-only", "absurd-rate"],
    )
    async def test_bad_file_gives_one_line_error_naming_path(
        self, tmp_path: Path, make: object, reason: str
    ) -> None:
        """Every unusable file raises AudioError with the path and the problem on one line."""
        path = make(tmp_path / "bad.wav")  # type: ignore[operator]
        with pytest.raises(AudioError) as info:
            async with WavFileSource(path, realtime=False):
                pass
        message = str(info.value)
        assert str(path) in message
        assert reason in message
        assert "\n" not in message

    async def test_cut_short_file_plays_what_is_there_with_a_warning(self, tmp_path: Path) -> None:
        """A WAV cut short (an interrupted copy) is read to its end, with one warning."""
        path = cut(write_wav(tmp_path / "cut.wav", sine(440, 1.0, 16000), 16000, 2), 44 + 16000)
        with capture_logs() as logs:
            async with WavFileSource(path, realtime=False) as source:
                chunks = [c async for c in source.chunks()]
        assert len(chunks) == 5                 # 0.5 s of the 1 s header
        (warning,) = [e for e in logs if e["event"] == "audio.file_truncated"]
        assert (warning["header_s"], warning["present_s"]) == (1.0, 0.5)

    @pytest.mark.parametrize("size", [0x7FFFF000, 0xFFFFFFFF])
    async def test_streamed_wav_of_unknown_length_plays_without_warning(
        self, tmp_path: Path, size: int
    ) -> None:
        """A WAV written to a pipe (sox, arecord, ffmpeg) has a placeholder length in its header:
        it is read to its end with no 'truncated' warning."""
        pcm = encode(sine(440, 0.5, 16000), 2)
        path = write_riff(tmp_path / "piped.wav", 1, 1, 16000, 16, pcm)
        with path.open("r+b") as file:
            file.seek(40)
            file.write(struct.pack("<I", size))
        with capture_logs() as logs:
            async with WavFileSource(path, realtime=False) as source:
                samples = pcm_of([c async for c in source.chunks()])
        assert np.array_equal(samples, np.frombuffer(pcm, "<i2"))
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == []

    async def test_chunks_outside_context_is_an_error(self, tmp_path: Path) -> None:
        """Iterating a source that was never entered raises AudioError naming the file."""
        path = write_wav(tmp_path / "in.wav", sine(440, 0.2, 16000), 16000, 2)
        with pytest.raises(AudioError, match=r"in\.wav"):
            await anext(WavFileSource(path).chunks())


class TestWavPacing:
    async def test_realtime_is_not_faster_than_real_time(self, tmp_path: Path) -> None:
        """One second of audio takes at least one second to deliver in realtime mode."""
        path = write_wav(tmp_path / "in.wav", sine(440, 1.0, 16000), 16000, 2)
        loop = asyncio.get_running_loop()
        async with WavFileSource(path) as source, asyncio.timeout(10):
            started = loop.time()
            count = len([chunk async for chunk in source.chunks()])
            elapsed = loop.time() - started
        assert count == 10
        assert elapsed >= 0.95

    async def test_stop_ends_iteration_promptly(self, tmp_path: Path) -> None:
        """stop() ends a realtime file well before the file's end."""
        path = write_wav(tmp_path / "in.wav", sine(440, 30.0, 8000), 8000, 2)
        async with WavFileSource(path) as source, asyncio.timeout(2):
            chunks = source.chunks()
            await anext(chunks)
            source.stop()
            with pytest.raises(StopAsyncIteration):
                await anext(chunks)


# ----------------------------------------------------------------------------- callback bridge


def _feed_from_thread(
    bridge: CaptureBridge, buffers: list[bytes], frames: int, loop: asyncio.AbstractEventLoop
) -> asyncio.Event:
    """Call the PortAudio callback from a real thread; the event is set once all are offered."""
    done = asyncio.Event()

    def produce() -> None:
        for data in buffers:
            bridge.on_audio(data, frames, {}, 0)
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
        assert mic.dropped_chunks == 0

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
        """A device that is not there is an AudioError listing the real input devices."""
        with pytest.raises(
            AudioError, match=r"no audio input device matches 'no-such-mic'.*'pulse'"
        ):
            async with MicrophoneSource("no-such-mic"):
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
