"""Configuration: one TOML file, ``TRANSCRIBED_<SECTION>__<KEY>`` overrides, secrets from files.

Lookup when no path is given (SPEC "Command line"): ``$TRANSCRIBED_CONFIG``, then
``$XDG_CONFIG_HOME/transcribed/config.toml`` (``~/.config`` when it is unset or relative), then
``/etc/transcribed/config.toml``; with none, built-in defaults. Unknown keys are errors, and so
is a value in the file of the wrong TOML type (``chunk_ms = "100"``: ``daemon.tomltypes``; the
environment's values are text, converted as before). Every problem becomes one line naming the
key (``sinks.alerts.url: …``) and, where there is one, the file.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from daemon.credentials import HeaderSecret, resolve_secrets
from daemon.envvars import (
    ENV_PREFIX,
    key_variables,
    problem_origin,
    unknown_variables,
    unparsable_line,
)
from daemon.errors import ConfigError
from daemon.paths import look, read_config_text, xdg_home
from daemon.problems import located, path_text, validation_lines
from daemon.tomltypes import Loc, type_problems

DEFAULT_TOKEN_URL: Final = "https://streaming.assemblyai.com/v3/token"
SERVICE_MIN_SESSION_S: Final = 60   # the shortest session cap the real token endpoint grants
DEFAULT_SINKS: Final[dict[str, dict[str, Any]]] = {"console": {"type": "console"}}
KEY_UNKNOWN: Final = "assemblyai.api_key"   # a failed "section": the key file could not be read


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AudioConfig(_Section):
    """``[audio]``: where sound comes from."""

    source: Literal["microphone", "file"] = Field("microphone", description="audio source")
    device: str = Field("", description="'' = default; else an index or a name substring")
    path: str = Field("", description="WAV file for source = 'file'")
    sample_rate: int = Field(16000, ge=8000, le=48000, description="rate sent to the engine")
    chunk_ms: int = Field(100, ge=50, le=1000, description="chunk length in milliseconds")
    stall_seconds: float = Field(
        5.0, gt=0, description="no audio for this long means the device stalled and is reopened"
    )

    @field_validator("device", mode="before")
    @classmethod
    def _index(cls, value: Any) -> Any:
        """``device = 3`` means the index, as ``device = "3"`` does."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError("a device index is 0 or more (see `transcribed devices`)")
            return str(value)
        return value


class TranscriberConfig(_Section):
    """``[transcriber]``: which engine turns audio into text."""

    engine: Literal["assemblyai", "local", "auto"] = Field(
        "auto", description="'auto' = assemblyai when a key is configured, else local"
    )


