"""Deterministic, content-based "speech recognition" for the fake AssemblyAI service.

The fake knows a few reference recordings and their transcripts. Each reference is split into
utterances by energy (10 ms frames; pauses shorter than 250 ms stay inside an utterance); its
sentences are matched 1:1 to utterances when the counts agree, otherwise the words are spread
over all voiced audio. Inside an utterance the words are spread over its voiced span in
proportion to their length.

Received audio is located in the references by content: every 64-sample window of every
reference is hashed (a polynomial hash mod 2**64, computed for all offsets at once with prefix
sums), quiet windows (all samples within ±8, i.e. espeak's digital silence) and windows that
repeat inside one reference are left out. The received stream is hashed every 32 samples and each
hit marks 32 reference samples as *arrived* at that stream position. A word is *heard* once at
least 80 % of the indexable samples of its span have arrived in the session. When references
overlap (``espeak-s1.wav`` is the start of ``espeak-five-sentences.wav``), the reference that
comes first in the mapping wins. Audio that matches nothing (noise, tones, other rates or
encodings) produces no words.
"""

from __future__ import annotations

import json
import re
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

SAMPLE_RATE: Final = 16_000
HEARD_FRACTION: Final = 0.8
_WINDOW: Final = 64
_STEP: Final = 32
_QUIET: Final = 8
_FRAME: Final = 160
_MERGE_GAP_FRAMES: Final = 25
_MIN_RUN_FRAMES: Final = 3
_PRIME: Final = 0x9E3779B97F4A7C15
_MASK: Final = (1 << 64) - 1

Int16Array = npt.NDArray[np.int16]
Reference = tuple[Int16Array, str]


def load_reference(path: str | Path, text: str) -> Reference:
    """Read a 16 kHz mono 16-bit WAV file and pair it with its transcript.

    Raises:
        ValueError: if the file is not 16 kHz mono 16-bit PCM.
    """
    with wave.open(str(path), "rb") as wav:
        shape = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
        if shape != (SAMPLE_RATE, 1, 2):
            raise ValueError(f"{path}: expected 16000 Hz mono 16-bit WAV, got {shape}")
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return samples.astype(np.int16), text


def load_speech_references(directory: str | Path, *names: str) -> dict[str, Reference]:
    """Load the named WAV files of a directory with their ``transcripts.json`` entries."""
    folder = Path(directory)
    transcripts: dict[str, str] = json.loads((folder / "transcripts.json").read_text("utf-8"))
    chosen = names or tuple(transcripts)
    return {name: load_reference(folder / name, transcripts[name]) for name in chosen}


@dataclass(frozen=True, slots=True)
class RefWord:
    """A reference word: written form, normalised form and global sample span [start, end)."""

    text: str
    norm: str
    utterance: int
    start: int
    end: int


def _normalise(token: str) -> str:
    return re.sub(r"[^\w']+", "", token.lower()).strip("'")


def _window_hashes(x: Int16Array) -> npt.NDArray[np.uint64]:
    """Hash every ``_WINDOW``-sample window of ``x`` (result length ``len(x) - _WINDOW + 1``)."""
    n = len(x)
    if n < _WINDOW:
        return np.zeros(0, dtype=np.uint64)
    values = x.astype(np.int64).astype(np.uint64) + np.uint64(32768)
    powers = np.empty(n, dtype=np.uint64)
    powers[0] = 1
    powers[1:] = _PRIME
    powers = np.cumprod(powers, dtype=np.uint64)
    inverse = np.empty(n, dtype=np.uint64)
    inverse[0] = 1
    inverse[1:] = pow(_PRIME, -1, 1 << 64) & _MASK
    inverse = np.cumprod(inverse, dtype=np.uint64)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(values * powers, dtype=np.uint64, out=prefix[1:])
    starts = n - _WINDOW + 1
    hashed: npt.NDArray[np.uint64] = (prefix[_WINDOW:] - prefix[:starts]) * inverse[:starts]
    return hashed


def _indexable(x: Int16Array) -> npt.NDArray[np.bool_]:
    """Windows worth indexing: not quiet and not repeated inside this reference."""
    if len(x) < _WINDOW:
        return np.zeros(0, dtype=np.bool_)
    loud = np.abs(x.astype(np.int32)) > _QUIET
    counts = np.concatenate(([0], np.cumsum(loud)))
    keep: npt.NDArray[np.bool_] = (counts[_WINDOW:] - counts[: len(x) - _WINDOW + 1]) > 0
    hashes = _window_hashes(x)
    _, inverse, repeats = np.unique(hashes, return_inverse=True, return_counts=True)
    unique: npt.NDArray[np.bool_] = keep & (repeats[inverse] == 1)
    return unique


