"""Odd and broken WAV files as the file source meets them: each is read in full or refused with
one line naming the file and what is wrong (daemon.pcm's RIFF walker, ``check-config``, ``run``).

Every input is built at test time from the real speech in ``tests/data/speech``.
"""

from __future__ import annotations

import re
import struct
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest

from daemon.audio import WavFileSource
from daemon.errors import AudioError
from tests.audio_samples import Int16s, pcm_of
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import read_turns, run_daemon
from tests.test_e2e_local import local_config

CLIP = "espeak-s3.wav"
GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


# ----------------------------------------------------------------------------- helpers


def speech() -> Int16s:
    """The clip's 16 kHz mono samples."""
    with wave.open(str(SPEECH_DIR / CLIP)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2")


def chunk(chunk_id: bytes, body: bytes, size: int | None = None) -> bytes:
    """One RIFF chunk, its declared size ``size`` (default: the body's), padded to even."""
    declared = len(body) if size is None else size
    return chunk_id + struct.pack("<I", declared) + body + b"\0" * (len(body) & 1)


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, extensible: bool = False) -> bytes:
    """A fmt chunk; ``extensible`` wraps ``tag`` in a WAVE_FORMAT_EXTENSIBLE SubFormat."""
    align = channels * bits // 8
    body = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align,
                       align, bits)
    if extensible:
        body += struct.pack("<HHIH", 22, bits, 0, tag) + GUID_TAIL
    return chunk(b"fmt ", body)


def riff(*chunks: bytes, magic: bytes = b"RIFF", size: int | None = None) -> bytes:
    """A RIFF/WAVE file of ``chunks``; ``size`` overrides the RIFF size field."""
    body = b"WAVE" + b"".join(chunks)
    return magic + struct.pack("<I", len(body) if size is None else size) + body


def plain(samples: Int16s) -> bytes:
    """The clip as an ordinary 16 kHz mono 16-bit WAV."""
    return riff(fmt_chunk(1, 1, 16000, 16), chunk(b"data", samples.tobytes()))


async def decoded(path: Path) -> Int16s:
    """Every sample the file source delivers (16 kHz mono; the last chunk padded)."""
    async with WavFileSource(path, realtime=False) as source:
        return pcm_of([c async for c in source.chunks()])


async def refused(path: Path) -> str:
    """The AudioError the file source raises on opening ``path``."""
    with pytest.raises(AudioError) as info:
        async with WavFileSource(path, realtime=False):
            pass
    return str(info.value)


def config(tmp_path: Path, wav: Path) -> Path:
    """A config transcribing ``wav`` with the offline engine into ``tmp_path/turns.jsonl``."""
    return local_config(tmp_path, f'[audio]\nsource = "file"\npath = "{wav}"')


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


# ----------------------------------------------------------------------------- readable files


class TestUnusualButValid:
    async def test_riff_size_smaller_than_the_file_reads_all_audio(self, tmp_path: Path) -> None:
        """A RIFF size that covers only the header (a writer that never went back to fill it in)
        still gives every sample: the wave module bounded the data by it and read nothing, so
        ``run`` exited 0 with no turn and no warning."""
        samples = speech()
        data = bytearray(plain(samples))
        data[4:8] = struct.pack("<I", 36)
        path = tmp_path / "riff36.wav"
        path.write_bytes(data)
        out = await decoded(path)
        assert np.array_equal(out[: samples.size], samples)

    async def test_riff_size_zero_reads_all_audio(self, tmp_path: Path) -> None:
        """A RIFF size of 0 (a placeholder never patched) was 'not a WAVE file'."""
        samples = speech()
        data = bytearray(plain(samples))
        data[4:8] = bytes(4)
        path = tmp_path / "riff0.wav"
        path.write_bytes(data)
        assert np.array_equal((await decoded(path))[: samples.size], samples)

    async def test_rf64_file_is_read_with_its_ds64_size(self, tmp_path: Path) -> None:
        """RF64 (EBU 3306: WAV beyond 4 GB; ffmpeg -rf64, field recorders) takes the data size
        from its ds64 chunk; it was refused as 'file does not start with RIFF id'."""
        samples = speech()
        pcm = samples.tobytes()
        ds64 = chunk(b"ds64", struct.pack("<QQQI", 0, len(pcm), samples.size, 0))
        data = chunk(b"data", pcm, size=0xFFFFFFFF)
        path = tmp_path / "rf64.wav"
        path.write_bytes(riff(ds64, fmt_chunk(1, 1, 16000, 16), data,
                              magic=b"RF64", size=0xFFFFFFFF))
        out = await decoded(path)
        assert np.array_equal(out[: samples.size], samples)
        assert not out[samples.size:].any()

    async def test_extensible_float_is_read_whatever_the_python(self, tmp_path: Path) -> None:
        """WAVE_FORMAT_EXTENSIBLE float (48 kHz stereo): read by our own RIFF walker. With the
        wave module first, Python 3.12+ refused it ('unknown extended format')."""
        samples = speech().astype(np.float32) / 32768.0
        pcm = np.repeat(samples[:, None], 2, axis=1).astype("<f4").tobytes()
        path = tmp_path / "xf.wav"
        path.write_bytes(riff(fmt_chunk(3, 2, 16000, 32, extensible=True), chunk(b"data", pcm)))
        out = await decoded(path)
        assert np.abs(out[: samples.size].astype(np.int32) - speech()).max() <= 1


