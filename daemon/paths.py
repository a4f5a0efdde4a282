"""Looking at a path the configuration names, where looking itself may fail.

Owns ``look``: a path we may not look at (EACCES, a name too long) is one config error line
naming the key, never a traceback. Used by the config file lookup, the API key's credential
file and ``check-config``'s checks of ``audio.path`` and ``state.dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from daemon.errors import ConfigError


def look(path: Path, key: str, test: Callable[[Path], bool] = Path.is_file) -> bool:
    """``test(path)`` (is it a file?); a path we may not look at is a config error naming ``key``.

    EACCES (a 0700 folder, or /home behind the system unit's ProtectHome=yes) would otherwise be
    a traceback, exit 1, which systemd restarts in a loop.
    """
    try:
        return test(path)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot look at {path}: {exc.strerror}") from None