def _voiced_runs(x: Int16Array) -> list[tuple[int, int]]:
    """Return voiced sample spans [start, end) found by 10 ms frame energy."""
    frames = x[: len(x) // _FRAME * _FRAME].astype(np.float64).reshape(-1, _FRAME)
    if len(frames) == 0:
        return []
    rms = np.sqrt((frames**2).mean(axis=1))
    voiced = rms > max(0.08 * float(np.percentile(rms, 95)), 100.0)
    runs: list[list[int]] = []
    for i in np.flatnonzero(voiced):
        if runs and i - runs[-1][1] <= _MERGE_GAP_FRAMES:
            runs[-1][1] = int(i) + 1
        else:
            runs.append([int(i), int(i) + 1])
    return [(a * _FRAME, b * _FRAME) for a, b in runs if b - a >= _MIN_RUN_FRAMES]


def _merge_to(runs: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """Merge the runs separated by the shortest pauses until at most ``count`` remain."""
    runs = list(runs)
    while len(runs) > max(count, 1):
        gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
        i = gaps.index(min(gaps))
        runs[i : i + 2] = [(runs[i][0], runs[i + 1][1])]
    return runs


def _spread(tokens: list[str], start: int, end: int) -> list[tuple[int, int]]:
    """Spread tokens over [start, end) in proportion to their length (plus one for the space)."""
    weights = np.array([len(t) + 1 for t in tokens], dtype=np.float64)
    edges = start + np.concatenate(([0.0], np.cumsum(weights))) / weights.sum() * (end - start)
    return [(int(edges[i]), max(int(edges[i + 1]), int(edges[i]) + 1)) for i in range(len(tokens))]


def _align(x: Int16Array, text: str) -> list[tuple[list[str], int, int]]:
    """Pair groups of written tokens with the sample spans of their utterances."""
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    runs = _merge_to(_voiced_runs(x), len(sentences)) or [(0, len(x))]
    if len(runs) == len(sentences):
        return [(s, a, b) for s, (a, b) in zip(sentences, runs, strict=True)]
    tokens = [t for s in sentences for t in s]
    voiced = sum(b - a for a, b in runs)
    groups: list[tuple[list[str], int, int]] = [([], a, b) for a, b in runs]
    for token, (a, _) in zip(tokens, _spread(tokens, 0, voiced), strict=True):
        offset, k = a, 0
        while k < len(runs) - 1 and offset >= runs[k][1] - runs[k][0]:
            offset -= runs[k][1] - runs[k][0]
            k += 1
        groups[k][0].append(token)
    return [g for g in groups if g[0]]


class ReferenceIndex:
    """All references, their words and utterances, and a content hash index over their samples."""

    def __init__(self, references: Mapping[str, Reference]) -> None:
        self.words: list[RefWord] = []
        self.utterance_words: list[list[int]] = []
        hashes, positions, indexable, arrays = [], [], [], []
        offset = 0
        for _name, (samples, text) in references.items():
            x = np.ascontiguousarray(samples, dtype=np.int16)
            arrays.append(x)
            self._add_words(x, text, offset)
            ok = _indexable(x)
            hashes.append(_window_hashes(x)[ok])
            positions.append(np.flatnonzero(ok) + offset)
            indexable.append(np.concatenate((ok, np.zeros(len(x) - len(ok), dtype=np.bool_))))
            offset += len(x)
        self.total_samples = offset
        empty = np.zeros(0, dtype=np.int16)
        self._samples = np.concatenate(arrays or [empty])
        all_hashes = np.concatenate(hashes or [np.zeros(0, dtype=np.uint64)])
        all_positions = np.concatenate(positions or [np.zeros(0, dtype=np.int64)])
        order = np.lexsort((all_positions, all_hashes))
        first = np.ones(len(order), dtype=np.bool_)
        first[1:] = all_hashes[order][1:] != all_hashes[order][:-1]
        self._hashes = all_hashes[order][first]
        self._positions = all_positions[order][first].astype(np.int64)
        mask = np.concatenate(indexable or [np.zeros(0, dtype=np.bool_)])
        self.indexable_prefix = np.concatenate(([0], np.cumsum(mask)))
        self.indexable = mask
        self.word_starts = np.array([w.start for w in self.words], dtype=np.int64)

    def _add_words(self, x: Int16Array, text: str, offset: int) -> None:
        for tokens, start, end in _align(x, text):
            utterance = len(self.utterance_words)
            ids: list[int] = []
            for token, (a, b) in zip(tokens, _spread(tokens, start, end), strict=True):
                ids.append(len(self.words))
                norm = _normalise(token) or token.lower()
                self.words.append(RefWord(token, norm, utterance, a + offset, b + offset))
            self.utterance_words.append(ids)

    def locate(
        self, windows_from: Int16Array, starts: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Find which of the windows starting at ``starts`` (indices into ``windows_from``) match.

        Returns:
            The matched window starts and the reference positions they match.
        """
        hashes = _window_hashes(windows_from)[starts]
        slot = np.searchsorted(self._hashes, hashes)
        slot = np.minimum(slot, max(len(self._hashes) - 1, 0))
        if len(self._hashes) == 0:
            return starts[:0], starts[:0]
        found = self._hashes[slot] == hashes
        query, ref = starts[found], self._positions[slot[found]]
        span = np.arange(_WINDOW)
        same = (windows_from[query[:, None] + span] == self._samples[ref[:, None] + span]).all(1)
        return query[same], ref[same]


class Hearing:
    """What one session has received: its audio stream and where each reference sample arrived."""

    def __init__(self, index: ReferenceIndex) -> None:
        self.index = index
        self.received_samples = 0
        self.heard: set[int] = set()
        self._arrival = np.full(index.total_samples, -1, dtype=np.int64)
        self._pending = np.zeros(0, dtype=np.int16)
        self._pending_start = 0

    def feed(self, samples: Int16Array) -> list[int]:
        """Take the next received samples; return the ids of words newly heard, in arrival order."""
        buf = np.concatenate((self._pending, samples))
        self.received_samples += len(samples)
        count = max((len(buf) - _WINDOW) // _STEP + 1, 0)
        starts = np.arange(count, dtype=np.int64) * _STEP
        self._pending = buf[count * _STEP :]
        base = self._pending_start
        self._pending_start += count * _STEP
        if count == 0 or self.index.total_samples == 0:
            return []
        query, ref = self.index.locate(buf, starts)
        if len(ref) == 0:
            return []
        span = np.arange(_STEP)
        targets = (ref[:, None] + span).ravel()
        arrived = (query[:, None] + span).ravel() + base
        fresh = self._arrival[targets] < 0
        self._arrival[targets[fresh]] = arrived[fresh]
        return self._newly_heard(ref)

    def _newly_heard(self, ref: npt.NDArray[np.int64]) -> list[int]:
        touched = np.unique(np.searchsorted(self.index.word_starts, ref, side="right") - 1)
        new: list[int] = []
        for word_id in (int(w) for w in touched if w >= 0):
            nxt = word_id + 1  # the window may also reach into the next word
            for wid in (word_id, nxt):
                if wid < len(self.index.words) and wid not in self.heard and wid not in new:
                    if self.coverage(wid) >= HEARD_FRACTION:
                        new.append(wid)
        self.heard.update(new)
        return sorted(new, key=lambda w: self.span_ms(w)[0])

    def coverage(self, word_id: int) -> float:
        """Fraction of the word's indexable samples that have arrived in this session."""
        word = self.index.words[word_id]
        total = self.index.indexable_prefix[word.end] - self.index.indexable_prefix[word.start]
        if total == 0:
            return 0.0
        mask = self.index.indexable[word.start : word.end]
        arrived = np.count_nonzero(self._arrival[word.start : word.end][mask] >= 0)
        return float(arrived) / float(total)

    def span_ms(self, word_id: int) -> tuple[int, int]:
        """Where in the session's stream the word's audio arrived, in milliseconds."""
        word = self.index.words[word_id]
        arrived = self._arrival[word.start : word.end]
        arrived = arrived[arrived >= 0]
        if len(arrived) == 0:
            return 0, 0
        return int(arrived.min()) * 1000 // SAMPLE_RATE, int(
            arrived.max() + 1
        ) * 1000 // SAMPLE_RATE

    @property
    def received_ms(self) -> int:
        """Milliseconds of audio received in this session."""
        return self.received_samples * 1000 // SAMPLE_RATE
