"""Built-in webhook sink: POSTs each turn as a signed Standard Webhooks event (httpx).

Body: ``{"type": "turn.completed", "timestamp": <ended_at>, "data": <record>}``. Headers:
``webhook-id`` (the record id, stable across retries), ``webhook-timestamp`` (Unix seconds of this
attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>``, one per configured secret,
space-separated, so receivers can rotate secrets).

Failures are classified here, at the I/O boundary: timeouts, connection errors (a TLS failure
says why), 408, 425, 429 and 5xx raise ``SinkError`` (with ``retry_after`` from a ``Retry-After``
header); any other non-2xx raises ``PermanentSinkError``, and so does a redirect whose
``Location`` is not a URL. An answer that is not HTTP/1.1 is named (closed without an answer,
what h11 found wrong); a reason phrase is shown printable and bounded. Neither message carries a
secret, a header value or the URL's path. A kept-alive connection that breaks before any answer
(the server dropped it while idle) is sent on again at once, on a new connection, once
(``webhook.sent_again``, info): it is not a failure of the sink.

Only the status line and headers of an answer decide; its body is read and discarded up to
``BODY_READ_MAX`` bytes within ``timeout_s`` (so a normal connection can be reused) and a longer,
endless, slow or broken-off body is not read on: the connection is closed instead, so a receiver
cannot grow the daemon's memory, and the status it sent still counts.

After a send that nothing took (refused, no route, a connect timeout), ``ready()`` probes the
server's port (``plugins.tcp_probe``) so the dispatcher retries as soon as it is back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import time
from types import TracebackType
from typing import Annotated, Any, Final, Self
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from daemon.backoff import retry_after_s
from daemon.credentials import read_secret_file
from daemon.envvars import json_error, json_problem
from daemon.errors import PermanentSinkError, SinkError
from daemon.events import TurnRecord, iso_utc, json_line
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl
from daemon.tomltypes import type_name
from plugins.tcp_probe import proxied, until_it_connects
from plugins.webhook_answers import (
    REASON_MAX,
    bad_location,
    drain,
    origin,
    printable,
    transport_problem,
)

log = structlog.get_logger("plugins.webhook")

EVENT_TYPE: Final = "turn.completed"
SECRET_PREFIX: Final = "whsec_"
USER_AGENT: Final = "transcribed-webhook/1"
_TRANSIENT_STATUS: Final = frozenset({408, 425, 429})
RETRY_AFTER_MAX_S: Final = 3600.0
_SET_BY_THE_SINK: Final = frozenset({    # framing the HTTP client owns: a wrong one fails
    "content-type", "content-length", "transfer-encoding", "connection", "host", "upgrade",
    "te", "trailer", "keep-alive", "expect"})      # every send, for ever
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")   # an HTTP token (RFC 9110)
_HEADER_VALUE: Final = re.compile(r"[\t\x20-\x7e]*")   # what httpx can send: printable ASCII
_BROKEN_BEFORE_ANSWER: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class _ReusedConnectionBroke(Exception):
    """A kept-alive connection broke before any answer came: worth one more try, on a new one."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class _NewConnection:
    """An httpcore ``trace`` hook: did this request open a connection (or reuse a pooled one)?"""

    def __init__(self) -> None:
        self.opened = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        """Note a connection being opened for the request."""
        if event.startswith(("connection.connect_tcp.", "connection.connect_unix_socket.")):
            self.opened = True


def _header_value(value: str) -> str:
    """A header value httpx can send; the message never shows the value (it may be a secret).

    Spaces and tabs around it are dropped: HTTP does not count them as part of the value, and
    h11 refuses to send them (every send failed, retried for ever).
    """
    if not _HEADER_VALUE.fullmatch(value):
        raise ValueError("header value must be printable ASCII (no line breaks, control "
                         "characters or non-ASCII letters)")
    return value.strip(" \t")


HeaderValue = Annotated[str, AfterValidator(_header_value)]


