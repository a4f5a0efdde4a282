"""Looking at a path the configuration names, and reading the config file, where either may fail.

Owns ``look``: a path we may not look at (EACCES, a name too long) is one config error line
naming the key, never a traceback. Used by the config file lookup, the API key's credential
file and ``check-config``'s checks of ``audio.path`` and ``state.dir``. Owns
``read_config_text``: the config file's text, read no further than ``CONFIG_MAX_BYTES``, and
``xdg_home``: an XDG base directory as the XDG Base Directory specification reads it.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from daemon.errors import ConfigError
from daemon.problems import path_text

CONFIG_MAX_BYTES: Final = 1 << 20
"""A config file larger than this (1 MiB) is refused unread: a sparse or wrong file (a disk
image, a log) was read whole into memory, twice over as text, before TOML found it wrong."""


def look(path: Path, key: str, test: Callable[[Path], bool] = Path.is_file) -> bool:
    """``test(path)`` (is it a file?); a path we may not look at is a config error naming ``key``.

    EACCES (a 0700 folder, or /home behind the system unit's ProtectHome=yes) would otherwise be
    a traceback, exit 1, which systemd restarts in a loop.
    """
    try:
        return test(path)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot look at {path_text(path)}: {exc.strerror}") from None


def read_config_text(path: Path) -> str:
    """The text of the config file ``path`` (a regular file: ``find_config`` has looked).

    Raises:
        ConfigError: one line naming the file: it cannot be read, is larger than
            ``CONFIG_MAX_BYTES``, starts with a byte order mark or is not UTF-8.
    """
    shown = path_text(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read config: {exc.strerror}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{shown}: larger than {CONFIG_MAX_BYTES >> 20} MiB, "
                          "too large for a config file")
    if data.startswith(codecs.BOM_UTF8):          # tomllib: "Invalid statement" at 1:1
        raise ConfigError(f"{shown}: invalid TOML: it starts with a byte order mark "
                          "(BOM): save it as UTF-8 without one")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {exc.start})") from None


def xdg_home(env: Mapping[str, str], variable: str, default: str) -> Path:
    """``$variable`` (``XDG_CONFIG_HOME``…) if it is an absolute path, else ``~/<default>``.

    The XDG Base Directory specification: a relative path there is invalid and is ignored
    (taken as it was, it named a folder below wherever the daemon was started).
    """
    value = env.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / default
