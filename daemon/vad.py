"""Streaming voice activity detection and endpointing for the local engine.

:class:`SileroStream` runs faster-whisper's bundled silero VAD (ONNX, no torch) frame by frame and
keeps the model's LSTM state across chunks, so a live stream costs ~0.1 ms of CPU per 32 ms frame
and gives the same probabilities as running the model over the whole recording.

:class:`Endpointer` is a pure state machine over 16 kHz chunks and their speech probabilities. It
cuts the stream into turns: ``preroll_ms`` of audio before the first speech chunk, the speech,
and ``pad_ms`` of the silence after it. It reports three events:

* :class:`TurnPaused`: the speaker stopped for ``pad_ms``; the audio is the turn as it will be
  committed if the silence lasts, so the engine may start transcribing it right away.
* :class:`TurnResumed`: speech came back before ``end_silence_ms``; the paused audio is stale.
* :class:`TurnEnded`: the turn is over (``end_silence_ms`` of silence, ``max_turn_ms`` reached,
  or end of input); its audio is final.

A turn that reaches ``max_turn_ms`` without ending is cut in its last pause (a chunk the VAD did
not call speech, however short), so no word is cut in two; the speech after that pause opens the
next turn. Only speech without any pause is cut at ``max_turn_ms`` itself.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

VAD_RATE: Final = 16000
FRAME: Final = 512  # samples per silero frame at 16 kHz (32 ms)
_CONTEXT: Final = 64  # samples of the previous frame the v5/v6 model expects in front of each frame
_HYSTERESIS: Final = 0.15  # silero's own: speech ends below threshold - 0.15

Samples = npt.NDArray[np.float32]
EndReason = Literal["silence", "max_length", "end_of_input"]


class SileroStream:
    """Silero VAD over a live stream: feed samples, get one probability per completed frame."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    @staticmethod
    def load_session() -> Any:
        """Load faster-whisper's ``silero_vad_v6.onnx`` into a single-threaded ONNX session."""
        import onnxruntime
        from faster_whisper.utils import get_assets_path

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
        return onnxruntime.InferenceSession(
            path, providers=["CPUExecutionProvider"], sess_options=options
        )

    def probabilities(self, samples: Samples) -> list[float]:
        """Append 16 kHz samples; return the speech probability of each frame they complete."""
        data = np.concatenate([self._pending, samples]) if self._pending.size else samples
        count = data.size // FRAME
        self._pending = data[count * FRAME :].copy()
        if count == 0:
            return []
        frames = data[: count * FRAME].reshape(count, FRAME)
        contexts = np.vstack([self._context[None, :], frames[:-1, -_CONTEXT:]])
        batch = np.concatenate([contexts, frames], axis=1).astype(np.float32, copy=False)
        probs, self._h, self._c = self._session.run(
            None, {"input": batch, "h": self._h, "c": self._c}
        )
        self._context = frames[-1, -_CONTEXT:].copy()
        return [float(p) for p in np.asarray(probs).reshape(-1)]


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of a turn: 16 kHz samples, when its first sample was captured, its speech prob."""

    samples: Samples
    captured_at: float
    prob: float

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples.size / VAD_RATE


@dataclass(frozen=True, slots=True)
class TurnAudio:
    """The audio of a turn (or of a turn so far) and what the VAD saw in it."""

    serial: int
    pieces: tuple[Piece, ...]
    speech_prob: float
    onset: int = 0

    @property
    def speech_start(self) -> float:
        """Offset (seconds) of the first chunk the VAD called speech, after the pre-roll."""
        return sum(p.duration for p in self.pieces[: self.onset])

    @property
    def key(self) -> tuple[int, int]:
        """Identity of this exact audio: the same key means the same samples."""
        return (self.serial, len(self.pieces))

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return sum(p.duration for p in self.pieces)

    def samples(self) -> Samples:
        """All samples, concatenated."""
        return np.concatenate([p.samples for p in self.pieces]).astype(np.float32, copy=False)

    def wall_clock(self, offset: float) -> float:
        """Map an offset (seconds from the first sample) to POSIX time, honouring chunk gaps."""
        for piece in self.pieces:
            if offset < piece.duration:
                return piece.captured_at + offset
            offset -= piece.duration
        last = self.pieces[-1]
        return last.captured_at + last.duration + offset


@dataclass(frozen=True, slots=True)
class TurnPaused:
    """Speech paused for ``pad_ms``: ``audio`` is what will be committed if the pause lasts."""

    audio: TurnAudio


@dataclass(frozen=True, slots=True)
class TurnResumed:
    """Speech resumed: the paused audio of turn ``serial`` is stale."""

    serial: int


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """A turn is over; ``confidence`` is how sure the VAD is that the speaker stopped."""

    audio: TurnAudio
    reason: EndReason
    confidence: float
    speech_ended_at: float


Event = TurnPaused | TurnResumed | TurnEnded


@dataclass(slots=True)
class _Turn:
    serial: int
    pieces: list[Piece]
    last_speech: int
    speech_s: float = 0.0
    silence_s: float = 0.0
    paused: bool = False
    onset: int = 0
    length_s: float = 0.0
    probs: list[float] = field(default_factory=list)
    speech: list[bool] = field(default_factory=list)  # per piece: did the VAD call it speech


class Endpointer:
    """Cuts a stream of (chunk, speech probability) into turns; see the module docstring."""

    def __init__(
        self,
        *,
        threshold: float,
        end_silence_ms: int,
        max_turn_ms: int,
        preroll_ms: int = 300,
        pad_ms: int = 200,
        min_speech_ms: int = 200,
    ) -> None:
        self._on = threshold
        self._off = max(threshold - _HYSTERESIS, 0.01)
        self._end_s = end_silence_ms / 1000
        self._max_s = max_turn_ms / 1000
        self._preroll_s = preroll_ms / 1000
        self._pad_s = min(pad_ms, end_silence_ms) / 1000
        self._min_speech_s = min_speech_ms / 1000
        self._idle: deque[Piece] = deque()
        self._turn: _Turn | None = None
        self._serial = 0

    def push(self, piece: Piece) -> list[Event]:
        """Take the next chunk; return what it caused."""
        if self._turn is None:
            return self._push_idle(piece)
        return self._push_turn(self._turn, piece)

    def flush(self) -> list[Event]:
        """End of input: end the open turn, if any."""
        turn, self._turn = self._turn, None
        self._idle.clear()
        if turn is None or turn.speech_s < self._min_speech_s:
            return []
        audio = self._committed(turn)
        return [TurnEnded(audio, "end_of_input", 1.0, self._speech_end(turn))]

    def current(self) -> TurnAudio | None:
        """The open turn's audio so far while the speaker is talking (for partials), else None."""
        turn = self._turn
        if turn is None or turn.silence_s > 0:
            return None
        return TurnAudio(turn.serial, tuple(turn.pieces), _mean(turn.probs), turn.onset)

    def _push_idle(self, piece: Piece) -> list[Event]:
        if piece.prob < self._on:
            self._idle.append(piece)
            while sum(p.duration for p in self._idle) > self._preroll_s + 1e-6:
                self._idle.popleft()
            return []
        pieces = [*self._idle, piece]
        self._idle.clear()
        onset = len(pieces) - 1
        length = sum(p.duration for p in pieces)
        self._turn = _Turn(
            self._serial, pieces, onset, piece.duration, onset=onset, length_s=length
        )
        self._turn.probs.append(piece.prob)
        self._turn.speech = [False] * onset + [True]
        self._serial += 1
        return self._check_length(self._turn)

    def _push_turn(self, turn: _Turn, piece: Piece) -> list[Event]:
        turn.pieces.append(piece)
        turn.length_s += piece.duration
        events: list[Event] = []
        speech = piece.prob >= self._on or (piece.prob >= self._off and turn.silence_s == 0)
        turn.speech.append(speech)
        if speech:
            if turn.paused:
                events.append(TurnResumed(turn.serial))
            turn.paused = False
            turn.silence_s = 0.0
            turn.last_speech = len(turn.pieces) - 1
            turn.speech_s += piece.duration
            turn.probs.append(piece.prob)
            return events + self._check_length(turn)
        turn.silence_s += piece.duration
        enough = turn.speech_s >= self._min_speech_s
        if turn.silence_s >= self._end_s - 1e-6:
            return events + self._end_on_silence(turn)
        if enough and not turn.paused and turn.silence_s >= self._pad_s - 1e-6:
            turn.paused = True
            events.append(TurnPaused(self._committed(turn)))
        return events + self._check_length(turn)

    def _end_on_silence(self, turn: _Turn) -> list[Event]:
        audio = self._committed(turn)
        self._turn = None
        trailing = turn.pieces[len(audio.pieces) :]
        for leftover in trailing:  # the next turn's pre-roll never overlaps this turn's audio
            self._idle.append(leftover)
        while sum(p.duration for p in self._idle) > self._preroll_s + 1e-6:
            self._idle.popleft()
        if turn.speech_s < self._min_speech_s:
            return []
        silence = turn.pieces[turn.last_speech + 1 :]
        confidence = 1.0 - _mean([p.prob for p in silence])
        return [TurnEnded(audio, "silence", round(confidence, 3), self._speech_end(turn))]

    def _check_length(self, turn: _Turn) -> list[Event]:
        if turn.length_s < self._max_s - 1e-6:
            return []
        self._turn = None
        if turn.silence_s > 0:  # cut inside a pause: commit up to the pad as usual
            return self._end_on_silence(turn)
        pause = _last_pause(turn)
        if pause is not None:
            return self._split(turn, *pause)
        audio = TurnAudio(turn.serial, tuple(turn.pieces), _mean(turn.probs), turn.onset)
        confidence = round(1.0 - turn.pieces[-1].prob, 3)
        return [TurnEnded(audio, "max_length", confidence, self._speech_end(turn))]

    def _split(self, turn: _Turn, start: int, stop: int) -> list[Event]:
        """End ``turn`` inside its pause ``pieces[start:stop]``; the rest opens the next turn."""
        cut = start + max(1, (stop - start) // 2)
        before, after = turn.pieces[:cut], turn.pieces[cut:]
        flags_before, flags_after = turn.speech[:cut], turn.speech[cut:]
        probs_before = [p.prob for p, s in zip(before, flags_before, strict=True) if s]
        audio = TurnAudio(turn.serial, tuple(before), _mean(probs_before), turn.onset)
        last = turn.pieces[start - 1]
        confidence = round(1.0 - _mean([p.prob for p in turn.pieces[start:stop]]), 3)
        ended = TurnEnded(audio, "max_length", confidence, last.captured_at + last.duration)
        onset = flags_after.index(True)
        rest = _Turn(
            self._serial, after, len(after) - 1, onset=onset,
            speech_s=sum(p.duration for p, s in zip(after, flags_after, strict=True) if s),
            length_s=sum(p.duration for p in after),
            probs=[p.prob for p, s in zip(after, flags_after, strict=True) if s],
            speech=flags_after,
        )  # fmt: skip
        self._serial += 1
        self._turn = rest
        return [ended, *self._check_length(rest)]

    def _committed(self, turn: _Turn) -> TurnAudio:
        end = turn.last_speech + 1
        pad = 0.0
        while end < len(turn.pieces) and pad < self._pad_s - 1e-6:
            pad += turn.pieces[end].duration
            end += 1
        return TurnAudio(turn.serial, tuple(turn.pieces[:end]), _mean(turn.probs), turn.onset)

    @staticmethod
    def _speech_end(turn: _Turn) -> float:
        last = turn.pieces[turn.last_speech]
        return last.captured_at + last.duration


def _last_pause(turn: _Turn) -> tuple[int, int] | None:
    """``(start, stop)`` of the last run of non-speech pieces after the turn's onset, if any."""
    stop = None
    for index in range(len(turn.speech) - 1, turn.onset - 1, -1):
        if not turn.speech[index]:
            stop = index + 1 if stop is None else stop
        elif stop is not None:
            return index + 1, stop
    return None


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
