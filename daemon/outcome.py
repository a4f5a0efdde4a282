"""How a streaming session ended, or an attempt to open one failed, and how an outage is told.

Owns ``Outcome`` (the close kind and reason, and what the engine's backoff and replay decide
on), ``close_of`` (how a websocket connection closed, and who closed it), the count of
credential rejections in a row (``refused_after_begin``, ``token_failed``: the second is exit
77), ``unreachable`` (a failed connection in plain words) and ``Outage`` (what a run of failed
attempts logs, and at which level). ``daemon.session`` makes outcomes when a session ends,
``daemon.stream`` when a connection attempt fails.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from daemon.errors import AuthError
from daemon.protocol import CloseKind, classify_close
from daemon.supervise import error_line
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


# -- an outage in plain words --------------------------------------------------------------

SUMMARY_EVERY_S: Final = 300.0      # while an outage lasts, one ``stream.still_down`` this often
_REASONS_MAX: Final = 32            # reasons remembered per outage (a server's texts may vary)
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}
RATE_HINT: Final = ("the account's limit of concurrent (or new) sessions was reached: is another "
                    "transcribed, or another program, using this API key?")
_ERRNO_WORDS: Final = {
    errno.ECONNREFUSED: "connection refused by {where}",
    errno.ECONNRESET: "connection reset by {where}",
    errno.ETIMEDOUT: "no answer from {where} (the connection timed out)",
    errno.EHOSTUNREACH: "{where} cannot be reached (no route to the host)",
    errno.ENETUNREACH: "{where} cannot be reached (the network is unreachable)",
}


def endpoint(url: str) -> str:
    """``host:port`` of a URL, for a log line: no user info, path or query (a token's place)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:                      # a port that is no number: shown as written
        return urlsplit(url).netloc.rpartition("@")[2]
    port = port or _DEFAULT_PORTS.get(parts.scheme)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def unreachable(exc: BaseException, where: str) -> str | None:
    """A failed connection in plain words (refused, DNS, TLS, unreachable), else ``None``.

    Follows the exception's causes and contexts: httpx's "All connection attempts failed", and a
    ``TokenError`` raised ``from None``, keep the socket's own error there.
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        words = _oserror_words(seen, where)
        if words is not None:
            return words
        seen = seen.__cause__ or seen.__context__
    return None


def _oserror_words(exc: BaseException, where: str) -> str | None:
    """One exception (not its causes) in plain words, if it is a connection failure we know."""
    if isinstance(exc, socket.gaierror):
        host = where.rpartition(":")[0] or where
        return f"host name {host} not found (DNS: {exc.strerror or exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate of {where} not accepted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {where} failed ({exc.reason or exc})"
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code is None and f"[Errno {errno.ECONNREFUSED}]" in str(exc):   # every address refused
        code = errno.ECONNREFUSED
    template = _ERRNO_WORDS.get(code) if code is not None else None
    if template is not None:
        return template.format(where=where)
    if exc.strerror:
        return f"cannot connect to {where}: {exc.strerror.lower()}"
    return None


def connect_failed(exc: BaseException, where: str, *, connected: bool, limit_s: float) -> str:
    """Why a connection to the streaming endpoint failed, in plain words where we know them."""
    if isinstance(exc, TimeoutError):
        what = "no Begin from" if connected else "no connection to"
        return f"{what} {where} within {limit_s:g} s (assemblyai.connect_timeout)"
    return unreachable(exc, where) or f"connect failed: {error_line(exc)}"


def backlog_fields(held_s: float, lost_s: float, cap_s: float, *, file: bool) -> dict[str, Any]:
    """What the backlog holds during an outage, and what that means for the audio."""
    if lost_s > 0:
        effect = f"the backlog is full: the oldest audio is being dropped ({lost_s:.1f} s)"
    elif file:
        effect = f"the file waits once {cap_s:g} s are held (reconnect.backlog_seconds); " \
                 "nothing is lost"
    else:
        effect = f"the audio is held, up to {cap_s:g} s (reconnect.backlog_seconds), and " \
                 "sent when the service answers; nothing is lost yet"
    return {"backlog_s": round(held_s, 2), "backlog_seconds": cap_s,
            "dropped_s": round(lost_s, 2), "effect": effect}


def retry_fields(delay: float, stop_by: float | None) -> dict[str, Any]:
    """When the next attempt comes: ``retry_in_s``, or none when a stop's deadline comes first."""
    if stop_by is not None and time.monotonic() + delay >= stop_by:
        return {"next_attempt": "none: stopping (the shutdown deadline comes first)"}
    return {"retry_in_s": round(delay, 2)}


class Outage:
    """Failed attempts to open a session since one last opened: what each logs, at which level.

    An operator tailing the log gets one warning when an outage starts and one when its reason
    changes (refused, then 503, then rate-limited: each reason once), the retries of the same
    reason at debug, a ``stream.still_down`` warning every ``every_s`` while it lasts (how long,
    how many attempts, the audio held), and ``stream.recovered`` (info) when a session opens.
    ``held`` says what the audio backlog holds (the engine's ledger) for those lines.
    """

    def __init__(self, held: Callable[[], dict[str, Any]], every_s: float = SUMMARY_EVERY_S
                 ) -> None:
        self._held = held
        self._every_s = every_s
        self.started: float | None = None        # monotonic time of the first failure
        self.attempts = 0
        self.reason = ""
        self.stop_by: float | None = None        # the shutdown deadline, once stopping
        self._reasons: set[str] = set()
        self._summed_at = 0.0

    @property
    def down_for_s(self) -> float:
        """Seconds since the outage's first failure (0 when there is none)."""
        return 0.0 if self.started is None else round(time.monotonic() - self.started, 1)

    def counted(self, reason: str) -> bool:
        """Count a failed attempt; True if it starts the outage or its reason is new in it."""
        now = time.monotonic()
        self.attempts += 1
        if self.started is None:
            self.started = self._summed_at = now
            self._reasons.clear()
        # past the cap (a server whose texts vary per attempt) a reason is no longer news
        new = reason not in self._reasons and len(self._reasons) < _REASONS_MAX
        if new:
            self._reasons.add(reason)
        self.reason = reason
        return new

    def token_failed(self, exc: TokenError, where: str, delay: float) -> None:
        """A token request failed (``where``: the endpoint's host and port)."""
        reason = unreachable(exc, f"the token endpoint {where}") or str(exc)
        self.failed("stream.token_failed", reason, error=reason,
                    **retry_fields(delay, self.stop_by), backlog_s=self._held()["backlog_s"])

    def reconnecting(self, outcome: Outcome, delay: float, **fields: Any) -> None:
        """The next attempt after ``outcome``: info after a session, else part of the outage."""
        fields = {"kind": outcome.kind.value, "reason": outcome.reason,
                  **retry_fields(delay, self.stop_by), **fields}
        if outcome.kind is CloseKind.RATE:
            fields["hint"] = RATE_HINT
        if not outcome.began:
            self.failed("stream.reconnecting", outcome.reason, **fields)
        elif outcome.kind is CloseKind.RATE:
            log.warning("stream.reconnecting", **fields)
        else:
            log.info("stream.reconnecting", **fields)

    def failed(self, event: str, reason: str, /, **fields: Any) -> None:
        """Log a failed attempt: a warning if it starts the outage or says something new."""
        previous, first = self.reason, self.started is None
        if not self.counted(reason):
            log.debug(event, **fields, attempts=self.attempts)
        elif first:
            log.warning(event, **{**self._held(), **fields}, outage="started")
        else:
            log.warning(event, **{**self._held(), **fields}, outage="reason changed",
                        previous=previous, down_for_s=self.down_for_s, attempts=self.attempts)
        self._sum_up()

    def _sum_up(self) -> None:
        """Every ``every_s`` of an outage: one line saying it goes on, and what it costs."""
        now = time.monotonic()
        if now - self._summed_at < self._every_s:
            return
        self._summed_at = now
        log.warning("stream.still_down", down_for_s=self.down_for_s, attempts=self.attempts,
                    reason=self.reason, **self._held())

    def recovered(self) -> None:
        """A session opened: the outage (if any) is over, in one line."""
        if self.started is None:
            return
        held = self._held()
        log.info("stream.recovered", down_for_s=self.down_for_s, attempts=self.attempts,
                 last_reason=self.reason, backlog_s=held["backlog_s"], dropped_s=held["dropped_s"])
        self.started, self.attempts, self.reason = None, 0, ""
