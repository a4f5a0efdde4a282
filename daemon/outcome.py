"""How a streaming session ended, or an attempt to open one failed.

Owns ``Outcome`` (the close kind and reason, and what the engine's backoff and replay decide
on), ``close_of`` (how a websocket connection closed, and who closed it) and the count of
credential rejections in a row (``refused_after_begin``, ``token_failed``: the second is exit
77). ``daemon.session`` makes outcomes when a session ends, ``daemon.stream`` when a connection
attempt fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import structlog
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from daemon.errors import AuthError
from daemon.protocol import CloseKind, classify_close
from daemon.tokens import TokenError

log = structlog.get_logger("daemon.stream")


@dataclass
class Outcome:
    """How a session ended."""

    kind: CloseKind
    reason: str
    began: bool = False
    healthy: bool = False            # old enough for the backoff to start over
    unanswered: bool = False         # the service took speech and never answered it
    finished: bool = False           # Termination received after the input ended


@dataclass(frozen=True)
class CloseReport:
    """A connection's close: its code and reason, and whether we closed it (``ours``)."""

    code: int
    reason: str
    ours: bool = False

    @property
    def kind(self) -> CloseKind:
        """The close kind; our own close (a frame too big, a keepalive timeout) is transient.

        The service gave no verdict then: the connection failed on our side, so the next
        session reconnects and replays what no finished turn covers, never exits.
        """
        return CloseKind.TRANSIENT if self.ours else classify_close(self.code, self.reason)

    def __str__(self) -> str:
        if not self.ours:
            return f"{self.code} {self.reason}".strip()
        return f"{Close(self.code, self.reason)} (closed by us)"   # 1009 (message too big) …


def close_of(exc: ConnectionClosed) -> CloseReport:
    """How the connection closed: the peer's close frame, or ours if we closed first.

    We close first when ``websockets`` fails the connection itself (1009 for a frame over
    ``max_size``, 1011 for a keepalive timeout): no close frame came back before the socket
    ended, or only the echo of ours. With neither frame, 1006 (the connection just ended).
    """
    sent, rcvd = exc.sent, exc.rcvd
    if sent is not None and exc.rcvd_then_sent is not True:
        return CloseReport(sent.code, sent.reason, ours=True)
    if rcvd is not None:
        return CloseReport(rcvd.code, rcvd.reason)
    return CloseReport(1006, "abnormal closure")


def refused_after_begin(outcome: Outcome, auth_failures: int) -> int:
    """The rejections in a row after a session (the second is fatal: exit 77).

    A session the service closed as unauthorised before it was healthy (4001-4003, or 1008
    saying so, right after ``Begin``) counts, as a refused handshake does (it reconnected for
    ever); any other outcome starts the count again. A bare 1008 does not: the token endpoint
    had just taken the key, and older services closed 1008 for much else.
    """
    if outcome.kind is not CloseKind.AUTH or outcome.healthy or not _about_credentials(outcome):
        return 0
    if auth_failures >= 1:
        raise AuthError(auth_message(outcome.reason))
    log.warning("stream.auth_rejected", reason=outcome.reason, retrying=True)
    return auth_failures + 1


def token_failed(exc: TokenError, auth_failures: int, delays: Iterator[float]) -> float:
    """The wait before the next attempt after a failed token; the second rejection is fatal."""
    if auth_failures >= 2:
        raise AuthError(auth_message(str(exc))) from None
    delay = next(delays)               # a floor: "Retry-After: 0" must not make a tight loop
    if exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    log.warning("stream.token_failed", error=str(exc), retry_in_s=round(delay, 2))
    return delay


def auth_message(reason: str) -> str:
    """The exit message (77) when the service refused the credentials twice."""
    return (f"AssemblyAI rejected the credentials twice ({reason}); check assemblyai.api_key "
            "(or api_key_file / the assemblyai_api_key credential)")


_CREDENTIAL_WORDS: Final = re.compile(r"auth|token|credential|api.?key", re.IGNORECASE)


def _about_credentials(outcome: Outcome) -> bool:
    """A close after ``Begin`` that names the credentials: 4001-4003, or words that say so."""
    code = outcome.reason.split(" ", 1)[0]
    return code in ("4001", "4002", "4003") or bool(_CREDENTIAL_WORDS.search(outcome.reason))