class AssemblyAIConfig(_Section):
    """``[assemblyai]``: the Universal Streaming v3 service."""

    api_key: HeaderSecret = Field(SecretStr(""), description="API key (prefer api_key_file)")
    api_key_file: str = Field("", description="file holding the API key")
    streaming_url: str = "wss://streaming.assemblyai.com/v3/ws"
    token_url: str = DEFAULT_TOKEN_URL
    token_expires_in: int = Field(60, ge=1, le=600)
    max_session_seconds: int = Field(10800, ge=10, le=10800,   # >= 10 for test services only
                                     description="session cap asked for (the service: 60..10800)")
    speech_model: str = "universal-streaming-english"
    format_turns: bool = True
    end_of_turn_confidence_threshold: float = Field(0.4, ge=0.0, le=1.0)
    min_turn_silence: int = Field(400, ge=0)
    max_turn_silence: int = Field(1280, ge=0)
    keyterms: list[str] = Field(default_factory=list, max_length=100)
    language_detection: bool = False
    connect_timeout: float = Field(
        10.0, gt=0, description="token request, handshake and Begin timeout, seconds")
    terminate_timeout: float = Field(10.0, gt=0, description="Terminate → Termination, seconds")

    @field_validator("streaming_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        return service_url(value, ("ws", "wss"))

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return service_url(value, ("http", "https"))

    @field_validator("keyterms")
    @classmethod
    def _keyterm_length(cls, value: list[str]) -> list[str]:
        for term in value:
            if not term.strip() or len(term) > 50:
                raise ValueError(f"each term must be 1..50 characters (got {term!r})")
        return value


def service_url(value: str, schemes: tuple[str, ...]) -> str:
    """``value`` if a connection can use it; else ``ValueError`` saying why (never echoing it).

    Accepted, a bad one failed every connection attempt, retried for ever.
    """
    if not value.startswith(tuple(f"{scheme}://" for scheme in schemes)):
        raise ValueError("must start with " + " or ".join(f"{s}://" for s in schemes))
    if any(c.isspace() for c in value):
        raise ValueError("must not contain spaces")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("its port is not 1-65535")
    if not parts.hostname:
        raise ValueError("must name a host")
    return value


class LocalConfig(_Section):
    """``[local]``: the embedded offline engine (extra ``local``)."""

    model: str = Field("", description="'' = bundled tiny.en; else a CTranslate2 Whisper dir")
    compute_type: Literal["int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                          "float16", "bfloat16", "float32", "default", "auto"] = Field(
        "int8", description="CTranslate2 compute type; on a CPU int8, int8_float32 or float32")
    beam_size: int = Field(5, ge=1, le=10)
    language: str = "en"
    threads: int = Field(0, ge=0, description="0 = all cores")
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    end_silence_ms: int = Field(600, ge=100, le=5000)
    max_turn_seconds: float = Field(30, ge=1, le=120)
    partials: bool = Field(False, description="transcribe the growing turn for live views")


class ReconnectConfig(_Section):
    """``[reconnect]``: backoff and the audio held while disconnected."""

    initial_delay: float = Field(0.5, gt=0)
    max_delay: float = Field(30.0, gt=0)
    backlog_seconds: float = Field(120, ge=1, le=86400)


class LogConfig(_Section):
    """``[log]``: structured log output."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"
    transcripts: bool = Field(True, description="false keeps transcript text out of logs")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class HttpConfig(_Section):
    """``[http]``: the local live view, health and metrics."""

    enabled: bool = True
    listen: str = "127.0.0.1:8765"
    token: HeaderSecret = SecretStr("")


class StateConfig(_Section):
    """``[state]``: where durable queues live."""

    dir: str = Field("", description="default $STATE_DIRECTORY, else $XDG_STATE_HOME/transcribed")


class Settings(BaseSettings):
    """The whole configuration. Sink tables stay raw: each sink type validates its own."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    audio: AudioConfig = AudioConfig()
    transcriber: TranscriberConfig = TranscriberConfig()
    assemblyai: AssemblyAIConfig = AssemblyAIConfig()
    local: LocalConfig = LocalConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    state: StateConfig = StateConfig()
    sinks: dict[str, dict[str, Any]] = Field(default_factory=dict)

    _toml_path: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment beats the TOML file, which beats the defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_path))
        return tuple(sources)

    # -- derived values -------------------------------------------------------------------

    def effective_sinks(self) -> dict[str, dict[str, Any]]:
        """The sink tables in force: the configured ones, or a console sink when there are none."""
        return dict(self.sinks) if self.sinks else {k: dict(v) for k, v in DEFAULT_SINKS.items()}

    def engine_name(self) -> Literal["assemblyai", "local"]:
        """Resolve ``engine = "auto"``: the cloud when a key is configured, else local."""
        if self.transcriber.engine != "auto":
            return self.transcriber.engine
        return "assemblyai" if self.assemblyai.api_key.get_secret_value() else "local"

    def state_path(self) -> Path:
        """Directory for durable state (created by whoever writes there)."""
        if self.state.dir:
            return Path(self.state.dir).expanduser()
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        return xdg_home(os.environ, "XDG_STATE_HOME", ".local/state") / "transcribed"


