"""The daemon's exception tree.

Everything above the I/O boundary sees only these::

    DaemonError
    ├── ConfigError        bad configuration: exit 78 (EX_CONFIG)
    ├── AuthError          the service rejected our credentials twice: exit 77 (EX_NOPERM)
    ├── AudioError         the audio source could not be opened or read
    ├── StreamError        the streaming service failed in a way retrying will not fix
    ├── EngineError        the local engine could not be loaded
    └── SinkError          a sink could not deliver a record
        └── PermanentSinkError   retrying will not help (a 4xx, a bad topic)

Each carries a one-line, human message that names what is wrong and where, and never a secret;
``one_line`` makes text from elsewhere (a server, a plugin) fit into one.
"""

from __future__ import annotations

from typing import Final

EX_OK: Final = 0
EX_FAILURE: Final = 1
EX_NOPERM: Final = 77
EX_CONFIG: Final = 78


class DaemonError(Exception):
    """Root of every error the daemon raises on purpose."""

    exit_code: int = EX_FAILURE


class ConfigError(DaemonError):
    """The configuration is invalid; ``problems`` holds one readable line per problem."""

    exit_code = EX_CONFIG

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class AuthError(DaemonError):
    """The transcription service rejected our credentials, even with a fresh token."""

    exit_code = EX_NOPERM


class AudioError(DaemonError):
    """The audio source could not be opened or read."""


class StreamError(DaemonError):
    """The streaming service failed in a way that retrying will not fix."""


class EngineError(DaemonError):
    """The local transcription engine could not be loaded or run."""


class SinkError(DaemonError):
    """A sink failed to deliver a record; retrying may help.

    ``retry_after`` is the delay in seconds the destination asked for (an HTTP ``Retry-After``),
    or ``None`` to let the dispatcher choose its own backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """A sink failed to deliver a record and retrying will not help."""


def one_line(text: str, limit: int) -> str:
    """Text from elsewhere as one printable line of at most ``limit`` characters (and a "…").

    Line breaks and runs of spaces become one space, other control characters (a terminal
    escape) "?": such text reaches log lines, exit messages and systemd's ``STATUS=``.
    """
    text = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "…"
