"""PCM plumbing shared by the audio sources: format conversion, re-chunking, WAV decoding.

Any PCM (8/16/24/32-bit integer or float, any rate, any channel count) becomes 16-bit mono at
the configured rate, cut into exact chunks. Nothing here touches the event loop.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final
from uuid import UUID

from daemon.errors import AudioError
from daemon.events import AudioChunk

_FORMAT_PCM: Final = 0x0001
_FORMAT_FLOAT: Final = 0x0003
_FORMAT_EXTENSIBLE: Final = 0xFFFE
# WAVE_FORMAT_EXTENSIBLE: the SubFormat GUID is the format tag followed by these 14 bytes
_GUID_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_ENCODINGS: Final = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM",
                     0x0031: "GSM 6.10", 0x0050: "MPEG", 0x0055: "MP3"}
# what a file that is no WAV file starts with: what to tell the user
_SIGNATURES: Final = (
    (b"ID3", "it is an MP3 file; convert it to WAV first"),
    (b"fLaC", "it is a FLAC file; convert it to WAV first"),
    (b"OggS", "it is an Ogg (Vorbis/Opus) file; convert it to WAV first"),
    (b"FORM", "it is an AIFF file; convert it to WAV first"),
    (b"caff", "it is a CAF file; convert it to WAV first"),
    (b"RIFX", "it is a big-endian (RIFX) WAV file; convert it to a little-endian WAV first"),
    (b"\x1aE\xdf\xa3", "it is a WebM/Matroska file; convert it to WAV first"),
)
# float samples beyond this (a broken file: 1e38) would overflow numpy's scaling with a
# two-line RuntimeWarning on stderr; anything above 1.0 is clipped to full scale anyway
_FLOAT_BOUND: Final = 1e4
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
    if fmt.is_float:    # NaN or infinite samples (a broken file) are silence / full scale;
        decoded = np.frombuffer(raw, f"<f{fmt.width}")  # huge ones are bounded before the cast
        finite = np.nan_to_num(decoded, nan=0.0, posinf=1.0, neginf=-1.0)  # and the scaling
        samples: FloatArray = np.clip(finite, -_FLOAT_BOUND, _FLOAT_BOUND).astype(np.float32)
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
    """Open ``path``: any RIFF/RF64 WAVE file holding PCM or float audio.

    Our own chunk walker, not :mod:`wave`: that module's answer depends on the Python version
    (3.12 rejects WAVE_FORMAT_EXTENSIBLE float) and a chunk that claims more bytes than the file
    holds makes it raise a bare ``RuntimeError``.
    """
    try:
        file = path.open("rb")
    except OSError as exc:
        raise AudioError(f"audio file {path}: cannot open ({exc.strerror or exc})") from None
    try:
        size = os.fstat(file.fileno()).st_size
        fmt, offset, declared = _parse_riff(file, path, size)
        file.seek(offset)
    except BaseException:
        file.close()
        raise
    frame_bytes = max(1, fmt.width * fmt.channels)
    present = min(declared, size - offset)
    end = offset + present - present % frame_bytes

    def read(frames: int) -> bytes:
        return file.read(max(0, min(frames * frame_bytes, end - file.tell())))

    reader = WavReader(fmt, present // frame_bytes, read, file.close,
                       declared=declared // frame_bytes)
    _check_wav(path, reader)  # closes the file when it rejects it
    return reader


def _parse_riff(file: BinaryIO, path: Path, file_size: int) -> tuple[PcmFormat, int, int]:
    """Return (format, data offset, declared data size) from a RIFF/RF64 WAVE header."""
    header = file.read(12)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RF64") or header[8:] != b"WAVE":
        raise _not_wav(path, header)
    fmt: PcmFormat | None = None
    data_size64: int | None = None           # RF64: the real data size, from the ds64 chunk
    while len(chunk := file.read(8)) == 8:
        chunk_id, size = struct.unpack("<4sI", chunk)
        at = file.tell() - 8
        if chunk_id == b"data":
            if fmt is None:
                raise _unusable(path, f"its data chunk at byte {at} comes before any fmt chunk")
            if size == 0xFFFFFFFF and data_size64 is not None:
                size = data_size64
            return fmt, at + 8, size
        if at + 8 + size > file_size:
            raise _unusable(path, f"its {_chunk_name(chunk_id)} chunk at byte {at} claims {size} "
                                  f"bytes, past the end of the file ({file_size} bytes)")
        if chunk_id == b"fmt ":
            fmt = _read_fmt(file.read(size), path)
        elif chunk_id == b"ds64" and header[:4] == b"RF64" and size >= 24:
            (data_size64,) = struct.unpack_from("<8xQ", file.read(size))
        else:
            file.seek(size, os.SEEK_CUR)
        file.seek(size & 1, os.SEEK_CUR)      # chunks of odd size are padded to even
    raise _unusable(path, "no fmt chunk" if fmt is None else "no data chunk")


def _read_fmt(body: bytes, path: Path) -> PcmFormat:
    """Decode a fmt chunk; only PCM and float are accepted."""
    if len(body) < 16:
        raise _unusable(path, f"its fmt chunk has {len(body)} bytes, fewer than 16")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise _unusable(path, f"its WAVE_FORMAT_EXTENSIBLE fmt chunk has {len(body)} bytes, "
                                  "too few for a SubFormat (40)")
        guid = body[24:40]
        if guid[2:] != _GUID_TAIL:
            raise _unsupported(path, f"WAVE_FORMAT_EXTENSIBLE SubFormat {UUID(bytes_le=guid)}")
        (tag,) = struct.unpack_from("<H", guid)
    if tag not in (_FORMAT_PCM, _FORMAT_FLOAT):
        name = f"{_ENCODINGS[tag]}, compressed" if tag in _ENCODINGS else "compressed"
        raise _unsupported(path, f"format tag 0x{tag:04x}: {name}")
    return PcmFormat(rate, channels, (bits + 7) // 8, tag == _FORMAT_FLOAT)


def _unusable(path: Path, why: str) -> AudioError:
    return AudioError(f"audio file {path}: not a usable WAV file ({why})")


def _unsupported(path: Path, encoding: str) -> AudioError:
    return AudioError(f"audio file {path}: unsupported WAV encoding ({encoding}); "
                      "only PCM and float WAV files are supported")


def _chunk_name(chunk_id: bytes) -> str:
    """A chunk id for a message: ``'LIST'``, or escaped bytes when it is not text."""
    return repr(chunk_id.decode("latin-1"))


def _not_wav(path: Path, header: bytes) -> AudioError:
    """The error for a file that is not a RIFF/WAVE file: what it seems to be, if we can tell."""
    if not header:
        return AudioError(f"audio file {path}: not a WAV file (empty file)")
    for magic, what in _SIGNATURES:
        if header.startswith(magic):
            return AudioError(f"audio file {path}: not a WAV file ({what})")
    if header[4:8] == b"ftyp":
        return AudioError(f"audio file {path}: not a WAV file (it is an MP4/M4A file; convert it "
                          "to WAV first)")
    if header[:1] == b"\xff" and header[1:2] >= b"\xe0":
        return AudioError(f"audio file {path}: not a WAV file (it is an MP3 or AAC file; convert "
                          "it to WAV first)")
    if header[:4] not in (b"RIFF", b"RF64"):
        return AudioError(f"audio file {path}: not a WAV file (it does not start with 'RIFF')")
    if len(header) < 12:
        return AudioError(f"audio file {path}: not a WAV file (its header is cut short at "
                          f"{len(header)} bytes)")
    return AudioError(f"audio file {path}: not a WAV file (it is a RIFF "
                      f"{_chunk_name(header[8:])} file, not WAVE)")


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
