"""Everything a configuration is checked for, in one pass, as ``run`` and ``check-config`` see it.

Field validation (``daemon.config.read_settings``), then the cross-key checks field validation
cannot see (``semantic_problems``), then each sink table by its own type (``sink_problems``:
a key its type does not have was found by comparing it with ``type``, and reads both). A
section with a problem of its own holds back only the checks that read it, so one run names
every problem; each line names the key and who set it (the file or an environment variable);
a cross-key problem names who set any of the keys its check read (``keys_origin``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import (
    DEFAULT_TOKEN_URL,
    KEY_UNKNOWN,
    SERVICE_MIN_SESSION_S,
    AudioConfig,
    Settings,
    find_config,
    read_settings,
)
from daemon.envvars import keys_origin, problem_origin, variable_key
from daemon.errors import AudioError, ConfigError, EngineError
from daemon.paths import look, read_config_text
from daemon.problems import Problem, path_text
from daemon.sinktables import ValidatedSinks, sink_problems, validate_sinks

if TYPE_CHECKING:
    from daemon.plugins import PluginHost


def validate(config: str | None, plugins: PluginHost
             ) -> tuple[Settings, Path | None, ValidatedSinks]:
    """The settings, their file and the validated sink tables (disabled ones included).

    Raises:
        ConfigError: every problem found, one line each.
    """
    path = find_config(config)
    where = f"{path_text(path)}: " if path else ""
    settings, failed, problems = read_settings(path)
    if settings is None:              # report the file's sink problems with the others
        raise ConfigError(problems + _file_sink_problems(plugins, _file_sinks(path), where))
    late = semantic_problems(settings, skip=failed)
    sinks: ValidatedSinks = {}
    try:
        sinks, sink_lines = sink_problems(plugins, settings.effective_sinks())
    except ConfigError as exc:          # two plugins provide one sink type
        sink_lines = [(p, ()) for p in exc.problems]
    late += sink_lines
    if late:    # each names its environment variable, if one set the key (or the sink)
        problems += _with_origins(late, where, file_table(path))
    if problems:
        raise ConfigError(problems)
    return settings, path, sinks


def _with_origins(late: list[Problem], where: str, file_table: dict[str, Any]) -> list[str]:
    """Each line prefixed with who set its key, or every key its check read."""
    file_sinks = file_table.get("sinks")
    in_file = file_sinks.keys() if isinstance(file_sinks, dict) else set()
    return [(keys_origin(keys, where, os.environ, file_table) if keys
             else problem_origin(line, where, os.environ, file_sinks=in_file)) + line
            for line, keys in late]


def file_table(path: Path | None) -> dict[str, Any]:
    """The config file's TOML (empty when no file is used)."""
    try:
        return tomllib.loads(read_config_text(path)) if path else {}
    except (ConfigError, ValueError, RecursionError):
        return {}                           # read_settings has reported it


def _file_sinks(path: Path | None) -> dict[str, Any]:
    """The config file's ``[sinks]`` entries (none when it has none, or no file is used)."""
    tables = file_table(path).get("sinks")
    return tables if isinstance(tables, dict) else {}


def _file_sink_problems(plugins: PluginHost, tables: dict[str, Any], where: str) -> list[str]:
    """The problems of a config file's ``[sinks]`` tables, when the settings could not be built.

    Left out (reported once the settings load): entries that are not tables (the settings'
    validation has named them) and sinks the environment overrides (their file table alone may
    lack what the environment supplies).
    """
    keys = [key for key in map(variable_key, os.environ) if key is not None]
    overridden = {key[1] for key in keys if len(key) > 1 and key[0] == "sinks"}
    try:
        validate_sinks(plugins, {name: table for name, table in tables.items()
                                 if isinstance(table, dict) and name not in overridden})
    except ConfigError as exc:
        return [where + p for p in exc.problems]
    return []


def _compute_type_problems(compute_type: str) -> list[str]:
    """The compute type must be one this machine's CTranslate2 can run on the CPU."""
    try:
        import ctranslate2
    except ImportError:
        return []                        # resolve_model_path reports the missing extra
    supported = set(ctranslate2.get_supported_compute_types("cpu")) | {"default", "auto"}
    if compute_type in supported:
        return []
    return [f"local.compute_type: {compute_type!r} is not supported on this CPU "
            f"(supported: {', '.join(sorted(supported))})"]


def _audio_problems(audio: AudioConfig) -> list[Problem]:
    read = ("audio.path", "audio.source")           # whether a path is wanted: the source's
    if audio.source != "file":
        return [("audio.path: only used when audio.source = 'file'", read)] if audio.path else []
    if not audio.path:
        return [("audio.path: required when audio.source = 'file'", read)]
    return [(line, ()) for line in _audio_file_problems(audio.path)]


