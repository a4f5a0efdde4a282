"""Secrets in the configuration: the rule for secrets sent in headers, and secret files.

Owns ``HeaderSecret`` (a ``SecretStr`` an HTTP header can carry), ``read_secret_file`` (a
bounded read of a regular file whose errors name the key, never the value; sinks use it too)
and ``resolve_secrets``, which fills ``assemblyai.api_key`` from ``api_key_file`` or systemd's
``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

from pydantic import AfterValidator, SecretStr

from daemon.envvars import problem_origin
from daemon.errors import ConfigError
from daemon.paths import look
from daemon.problems import path_text

if TYPE_CHECKING:
    from daemon.config import Settings

HEADER_SAFE: Final = re.compile(r"[!-~]*")   # what an HTTP header carries: printable ASCII
NOT_HEADER_SAFE: Final = "must be printable ASCII without spaces (it is sent in a header)"
SECRET_MAX_BYTES: Final = 64 * 1024     # a key, a token or a few secrets: never more


def _header_safe(value: SecretStr) -> SecretStr:
    """A secret sent in a header (a non-ASCII letter crashed the request, a break failed it)."""
    if not HEADER_SAFE.fullmatch(value.get_secret_value()):
        raise ValueError(NOT_HEADER_SAFE)
    return value


HeaderSecret = Annotated[SecretStr, AfterValidator(_header_safe)]


def read_secret_file(path: str, key: str) -> str:
    """Read a secret from a file (trailing newline stripped); errors name the key, not the value.

    Only a regular file of at most ``SECRET_MAX_BYTES``: a FIFO would block (a reload, or
    ``check-config``, forever) and ``/dev/zero`` would fill the memory.
    """
    file = Path(path).expanduser()
    shown = path_text(path)             # a line break in the name must not split the line
    try:
        if not stat.S_ISREG(file.stat().st_mode):
            raise ConfigError(f"{key}: {shown} is not a regular file")
        with file.open("rb") as handle:
            data = handle.read(SECRET_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {shown}: {exc.strerror}") from None
    if len(data) > SECRET_MAX_BYTES:
        raise ConfigError(f"{key}: {shown} is larger than {SECRET_MAX_BYTES // 1024} KiB")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: {shown} is not UTF-8 text (byte {exc.start})") from None
    if not value:
        raise ConfigError(f"{key}: {shown} is empty")
    return value


def resolve_secrets(settings: Settings, where: str, env: Mapping[str, str]) -> Settings:
    """Fill ``assemblyai.api_key`` from ``api_key_file`` or ``$CREDENTIALS_DIRECTORY``."""
    section = settings.assemblyai
    if section.api_key.get_secret_value():
        return settings
    key: str | None = None
    if section.api_key_file:
        try:
            key = _read_key(section.api_key_file, "assemblyai.api_key_file")
        except ConfigError as exc:
            raise ConfigError([problem_origin(p, where, env) + p for p in exc.problems]) from None
    elif env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / "assemblyai_api_key"
        if look(candidate, "assemblyai.api_key (credential)"):
            key = _read_key(str(candidate), "assemblyai.api_key (credential)")
    if key is None:
        return settings
    new_section = section.model_copy(update={"api_key": SecretStr(key)})
    return settings.model_copy(update={"assemblyai": new_section})


def _read_key(path: str, key: str) -> str:
    """The API key in a secret file: text an HTTP header can carry."""
    value = read_secret_file(path, key)
    if not HEADER_SAFE.fullmatch(value):
        raise ConfigError(f"{key}: the key in {path} {NOT_HEADER_SAFE}")
    return value