class WebhookConfig(SinkConfig):
    """``type = "webhook"``: POST each turn to ``url``."""

    model_config = ConfigDict(hide_input_in_errors=True)

    url: str = Field(description="http:// or https:// endpoint")
    secret: tuple[SecretStr, ...] = Field(
        default=(), description="Standard Webhooks secret(s) whsec_…; a list or space-separated"
    )
    secret_file: str = Field(default="", description="file holding the secret(s)")
    headers: dict[str, HeaderValue] = Field(default_factory=dict,
                                            description="extra request headers")
    timeout_s: float = Field(default=10.0, gt=0, description="per-request timeout, seconds")
    retry_max_s: float | None = Field(
        default=None, gt=0, description="dead-letter a turn after retrying this long; unset = never"
    )

    @model_validator(mode="before")
    @classmethod
    def _secret_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("secret_file"):
            return data
        if data.get("secret"):
            raise ValueError("set either secret or secret_file, not both")
        return {**data, "secret": read_secret_file(str(data["secret_file"]), "secret_file")}

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        problem = "must be an http:// or https:// URL with a host"
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL:
            raise ValueError(problem) from None
        try:
            port = urlsplit(value).port  # what the masker and the log lines parse it with
        except ValueError:          # a port out of range (httpx took it), or a broken [IPv6]
            raise ValueError("its port is not 1-65535" if url.port else problem) from None
        if port == 0:
            raise ValueError("its port is not 1-65535")
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(problem)
        if any(c.isspace() for c in value) or ("%" in url.host and ":" not in url.host):
            raise ValueError("must not contain spaces or a percent-encoded host name")
        return str(url)     # as httpx sends and logs it, so the log masker learns that text

    @field_validator("secret", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool | int | float | dict):     # never shown: it may be the secret
            raise ValueError("expected a string (whsec_…) or an array of them, found "
                             f"{type_name(value)}")
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("[") and (error := json_error(value)) is not None:
            raise ValueError(json_problem(error, list))   # a list whose JSON is broken
        return value.split()

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for number, secret in enumerate(value, start=1):
            _secret_key(secret, number)
        return value

    @field_validator("headers", mode="wrap")
    @classmethod
    def _header_names(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Every bad header name is named (one line each); the other headers' values are checked.

        A bad name's value is not: only a valid token may become part of a value problem's
        (one-line) location, ``headers.<name>``.
        """
        if not isinstance(value, dict):
            return handler(value)
        problems = {name: problem for name in value if (problem := _header_name_problem(name))}
        first: dict[str, str] = {}          # both would be sent: the receiver picks one
        for name in value:
            if name in problems or not isinstance(name, str):
                continue
            if (other := first.setdefault(name.lower(), name)) != name:
                problems[name] = f"header {name!r} is set twice (names ignore case: also {other!r})"
        errors: list[InitErrorDetails] = [
            {"type": PydanticCustomError("header_name", problem), "loc": (), "input": name}
            for name, problem in problems.items()]
        try:
            headers = handler({k: v for k, v in value.items() if k not in problems})
        except ValidationError as exc:
            # a value's type may be named (found an integer), a text never shown: it may be
            # a credential
            errors += [{"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"],
                        "input": None if isinstance(e.get("input"), str) else e.get("input")}
                       for e in exc.errors(include_url=False)]
        if errors:
            raise ValidationError.from_exception_data("headers", errors)
        return headers


def _header_name_problem(name: Any) -> str | None:
    """Why a header cannot have this name (``None``: it can)."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        return f"{name!r} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    if name.lower().startswith("webhook-") or name.lower() in _SET_BY_THE_SINK:
        return f"header {name!r} is set by the sink and cannot be overridden"
    return None


def _secret_key(secret: SecretStr, number: int) -> bytes:
    """Decode ``whsec_<base64>`` into the HMAC key; errors name the secret by position only."""
    text = secret.get_secret_value()
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"secret #{number} must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(text.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"secret #{number} is not valid base64 after {SECRET_PREFIX!r}") from None
    if not key:
        raise ValueError(f"secret #{number} is empty")
    return key


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<sig>`` per key, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
        for key in keys
    )


def event_body(record: TurnRecord) -> bytes:
    """The JSON body for one turn (identical on every attempt).

    ``json_line``: a lone surrogate (no UTF-8 form) is sent as its JSON escape; encoding it
    raised, and the turn was retried for ever ahead of every later one.
    """
    event = {"type": EVENT_TYPE, "timestamp": iso_utc(record.ended_at), "data": record.to_dict()}
    return json_line(event).encode()


