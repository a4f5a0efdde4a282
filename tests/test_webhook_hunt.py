"""The webhook sink against odd replies from a hand-played HTTP server on 127.0.0.1.

Each reply is bytes written on a real socket (``asyncio`` streams), so malformed answers, resets
and kept-alive connections the server drops are what the sink's HTTP client really meets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.dispatch import Dispatcher
from daemon.errors import PermanentSinkError, SinkError
from daemon.outbox import Outbox
from daemon.runner import SinkRunner
from plugins.webhook import WebhookConfig, WebhookSink
from plugins.webhook import transcribed_sink_types as webhook_types
from tests.loopback_server import LoopbackServer
from tests.test_outbox import make_turn

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
HANG_UP = b""      # a step: read the request, then close without a word
RESET = b"RST"     # a step: read the request, then reset the connection
CLOSE = b"\0close"  # a step's ending: write what comes before it, then close
PATH = "/tok3n-path?key=hunter2"


class Scripted(LoopbackServer):
    """Plays each connection's steps in turn: read a request, then write the step's bytes (the
    connection stays open for the next step, unless they end with ``CLOSE``), close
    (``HANG_UP``) or reset it (``RESET``).

    After the last step the connection stays open until the client closes it.
    """

    def __init__(self, *connections: list[bytes]) -> None:
        super().__init__()
        self._connections = list(connections)
        self.ids: list[str] = []          # the webhook-id of each request, in arrival order
        self.connections = 0
        self.answered = asyncio.Event()   # the scripts are played out
        self._handlers: set[asyncio.Task[object]] = set()

    @property
    def url(self) -> str:
        """The webhook URL, with a path and query that must never be shown."""
        return f"http://127.0.0.1:{self.port}{PATH}"

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)     # closes the connections: each handler sees the end
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self._handlers.add(task)
        self.connections += 1
        steps = self._connections.pop(0) if self._connections else [OK]
        try:
            for step in steps:
                await self._read_request(reader)
                if step == RESET:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if step == HANG_UP:
                    writer.close()
                    return
                writer.write(step.removesuffix(CLOSE))
                await writer.drain()
                if step.endswith(CLOSE):
                    return
            if not self._connections:
                self.answered.set()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        fields = {k.lower(): v for k, v in fields.items()}
        await reader.readexactly(int(fields.get(b"content-length", b"0")))
        self.ids.append(fields[b"webhook-id"].decode())


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3")
    yield box
    box.close()


def config(url: str, **extra: object) -> WebhookConfig:
    """A validated webhook config with a credential header."""
    return WebhookConfig.model_validate({"type": "webhook", "url": url, "timeout_s": 5,
                                         "headers": {"Authorization": "Bearer hunter2"}, **extra})


async def send_one(server: Scripted) -> SinkError:
    """Send one turn to ``server``; the error it raised (the test fails if none)."""
    async with WebhookSink("hook", config(server.url)) as sink:
        with pytest.raises(SinkError) as info:
            async with asyncio.timeout(5):
                await sink.send(make_turn(1))
    return info.value


class TestMalformedAnswers:
    @pytest.mark.parametrize(("reply", "expected"), [
        (b"HTTP/1.1 200 OK\r\n" + CLOSE, "closed the connection without a (complete) answer"),
        (HANG_UP, "closed the connection without a (complete) answer"),
        (b"hello from HTTP/0.9\n" + CLOSE, "closed the connection without a (complete) answer"),
        (b"HTTP/1.1 500 Bad\x00Thing\r\nContent-Length: 0\r\n\r\n",
         "answered with something that is not HTTP/1.1: illegal status line: "
         "bytearray(b'HTTP/1.1 500 Bad\\x00Thing')"),
        (b"HTTP/2 200\r\n\r\n" + CLOSE, "answered with something that is not HTTP/1.1: "
         "illegal status line: bytearray(b'HTTP/2 200')"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
         "answered with something that is not HTTP/1.1: bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (128 << 10) + b"\r\n\r\n",
         "answered with a status line and headers over 100 KiB"),
        (RESET, "broke the connection: ReadError (Connection reset by peer)"),
    ], ids=["status-line-only", "no-answer", "http-0.9", "nul-in-reason", "http-2",
            "bad-content-length", "headers-over-100k", "reset"])
    async def test_an_answer_that_is_not_http_says_what(self, reply: bytes,
                                                        expected: str) -> None:
        """A server that answers garbage, or closes or resets the connection, was reported as
        ``unreachable: RemoteProtocolError`` (it had been reached: the line said nothing true).
        The line now says what came back; it stays a transient failure (retried)."""
        async with Scripted([reply]) as server:
            error = await send_one(server)
        assert str(error) == f"webhook http://127.0.0.1:{server.port} {expected}"
        assert not isinstance(error, PermanentSinkError)
        assert "tok3n" not in str(error) and "hunter2" not in str(error)

    @pytest.mark.parametrize("reason", [b"R" * 60_000, b"Bad\x1b[2J\x1b[31mThing\x07"],
                             ids=["60k", "escapes"])
    async def test_a_reason_phrase_is_printable_and_bounded(self, reason: bytes) -> None:
        """The reason phrase is the server's text: a 60 KB one made a 60 KB log line and dead
        letter, and terminal escape sequences reached the console log."""
        async with Scripted([b"HTTP/1.1 400 " + reason + b"\r\nContent-Length: 0\r\n\r\n"]) \
                as server:
            error = await send_one(server)
        assert isinstance(error, PermanentSinkError)
        assert str(error).startswith(f"webhook http://127.0.0.1:{server.port} answered 400 ")
        assert len(str(error)) < 160
        assert str(error).isprintable() and str(error).isascii()


class TestRedirects:
    @pytest.mark.parametrize("status", [600, 999])
    async def test_a_status_beyond_5xx_is_permanent(self, status: int) -> None:
        """A status of 600 or more (LinkedIn's 999) is no 5xx: README says any other non-2xx is
        permanent; it was retried for ever ahead of every later turn (the check was >= 500)."""
        reply = b"HTTP/1.1 %d Request Denied\r\nContent-Length: 0\r\n\r\n" % status
        async with Scripted([reply]) as server:
            error = await send_one(server)
        assert isinstance(error, PermanentSinkError), error
        assert f"answered {status} Request Denied" in str(error)

    @pytest.mark.parametrize("location", [b"http://[::1", b"http://h.example:port/x",
                                          b"/tok3n\x01path"])
    async def test_a_redirect_to_no_url_is_permanent(self, location: bytes) -> None:
        """httpx reads a redirect's Location even though the sink does not follow it, and raised a
        ``RemoteProtocolError`` for one that is not a URL: taken for a connection error, the
        redirect was retried for ever ahead of every later turn, instead of dead-lettered."""
        reply = b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
        async with Scripted([reply % location]) as server:
            error = await send_one(server)
        assert isinstance(error, PermanentSinkError)
        assert str(error) == (f"webhook http://127.0.0.1:{server.port} answered a redirect whose "
                              "Location is not a URL: redirects are not followed (set url to "
                              "the new address)")
        assert server.ids == ["sess:1"]      # not sent twice


class TestKeptAliveConnections:
    @pytest.mark.parametrize("second", [
        HANG_UP,                     # the server's keep-alive timeout fired as the turn came
        RESET,
        # a 204 with a body: its bytes were left on the connection, read as the next answer
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ], ids=["closed", "reset", "after-204-with-body"])
    async def test_a_dropped_kept_alive_connection_is_not_a_failure(
            self, second: bytes, tmp_path: Path, outbox: Outbox) -> None:
        """A kept-alive connection the server dropped between turns made the next turn fail
        (``sink.send_failed`` warning, a failure counted, ``sink.recovered``), though nothing was
        wrong but an idle connection. It is sent again at once on a new connection, with one
        info line, and is neither dead-lettered (even with a tiny ``retry_max_s``) nor counted
        as failed."""
        first = (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"
                 if second.startswith(b"HTTP/") else OK)
        async with Scripted([first, second], [OK]) as server:
            cfg = config(server.url, retry_max_s=0.001)
            sink_type = webhook_types()[0]
            runner = SinkRunner("hook", sink_type, cfg, WebhookSink("hook", cfg),
                                outbox.queue("hook"))
            dispatcher = Dispatcher([runner], dead_letter_dir=tmp_path / "dead")
            with capture_logs() as logs:
                async with asyncio.TaskGroup() as group:
                    dispatcher.start(group)
                    dispatcher.dispatch(make_turn(1))
                    dispatcher.dispatch(make_turn(2))
                    async with asyncio.timeout(5):
                        await server.answered.wait()
                    await dispatcher.close(flush_s=5)
        assert server.ids == ["sess:1", "sess:2", "sess:2"] and server.connections == 2
        assert (runner.stats.delivered, runner.stats.failed, runner.stats.dead_lettered) == \
            (2, 0, 0)
        assert outbox.depth("hook") == 0
        events = [e["event"] for e in logs]
        assert "sink.send_failed" not in events and "sink.recovered" not in events
        [again] = [e for e in logs if e["event"] == "webhook.sent_again"]
        assert again["sink"] == "hook"
        assert again["error"].startswith(f"webhook http://127.0.0.1:{server.port} ")
        assert "tok3n" not in repr(logs) and "hunter2" not in repr(logs)

    async def test_a_server_that_never_answers_is_tried_once_more_at_most(self) -> None:
        """Only a kept-alive connection gets the second try: a server that drops every
        connection fails the send after two tries (one new connection), not a loop."""
        async with Scripted([OK, HANG_UP], [HANG_UP], [HANG_UP]) as server:
            async with WebhookSink("hook", config(server.url)) as sink:
                await sink.send(make_turn(1))
                with pytest.raises(SinkError, match="closed the connection without"):
                    await sink.send(make_turn(2))
                with pytest.raises(SinkError, match="closed the connection without"):
                    await sink.send(make_turn(3))   # a new connection: no second try
        assert server.ids == ["sess:1", "sess:2", "sess:2", "sess:3"]
