"""The local live view server: ``/``, ``/events``, ``/healthz`` and ``/metrics`` on one port.

It is the ``websockets`` server itself: ``process_request`` answers the plain HTTP endpoints and
lets ``/events`` go on to a WebSocket handshake; no web framework, no per-connection compression.
It binds to loopback unless a token is configured. Without a token, requests must name a
loopback ``Host`` (a DNS-rebinding page cannot read it) and the feed refuses cross-origin
browsers. With a token, every endpoint wants ``Authorization: Bearer <token>`` or
``?token=<token>``, compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import unquote, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from daemon.config import HttpConfig
from daemon.errors import ConfigError
from daemon.live import LiveHub
from daemon.metrics import MetricsRenderer, StatusSnapshot, health

log = structlog.get_logger("daemon.web")

PAGE_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
POLL_S: Final = 1.0  # how often backlog and audio flow are refreshed into the state event
MAX_CONNECTIONS: Final = 256  # open at once (handshakes included): each holds a file descriptor
UNREAD_MAX_BYTES: Final = 1 << 20  # a client with this much unread is cut off
CLOSE_TIMEOUT_S: Final = 1.0  # a viewer that does not answer the close is cut off after this

# websockets logs each request line at debug level, query (token) included: keep it quiet.
_WS_LOGGER: Final = logging.getLogger("daemon.web.websockets")
_WS_LOGGER.setLevel(logging.WARNING)


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8765`` for IPv6); errors name ``http.listen``.

    Port 0 (any free port) passes here, for the server's own use; a config refuses it
    (:func:`check_http`).
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):   # "²" is a digit too
        raise ConfigError(f"http.listen: expected HOST:PORT, got {listen!r}")
    if int(port_text) > 65535:
        raise ConfigError(f"http.listen: port {int(port_text)} is out of range (1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"http.listen: missing host in {listen!r} (use 127.0.0.1:PORT)")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) names this machine's loopback."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http(config: HttpConfig) -> list[str]:
    """Config problems of ``[http]``, one line each (for ``check-config`` and startup)."""
    if not config.enabled:
        return []
    try:
        host, port = parse_listen(config.listen)
    except ConfigError as exc:
        return exc.problems
    if not is_loopback(host) and not config.token.get_secret_value():
        return [f"http.listen: {config.listen} is not a loopback address; set http.token "
                "to serve beyond this machine"]
    if port == 0:   # a port picked at random: tail, a browser, a health check could not find it
        return ["http.listen: port 0 is out of range (1-65535; 0 would be a random port that "
                "transcribed tail could not find)"]
    return []


def feed_url(listen: str) -> str:
    """The WebSocket URL ``transcribed tail`` connects to for a ``listen`` value."""
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}/events"


def _page() -> bytes:
    return (resources.files("daemon") / "assets" / "live.html").read_bytes()


class LiveServer:
    """Serves the live view, the event feed, health and metrics; an async context manager."""

    def __init__(
        self,
        hub: LiveHub,
        status: Callable[[], StatusSnapshot],
        *,
        listen: str = "127.0.0.1:8765",
        token: str = "",
        stale_s: float = 5.0,
        poll_s: float = POLL_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._host, self._port = parse_listen(listen)
        self._max_connections = max_connections
        if not is_loopback(self._host) and not token:
            raise ConfigError(check_http(HttpConfig(listen=listen))[0])
        self._hub = hub
        self._status = status
        self._token = token.encode()
        self._stale_s = stale_s
        self._poll_s = poll_s
        self._metrics = MetricsRenderer()
        self._page = _page()
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._bound = 0

    @classmethod
    def from_config(cls, config: HttpConfig, hub: LiveHub,
                    status: Callable[[], StatusSnapshot], *, stale_s: float) -> LiveServer:
        """Build from ``[http]``; ``stale_s`` is how long without audio is unhealthy."""
        return cls(hub, status, listen=config.listen, token=config.token.get_secret_value(),
                   stale_s=stale_s)

    @property
    def serving(self) -> bool:
        """Whether the server is listening (binding can fail: the daemon runs on without it)."""
        return bool(self._bound)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._bound, "server not started"
        return self._bound

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        try:
            self._server = await serve(
                self._feed, self._host, self._port, process_request=self._route,
                compression=None, max_size=4096, max_queue=4, logger=_WS_LOGGER,
                server_header=None, close_timeout=CLOSE_TIMEOUT_S,
                create_connection=_capped(self._max_connections),
            )
        except OSError as exc:  # the live view is optional: capture goes on without it
            log.error("http.listen_failed", listen=f"{self._host}:{self._port}",
                      error=exc.strerror or str(exc), key="http.listen",
                      effect="transcribing goes on without the live view, /healthz, /metrics "
                      "and transcribed tail")
            return self
        self._bound = int(self._server.sockets[0].getsockname()[1])
        self._ticker = asyncio.create_task(self._tick(), name="live-ticker")
        log.info("http.listening", url=self.url,
                 access="with http.token" if self._token else "open on loopback")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._hub.state("stopped", session_id=None)
        if self._server is not None:         # never listened (http.listen_failed): nothing stops
            self._server.close()
            await self._server.wait_closed()
            log.info("http.stopped")

    # -- the feed --------------------------------------------------------------------------

    async def _feed(self, conn: ServerConnection) -> None:
        """Send the replay, then every event, until the client leaves or falls behind."""
        sub = self._hub.subscribe(on_drop=conn.transport.abort)
        watcher = asyncio.create_task(self._close_on_exit(conn, sub.close))
        try:
            while (text := await sub.next()) is not None:
                await conn.send(text)
        except ConnectionClosed:
            pass
        finally:
            watcher.cancel()
            self._hub.unsubscribe(sub)

    @staticmethod
    async def _close_on_exit(conn: ServerConnection, close: Callable[[], None]) -> None:
        await conn.wait_closed()
        close()

    async def _tick(self) -> None:
        """Refresh backlog, audio flow and capture in the state event (sent only on change)."""
        while True:
            try:
                snap = self._status()
                flowing = snap.audio_age_s is not None and snap.audio_age_s <= self._stale_s
                self._hub.state(backlog_s=snap.backlog_seconds, audio=flowing)
                self._hub.capture_paused(snap.capture_recovering)
            except Exception:  # supervision boundary: the view must not take the daemon down
                log.exception("http.status_failed")
            await asyncio.sleep(self._poll_s)

    # -- plain HTTP ------------------------------------------------------------------------

    def _route(self, conn: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP; return ``None`` to let ``/events`` upgrade to a WebSocket.

        HEAD (``wget --spider``, ``curl -I``: the usual health checks) is answered as GET
        without the body.
        """
        try:
            response = self._answer(request)
        except MultipleValuesError as exc:
            response = _text(HTTPStatus.BAD_REQUEST, f"header sent more than once: {exc}\n")
        if response is not None and request.method == "HEAD":
            response = dataclasses.replace(response, body=b"")
        return response

    def _answer(self, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if request.method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET or HEAD\n", allow="GET, HEAD")
        if not self._token and not is_loopback(_host_name(request.headers.get("Host", ""))):
            return _text(HTTPStatus.FORBIDDEN, "Host must name a loopback address\n")
        if not self._authorised(request, url.query):
            return _text(HTTPStatus.UNAUTHORIZED, "token required\n",
                         **{"WWW-Authenticate": 'Bearer realm="transcribed"'})
        if url.path == "/events":
            if request.method != "GET":
                return _text(HTTPStatus.METHOD_NOT_ALLOWED, "the feed is a WebSocket: GET\n",
                             allow="GET")
            return self._upgrade_check(request)
        if url.path in ("/", "/index.html"):
            return _response(HTTPStatus.OK, self._page, "text/html; charset=utf-8",
                             **{"Content-Security-Policy": PAGE_CSP})
        if url.path == "/healthz":
            return self._healthz()
        if url.path == "/metrics":
            return self._metrics_response()
        return _text(HTTPStatus.NOT_FOUND, "not found: try /, /events, /healthz or /metrics\n")

    def _authorised(self, request: Request, query: str) -> bool:
        if not self._token:
            return True
        given = request.headers.get("Authorization", "")
        offered = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not offered:         # ?token=…: a "+" is a "+" (tokens are often base64)
            values = [part[6:] for part in query.split("&") if part.startswith("token=")]
            offered = unquote(values[0]) if values else ""
        return hmac.compare_digest(offered.encode(), self._token)

    def _upgrade_check(self, request: Request) -> Response | None:
        """Refuse browsers from another origin (without a token, the Host check guards)."""
        origin = request.headers.get("Origin")
        if origin is None or self._token:
            return None
        if urlsplit(origin).netloc.lower() != request.headers.get("Host", "").lower():
            return _text(HTTPStatus.FORBIDDEN, "cross-origin feed refused\n")
        return None

    def _healthz(self) -> Response:
        snap = self._status()
        verdict = health(snap, self._stale_s)
        body = {**verdict.to_dict(snap), "connection": self._hub.current["connection"]}
        status = HTTPStatus.OK if verdict.ok else HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, json.dumps(body).encode() + b"\n", "application/json")

    def _metrics_response(self) -> Response:
        extra = [
            ("live_clients", "gauge", "Connected live-view clients.",
             float(self._hub.subscribers)),
            ("live_clients_dropped_total", "counter", "Live-view clients dropped as too slow.",
             float(self._hub.dropped_clients)),
        ]
        text = self._metrics.render(self._status(), extra)
        return _response(HTTPStatus.OK, text.encode(), METRICS_TYPE)


