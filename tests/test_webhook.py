"""The webhook sink against a real local HTTP server, through the real dispatcher and outbox."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from daemon.backoff import retry_after_s
from daemon.dispatch import Dispatcher
from daemon.errors import ConfigError, PermanentSinkError, SinkError
from daemon.logs import SecretMasker
from daemon.masking import url_log_secrets
from daemon.outbox import Outbox
from daemon.plugins import load_plugins
from daemon.runner import SinkRunner
from daemon.sinktables import validate_sinks
from plugins.webhook import RETRY_AFTER_MAX_S, WebhookConfig, WebhookSink
from plugins.webhook import transcribed_sink_types as webhook_types
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import cloud_config, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.http_receiver import HttpReceiver, Reply
from tests.loopback_server import LoopbackServer
from tests.mosquitto import make_certs
from tests.test_outbox import make_turn, run_and_kill

S1 = "espeak-s1.wav"
SECRET = "whsec_" + base64.b64encode(b"first secret key for tests 0123").decode()
SECRET2 = "whsec_" + base64.b64encode(b"second secret key for rotation!!").decode()


@pytest.fixture
async def receiver() -> AsyncIterator[HttpReceiver]:
    async with HttpReceiver() as server:
        yield server


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3")
    yield box
    box.close()


def config(url: str, **extra: Any) -> WebhookConfig:
    """A validated webhook config."""
    return WebhookConfig.model_validate({"type": "webhook", "url": url, **extra})


def runner(name: str, cfg: WebhookConfig, outbox: Outbox) -> SinkRunner:
    """A dispatcher runner for a webhook sink with a durable queue."""
    sink_type = webhook_types()[0]
    return SinkRunner(name, sink_type, cfg, WebhookSink(name, cfg), outbox.queue(name))


def delivered(receiver: HttpReceiver) -> list[str]:
    """Record ids the receiver accepted with a 2xx, in arrival order."""
    return [r.headers["webhook-id"] for r in receiver.received if 200 <= r.status < 300]


async def wait_delivered(receiver: HttpReceiver, count: int, within: float = 10) -> None:
    """Wait until ``count`` requests were answered 2xx."""
    async with asyncio.timeout(within):
        while len(delivered(receiver)) < count:
            await receiver.next(within)


class TestSigning:
    async def test_signed_body_verifies_with_each_secret(self, receiver: HttpReceiver) -> None:
        """The body and headers follow Standard Webhooks and verify with every rotated secret."""
        cfg = config(receiver.url + "/hook", secret=f"{SECRET} {SECRET2}",
                     headers={"X-Team": "voice"})
        record = make_turn(3)
        async with WebhookSink("hook", cfg) as sink:
            await sink.send(record)
        request = await receiver.next()
        assert request.path == "/hook"
        assert request.headers["webhook-id"] == record.id
        assert request.headers["x-team"] == "voice"
        assert request.headers["content-type"] == "application/json"
        assert len(request.headers["webhook-signature"].split(" ")) == 2
        for secret in (SECRET, SECRET2):
            payload = Webhook(secret).verify(request.body, request.headers)
            assert payload == {"type": "turn.completed", "timestamp": "2026-11-23T23:10:01.120Z",
                               "data": record.to_dict()}

    async def test_secret_file_and_list(self, tmp_path: Path, receiver: HttpReceiver) -> None:
        """Secrets load from a file (with a trailing newline) or a list."""
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET + "\n")
        for cfg in (config(receiver.url, secret_file=str(secret_file)),
                    config(receiver.url, secret=[SECRET2, SECRET])):
            async with WebhookSink("hook", cfg) as sink:
                await sink.send(make_turn(1))
            request = await receiver.next()
            Webhook(SECRET).verify(request.body, request.headers)

    async def test_spaces_around_a_header_value_are_dropped(self,
                                                            receiver: HttpReceiver) -> None:
        """A value with a space or tab around it (a pasted token) passed the check, but h11
        refuses to send it: every send failed as a retried ``LocalProtocolError``, for ever."""
        cfg = config(receiver.url, headers={"Authorization": "Bearer tok3n ", "X-Pad": "\t"})
        async with WebhookSink("hook", cfg) as sink:
            await sink.send(make_turn(1))
        request = await receiver.next()
        assert (request.headers["authorization"], request.headers["x-pad"]) == ("Bearer tok3n", "")

    async def test_a_lone_surrogate_is_sent_escaped(self, receiver: HttpReceiver) -> None:
        """A lone surrogate has no UTF-8 form: encoding the body raised (not a ``SinkError``), so
        the turn was retried for ever ahead of every later one. It is sent as its JSON escape,
        and the signed bytes are the bytes sent."""
        record = dataclasses.replace(make_turn(1), transcript="caf\ud800e")
        async with WebhookSink("hook", config(receiver.url, secret=SECRET)) as sink:
            await sink.send(record)
        request = await receiver.next()
        payload = Webhook(SECRET).verify(request.body, request.headers)
        assert payload["data"]["transcript"] == "caf\ud800e"


class TestConfig:
    @pytest.mark.parametrize(
        ("table", "expected"),
        [
            ({"url": "ftp://x"}, "sinks.hook.url: must be an http:// or https://"),
            ({"url": "http://[bad/x"}, "sinks.hook.url: must be an http:// or https://"),
            ({"url": "http://h:port/x"}, "sinks.hook.url: must be an http:// or https://"),
            ({"url": "http://h:99999/x"}, "sinks.hook.url: its port is not 1-65535"),
            ({"url": "http://h:0/x"}, "sinks.hook.url: its port is not 1-65535"),
            ({"url": "https://exa mple.invalid/x"}, "sinks.hook.url: must not contain spaces"),
            ({"url": "https://exa%20mple.invalid/x"}, "sinks.hook.url: must not contain spaces"),
            ({"url": "http://x", "secret": "nope"}, "secret #1 must start with 'whsec_'"),
            ({"url": "http://x", "secret": "whsec_!!!"}, "secret #1 is not valid base64"),
            ({"url": "http://x", "secret": SECRET, "secret_file": "/x"}, "not both"),
            ({"url": "http://x", "secret_file": "/nonexistent/s"},
             "sinks.hook.secret_file: cannot read /nonexistent/s"),
            ({"url": "http://x", "headers": {"Webhook-Id": "1"}}, "cannot be overridden"),
            ({"url": "http://x", "timeout_s": 0}, "sinks.hook.timeout_s: Input should be greater"),
            ({"url": "http://x", "retries": 3}, "sinks.hook.retries: unknown key"),
        ],
    )
    def test_bad_tables_give_one_clear_line(self, table: dict[str, Any], expected: str) -> None:
        """Each bad key gives a one-line error naming it, without echoing the secret."""
        host = load_plugins(entry_points=False)
        with pytest.raises(ConfigError) as info:
            validate_sinks(host, {"hook": {"type": "webhook", **table}})
        assert expected in str(info.value)
        assert "!!!" not in str(info.value)
        assert SECRET not in str(info.value)

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ({"Authorization": "Bearer tok3n\n"},
             "sinks.hook.headers.Authorization: header value must be printable ASCII"),
            ({"X-Key": "tok3n\r\nX-Evil: 1"},
             "sinks.hook.headers.X-Key: header value must be printable ASCII"),
            ({"X-Key": "tok3n\x00"}, "sinks.hook.headers.X-Key: header value must be"),
            ({"X-Key": "tok3n\u00e9"}, "sinks.hook.headers.X-Key: header value must be"),
            ({"X Key": "tok3n"}, "sinks.hook.headers: 'X Key' is not a valid header name"),
            ({"X-Key\r\n": "tok3n\n"},
             "sinks.hook.headers: 'X-Key\\r\\n' is not a valid header name"),
            ({"": "tok3n"}, "sinks.hook.headers: '' is not a valid header name"),
            ({"Content-Length": "5"},
             "sinks.hook.headers: header 'Content-Length' is set by the sink"),
            ({"host": "other.example"}, "sinks.hook.headers: header 'host' is set by the sink"),
            ({"Transfer-Encoding": "chunked"}, "header 'Transfer-Encoding' is set by the sink"),
            ({"X-Key": "tok3n", "x-key": "tok3n"},
             "sinks.hook.headers: header 'x-key' is set twice (names ignore case: also 'X-Key')"),
        ],
    )
    def test_bad_headers_give_one_line_without_the_value(self, headers: dict[str, str],
                                                         expected: str) -> None:
        """A header an HTTP request cannot carry is refused at check time, never echoing its value.

        (Accepted, it failed every send as a retried ``LocalProtocolError``, forever.)
        """
        host = load_plugins(entry_points=False)
        with pytest.raises(ConfigError) as info:
            validate_sinks(host, {"hook": {"type": "webhook", "url": "http://x",
                                           "headers": headers}})
        assert len(info.value.problems) == 1
        assert expected in str(info.value)
        assert "\n" not in str(info.value) and "\r" not in str(info.value)
        assert "tok3n" not in str(info.value)


class TestClassification:
    async def test_status_codes_and_retry_after(self, receiver: HttpReceiver) -> None:
        """5xx and 429 are transient (429 carries Retry-After); other 4xx are permanent."""
        receiver.script(Reply(503), Reply(429, {"Retry-After": "2"}), Reply(400), Reply(301))
        async with WebhookSink("hook", config(receiver.url)) as sink:
            with pytest.raises(SinkError, match="answered 503") as transient:
                await sink.send(make_turn(1))
            assert not isinstance(transient.value, PermanentSinkError)
            with pytest.raises(SinkError, match="answered 429") as limited:
                await sink.send(make_turn(1))
            assert limited.value.retry_after == 2.0
            with pytest.raises(PermanentSinkError, match="answered 400"):
                await sink.send(make_turn(1))
            with pytest.raises(PermanentSinkError, match="answered 301"):
                await sink.send(make_turn(1))

    @pytest.mark.parametrize(("location", "shown"), [
        ("https://hooks.example:8443/new/s3cret-path?k=v", "https://hooks.example:8443"),
        ("/moved/s3cret-path", "{origin}"),
    ])
    async def test_a_redirect_says_where_without_the_path(
            self, receiver: HttpReceiver, location: str, shown: str) -> None:
        """A redirect is not followed (a signed POST must not be re-sent elsewhere, or turned
        into a GET): the error says so and names where it points, never its path."""
        receiver.script(Reply(308, {"Location": location}))
        async with WebhookSink("hook", config(receiver.url + "/old")) as sink:
            with pytest.raises(PermanentSinkError) as moved:
                await sink.send(make_turn(1))
        origin = receiver.url.rstrip("/")
        assert str(moved.value) == (
            f"webhook {origin} answered 308 Permanent Redirect: redirects are not followed; "
            f"it points to {shown.format(origin=origin)} (set url to the new address)")
        assert "s3cret" not in str(moved.value)

    async def test_unreachable_and_timeout_are_transient(self, receiver: HttpReceiver) -> None:
        """A refused connection or a hung server raises a transient error naming only the host
        (and, for the refusal, the system's reason, not only the exception's type)."""
        receiver.script(Reply(hang=True))
        cfg = config(receiver.url + "/secret-path", timeout_s=0.3)
        async with WebhookSink("hook", cfg) as sink:
            with pytest.raises(SinkError, match=r"timed out after 0.3 s") as hung:
                await sink.send(make_turn(1))
        assert "secret-path" not in str(hung.value)
        async with WebhookSink("hook", config("http://127.0.0.1:9/x")) as sink:
            with pytest.raises(SinkError,
                               match=r"unreachable: ConnectError \(Connection refused\)$"):
                await sink.send(make_turn(1))

    @pytest.mark.parametrize(("status", "stall", "error"), [
        (200, False, None), (200, True, None),
        (400, False, "answered 400"), (503, True, "answered 503")])
    async def test_the_status_decides_when_the_body_breaks_off(
            self, status: int, stall: bool, error: str | None) -> None:
        """An answer whose body then breaks off or stalls past ``timeout_s`` is judged by its
        status: a 2xx was a failure (retried: delivered twice), a 400 was retried for ever."""
        async with BrokenBody(status, stall=stall) as server, \
                WebhookSink("hook", config(server.url + "/x", timeout_s=0.5)) as sink:
            async with asyncio.timeout(5):
                if error is None:
                    await sink.send(make_turn(1))
                else:
                    with pytest.raises(SinkError, match=error) as info:
                        await sink.send(make_turn(1))
                    assert isinstance(info.value, PermanentSinkError) == (status < 500)
                await server.hung_up.wait()     # the unfinished connection was not kept
        assert server.requests == 1

    async def test_a_tls_failure_says_why(self, tmp_path: Path, receiver: HttpReceiver) -> None:
        """An untrusted certificate, or TLS to a plain HTTP port, is named in one line (it was
        ``unreachable: ConnectError``), without the URL's path; it stays transient."""
        certs = make_certs(tmp_path / "certs")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.cert, certs.key)
        server = await asyncio.start_server(_hang_up, "127.0.0.1", 0, ssl=context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            cases = [(f"https://127.0.0.1:{port}/secret-path",
                      "TLS certificate not accepted: unable to get local issuer certificate"),
                     (receiver.url.replace("http:", "https:") + "/secret-path",
                      "TLS handshake failed: ")]
            for url, expected in cases:
                async with WebhookSink("hook", config(url)) as sink:
                    with pytest.raises(SinkError) as info:
                        await sink.send(make_turn(1))
                origin = url.removesuffix("/secret-path")
                assert str(info.value).startswith(f"webhook {origin} {expected}")
                assert "secret-path" not in str(info.value) and "\n" not in str(info.value)
                assert not isinstance(info.value, PermanentSinkError)

    def test_retry_after_forms(self) -> None:
        """Retry-After parses seconds and HTTP dates, and is capped."""
        assert retry_after_s("7", RETRY_AFTER_MAX_S) == 7.0
        assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", RETRY_AFTER_MAX_S) == 0.0
        assert retry_after_s("999999", RETRY_AFTER_MAX_S) == 3600.0
        assert retry_after_s("soon", RETRY_AFTER_MAX_S) is None
        assert retry_after_s("nan", RETRY_AFTER_MAX_S) is None
        assert retry_after_s("inf", RETRY_AFTER_MAX_S) is None
        assert retry_after_s("-5", RETRY_AFTER_MAX_S) == 0.0


class RawHttp(LoopbackServer):
    """A hand-played HTTP server on 127.0.0.1 answering with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.hung_up = asyncio.Event()     # the connection is closed mid-answer

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` once entered."""
        return f"http://127.0.0.1:{self.port}"


class EndlessBody(RawHttp):
    """Answers each POST with a chunked body far longer than any answer worth reading
    (``BODY_BYTES``; endless to the client)."""

    BODY_BYTES = 64 << 20

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 %d Whatever\r\nTransfer-Encoding: chunked\r\n\r\n"
                         % self.status)
            block = b"x" * (1 << 16)
            for _ in range(self.BODY_BYTES // len(block)):
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> None:
    """Read one request: its head, then the body its ``Content-Length`` announces."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A TLS server's handler: the client gives up during the handshake; close."""
    writer.close()


class BrokenBody(RawHttp):
    """Answers a POST with 3 of the 100 body bytes it announces, then hangs up (or, with
    ``stall``, sends nothing more)."""

    def __init__(self, status: int, *, stall: bool) -> None:
        super().__init__(status)
        self.stall = stall
        self.requests = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            self.requests += 1
            writer.write(b"HTTP/1.1 %d Whatever\r\nContent-Length: 100\r\n\r\nabc" % self.status)
            await writer.drain()
            if self.stall:
                await reader.read()         # until the client hangs up
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.hung_up.set()


class TestLargeAnswers:
    @pytest.mark.parametrize(("status", "error"), [(200, None), (500, "answered 500")])
    async def test_endless_body_is_not_read(self, status: int, error: str | None) -> None:
        """An endless answer body is not read on: the status decides at once and the connection
        is dropped, so the daemon's memory cannot grow with it."""
        async with EndlessBody(status) as server, \
                WebhookSink("hook", config(server.url + "/x", timeout_s=60)) as sink:
            async with asyncio.timeout(5):      # far below timeout_s
                if error is None:
                    await sink.send(make_turn(1))
                else:
                    with pytest.raises(SinkError, match=error) as info:
                        await sink.send(make_turn(1))
                    assert not isinstance(info.value, PermanentSinkError)
                await server.hung_up.wait()     # it did not read the body to its end


class TestDelivery:
    async def test_503_then_200_delivers_each_once_in_order(
        self, tmp_path: Path, receiver: HttpReceiver, outbox: Outbox
    ) -> None:
        """Turns queued while the webhook answers 503 are each delivered once, in order."""
        receiver.script(Reply(503), Reply(503), Reply(502))
        dispatcher = Dispatcher([runner("hook", config(receiver.url, secret=SECRET), outbox)],
                                dead_letter_dir=tmp_path / "dead")
        with capture_logs() as logs:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                for i in range(5):
                    dispatcher.dispatch(make_turn(i))
                await wait_delivered(receiver, 5)
                await dispatcher.close(flush_s=5)
        assert delivered(receiver) == [f"sess:{i}" for i in range(5)]
        assert outbox.depth("hook") == 0
        events = [e["event"] for e in logs]
        assert events.count("sink.send_failed") == 1
        assert events.count("sink.recovered") == 1
        for request in receiver.received:
            Webhook(SECRET).verify(request.body, request.headers)

    async def test_400_goes_to_dead_letter(
        self, tmp_path: Path, receiver: HttpReceiver, outbox: Outbox
    ) -> None:
        """A permanent 4xx moves the turn to the dead-letter file and delivery moves on."""
        receiver.script(Reply(400))
        (tmp_path / "dead").mkdir(mode=0o755)             # as an older version left them
        (tmp_path / "dead" / "hook.jsonl").touch(mode=0o644)
        dispatcher = Dispatcher([runner("hook", config(receiver.url), outbox)],
                                dead_letter_dir=tmp_path / "dead")
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(1))
            dispatcher.dispatch(make_turn(2))
            await wait_delivered(receiver, 1)
            await dispatcher.close(flush_s=5)
        assert delivered(receiver) == ["sess:2"]
        lines = (tmp_path / "dead" / "hook.jsonl").read_text().splitlines()
        assert (tmp_path / "dead" / "hook.jsonl").stat().st_mode & 0o777 == 0o600  # transcripts
        assert (tmp_path / "dead").stat().st_mode & 0o777 == 0o700
        assert len(lines) == 1
        dead = json.loads(lines[0])
        assert dead["record"]["id"] == "sess:1"
        assert "answered 400" in dead["error"]
        assert outbox.depth("hook") == 0

    async def test_hanging_sink_delays_no_other_sink(
        self, tmp_path: Path, receiver: HttpReceiver, outbox: Outbox
    ) -> None:
        """While one webhook hangs, another sink still gets every turn promptly."""
        receiver.script(Reply(hang=True))
        async with HttpReceiver() as healthy:
            dispatcher = Dispatcher(
                [runner("stuck", config(receiver.url, timeout_s=300), outbox),
                 runner("fine", config(healthy.url), outbox)],
                dead_letter_dir=tmp_path / "dead",
            )
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                for i in range(3):
                    dispatcher.dispatch(make_turn(i))
                await receiver.next()  # the stuck sink's request is hanging now
                await wait_delivered(healthy, 3, within=2)
                await dispatcher.close(flush_s=0.2)
        assert delivered(healthy) == ["sess:0", "sess:1", "sess:2"]
        assert outbox.depth("stuck") == 3  # kept on disk for the next run

    async def test_secrets_never_logged(
        self, tmp_path: Path, receiver: HttpReceiver, outbox: Outbox
    ) -> None:
        """Failure logs carry neither the secret, the header values nor the URL path."""
        receiver.script(Reply(500), Reply(403))
        cfg = config(receiver.url + "/tok3n-path", secret=SECRET,
                     headers={"Authorization": "Bearer hunter2"})
        dispatcher = Dispatcher([runner("hook", cfg, outbox)], dead_letter_dir=tmp_path / "dead")
        with capture_logs() as logs:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                dispatcher.dispatch(make_turn(1))
                await receiver.next()
                await receiver.next()
                await dispatcher.close(flush_s=5)
        text = repr(logs) + (tmp_path / "dead" / "hook.jsonl").read_text()
        assert "answered 403" in text
        for secret in (SECRET, SECRET.removeprefix("whsec_"), "hunter2", "tok3n"):
            assert secret not in text

    async def test_the_url_httpx_logs_is_masked(self, receiver: HttpReceiver,
                                                caplog: pytest.LogCaptureFixture) -> None:
        """At debug level httpx logs each request's URL in its own spelling (percent-encoded,
        dot segments resolved): the user info and path leaked past the masker, which knew only
        the config's spelling. The validated url is httpx's spelling, so the masker learns it."""
        raw = receiver.url.replace("//", "//\u00fcser:p\u00e4ss@") + "/hook/../t\u00f6k3n?k=v"
        cfg = config(raw)
        masker = SecretMasker(url_log_secrets(cfg.url))   # as the daemon does
        with caplog.at_level(logging.INFO, logger="httpx"):
            async with WebhookSink("hook", cfg) as sink:
                await sink.send(make_turn(1))
        assert (await receiver.next()).path == "/t%C3%B6k3n?k=v"
        lines = [masker.mask(r.getMessage()) for r in caplog.records if r.name == "httpx"]
        assert len(lines) == 1 and "HTTP Request: POST" in lines[0]
        for part in ("%C3%BCser", "p%C3%A4ss", "k3n", "k=v"):
            assert part not in lines[0]


