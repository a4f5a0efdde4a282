"""PCM plumbing shared by the audio sources: format conversion, re-chunking, WAV decoding.

Any PCM (8/16/24/32-bit integer or float, any rate, any channel count) becomes 16-bit mono at
the configured rate, cut into exact chunks. Nothing here touches the event loop.
"""

from __future__ import annotations

import os
import struct
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from daemon.errors import AudioError
from daemon.events import AudioChunk

_FORMAT_PCM: Final = 0x0001
_FORMAT_FLOAT: Final = 0x0003
_FORMAT_EXTENSIBLE: Final = 0xFFFE
_MIN_HEADER: Final = 44             # bytes before the audio in the smallest WAV file
MIN_RATE: Final = 4000              # sample rates a WAV file may have (Hz)
MAX_RATE: Final = 384_000
# Data sizes a writer puts in the header when it cannot go back to fill in the real one (it
# writes to a pipe: sox, arecord, ffmpeg): the length is unknown, not cut short.
_UNKNOWN_SIZES: Final = (0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000)

if TYPE_CHECKING:  # numpy and soxr load only when a conversion is needed
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PcmFormat:
    """Interleaved PCM as a file or device delivers it."""

    rate: int
    channels: int
    width: int  # bytes per sample
    is_float: bool = False


