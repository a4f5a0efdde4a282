"""Test audio shared by the WAV and microphone tests: tones, PCM helpers, the speech clip."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from daemon.events import AudioChunk
from tests.conftest import SPEECH_DIR

SPEECH = SPEECH_DIR / "espeak-s1.wav"

Floats = npt.NDArray[np.float64]
Int16s = npt.NDArray[np.int16]


def write_pcm16(path: Path, pcm: bytes, rate: int = 16000) -> Path:
    """Write mono 16-bit PCM (silence: ``bytes(2 * frames)``) as a WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return path


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


def pcm_of(chunks: list[AudioChunk]) -> Int16s:
    """All chunks' samples as one int16 array."""
    return np.frombuffer(b"".join(c.pcm for c in chunks), "<i2")


def dominant_hz(samples: Int16s, rate: int) -> float:
    """The frequency of the strongest FFT bin."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum)) * rate / samples.size


def speech_pcm() -> Int16s:
    """The reference speech clip (16 kHz mono 16-bit) as samples."""
    with wave.open(str(SPEECH), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
