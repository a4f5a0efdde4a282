"""What a webhook's answer (or its absence) says, in a few words for a log line.

Owns the wording of the webhook sink's failures at the I/O boundary: why no answer came
(``transport_problem``: TLS, the system call, an answer that is not HTTP/1.1), a server's text
made safe for a log line (``printable``), a redirect's target without its path (``origin``),
and reading an answer's body without letting the receiver grow memory (``drain``). Nothing here
carries a secret, a header value or the URL's path.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from contextlib import suppress
from typing import Final

import httpx

REASON_MAX: Final = 100             # characters of a server's reason phrase or error shown
BODY_READ_MAX: Final = 64 * 1024     # bytes of an answer's body read (and discarded) at most
_NOT_PRINTABLE: Final = re.compile(r"[^\x20-\x7e]+")


def printable(text: str, limit: int) -> str:
    """A server's text for a log line: control and non-ASCII characters as ``?``, bounded.

    A reason phrase is the server's to choose: escape sequences reached the terminal, and a 60 KB
    one made every log line and dead letter 60 KB long.
    """
    text = _NOT_PRINTABLE.sub("?", text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def transport_problem(exc: httpx.TransportError) -> str:
    """Why no answer came, in a few words.

    A TLS failure says why, and so does the system call under a ``ConnectError`` (``Connection
    refused``, ``Name or service not known``) or a reset connection; an answer that is not HTTP
    says so (it was ``unreachable: RemoteProtocolError``, for a server that had answered).
    """
    cause: BaseException | None = exc
    seen: set[int] = set()
    system: OSError | None = None
    while cause is not None and id(cause) not in seen and not isinstance(cause, ssl.SSLError):
        seen.add(id(cause))
        if system is None and isinstance(cause, OSError) and isinstance(cause.errno, int):
            system = cause
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        reason = (cause.reason or type(cause).__name__).replace("_", " ").lower()
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return protocol_problem(exc)
    lost = isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError)
    problem = f"{'broke the connection' if lost else 'unreachable'}: {type(exc).__name__}"
    if system is None or system.errno is None:
        return problem
    # a DNS failure's number is getaddrinfo's (negative), its text the resolver's
    why = os.strerror(system.errno) if system.errno > 0 else system.strerror
    return f"{problem} ({why})" if why else problem


def protocol_problem(exc: httpx.RemoteProtocolError) -> str:
    """What was wrong with an answer that is not HTTP/1.1 (h11's words, printable and bounded)."""
    text = str(exc)
    if text.startswith("Server disconnected without sending a response"):
        return "closed the connection without a (complete) answer"
    if text == "Receive buffer too long":
        return "answered with a status line and headers over 100 KiB"
    return f"answered with something that is not HTTP/1.1: {printable(text, REASON_MAX)}"


def bad_location(exc: httpx.TransportError) -> bool:
    """The answer was a redirect whose ``Location`` is not a URL.

    httpx reads it even when redirects are not followed, and raises a ``RemoteProtocolError``:
    taken for a connection error, a redirect was retried for ever instead of dead-lettered.
    """
    return (isinstance(exc, httpx.RemoteProtocolError)
            and isinstance(exc.__context__, httpx.InvalidURL)
            and str(exc).startswith("Invalid URL in location header"))


def origin(response: httpx.Response, location: str) -> str:
    """``scheme://host[:port]`` of a redirect's target (never its path: it may be a secret)."""
    try:
        target = response.request.url.join(location)
    except (httpx.InvalidURL, ValueError):
        return "an address that is not a URL"
    return f"{target.scheme}://{target.netloc.decode()}"


async def drain(response: httpx.Response, deadline: float) -> None:
    """Read and discard the body, but stop after ``BODY_READ_MAX`` bytes or at ``deadline``.

    Raw bytes, not decoded: a compressed body cannot inflate either. Stopping early leaves the
    body unread, so the caller's ``response.aclose()`` closes the connection instead of reusing
    it. The status line has already decided: a body that breaks off or outlasts the deadline
    changes nothing (a 2xx taken for a failure was delivered again, a 4xx retried for ever).
    """
    seen = 0
    with suppress(httpx.TransportError, TimeoutError):
        async with asyncio.timeout_at(deadline):
            async for chunk in response.aiter_raw():
                seen += len(chunk)
                if seen > BODY_READ_MAX:
                    return