class WebhookSink:
    """Delivers turns to one webhook endpoint.

    Args:
        name: the sink's instance name (for messages).
        config: its validated table.
        client: a shared ``httpx.AsyncClient``; when ``None`` the sink opens and closes its own.
    """

    def __init__(self, name: str, config: WebhookConfig,
                 client: httpx.AsyncClient | None = None) -> None:
        self.name = name
        self.config = config
        self._keys = [_secret_key(s, n) for n, s in enumerate(config.secret, start=1)]
        self._client = client
        self._owns_client = client is None
        url = httpx.URL(config.url)
        self._where = f"{url.scheme}://{url.netloc.decode()}"  # never the path: it may be a secret
        self._host, self._port = url.host, url.port or (443 if url.scheme == "https" else 80)
        self._probe = not proxied(url)      # a proxy would take the connection itself
        self._unreachable = False           # the last send found nothing to connect to

    async def __aenter__(self) -> Self:
        """Open an HTTP client unless one was injected."""
        if self._client is None:
            self._client = httpx.AsyncClient(headers={"user-agent": USER_AGENT})
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Close the client if this sink opened it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ready(self) -> None:
        """Return once the server takes a TCP connection, after a send found none to connect to.

        A server that answered (a 5xx, a ``Retry-After``) is left to the dispatcher's backoff,
        and so is one behind a proxy: then this never returns (the backoff ends it).
        """
        if not (self._unreachable and self._probe):
            await asyncio.Event().wait()
        await until_it_connects(self._host, self._port, self.config.timeout_s)

    async def send(self, record: TurnRecord) -> None:
        """POST one turn; raise ``SinkError`` (transient) or ``PermanentSinkError``."""
        if self._client is None:
            raise SinkError(f"webhook sink {self.name!r} is not open")
        body = event_body(record)
        deadline = asyncio.get_running_loop().time() + self.config.timeout_s  # total, not per read
        try:
            response = await self._post(self._client, record.id, body, deadline)
        except _ReusedConnectionBroke as broke:
            log.info("webhook.sent_again", sink=self.name, error=broke.problem,
                     hint="a kept-alive connection failed before an answer; sent on a new one")
            response = await self._post(self._client, record.id, body, deadline, again=True)
        try:
            await drain(response, deadline)
        finally:
            await response.aclose()
        self._check(response)

    async def _post(self, client: httpx.AsyncClient, msg_id: str, body: bytes, deadline: float,
                    *, again: bool = False) -> httpx.Response:
        """Send the POST and return the answer's head (its body unread).

        Raises ``_ReusedConnectionBroke`` (unless ``again``) when a kept-alive connection broke
        before any answer: the server closed it while idle (a race with its keep-alive timeout),
        or it still held bytes of the previous answer (a 204 with a body).
        """
        fresh = _NewConnection()
        request = client.build_request(
            "POST", self.config.url, content=body, headers=self._headers(msg_id, body),
            timeout=self.config.timeout_s, extensions={"trace": fresh.trace})
        self._unreachable = False
        try:
            async with asyncio.timeout_at(deadline):
                return await client.send(request, stream=True)
        except (httpx.TimeoutException, TimeoutError) as exc:
            self._unreachable = isinstance(exc, httpx.ConnectTimeout)
            raise SinkError(
                f"webhook {self._where} timed out after {self.config.timeout_s:g} s"
            ) from None
        except httpx.TransportError as exc:
            self._unreachable = isinstance(exc, httpx.ConnectError)    # refused, no route, DNS
            if bad_location(exc):       # the answer was a redirect: permanent, never re-sent
                raise PermanentSinkError(
                    f"webhook {self._where} answered a redirect whose Location is not a URL: "
                    "redirects are not followed (set url to the new address)") from None
            problem = f"webhook {self._where} {transport_problem(exc)}"
            if not again and not fresh.opened and isinstance(exc, _BROKEN_BEFORE_ANSWER):
                raise _ReusedConnectionBroke(problem) from None
            raise SinkError(problem) from None

    def _headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(time.time())
        headers = {**self.config.headers, "content-type": "application/json",
                   "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, msg_id, timestamp, body)
        return headers

    def _check(self, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        reason = printable(response.reason_phrase, REASON_MAX)
        message = f"webhook {self._where} answered {status} {reason}".rstrip()
        if 500 <= status < 600 or status in _TRANSIENT_STATUS:
            delay = retry_after_s(response.headers.get("retry-after"), RETRY_AFTER_MAX_S)
            raise SinkError(message, retry_after=delay)
        if 300 <= status < 400 and (location := response.headers.get("location")):
            message += f": redirects are not followed; it points to {origin(response, location)}"
            message += " (set url to the new address)"
        raise PermanentSinkError(message)


def _factory(name: str, config: Any, context: SinkContext) -> WebhookSink:
    client = context.extra.get("http_client")
    return WebhookSink(name, config, client if isinstance(client, httpx.AsyncClient) else None)


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``webhook`` sink type (durable: queued in the outbox)."""
    return [SinkType("webhook", WebhookConfig, _factory, durable=True)]
