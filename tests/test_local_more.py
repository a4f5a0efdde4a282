"""The offline engine under long, unbroken speech and when it is stopped with turns in hand."""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import jiwer
import numpy as np
import pytest
from structlog.testing import capture_logs

pytest.importorskip("faster_whisper", reason="the local engine needs the 'local' extra")

from daemon.config import LocalConfig
from daemon.events import AudioChunk
from daemon.local import LocalEngine, LocalModel
from daemon.vad import Endpointer, TurnEnded
from tests.conftest import TRANSCRIPTS
from tests.test_local import (
    T0,
    cancelled_run,
    chunks_of,
    model,
    normalise,
    pieces,
    read_pcm,
    transcribe,
)

__all__ = ["model"]  # the module-scoped fixture, shared with test_local


def speech_only(path: Path) -> bytes:
    """A WAV's 16-bit samples without the silence before and after the speech."""
    with wave.open(str(path)) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    loud = np.nonzero(np.abs(samples) > 300)[0]
    return samples[loud[0] : loud[-1] + 1].tobytes()


def ends(events: Sequence[object]) -> list[TurnEnded]:
    return [e for e in events if isinstance(e, TurnEnded)]


class TestLongSpeech:
    def test_max_length_cuts_at_the_last_pause(self) -> None:
        """A turn reaching max_turn_ms is cut in its last short pause, not in the middle of the
        word being spoken; the speech after the pause starts the next turn (nothing lost or
        repeated)."""
        cut = Endpointer(threshold=0.5, end_silence_ms=600, max_turn_ms=1000, pad_ms=100)
        probs = [0.0] * 3 + [0.9] * 4 + [0.1] * 2 + [0.9] * 6
        events = [e for p in pieces(*probs) for e in cut.push(p)] + cut.flush()
        first, second = ends(events)
        assert first.reason == "max_length"
        assert [p.captured_at for p in first.audio.pieces] == [T0 + i * 0.1 for i in range(8)]
        assert first.speech_ended_at == pytest.approx(T0 + 0.7)
        assert first.confidence == pytest.approx(0.9)
        assert [p.captured_at for p in second.audio.pieces] == [
            T0 + i * 0.1 for i in range(8, 15)
        ]
        assert second.audio.speech_start == pytest.approx(0.1)

    def test_without_a_pause_the_cut_is_at_max_length(self) -> None:
        """Speech with no pause at all is still cut at max_turn_ms, every chunk in one turn."""
        cut = Endpointer(threshold=0.5, end_silence_ms=600, max_turn_ms=1000, pad_ms=100)
        events = [e for p in pieces(0.0, *[0.9] * 14) for e in cut.push(p)] + cut.flush()
        assert [len(e.audio.pieces) for e in ends(events)] == [10, 5]

    @pytest.mark.parametrize("seed", range(20))
    def test_every_chunk_is_in_at_most_one_turn_and_no_turn_is_too_long(self, seed: int) -> None:
        """Random speech and pauses: turns never overlap, keep their order, and none is longer
        than max_turn_ms, whichever pause they were cut in."""
        rng = np.random.default_rng(seed)
        probs = rng.choice([0.05, 0.4, 0.6, 0.95], size=400, p=[0.15, 0.1, 0.15, 0.6])
        cut = Endpointer(threshold=0.5, end_silence_ms=300, max_turn_ms=1500, pad_ms=100)
        events = [e for p in pieces(*probs) for e in cut.push(p)] + cut.flush()
        times = [p.captured_at for e in ends(events) for p in e.audio.pieces]
        assert times == sorted(set(times))
        assert all(e.audio.duration <= 1.5 + 1e-6 for e in ends(events))
        assert all(0 <= e.audio.speech_start < e.audio.duration for e in ends(events))

    async def test_a_monologue_longer_than_max_turn_loses_no_words(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """Sentences 250 ms apart (shorter than end_silence_ms) for 38 s, max_turn_seconds = 7:
        the turns are cut in pauses and no word is lost. Cut in mid-word, ten words were lost
        around the cuts ("... next Tuesday." / "three o'clock.", "... today is..." / "We need")."""
        gap = bytes(16000 // 4 * 2)
        names = [f"espeak-s{i}.wav" for i in range(1, 6)] * 2
        pcm = b"".join(speech_only(speech_dir / name) + gap for name in names)
        heard = await transcribe(model, chunks_of(pcm), max_turn_seconds=7)
        said = [turn.transcript for turn in heard.turns]
        assert len(said) >= 5, said
        reference = normalise(" ".join(TRANSCRIPTS[name] for name in names))
        words = jiwer.process_words(reference, normalise(" ".join(said)))
        assert words.deletions + words.insertions <= 2, said   # was 10 + 0
        assert words.wer <= 0.05, said                          # was 0.16


class TestStoppedWithTurnsInHand:
    async def test_turns_lost_to_a_cancelled_run_are_reported(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """Cancelled (the daemon's stop deadline, a second SIGTERM) while finished turns still
        wait for the recogniser: a warning says how many turns were not delivered; delivered
        and reported add up to the turns spoken. They used to vanish without a word."""
        pcm, _ = read_pcm(speech_dir / "espeak-five-sentences.wav")
        fed, never = asyncio.Event(), asyncio.Event()

        async def live_mic() -> AsyncIterator[AudioChunk]:
            async for chunk in chunks_of(pcm + bytes(16000 * 2)):  # every turn ends in silence
                yield chunk
            fed.set()
            await never.wait()                                     # the microphone stays open

        engine = LocalEngine(LocalConfig.model_validate({}), sample_rate=16000,
                             source_name="test", host="h", model=model)
        listener, logs = await cancelled_run(engine, live_mic(), fed)
        lost = [e for e in logs if e["event"] == "local.turns_lost"]
        reported = lost[0]["turns"] if lost else 0
        assert len(listener.turns) + reported == 5, (len(listener.turns), logs)
        assert lost == [] or lost[0]["log_level"] == "warning"
        assert listener.ended[0].reason == "cancelled"


async def _captured_from(pcm: bytes, start: float) -> AsyncIterator[AudioChunk]:
    """``pcm`` as chunks whose capture began at wall time ``start``."""
    async for chunk in chunks_of(pcm):
        yield replace(chunk, captured_at=chunk.captured_at - T0 + start)


class TestFallingBehind:
    async def test_a_recogniser_slower_than_speech_is_reported(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """Turns delivered long after they were spoken (a model too slow for the machine: the
        queue, its memory and the delay grow for as long as people talk) give one warning a
        minute naming the delay and what to change; they used to pile up without a word."""
        pcm, _ = read_pcm(speech_dir / "espeak-five-sentences.wav")
        with capture_logs() as logs:
            heard = await transcribe(model, _captured_from(pcm, time.time() - 3600))
        assert len(heard.turns) == 5
        [late] = [e for e in logs if e["event"] == "local.falling_behind"]
        assert late["log_level"] == "warning" and late["behind_s"] >= 3500
        assert "local.model" in late["hint"]

    async def test_turns_delivered_in_time_give_no_warning(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        pcm, _ = read_pcm(speech_dir / "espeak-s1.wav")
        with capture_logs() as logs:
            heard = await transcribe(model, _captured_from(pcm, time.time()))
        assert len(heard.turns) == 1
        assert [e for e in logs if e["event"] == "local.falling_behind"] == []