CHILD = """
import asyncio, sys
from pathlib import Path
from daemon.dispatch import Dispatcher
from daemon.runner import SinkRunner
from daemon.outbox import Outbox
from plugins.webhook import WebhookConfig, WebhookSink, transcribed_sink_types
from tests.test_outbox import make_turn

async def main() -> None:
    box = Outbox(Path(sys.argv[1]))
    cfg = WebhookConfig.model_validate({"type": "webhook", "url": sys.argv[2]})
    sink = WebhookSink("hook", cfg)
    runner = SinkRunner("hook", transcribed_sink_types()[0], cfg, sink, box.queue("hook"))
    dispatcher = Dispatcher([runner], dead_letter_dir=Path(sys.argv[1]).parent / "dead")
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        for i in range(1000):
            dispatcher.dispatch(make_turn(i))
            print(i, file=sys.stderr, flush=True)
            await asyncio.sleep(0.001)

asyncio.run(main())
"""


class TestCrash:
    async def test_kill_9_while_down_then_restart_delivers_all(
        self, tmp_path: Path, receiver: HttpReceiver
    ) -> None:
        """Turns dispatched before a kill -9 during an outage are all delivered after a restart."""
        receiver.script(*[Reply(503)] * 1000)
        path = tmp_path / "outbox.sqlite3"
        acknowledged = await asyncio.to_thread(
            run_and_kill, CHILD, str(path), receiver.url, lines=30
        )
        assert delivered(receiver) == []
        receiver.clear_script()  # the webhook is back up
        box = Outbox(path)
        try:
            dispatcher = Dispatcher([runner("hook", config(receiver.url), box)],
                                    dead_letter_dir=tmp_path / "dead")
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                await wait_delivered(receiver, len(acknowledged))
                await dispatcher.close(flush_s=5)
            ids = delivered(receiver)
            assert ids[: len(acknowledged)] == [f"sess:{i}" for i in acknowledged]
            assert len(set(ids)) == len(ids)
            assert box.depth("hook") == 0
        finally:
            box.close()


class TestDaemonEnd:
    async def test_end_of_file_waits_for_a_slow_webhook(self, tmp_path: Path,
                                                        receiver: HttpReceiver) -> None:
        """When a file ends, the last turn still reaches a webhook that asked for 4 s.

        The URL's path (a secret for many webhook services) stays out of the debug logs.
        """
        receiver.script(Reply(503, {"Retry-After": "4"}))
        async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as fake:
            sinks = f'[sinks.hook]\ntype = "webhook"\nurl = "{receiver.url}/hook/PATHSECRET"\n'
            config_path = cloud_config(tmp_path, fake, SPEECH_DIR / S1, sinks=sinks)
            result = await run_daemon("run", "--config", str(config_path))
        assert result.code == 0, result.stderr
        assert [r.status for r in receiver.received] == [503, 200]
        assert json.loads(receiver.received[1].body)["data"]["transcript"] == TRANSCRIPTS[S1]
        assert not result.events("sink.flush_timeout")
        assert "PATHSECRET" not in result.stdout + result.stderr
        assert "HTTP Request: POST" in result.stderr    # httpx logged it, masked
        assert Outbox(tmp_path / "state" / "outbox.sqlite3").depth("hook") == 0