def find_config(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """Return the config file to use, or ``None`` for built-in defaults.

    An explicitly named file (``--config`` or ``$TRANSCRIBED_CONFIG``) must exist; at a lookup
    path, a folder or a broken link is an error too (not a silent fallback to the defaults).
    """
    env = os.environ if env is None else env
    if explicit == "":          # --config "$UNSET": not the lookup's file in its place
        raise ConfigError("--config: an empty path (name a file, or leave --config out)")
    named = explicit or env.get("TRANSCRIBED_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not look(path, "config"):
            raise ConfigError(f"{path_text(path)}: {_not_a_file(path)}")
        return path
    candidates = (xdg_home(env, "XDG_CONFIG_HOME", ".config") / "transcribed" / "config.toml",
                  Path("/etc/transcribed/config.toml"))
    for candidate in candidates:
        if look(candidate, "config"):
            return candidate
        if look(candidate, "config", lambda path: path.is_symlink() or path.exists()):
            # a folder, or a link to nothing: never the defaults in its place without a word
            raise ConfigError(f"{path_text(candidate)}: {_not_a_file(candidate)}")
    return None


def _not_a_file(path: Path) -> str:
    """Why a config path that is no regular file is not one (``look`` has looked at it)."""
    if path.exists():
        return "not a regular file"
    return "a link to a missing file" if path.is_symlink() else "config file not found"


def load_settings(path: Path | None) -> Settings:
    """Load and validate everything except sink tables (see ``daemon.sinktables.validate_sinks``).

    Raises:
        ConfigError: with one line per problem, each naming the key (and file).
    """
    settings, _failed, problems = read_settings(path)
    if settings is None or problems:
        raise ConfigError(problems)
    return settings


def read_settings(path: Path | None) -> tuple[Settings | None, frozenset[str], list[str]]:
    """Load what validates and name every problem: ``(settings, failed sections, problems)``.

    A section with a problem is taken at its defaults in the settings returned, so that the
    cross-key checks of the others still run (``daemon.validate.semantic_problems`` with
    ``skip=failed``) and one ``check-config`` names everything (an unreadable API key file
    "fails" ``KEY_UNKNOWN`` only); ``None`` when no settings can be built (an unknown section,
    ``[sinks]`` entries that are not tables, or a value the environment does not parse).
    Problems name their file or environment variable.

    Raises:
        ConfigError: the file is not TOML (or cannot be read): nothing else can be checked.
    """
    settings, failed, problems = _read(path)
    return settings, failed, problems + unknown_variables(os.environ, Settings.model_fields)


def _read(path: Path | None) -> tuple[Settings | None, frozenset[str], list[str]]:
    where = f"{path_text(path)}: " if path else ""
    toml = _check_toml(path) if path is not None else {}
    failed: frozenset[str] = frozenset()
    problems: list[str] = []
    try:
        settings = _settings(path)
    except ValidationError as exc:
        lines = validation_lines(exc, sections=Settings.model_fields, env=os.environ,
                                 model=Settings, toml=_from_file) + _type_lines(toml, exc)
        problems = [problem_origin(line, where, os.environ) + line
                    for line in sorted(lines, key=_section_order)]
        failed = frozenset(str(error["loc"][0]) for error in exc.errors() if error["loc"])
        defaults = {name: Settings.model_fields[name].get_default(call_default_factory=True)
                    for name in failed if name in Settings.model_fields and name != "sinks"}
        if len(defaults) < len(failed):
            return None, failed, problems
        try:
            settings = _settings(path, **defaults)
        except (ValidationError, SettingsError):
            return None, failed, problems
    except SettingsError as exc:
        found = re.search(r'field "([^"]+)"', str(exc))
        line = unparsable_line(found.group(1) if found else None, exc.__cause__, os.environ,
                               Settings)
        return None, failed, [line, *(where + typed for typed in _type_lines(toml, None))]
    except RecursionError:      # a variable's JSON nested too deeply for the settings source
        line = unparsable_line(None, ValueError("nested too deeply"), os.environ, Settings)
        return None, failed, [line, *(where + typed for typed in _type_lines(toml, None))]
    else:
        problems = [where + typed for typed in _type_lines(toml, None)]
    if "assemblyai" not in failed:
        try:
            settings = resolve_secrets(settings, where, os.environ)
        except ConfigError as exc:
            problems += exc.problems
            failed |= {KEY_UNKNOWN}
    return settings, failed, problems


def _settings(path: Path | None, **sections: Any) -> Settings:
    """Build ``Settings`` from the environment and ``path``; ``sections`` replace theirs."""
    try:
        Settings._toml_path = path
        return Settings(**sections)
    finally:
        Settings._toml_path = None


def _from_file(loc: Loc) -> bool:
    """Whether the value at ``loc`` (``section, key, …``) came from the file: no variable set it."""
    return not key_variables([str(part) for part in loc], os.environ)


def _set_elsewhere(section: str, loc: Loc) -> bool:
    return not _from_file((section, *loc))


def _section_order(line: str) -> int:
    """Where the section a problem line names is in ``Settings`` (one section's lines together)."""
    names = list(Settings.model_fields)
    section = line.split(":", 1)[0].split(".", 1)[0]
    return names.index(section) if section in names else len(names)


def _type_lines(toml: Mapping[str, Any], exc: ValidationError | None) -> list[str]:
    """The file's values of a wrong TOML type the (lax) validation took: ``chunk_ms = "100"``.

    ``exc``: the lax validation's error (a value it calls the wrong type is named there).
    """
    errors = exc.errors(include_url=False) if exc is not None else []
    lines = []
    for name, field in Settings.model_fields.items():
        table, model = toml.get(name), field.annotation
        if not isinstance(table, dict) or not isinstance(model, type) \
                or not issubclass(model, BaseModel):
            continue
        found = type_problems(model, table, lax=errors, at=(name,),
                              skip=partial(_set_elsewhere, name))
        lines += [located(name, loc, message) for loc, message in found.items()]
    return lines


def _check_toml(path: Path) -> dict[str, Any]:
    """The file's TOML; ``ConfigError`` if it is none."""
    try:
        return tomllib.loads(read_config_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path_text(path)}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path_text(path)}: invalid TOML: nested too deeply") from None
    except ValueError:      # int(): more digits than sys.get_int_max_str_digits(), a traceback
        raise ConfigError(f"{path_text(path)}: invalid TOML: an integer of more than "
                          f"{sys.get_int_max_str_digits()} digits") from None