# ----------------------------------------------------------------------------- refused files


class TestRefusedWithOneLine:
    @pytest.mark.parametrize(
        ("name", "make", "reason"),
        [
            ("junk-past-end", lambda s: riff(chunk(b"JUNK", b"", size=0x7FFFFFF0),
                                             fmt_chunk(1, 1, 16000, 16), chunk(b"data", s)),
             "its 'JUNK' chunk at byte 12 claims 2147483632 bytes, past the end of the file"),
            ("fmt-14-bytes", lambda s: riff(chunk(b"fmt ", struct.pack("<HHIIH", 1, 1, 16000,
                                                                          32000, 2)),
                                            chunk(b"data", s)),
             "its fmt chunk has 14 bytes, fewer than 16"),
            ("extensible-no-subformat",
             lambda s: riff(chunk(b"fmt ", struct.pack("<HHIIHHH", 0xFFFE, 1, 16000, 32000, 2,
                                                       16, 0)), chunk(b"data", s)),
             "its WAVE_FORMAT_EXTENSIBLE fmt chunk has 18 bytes, too few for a SubFormat"),
            ("mp3", lambda s: b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64" + s,
             "not a WAV file (it is an MP3 file; convert it to WAV first)"),
            ("flac", lambda s: b"fLaC\x00\x00\x00\x22" + s,
             "not a WAV file (it is a FLAC file; convert it to WAV first)"),
            ("ogg", lambda s: b"OggS\x00\x02" + s, "it is an Ogg (Vorbis/Opus) file"),
            ("a-law", lambda s: riff(fmt_chunk(6, 1, 8000, 8), chunk(b"data", s)),
             "unsupported WAV encoding (format tag 0x0006: A-law, compressed)"),
            ("data-before-fmt", lambda s: riff(chunk(b"data", s), fmt_chunk(1, 1, 16000, 16)),
             "its data chunk at byte 12 comes before any fmt chunk"),
        ],
        ids=["junk-past-end", "fmt-14-bytes", "extensible-no-subformat", "mp3", "flac", "ogg",
             "a-law", "data-before-fmt"],
    )
    async def test_message_names_the_file_and_the_problem(
        self, tmp_path: Path, name: str, make: object, reason: str
    ) -> None:
        """Each is an AudioError of one line with the path and the part of the file at fault (a
        chunk larger than the file was a bare RuntimeError: a traceback and exit 1)."""
        path = tmp_path / f"{name}.wav"
        path.write_bytes(make(speech().tobytes()))  # type: ignore[operator]
        message = await refused(path)
        assert message.startswith(f"audio file {path}: ")
        assert reason in message
        assert "\n" not in message

    async def test_check_config_reports_an_oversized_chunk_with_exit_78(
        self, tmp_path: Path
    ) -> None:
        """``check-config`` on a chunk that runs past the end: exit 78, one line naming the key,
        the file and the chunk (it was a traceback, exit 1)."""
        wav = tmp_path / "broken.wav"
        wav.write_bytes(riff(chunk(b"LIST", b"", size=0x10000000), fmt_chunk(1, 1, 16000, 16),
                             chunk(b"data", speech().tobytes())))
        result = await run_daemon("check-config", "--config", str(config(tmp_path, wav)),
                                  limit_s=30)
        assert result.code == 78, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        [line] = [ln for ln in result.stderr.splitlines() if "audio.path" in ln]
        assert f"audio.path: {wav}: not a usable WAV file (its 'LIST' chunk at byte 12" in line


# ----------------------------------------------------------------------------- end to end


async def test_run_transcribes_a_file_whose_riff_size_was_never_filled_in(
    tmp_path: Path,
) -> None:
    """``transcribed run`` with the offline engine on a WAV whose RIFF size covers only its
    header: the sentence comes out (it exited 0 with no turn at all)."""
    pytest.importorskip("faster_whisper")
    data = bytearray(plain(speech()))
    data[4:8] = struct.pack("<I", 36)
    wav = tmp_path / "unpatched.wav"
    wav.write_bytes(data)
    result = await run_daemon("run", "--config", str(config(tmp_path, wav)), limit_s=90)
    assert result.code == 0, result.stderr[-2000:]
    [record] = read_turns(tmp_path / "turns.jsonl")
    expected, got = words(TRANSCRIPTS[CLIP]), words(record["transcript"])
    assert len(set(expected) & set(got)) >= len(expected) - 2, record["transcript"]


@pytest.mark.parametrize(("width", "value"), [(4, 3e38), (8, 1e300)])
async def test_huge_float_samples_are_full_scale_without_warnings(
    tmp_path: Path, width: int, value: float
) -> None:
    """Finite but absurd float samples (a corrupt float WAV) read as full scale, with no numpy
    'overflow encountered' RuntimeWarning (two lines on stderr, outside the log format)."""
    data = np.array([value, -value, 0.25] * 2000, f"<f{width}").tobytes()
    path = tmp_path / "huge.wav"
    path.write_bytes(riff(fmt_chunk(3, 1, 16000, 8 * width), chunk(b"data", data)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = await decoded(path)
    assert out[:3].tolist() == [32767, -32768, 8192]
