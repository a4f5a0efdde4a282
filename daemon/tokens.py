"""Temporary tokens for the streaming service: one fresh token per connection attempt.

The raw API key goes only to ``token_url`` in the ``Authorization`` header; the socket sees only
the short-lived token (``?token=``). Every minted token is handed to the log masker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import httpx
import structlog

from daemon.backoff import retry_after_s
from daemon.config import AssemblyAIConfig
from daemon.errors import ConfigError, DaemonError

log = structlog.get_logger("daemon.tokens")
_TIMEOUT_S: Final = 10.0
RETRY_AFTER_MAX_S: Final = 300.0    # a longer ask (or a proxy's) would stall transcription


class TokenError(DaemonError):
    """A token could not be had; ``rejected`` means the key itself was refused (401/403)."""

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
            TokenError: transient (network, 429, 5xx) or ``rejected`` (401/403).
            ConfigError: the endpoint refused our parameters (400).
        """
        params = {"expires_in_seconds": self._config.token_expires_in}
        session_cap = max_session_seconds or self._config.max_session_seconds
        params["max_session_duration_seconds"] = session_cap
        headers = {"Authorization": self._config.api_key.get_secret_value()}
        try:
            response = await self._client.get(
                self._config.token_url, params=params, headers=headers, timeout=_TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise TokenError(
                f"token request to {self._config.token_url} failed: {type(exc).__name__}"
            ) from None
        return self._token_from(response)

    def _token_from(self, response: httpx.Response) -> str:
        status = response.status_code
        service = _service_error(response)
        detail = service or response.reason_phrase or "no detail"
        if status in (401, 403):
            raise TokenError(
                f"token endpoint rejected the API key ({status}: {detail})", rejected=True
            )
        if status == 400 and service is not None:
            raise ConfigError(
                "assemblyai.token_expires_in / max_session_seconds: the token endpoint refused "
                f"them ({detail})"
            )
        if status != 200:               # a 400 without the service's JSON: a proxy, transient
            asked = retry_after_s(response.headers.get("retry-after"), RETRY_AFTER_MAX_S)
            raise TokenError(f"token endpoint answered {status}: {detail}", retry_after=asked)
        try:
            token = response.json()["token"]
        except (ValueError, KeyError, TypeError):
            raise TokenError("token endpoint answered 200 without a token") from None
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint answered 200 without a token")
        self._on_token(token)
        return token


def _service_error(response: httpx.Response) -> str | None:
    """The service's own ``{"error": "..."}`` text, if the body is that."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:200]
    return None