def _to_float(data: bytes, fmt: PcmFormat) -> FloatArray:
    """Decode interleaved PCM (whole frames only) and downmix it to mono float32."""
    import numpy as np

    usable = len(data) - len(data) % (fmt.width * fmt.channels)
    raw = data[:usable]
    if fmt.is_float:    # NaN or infinite samples (a broken file) are silence / full scale
        decoded = np.frombuffer(raw, f"<f{fmt.width}").astype(np.float32)
        samples = np.nan_to_num(decoded, nan=0.0, posinf=1.0, neginf=-1.0)
    elif fmt.width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt.width == 3:  # place each 24-bit sample in the top of an int32
        wide = np.zeros((usable // 3, 4), np.uint8)
        wide[:, 1:] = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        samples = wide.view("<i4").ravel().astype(np.float32) / 2.0**31
    else:
        samples = np.frombuffer(raw, f"<i{fmt.width}").astype(np.float32) / 2.0 ** (
            8 * fmt.width - 1
        )
    if fmt.channels > 1:
        samples = samples.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
    return samples


def _to_int16(samples: FloatArray) -> bytes:
    """Encode float samples as 16-bit little-endian PCM, clipping out-of-range values."""
    import numpy as np

    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


class Converter:
    """Turns PCM of any format into mono int16 at ``out_rate``, seamlessly across calls."""

    def __init__(self, fmt: PcmFormat, out_rate: int) -> None:
        self._fmt = fmt
        self._passthrough = (fmt.rate, fmt.channels, fmt.width, fmt.is_float) == (
            out_rate,
            1,
            2,
            False,
        )
        self._resampler: Any = None
        if fmt.rate != out_rate:
            import soxr

            self._resampler = soxr.ResampleStream(fmt.rate, out_rate, 1, dtype="float32")

    def convert(self, data: bytes, *, last: bool = False) -> bytes:
        """Convert the next block; ``last`` flushes the resampler's tail."""
        if self._passthrough:
            return data
        mono = _to_float(data, self._fmt)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        return _to_int16(mono)


class Rechunker:
    """Cuts a PCM stream into exact chunks, tracking each chunk's first-sample wall time."""

    def __init__(self, sample_rate: int, chunk_ms: int) -> None:
        self._rate = sample_rate
        self._size = sample_rate * chunk_ms // 1000 * 2
        self._buf = bytearray()
        self._start = 0.0

    def push(self, pcm: bytes, captured_at: float) -> list[AudioChunk]:
        """Add ``pcm`` whose first sample was captured at ``captured_at``; return full chunks."""
        self._start = captured_at - len(self._buf) / 2 / self._rate  # re-anchor: no drift
        self._buf += pcm
        chunks = []
        while len(self._buf) >= self._size:
            chunks.append(AudioChunk(bytes(self._buf[: self._size]), self._start, self._rate))
            del self._buf[: self._size]
            self._start += self._size / 2 / self._rate
        return chunks

    def flush(self) -> AudioChunk | None:
        """Return the remainder padded with silence to a full chunk, if there is any."""
        if not self._buf:
            return None
        pcm = bytes(self._buf) + bytes(self._size - len(self._buf))
        self._buf.clear()
        return AudioChunk(pcm, self._start, self._rate)


# --------------------------------------------------------------------------- WAV files


class WavReader:
    """An open WAV file: its format, its length and a blocking frame reader."""

    def __init__(
        self, fmt: PcmFormat, frames: int, read: Callable[[int], bytes], close: Callable[[], None],
        *, declared: int | None = None,
    ) -> None:
        self.fmt, self.frames, self.read, self.close = fmt, frames, read, close
        self.declared = frames if declared is None else declared   # what the header says

    @property
    def truncated(self) -> bool:
        """The file holds fewer frames than its header declares (an interrupted copy)."""
        frame_bytes = self.fmt.width * self.fmt.channels
        streamed = any(self.declared == size // frame_bytes for size in _UNKNOWN_SIZES)
        return self.frames < self.declared and not streamed


def open_wav(path: Path) -> WavReader:
    """Open ``path`` with :mod:`wave`, falling back to a RIFF parser for float/extensible."""
    try:
        wav = wave.open(str(path), "rb")
    except wave.Error as exc:
        if str(exc).startswith("unknown format"):
            return _open_riff(path)
        raise AudioError(f"audio file {path}: not a usable WAV file ({exc})") from None
    except (EOFError, struct.error):
        raise AudioError(f"audio file {path}: not a WAV file (empty or truncated header)") from None
    except OSError as exc:
        raise AudioError(f"audio file {path}: cannot open ({exc.strerror or exc})") from None
    fmt = PcmFormat(wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
    declared = wav.getnframes()
    frame_bytes = max(1, fmt.width * fmt.channels)
    present = (os.stat(path).st_size - _MIN_HEADER) // frame_bytes   # an upper bound
    reader = WavReader(fmt, max(0, min(declared, present)), wav.readframes, wav.close,
                       declared=declared)
    _check_wav(path, reader)
    return reader


def _open_riff(path: Path) -> WavReader:
    """Open a float or WAVE_FORMAT_EXTENSIBLE file that :mod:`wave` rejects."""
    file = path.open("rb")
    try:
        tag, fmt, offset, size = _parse_riff(file, path)
        if tag not in (_FORMAT_PCM, _FORMAT_FLOAT):
            raise AudioError(
                f"audio file {path}: unsupported WAV encoding (format tag 0x{tag:04x}, compressed);"
                " only PCM and float WAV files are supported"
            )
        declared = size
        size = min(size, os.fstat(file.fileno()).st_size - offset)
        file.seek(offset)
    except BaseException:
        file.close()
        raise
    frame_bytes = max(1, fmt.width * fmt.channels)
    end = offset + size - size % frame_bytes

    def read(frames: int) -> bytes:
        return file.read(max(0, min(frames * frame_bytes, end - file.tell())))

    reader = WavReader(fmt, size // frame_bytes, read, file.close,
                       declared=declared // frame_bytes)
    _check_wav(path, reader)  # closes the file when it rejects it
    return reader


def _parse_riff(file: BinaryIO, path: Path) -> tuple[int, PcmFormat, int, int]:
    """Return (format tag, format, data offset, data size) from a RIFF/WAVE header."""
    header = file.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:] != b"WAVE":
        raise AudioError(f"audio file {path}: not a WAV file (no RIFF/WAVE header)")
    tag, fmt = -1, None
    while len(chunk := file.read(8)) == 8:
        chunk_id, size = struct.unpack("<4sI", chunk)
        if chunk_id == b"data" and fmt is not None:
            return tag, fmt, file.tell(), size
        body = file.read(size + (size & 1))
        if chunk_id == b"fmt " and len(body) >= 16:
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _FORMAT_EXTENSIBLE and len(body) >= 26:
                (tag,) = struct.unpack_from("<H", body, 24)  # first bytes of the SubFormat GUID
            fmt = PcmFormat(rate, channels, (bits + 7) // 8, tag == _FORMAT_FLOAT)
    raise AudioError(f"audio file {path}: not a usable WAV file (fmt or data chunk missing)")


def _check_wav(path: Path, reader: WavReader) -> None:
    """Reject formats we cannot decode and files without audio."""
    fmt = reader.fmt
    widths = (4, 8) if fmt.is_float else (1, 2, 3, 4)
    if fmt.width not in widths or fmt.channels < 1 or not MIN_RATE <= fmt.rate <= MAX_RATE:
        reader.close()
        raise AudioError(
            f"audio file {path}: unsupported WAV format "
            f"({fmt.width * 8}-bit, {fmt.channels} ch, {fmt.rate} Hz; readable: 8/16/24/32-bit "
            f"PCM or 32/64-bit float, {MIN_RATE // 1000}-{MAX_RATE // 1000} kHz)"
        )
    if reader.frames == 0:
        reader.close()
        cut = f" of the {reader.declared} its header declares" if reader.truncated else ""
        raise AudioError(f"audio file {path}: contains no audio (0 frames{cut})")
