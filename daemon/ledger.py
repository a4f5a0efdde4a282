"""The audio ledger: audio not yet covered by a finished turn, kept for the next session.

Positions are absolute sample indexes since the daemon started (``start`` of the first chunk is 0),
so a word's time in any session maps back to the exact audio and its wall-clock capture time.
The ledger is bounded by ``backlog_seconds``: beyond it the oldest audio is dropped and counted.
A writer that can wait (a file) asks ``full`` first and waits with ``wait_for_room``.

A ``Timeline`` belongs to one session and maps that session's audio offsets (what word times are
relative to) back to ledger positions and wall-clock times, across gaps and skipped silence.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from dataclasses import dataclass, field

from daemon.events import AudioChunk


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of audio at absolute sample ``start``, captured at wall time ``captured_at``."""

    start: int
    pcm: bytes
    captured_at: float

    @property
    def samples(self) -> int:
        """Number of samples."""
        return len(self.pcm) // 2

    @property
    def end(self) -> int:
        """Absolute index one past the last sample."""
        return self.start + self.samples


class Ledger:
    """Holds audio from the end of the last finished turn to now (bounded)."""

    def __init__(self, sample_rate: int, backlog_seconds: float) -> None:
        self.sample_rate = sample_rate
        self._max_samples = int(backlog_seconds * sample_rate)
        self._pieces: deque[Piece] = deque()
        self._next = 0  # absolute index of the next appended sample
        self._covered = 0  # audio before this is covered by finished turns
        self._changed = asyncio.Event()
        self.ended = asyncio.Event()  # set by ``finish``: no more audio will come
        self.dropped_samples = 0  # total audio dropped because the backlog was full
        self.starved = 0  # readers waiting for audio beyond the end (all held audio is sent)
        self._room = asyncio.Event()  # audio was covered, a reader starved, or ``wake``

    # -- writer side ----------------------------------------------------------------------

    def append(self, chunk: AudioChunk) -> None:
        """Add a captured chunk; drop the oldest audio beyond the backlog bound."""
        piece = Piece(self._next, chunk.pcm, chunk.captured_at)
        self._pieces.append(piece)
        self._next = piece.end
        while self._pieces and self._next - self._pieces[0].start > self._max_samples:
            gone = self._pieces.popleft()
            self.dropped_samples += gone.samples
            self._covered = max(self._covered, gone.end)
        self._changed.set()

    def finish(self) -> None:
        """No more audio will come (end of file, or shutdown)."""
        self.ended.set()
        self._changed.set()

    def full(self, samples: int) -> bool:
        """Appending ``samples`` more would drop the oldest audio."""
        return bool(self._pieces) and self.overflow(samples) > 0

    def overflow(self, samples: int) -> int:
        """How much of the oldest audio appending ``samples`` more would drop."""
        return max(0, self._next + samples - self.head - self._max_samples)

    def release(self, samples: int) -> None:
        """Forget the oldest audio so that ``samples`` more fit, not counted as dropped.

        For a writer that waited (a file) when nothing else can free room: what goes was sent
        already, to a session that may still transcribe it.
        """
        self.cover(self.head + self.overflow(samples))

    async def wait_for_room(self) -> None:
        """Wait until audio is covered, a reader starts waiting beyond the end, or ``wake``.

        The caller checks ``full`` (and whatever else it waits on) before each wait.
        """
        self._room.clear()
        await self._room.wait()

    def wake(self) -> None:
        """Wake a writer in ``wait_for_room`` (to look at something else it waits on)."""
        self._room.set()

    def cover(self, position: int) -> None:
        """Audio before ``position`` is covered by finished turns (or known silence): forget it."""
        if position <= self._covered:
            return
        self._covered = position
        self._room.set()
        while self._pieces and self._pieces[0].end <= position:
            self._pieces.popleft()
        if self._pieces and self._pieces[0].start < position:
            head = self._pieces[0]
            cut = (position - head.start) * 2
            offset_s = (position - head.start) / self.sample_rate
            self._pieces[0] = Piece(position, head.pcm[cut:], head.captured_at + offset_s)

    # -- reader side ----------------------------------------------------------------------

    @property
    def eof(self) -> bool:
        """The input has ended (``finish`` was called)."""
        return self.ended.is_set()

    @property
    def head(self) -> int:
        """Absolute position of the oldest audio held (where a new session starts)."""
        return self._pieces[0].start if self._pieces else self._next

    @property
    def end(self) -> int:
        """Absolute position one past the newest audio."""
        return self._next

    def pieces(self) -> list[Piece]:
        """The audio held, oldest first (the captured chunks)."""
        return list(self._pieces)

    def seconds_held(self) -> float:
        """How much audio is held."""
        return (self._next - self.head) / self.sample_rate

    def read(self, position: int, max_samples: int) -> Piece | None:
        """Up to ``max_samples`` of audio at ``position`` (or the oldest held after it)."""
        if not self._pieces or position >= self._next:
            return None
        position = max(position, self._pieces[0].start)
        index = bisect.bisect_right(self._pieces, position, key=lambda p: p.start) - 1
        piece = self._pieces[index]
        skip = position - piece.start
        take = min(piece.samples - skip, max_samples)
        return Piece(
            position,
            piece.pcm[skip * 2 : (skip + take) * 2],
            piece.captured_at + skip / self.sample_rate,
        )

    def held_speech_s(self, part_samples: int, threshold: float,
                      stop: int | None = None) -> float:
        """Seconds held (up to ``stop``) if any part of it is speech, else 0 (only silence).

        Speech: a part of ``part_samples`` whose RMS reaches ``threshold``.
        """
        position, end = self.head, self._next if stop is None else min(stop, self._next)
        start = position
        speech = False
        while position < end and (piece := self.read(position, min(part_samples,
                                                                    end - position))):
            speech = speech or rms(piece.pcm) >= threshold
            position = piece.end
        return (position - start) / self.sample_rate if speech else 0.0

    def capture_time(self, position: int) -> float | None:
        """Wall-clock capture time of the sample at ``position``, if still held."""
        piece = self.read(position, 1)
        return piece.captured_at if piece and piece.start == position else None

    async def wait_beyond(self, position: int) -> None:
        """Wait until audio exists at ``position`` or the input has ended."""
        while position >= self._next and not self.eof:
            self._changed.clear()
            self.starved += 1
            self._room.set()        # a writer waiting for room: this reader has sent it all
            try:
                await self._changed.wait()
            finally:
                self.starved -= 1