def _capped(limit: int) -> type[ServerConnection]:
    """A connection class that cuts off TCP connections beyond ``limit`` open at once.

    Viewers and half-open handshakes alike hold a file descriptor; without a cap a flood of
    them exhausts the process's descriptors, and the sinks and the cloud engine need those.
    """
    open_now: set[ServerConnection] = set()
    refusing = [False]

    class Capped(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if len(open_now) >= limit:
                if not refusing[0]:
                    log.warning("http.too_many_connections", limit=limit)
                refusing[0] = True
                assert isinstance(transport, asyncio.Transport)
                transport.abort()
                return
            refusing[0] = False
            open_now.add(self)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # the library answers every ping (and a close) on its own, whether or not the client
            # reads: a client that floods pings and never reads grew our memory ~28 MB a second
            transport = self.transport
            if isinstance(transport, asyncio.WriteTransport) \
                    and transport.get_write_buffer_size() > UNREAD_MAX_BYTES:
                log.warning("http.viewer_cut", reason="it does not read what it asks for",
                            unread_bytes=transport.get_write_buffer_size())
                transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            open_now.discard(self)
            super().connection_lost(exc)

    return Capped


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


def _text(status: HTTPStatus, text: str, **headers: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8", **headers)


def _response(status: HTTPStatus, body: bytes, content_type: str, **extra: Any) -> Response:
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Connection", "close"),
    ])
    for key, value in extra.items():
        headers[key.replace("_", "-").title() if key.islower() else key] = value
    return Response(status.value, status.phrase, headers, body)
