"""Tests for the WAV file source (daemon.filesource, daemon.pcm): conversion, errors, pacing."""

from __future__ import annotations

import asyncio
import struct
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.audio import WavFileSource
from daemon.errors import AudioError
from daemon.events import AudioChunk
from tests.audio_samples import Floats, dominant_hz, encode, pcm_of, sine

CHUNK_BYTES = 3200  # 100 ms at 16 kHz, 16-bit


# ----------------------------------------------------------------------------- helpers


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


async def read_all(source: WavFileSource) -> list[AudioChunk]:
    """Every chunk of a WAV source."""
    async with source:
        return [chunk async for chunk in source.chunks()]


# ----------------------------------------------------------------------------- WAV files


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
             "unsupported WAV format (16-bit, 1 ch, 1000000000 Hz; readable: 8/16/24/32-bit PCM "
             "or 32/64-bit float, 4-384 kHz)"),
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