def rms(pcm: bytes) -> float:
    """Root-mean-square level of 16-bit PCM."""
    if len(pcm) < 2:
        return 0.0
    import numpy as np  # only while catching up or switching sessions: keeps numpy out of RSS

    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    return float(np.sqrt(np.mean(samples * samples)))


@dataclass
class Timeline:
    """Maps one session's audio offsets to ledger positions and wall-clock times.

    Keeps only where each sent piece came from (not its audio), so a 3-hour session costs a few
    MB, not the 345 MB its audio would.
    """

    sample_rate: int
    _session_starts: list[int] = field(default_factory=list)  # session sample of each piece
    _starts: list[int] = field(default_factory=list)  # absolute position of each piece
    _captured: list[float] = field(default_factory=list)  # wall-clock capture time of each
    sent_samples: int = 0

    def add(self, piece: Piece) -> None:
        """Record that ``piece`` was sent as the session's next audio."""
        self._session_starts.append(self.sent_samples)
        self._starts.append(piece.start)
        self._captured.append(piece.captured_at)
        self.sent_samples += piece.samples

    @property
    def sent_seconds(self) -> float:
        """Audio sent in this session."""
        return self.sent_samples / self.sample_rate

    def locate(self, session_ms: int) -> tuple[int, float] | None:
        """(absolute position, wall-clock time) of a session offset, or None before any audio."""
        if not self._starts:
            return None
        sample = max(0, session_ms * self.sample_rate // 1000)
        index = max(0, bisect.bisect_right(self._session_starts, sample) - 1)
        following = self._session_starts[index + 1] if index + 1 < len(self._starts) \
            else self.sent_samples
        within = min(sample - self._session_starts[index], following - self._session_starts[index])
        return self._starts[index] + within, self._captured[index] + within / self.sample_rate

    def last_position(self) -> int | None:
        """Absolute position one past the last sent audio."""
        if not self._starts:
            return None
        return self._starts[-1] + self.sent_samples - self._session_starts[-1]
