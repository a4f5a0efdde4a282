"""Files holding a secret that every user of the machine can read.

The config file, when it holds a secret itself (``assemblyai.api_key``, ``http.token``, a sink's
secret such as a webhook ``secret``, an MQTT ``password``, a credential header or a URL's
password), and the secret files it names (``assemblyai.api_key_file``, a sink's ``secret_file``
or ``password_file``: any ``<key>_file`` beside a secret ``<key>``). ``check-config`` and
``run`` warn about each such file that others can read (mode ``o+r``), naming the file, its
mode and the keys, never the secret. Only others: a group-readable file is usual under Debian's
user private groups (umask 002), and a group made for the daemon is a choice. Files that the
systemd credential mechanism manages are not looked at.
"""

from __future__ import annotations

import contextlib
import shlex
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from daemon.config import Settings
from daemon.masking import table_secrets
from daemon.sinktables import ValidatedSinks
from daemon.validate import file_table

_INLINE = (("assemblyai", "api_key"), ("http", "token"))


class Exposed(NamedTuple):
    """A secret-holding file every user can read."""

    file: Path
    mode: str           # e.g. "0644"
    keys: list[str]     # the keys whose secret it holds

    @property
    def fix(self) -> str:
        """The command that makes it private to its owner and group."""
        return f"chmod o-rwx {shlex.quote(str(self.file))}"

    def line(self) -> str:
        """What ``check-config`` says of it: the file, its mode, the keys, the fix."""
        return (f"{self.file}: every user can read it (mode {self.mode}) and it holds "
                f"{', '.join(self.keys)}: {self.fix}")


def exposed_files(settings: Settings, path: Path | None, sinks: ValidatedSinks) -> list[Exposed]:
    """``exposed_secrets`` with the TOML of the config file at ``path`` (validated just before)."""
    return exposed_secrets(settings, path, sinks, file_table(path))


def exposed_secrets(settings: Settings, path: Path | None, sinks: ValidatedSinks,
                    table: Mapping[str, Any]) -> list[Exposed]:
    """The secret-holding files that every user can read.

    ``path`` is the config file and ``table`` its TOML (keys set there, not by the environment).
    """
    holds: dict[Path, list[str]] = {}
    if path is not None:
        for section, key in _INLINE:
            part = table.get(section)
            if isinstance(part, dict) and part.get(key):
                holds.setdefault(path, []).append(f"{section}.{key}")
    if settings.assemblyai.api_key_file:
        holds.setdefault(Path(settings.assemblyai.api_key_file).expanduser(), []).append(
            "assemblyai.api_key_file")
    in_file = table.get("sinks")
    for name, (_type, config) in sinks.items():
        written = in_file.get(name) if isinstance(in_file, dict) else None
        for key in type(config).model_fields:
            if not _holds_secret(key, getattr(config, key)):
                continue
            if path is not None and isinstance(written, dict) and written.get(key):
                holds.setdefault(path, []).append(f"sinks.{name}.{key}")
            if named := getattr(config, f"{key}_file", ""):
                holds.setdefault(Path(str(named)).expanduser(), []).append(
                    f"sinks.{name}.{key}_file")
    return [found for file, keys in holds.items() if (found := _readable(file, keys))]


def _holds_secret(key: str, value: Any) -> bool:
    """Whether a sink's ``key`` holds a secret (one the log masker masks).

    Of a URL only its password counts: the masker also hides a URL's path, which may be a
    token but mostly is not.
    """
    if not table_secrets({key: value}):
        return False
    if isinstance(value, str) and "://" in value:
        with contextlib.suppress(ValueError):
            return bool(urlsplit(value).password)
    return True


def _readable(file: Path, keys: list[str]) -> Exposed | None:
    try:
        mode = file.stat().st_mode
    except OSError:         # read (or reported) where the secret is read
        return None
    return Exposed(file, f"{stat.S_IMODE(mode):04o}", keys) if mode & stat.S_IROTH else None
