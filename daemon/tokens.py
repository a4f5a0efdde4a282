"""Temporary tokens for the streaming service: one fresh token per connection attempt.

The raw API key goes only to ``token_url`` in the ``Authorization`` header; the socket sees only
the short-lived token (``?token=``). Every minted token is handed to the log masker.

Whatever the endpoint (or a proxy in front of it) answers, the error names it in one short
line: the whole exchange has ``connect_timeout`` (a reply trickled byte by byte included), at most
``_BODY_MAX`` of a body is read (a 50 MB reply must not be held, twice, in memory), the server's
texts are shown printable and cut, and the API key is masked in them (a server may echo it).
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import structlog

from daemon.backoff import retry_after_s
from daemon.config import AssemblyAIConfig
from daemon.errors import ConfigError, DaemonError, one_line
from daemon.masking import MASK

log = structlog.get_logger("daemon.tokens")
_BODY_MAX: Final = 64 * 1024        # a token reply is < 1 KiB; an error page needs no more
TOKEN_MAX: Final = 8192             # a JWT is a few hundred bytes: longer is not a token
_SHOWN_MAX: Final = 100             # a server's text (reason, error, redirect) in a log line
RETRY_AFTER_MAX_S: Final = 300.0    # a longer ask (or a proxy's) would stall transcription
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")      # visible ASCII: what a URL carries as is


class TokenError(DaemonError):
    """A token could not be had; ``rejected``: the service refused the key (401, its own 403)."""

    def __init__(
        self, message: str, *, rejected: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.rejected = rejected
        self.retry_after = retry_after


class TokenProvider:
    """Mints single-use temporary tokens from the v3 token endpoint."""

    def __init__(
        self,
        config: AssemblyAIConfig,
        client: httpx.AsyncClient,
        *,
        on_token: Callable[[str], None] = lambda _token: None,
    ) -> None:
        self._config = config
        self._client = client
        self._on_token = on_token

    async def fresh(self, max_session_seconds: int | None = None) -> str:
        """Return a new token that can open one session.

        Raises:
            TokenError: transient (network, timeout, 429, 5xx, a reply that is not a token) or
                ``rejected`` (401, or a 403 with the service's JSON error).
            ConfigError: the endpoint refused our parameters (the service's own 400).
        """
        session_cap = max_session_seconds or self._config.max_session_seconds
        params = {"expires_in_seconds": self._config.token_expires_in,
                  "max_session_duration_seconds": session_cap}
        limit = self._config.connect_timeout
        try:
            async with asyncio.timeout(limit):
                status, reply = await self._request(params, limit)
        except TimeoutError:
            raise TokenError(f"token endpoint {self._config.token_url} gave no complete "
                             f"answer within {limit:g} s (assemblyai.connect_timeout)") from None
        except httpx.HTTPError as exc:
            raise TokenError(
                f"token request to {self._config.token_url} failed: {self._failure(exc)}"
            ) from None
        return self._token_from(status, reply)

    async def _request(self, params: dict[str, int], limit: float) -> tuple[int, _Reply]:
        """GET the token URL (no redirect followed: the key must not go elsewhere)."""
        headers = {"Authorization": self._config.api_key.get_secret_value(),
                   "Accept-Encoding": "identity"}
        async with self._client.stream(
            "GET", self._config.token_url, params=params, headers=headers,
            timeout=limit, follow_redirects=False,
        ) as response:
            body = await _read_capped(response)
            return response.status_code, _Reply(response, body, self._shown)

    def _token_from(self, status: int, reply: _Reply) -> str:
        detail = reply.service or reply.reason
        if status == 403 and reply.service is None:    # not the service's JSON error
            raise TokenError(f"token endpoint answered 403 ({detail}) without the service's "
                             f"error body ({reply.content_type}): a proxy, firewall or CDN in "
                             "the way? retried, not taken as a rejected key",
                             retry_after=reply.retry_after)
        if status in (401, 403):
            raise TokenError(
                f"token endpoint rejected the API key ({status}: {detail})", rejected=True
            )
        if status == 400 and reply.service is not None:
            raise ConfigError(
                "assemblyai.token_expires_in / max_session_seconds: the token endpoint refused "
                f"them ({detail})"
            )
        if 300 <= status < 400:
            raise TokenError(f"token endpoint answered {status} ({detail}), a redirect to "
                             f"{reply.location}: not followed (the API key would go along); "
                             "check assemblyai.token_url")
        if status != 200:               # a 400 without the service's JSON: a proxy, transient
            hint = "; check assemblyai.token_url" if status in (404, 405) else ""
            raise TokenError(f"token endpoint answered {status}: {detail}{hint}",
                             retry_after=reply.retry_after)
        token = self._checked(reply)
        self._on_token(token)
        return token

    def _checked(self, reply: _Reply) -> str:
        """The reply's ``token``, else ``TokenError`` naming what is wrong with it."""
        if reply.truncated:
            raise TokenError(f"token endpoint answered 200 with a body over {_BODY_MAX} bytes")
        data = reply.data
        if not isinstance(data, dict):
            what = "not JSON" if data is _NOT_JSON else f"JSON {type(data).__name__}, not an object"
            raise TokenError(f"token endpoint answered 200 with a body that is {what}"
                             f" ({reply.content_type})")
        if "token" not in data:
            said = f" (error: {reply.service})" if reply.service else ""
            raise TokenError(f"token endpoint answered 200 without a 'token' field{said}")
        problem = _token_problem(data["token"], self._config.api_key.get_secret_value())
        if problem:
            raise TokenError(f"token endpoint answered 200 with a 'token' that {problem}")
        return str(data["token"])

    def _shown(self, text: str) -> str:
        """A server's text for a log line: the API key masked, printable, one line, cut."""
        key = self._config.api_key.get_secret_value()
        if key:
            text = text.replace(key, MASK)
        return one_line(text[:4 * _SHOWN_MAX], _SHOWN_MAX)

    def _failure(self, exc: httpx.HTTPError) -> str:
        """A failed request named: its type and what its cause says (refused, DNS, TLS, …)."""
        said = self._shown(_root_cause(exc))
        return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


_NOT_JSON: Final = object()


class _Reply:
    """What a reply says, read once from its (capped) body and headers."""

    def __init__(self, response: httpx.Response, body: bytes,
                 shown: Callable[[str], str]) -> None:
        self.truncated = len(body) > _BODY_MAX
        self.data = _parsed(body[:_BODY_MAX])
        error = self.data.get("error") if isinstance(self.data, dict) else None
        self.service = shown(error) if isinstance(error, str) else None
        self.reason = shown(response.reason_phrase) or "no detail"
        self.content_type = shown(response.headers.get("content-type", "")) or "no Content-Type"
        self.location = _where(response.headers.get("location", ""), shown)
        self.retry_after = retry_after_s(response.headers.get("retry-after"), RETRY_AFTER_MAX_S)


async def _read_capped(response: httpx.Response) -> bytes:
    """The body's first ``_BODY_MAX`` bytes, plus one more when it is longer.

    Raw, inflated here within the cap: httpx inflates each chunk whole, and 64 KiB of gzip
    inflate to 64 MB. Other encodings are left as they are (identity is asked for).
    """
    encoding = response.headers.get("content-encoding", "").strip().lower()
    inflater = zlib.decompressobj(47) if encoding in ("gzip", "x-gzip", "deflate") else None
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            room = _BODY_MAX + 1 - len(body)
            body += inflater.decompress(chunk, room) if inflater else chunk[:room]
            if len(body) > _BODY_MAX:
                break
    except zlib.error:
        return b""                      # not what it says it is: not a token either
    return bytes(body)


def _root_cause(exc: BaseException) -> str:
    """The text of the innermost cause that has one.

    httpx's "All connection attempts failed" hides "Connect call failed", a DNS or a TLS error.
    """
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    for _ in range(8):
        if cause is None:
            break
        text = str(cause) or text
        cause = cause.__cause__ or cause.__context__
    return text


def _parsed(body: bytes) -> Any:
    """The body as JSON, else ``_NOT_JSON`` (deep nesting included: it is not a token)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _where(location: str, shown: Callable[[str], str]) -> str:
    """A redirect's target, without its query or user info (they may carry credentials)."""
    if not location:
        return "nowhere (no Location)"
    try:
        parts = urlsplit(location)
    except ValueError:              # "http://[" : not a URL
        return "an unreadable Location"
    host = parts.netloc.rpartition("@")[2]
    target = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    return shown(target) or "an unreadable Location"


def _token_problem(token: object, api_key: str) -> str | None:
    """What makes ``token`` unusable in the socket's URL, or ``None``."""
    if not isinstance(token, str):
        return f"is {'null' if token is None else type(token).__name__}, not a string"
    if not token:
        return "is empty"
    if len(token) > TOKEN_MAX:
        return f"is {len(token)} characters long (over {TOKEN_MAX})"
    if not _TOKEN_CHARS.fullmatch(token):
        return "holds spaces, control or non-ASCII characters"
    if token == api_key:
        return "is the API key itself (never sent in a URL)"
    return None
