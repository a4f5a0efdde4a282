"""A real, scriptable HTTP server on 127.0.0.1 for webhook tests (stdlib, in a thread).

Each request is recorded and handed to the test's event loop; replies follow a script (``Reply``
objects, then 200 by default): a status with headers, or a hang until the receiver is stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self


@dataclass(frozen=True)
class Reply:
    """One scripted answer: ``status`` with ``headers``, or hang until the receiver stops."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass(frozen=True)
class Received:
    """A request as the server saw it (header names lower-cased) and the status it got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: HttpReceiver

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet: a client that gave up on a hung request is expected."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        reply = self.server.receiver._next_reply()
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.receiver._record(
            Received("POST", self.path, headers, body, 0 if reply.hang else reply.status)
        )
        if reply.hang:
            self.server.receiver._release.wait()
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log."""


class HttpReceiver:
    """Async context manager running the server; ``url``, ``script()``, ``next()``, ``received``."""

    def __init__(self, port: int = 0) -> None:
        """A receiver on 127.0.0.1:``port`` (0: any free port)."""
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.received: list[Received] = []
        self._queue: asyncio.Queue[Received] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.receiver = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:43117``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests (after these, 200)."""
        with self._lock:
            self._script.extend(replies)

    def clear_script(self) -> None:
        """Forget replies not yet used: every request gets 200 from now on."""
        with self._lock:
            self._script.clear()

    async def next(self, within: float = 5.0) -> Received:
        """The next request received (waits up to ``within`` s)."""
        async with asyncio.timeout(within):
            return await self._queue.get()

    async def __aenter__(self) -> Self:
        self._thread.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._release.set()
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join, 5)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else Reply()

    def _record(self, request: Received) -> None:
        with self._lock:
            self.received.append(request)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, request)