def _audio_file_problems(text: str) -> list[str]:
    """The file source's ``audio.path``: a file, a WAV ``run`` would take."""
    path = Path(text).expanduser()
    try:
        if not look(path, "audio.path"):        # worded as _wav_problems: "audio.path: X: why"
            what = ("no such file" if not path.exists()
                    else "a directory, not a WAV file" if path.is_dir()
                    else "not a regular file (a device, FIFO or socket)")
            return [f"audio.path: {path_text(path)}: {what}"]
    except ConfigError as exc:
        return exc.problems
    return _wav_problems(path)


def _wav_problems(path: Path) -> list[str]:
    """The header of the file source's WAV: what ``run`` would refuse is a config error (78)."""
    from daemon.pcm import open_wav  # numpy: only for a file source

    try:
        open_wav(path).close()
    except AudioError as exc:
        return [f"audio.path: {path_text(path)}: {str(exc).removeprefix(f'audio file {path}: ')}"]
    return []


def _state_problems(state: Path) -> list[str]:
    """The state folder: a folder we can write in, or one we can create below one.

    The outbox and the dead letters go there; ``run`` failing at the outbox (exit 1) was
    restarted by systemd in a loop.
    """
    try:
        if look(state, "state.dir", lambda path: path.exists() and not path.is_dir()):
            return [f"state.dir: {path_text(state)} exists and is not a directory"]
        folder = next(p for p in (state, *state.parents) if look(p, "state.dir", Path.exists))
    except ConfigError as exc:
        return exc.problems
    if folder != state and not folder.is_dir():
        return [f"state.dir: {path_text(state)} cannot be created: {path_text(folder)} "
                "is not a directory"]
    if not os.access(folder, os.W_OK | os.X_OK):     # a read-only file system, or not ours
        what = "" if folder == state else f"cannot be created: {path_text(folder)} "
        return [f"state.dir: {path_text(state)} {what}is not writable by this user"]
    return []


def semantic_problems(settings: Settings, skip: frozenset[str] = frozenset()) -> list[Problem]:
    """Cross-key problems that field validation cannot see, with the keys each check read.

    The keys say whose the line is (``keys_origin``). Checks that read a section in ``skip``
    (one with problems of its own, or ``KEY_UNKNOWN``: the API key file could not be read) are
    left out.
    """
    def valid(*sections: str) -> bool:
        return skip.isdisjoint(sections)

    problems = _audio_problems(settings.audio) if valid("audio") else []
    has_key = bool(settings.assemblyai.api_key.get_secret_value())
    if valid("transcriber", "assemblyai", KEY_UNKNOWN) \
            and settings.transcriber.engine == "assemblyai" and not has_key:
        problems.append((
            "assemblyai.api_key: required when transcriber.engine = 'assemblyai' "
            "(set api_key, api_key_file or the assemblyai_api_key credential)",
            ("assemblyai.api_key", "assemblyai.api_key_file", "transcriber.engine")))
    cloud = settings.assemblyai
    if valid("assemblyai") and cloud.token_url == DEFAULT_TOKEN_URL \
            and cloud.max_session_seconds < SERVICE_MIN_SESSION_S:
        problems.append((f"assemblyai.max_session_seconds: the service accepts "
                         f"{SERVICE_MIN_SESSION_S}..10800 (got {cloud.max_session_seconds})",
                         ("assemblyai.max_session_seconds", "assemblyai.token_url")))
    if valid("state"):
        problems += _alone(_state_problems(settings.state_path()))
    if valid("assemblyai") and cloud.min_turn_silence > cloud.max_turn_silence:
        problems.append(("assemblyai.min_turn_silence: must not exceed "
                         f"assemblyai.max_turn_silence (got {cloud.min_turn_silence} > "
                         f"{cloud.max_turn_silence})",
                         ("assemblyai.min_turn_silence", "assemblyai.max_turn_silence")))
    if valid("reconnect") and settings.reconnect.initial_delay > settings.reconnect.max_delay:
        problems.append(("reconnect.initial_delay: must not exceed reconnect.max_delay",
                         ("reconnect.initial_delay", "reconnect.max_delay")))
    engine_known = valid("transcriber") and (settings.transcriber.engine != "auto"
                                             or valid("assemblyai", KEY_UNKNOWN))
    if engine_known and valid("local") and settings.engine_name() == "local":
        problems += _local_problems(settings)
    if valid("http"):
        from daemon.web import check_http

        problems += [(line, ("http.listen", "http.token") if "http.token" in line else ())
                     for line in check_http(settings.http)]
    return problems


def _alone(lines: list[str]) -> list[Problem]:
    """Lines each about the one key they name."""
    return [(line, ()) for line in lines]


def _local_problems(settings: Settings) -> list[Problem]:
    """The local engine's model, its language (read with the model) and compute type."""
    from daemon.recognizer import language_problems, resolve_model_path  # numpy: local only

    problems: list[Problem] = []
    try:
        model = resolve_model_path(settings.local.model)
    except EngineError as exc:
        problems.append((str(exc), ()))
    else:                                # what run refuses once it has loaded the model
        problems += [(line, ("local.language", "local.model"))
                     for line in language_problems(settings.local.language, model)]
    return problems + _alone(_compute_type_problems(settings.local.compute_type))
