"""The live-view server driven directly: health, metrics, the event feed, tokens, slow clients."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from daemon.config import HttpConfig
from daemon.errors import ConfigError
from daemon.live import LiveHub, Tee
from daemon.metrics import SinkSnapshot, StatusSnapshot
from daemon.web import LiveServer, check_http, feed_url, parse_listen
from tests.live_helpers import SESSION, StatusBox, began, ended, live_server, partial, receive, turn

TOKEN = "s3cret-live-token-value"


class TestListen:
    def test_non_loopback_needs_token(self) -> None:
        """A non-loopback listen address without a token is refused, naming http.listen."""
        with pytest.raises(ConfigError, match=r"^http\.listen: 0\.0\.0\.0:8765 is not a loopback"):
            LiveServer(LiveHub(), StatusBox(), listen="0.0.0.0:8765")
        config = HttpConfig(listen="192.168.1.5:8765")
        assert check_http(config)[0].startswith("http.listen: ")
        assert check_http(HttpConfig(listen="0.0.0.0:8765", token=SecretStr(TOKEN))) == []
        LiveServer(LiveHub(), StatusBox(), listen="0.0.0.0:8765", token=TOKEN)

    def test_default_is_loopback(self) -> None:
        """The default [http] passes the check and points tail at 127.0.0.1."""
        assert check_http(HttpConfig()) == []
        assert feed_url(HttpConfig().listen) == "ws://127.0.0.1:8765/events"
        assert feed_url("[::1]:9000") == "ws://[::1]:9000/events"

    @pytest.mark.parametrize("listen", ["8765", "localhost:http", ":8765", "127.0.0.1:70000"])
    def test_bad_listen(self, listen: str) -> None:
        """A malformed listen value is one line naming http.listen."""
        with pytest.raises(ConfigError, match=r"^http\.listen: "):
            parse_listen(listen)

    async def test_port_in_use(self) -> None:
        """A port already taken is logged naming http.listen; the daemon goes on without it."""
        async with live_server(LiveHub()) as first:
            with structlog.testing.capture_logs() as logs:
                async with live_server(LiveHub(), listen=f"127.0.0.1:{first.port}") as second:
                    assert not second.serving and first.serving
        failed = [e for e in logs if e["event"] == "http.listen_failed"]
        assert failed and failed[0]["key"] == "http.listen"
        assert "already in use" in failed[0]["error"].lower()
        assert "/healthz" in failed[0]["effect"]    # what the operator loses, said
        assert not [e for e in logs if e["event"] == "http.stopped"]   # it never started


class TestHealth:
    async def test_transitions(self) -> None:
        """/healthz is 503 until audio flows and the session is live, and again when audio stops."""
        status = StatusBox()
        async with live_server(LiveHub(), status, stale_s=2.0) as server, httpx.AsyncClient(
            base_url=server.url) as http:
            first = await http.get("/healthz")
            assert first.status_code == 503
            assert first.json()["reason"] == "no audio received yet"
            status.set(capture_waiting=True)
            waiting = await http.get("/healthz")
            assert waiting.status_code == 503
            assert waiting.json()["reason"] == "waiting for the microphone (audio.device) to appear"
            status.set(capture_waiting=False)
            status.set(audio_age_s=0.1)
            not_live = await http.get("/healthz")
            assert not_live.status_code == 503
            assert not_live.json()["reason"] == "assemblyai session is not live"
            status.set(engine_live=True)
            ok = await http.get("/healthz")
            assert ok.status_code == 200
            assert ok.json()["status"] == "ok" and ok.json()["engine_live"] is True
            assert ok.headers["content-type"] == "application/json"
            status.set(audio_age_s=7.25)
            stale = await http.get("/healthz")
            assert stale.status_code == 503
            assert stale.json() == {**stale.json(), "status": "unhealthy",
                                    "reason": "no audio for 7.2 s"}


class TestMetrics:
    async def test_parses_with_prometheus(self) -> None:
        """/metrics parses with the Prometheus parser and carries every promised figure."""
        latencies = [0.004, 0.03, 0.2, 1.5]
        status = StatusBox(StatusSnapshot(
            engine="assemblyai", engine_live=True, audio_seconds=61.5, audio_age_s=0.05,
            chunks_dropped=2, input_overflows=7, sessions=3, reconnects=2, backlog_seconds=4.25,
            turns=9,
            sinks=(SinkSnapshot("journal", 1, 4, 0, 0, latencies),
                   SinkSnapshot('we"ird', 0, 2, 5, 1, [0.1, 0.2])),
        ))
        async with live_server(LiveHub(), status) as server, httpx.AsyncClient(
            base_url=server.url) as http:
            response = await http.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            samples = _samples(response.text)
            assert samples[("transcribed_audio_seconds_total", ())] == 61.5
            assert samples[("transcribed_audio_chunks_dropped_total", ())] == 2
            assert samples[("transcribed_audio_input_overflows_total", ())] == 7
            assert samples[("transcribed_sessions_total", ())] == 3
            assert samples[("transcribed_reconnects_total", ())] == 2
            assert samples[("transcribed_backlog_seconds", ())] == 4.25
            assert samples[("transcribed_turns_total", ())] == 9
            journal = (("sink", "journal"),)
            assert samples[("transcribed_sink_queue_depth", journal)] == 1
            assert samples[("transcribed_sink_deliveries_total", journal)] == 4
            assert samples[("transcribed_sink_failures_total", (("sink", 'we"ird'),))] == 5
            assert samples[("transcribed_sink_dead_lettered_total", (("sink", 'we"ird'),))] == 1
            assert samples[("transcribed_sink_latency_seconds_count", journal)] == 4
            bucket = ("transcribed_sink_latency_seconds_bucket", (("le", "0.25"), *journal))
            assert samples[bucket] == 3
            latencies.extend([0.02, 0.02])  # two more deliveries between scrapes
            status.set(sinks=(SinkSnapshot("journal", 0, 6, 0, 0, latencies),))
            again = _samples((await http.get("/metrics")).text)
            assert again[("transcribed_sink_latency_seconds_count", journal)] == 6
            assert again[("transcribed_sink_latency_seconds_bucket",
                          (("le", "0.025"), *journal))] == 3

    async def test_sink_counters_survive_a_rebuilt_sink(self) -> None:
        """A reload that rebuilds a sink starts its figures from 0: the counters never go back."""
        status = StatusBox(StatusSnapshot(
            engine="assemblyai", sinks=(SinkSnapshot("journal", 0, 5, 2, 1, [0.1] * 5),)))
        journal = (("sink", "journal"),)
        counters = ("deliveries", "failures", "dead_lettered")
        async with live_server(LiveHub(), status) as server, httpx.AsyncClient(
            base_url=server.url) as http:
            before = _samples((await http.get("/metrics")).text)
            status.set(sinks=(SinkSnapshot("journal", 0, 0, 0, 0, []),))   # SIGHUP rebuilt it
            rebuilt = _samples((await http.get("/metrics")).text)
            status.set(sinks=(SinkSnapshot("journal", 0, 1, 0, 0, [0.2]),))
            after = _samples((await http.get("/metrics")).text)
        for name in counters:
            key = (f"transcribed_sink_{name}_total", journal)
            assert before[key] <= rebuilt[key] <= after[key], name
        assert after[("transcribed_sink_deliveries_total", journal)] == 6
        assert after[("transcribed_sink_latency_seconds_count", journal)] == 6


async def _replay_of(hub: LiveHub) -> list[dict[str, object]]:
    """What a viewer connecting now is sent first."""
    sub = hub.subscribe()
    texts = [await sub.next() for _ in range(sub.pending)]
    hub.unsubscribe(sub)
    return [json.loads(text) for text in texts if text is not None]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class TestFeed:
    async def test_events_and_replay(self) -> None:
        """The feed sends state, session, partial and turn events; a newcomer gets a replay."""
        hub = LiveHub(engine="assemblyai", history=2)
        async with live_server(hub) as server:
            url = server.url.replace("http", "ws") + "/events"
            async with connect(url) as ws:
                assert (await receive(ws))["connection"] == "connecting"
                hub.session_started(began())
                session = await receive(ws)
                assert session == {"type": "session", "event": "started", "session_id": SESSION,
                                   "engine": "assemblyai", "expires_at": "2026-11-24T02:10:01.120Z"}
                state = await receive(ws)
                assert state["type"] == "state" and state["connection"] == "live"
                assert state["session_id"] == SESSION
                for order, text in enumerate(["one", "two", "three"]):
                    hub.turn(turn(order, text))
                hub.partial(partial(3, "four fi"))
                events = [await receive(ws) for _ in range(4)]
                assert [e["transcript"] for e in events] == ["one", "two", "three", "four fi"]
                assert events[0] == {"type": "turn", **turn(0, "one").to_dict()}
                assert events[3] == {"type": "partial", "id": f"{SESSION}:3",
                                     **partial(3, "four fi").to_dict()}
            async with connect(url) as late:
                replay = [await receive(late) for _ in range(5)]
                assert [e["type"] for e in replay] == ["state", "session", "turn", "turn",
                                                      "partial"]
                assert [e["transcript"] for e in replay[2:]] == ["two", "three", "four fi"]
                hub.turn(turn(3, "four five."))
                assert (await receive(late))["transcript"] == "four five."
                hub.session_ended(ended())
                assert (await receive(late))["event"] == "ended"
                after = await receive(late)
                assert after["connection"] == "reconnecting" and after["session_id"] is None
        assert hub.subscribers == 0

    async def test_state_changes_only(self) -> None:
        """State events go out on change only; backlog is whole seconds; shutdown says stopped."""
        hub = LiveHub(engine="local")
        async with live_server(hub) as server, connect(
                server.url.replace("http", "ws") + "/events") as ws:
            await receive(ws)
            hub.state(backlog_s=0.2)
            hub.state("paused", backlog_s=12.4)
            paused = await receive(ws)
            assert (paused["connection"], paused["backlog_s"]) == ("paused", 12)
            await server.__aexit__(None, None, None)
            assert (await receive(ws))["connection"] == "stopped"

    async def test_capture_paused(self) -> None:
        """While the microphone is reopened a live view says paused; then live again."""
        hub, status = LiveHub(engine="assemblyai"), StatusBox()
        hub.session_started(began())
        async with live_server(hub, status, poll_s=0.02) as server, connect(
                server.url.replace("http", "ws") + "/events") as ws:

            async def next_connection() -> str:
                """The connection of the next state event that changes it."""
                seen = hub.current["connection"]
                async with asyncio.timeout(5):
                    while True:
                        event = await receive(ws)
                        if event["type"] == "state" and event["connection"] != seen:
                            return str(event["connection"])

            status.set(capture_recovering=True)
            assert await next_connection() == "paused"
            status.set(capture_recovering=False)
            assert await next_connection() == "live"
            hub.session_ended(ended())
            assert hub.current["connection"] == "reconnecting"
            status.set(capture_recovering=True)         # only a live view pauses
            hub.capture_paused(True)
            assert hub.current["connection"] == "reconnecting"

    def test_rotation_stays_live(self) -> None:
        """A session that ends after its successor began leaves the state live on the new one."""
        hub = LiveHub(engine="assemblyai")
        hub.session_started(began("old"))
        hub.partial(partial(2, "half a", session="new"))
        hub.session_started(began("new"))
        hub.session_ended(ended("old"))
        assert (hub.current["connection"], hub.current["session_id"]) == ("live", "new")
        sub = hub.subscribe()
        assert sub.pending == 3  # state, the new session, its partial
        hub.session_ended(ended("new"))
        hub.state("stopped")
        hub.session_ended(ended("new"))
        assert hub.current["connection"] == "stopped"

    async def test_catch_up_replay_ending_first_stays_live(self) -> None:
        """After an outage the live session opens, then a replay lane's: the replay ending
        first leaves the view live on the live session (not "reconnecting" for hours)."""
        hub = LiveHub(engine="assemblyai")
        hub.session_started(began("live"))
        hub.session_started(began("replay"))
        hub.session_ended(ended("replay"))
        assert (hub.current["connection"], hub.current["session_id"]) == ("live", "live")
        replayed = await _replay_of(hub)
        assert [e["session_id"] for e in replayed if e["type"] == "session"] == ["live"]
        hub.session_ended(ended("live"))
        assert (hub.current["connection"], hub.current["session_id"]) == ("reconnecting", None)

    def test_no_reconnecting_once_the_input_ended(self) -> None:
        """The last session ending at the end of the input is not shown as a reconnect."""
        hub = LiveHub(engine="assemblyai")
        hub.session_started(began())
        hub.input_ended()
        hub.session_ended(ended())
        assert hub.current["connection"] == "live"
        hub.state("stopped")
        assert hub.current["connection"] == "stopped"

    def test_tee_isolates_the_view(self) -> None:
        """Tee forwards to every listener; a failing live view never reaches the engine."""
        seen: list[str] = []

        class Primary:
            def turn(self, record: object) -> None:
                seen.append("turn")

            def partial(self, value: object) -> None:
                seen.append("partial")

            def session_started(self, value: object) -> None:
                seen.append("started")

            def session_ended(self, value: object) -> None:
                seen.append("ended")

        class Broken(Primary):
            def turn(self, record: object) -> None:
                raise RuntimeError("view broke")

        hub = LiveHub()
        tee = Tee(Primary(), Broken(), hub)
        tee.session_started(began())
        tee.turn(turn(0, "hello"))
        assert seen == ["started", "started", "turn"]
        assert hub.current["connection"] == "live"


class TestAccess:
    async def test_token_required(self, caplog: pytest.LogCaptureFixture) -> None:
        """With a token, every endpoint wants it (bearer or query); it is never logged."""
        caplog.set_level(logging.DEBUG)
        hub = LiveHub()
        with structlog.testing.capture_logs() as logs:
            async with live_server(hub, token=TOKEN) as server, httpx.AsyncClient(
                    base_url=server.url) as http:
                for path in ("/", "/healthz", "/metrics", "/events"):
                    refused = await http.get(path)
                    assert refused.status_code == 401, path
                    assert refused.headers["www-authenticate"].startswith("Bearer")
                wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                bearer = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
                assert bearer.status_code == 200
                assert (await http.get(f"/?token={TOKEN}")).status_code == 200
                ws_url = server.url.replace("http", "ws") + "/events"
                with pytest.raises(InvalidStatus) as refused_ws:
                    await connect(ws_url)
                assert refused_ws.value.response.status_code == 401
                async with connect(f"{ws_url}?token={TOKEN}") as ws:
                    assert (await receive(ws))["type"] == "state"
                async with connect(ws_url, additional_headers={
                        "Authorization": f"Bearer {TOKEN}"}) as ws:
                    assert (await receive(ws))["type"] == "state"
        server_side = [r.getMessage() for r in caplog.records  # not the test's own clients
                       if r.name.startswith(("daemon", "websockets.server"))]
        assert TOKEN not in "\n".join(server_side)
        assert TOKEN not in json.dumps(logs, default=str)

    async def test_foreign_host_and_origin(self) -> None:
        """Without a token, a non-loopback Host (DNS rebinding) or a foreign Origin is refused."""
        async with live_server(LiveHub()) as server, httpx.AsyncClient(
                base_url=server.url) as http:
            rebound = await http.get("/healthz", headers={"Host": f"evil.example:{server.port}"})
            assert rebound.status_code == 403
            assert (await http.get("/", headers={"Host": f"localhost:{server.port}"})
                    ).status_code == 200
            assert (await http.post("/healthz")).status_code == 405
            assert (await http.get("/nope")).status_code == 404
            ws_url = server.url.replace("http", "ws") + "/events"
            with pytest.raises(InvalidStatus) as foreign:
                await connect(ws_url, origin="http://evil.example")  # type: ignore[arg-type]
            assert foreign.value.response.status_code == 403
            async with connect(ws_url, origin=server.url) as ws:  # type: ignore[arg-type]
                assert (await receive(ws))["type"] == "state"

    async def test_token_in_query_keeps_its_plus(self) -> None:
        """A base64 token pasted into ``?token=`` works as typed ("+" is not a space)."""
        token = "s3cr3t+tok/en=="
        async with live_server(LiveHub(), token=token) as server, httpx.AsyncClient(
                base_url=server.url) as http:
            assert (await http.get(f"/healthz?token={token}")).status_code in (200, 503)
            assert (await http.get("/healthz?token=s3cr3t%2Btok%2Fen%3D%3D")).status_code != 401
            assert (await http.get("/healthz?token=s3cr3t tok/en==")).status_code == 401

    async def test_repeated_header_is_a_400(self) -> None:
        """Two Authorization (or Host) headers: a plain 400, not a server error."""
        async with live_server(LiveHub(), token=TOKEN) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                         f"{TOKEN}\r\nAuthorization: Bearer x\r\n\r\n".encode())
            async with asyncio.timeout(5):
                status = await reader.readline()
            writer.close()
        assert status.startswith(b"HTTP/1.1 400 ")

    async def test_connections_are_capped(self) -> None:
        """Beyond the cap a connection is cut at once, so a flood cannot use up descriptors."""
        async with live_server(LiveHub(), max_connections=2) as server:
            held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            async with asyncio.timeout(5):
                assert await reader.read() == b""              # closed without an answer
            writer.close()
            for _reader, held_writer in held:
                held_writer.close()

    async def test_page_is_self_contained(self) -> None:
        """The page is served with a CSP that forbids any other origin."""
        async with live_server(LiveHub()) as server, httpx.AsyncClient(
                base_url=server.url) as http:
            page = await http.get("/")
            assert page.status_code == 200 and "<title>transcribed" in page.text
            assert "connect-src 'self'" in page.headers["content-security-policy"]
            assert "http://" not in page.text and "https://" not in page.text


class TestSlowClient:
    async def test_slow_client_dropped(self) -> None:
        """A client that stops reading is dropped; a reading client gets every event."""
        hub = LiveHub(client_queue=8)
        async with live_server(hub) as server:
            slow = await _stalled_feed_client(server.port)
            async with connect(server.url.replace("http", "ws") + "/events",
                               max_size=2**20) as fast:
                await receive(fast)
                assert hub.subscribers == 2
                big = "x" * 128 * 1024
                sent = 0
                async with asyncio.timeout(20):
                    while hub.dropped_clients == 0:
                        hub.turn(turn(sent, f"{sent} {big}"))
                        assert (await receive(fast))["turn_order"] == sent
                        sent += 1
                assert hub.subscribers == 1 and sent < 400
                hub.turn(turn(sent, "still here"))
                assert (await receive(fast))["transcript"] == "still here"
            slow.close()

    async def test_stalled_viewer_does_not_hold_up_shutdown(self) -> None:
        """A viewer that never reads cannot keep the daemon from stopping."""
        hub = LiveHub()
        server = LiveServer(hub, StatusBox(), listen="127.0.0.1:0")
        await server.__aenter__()
        slow = await _stalled_feed_client(server.port)
        for order in range(40):                           # fill its socket buffers
            hub.turn(turn(order, f"{order} " + "x" * 4096))
        try:
            async with asyncio.timeout(5):                # the close handshake waits 1 s at most
                await server.__aexit__(None, None, None)
        finally:
            slow.close()


class TestPingFlood:
    async def test_client_flooding_pings_unread_is_cut(self) -> None:
        """Pings sent as fast as possible, the pongs never read: the client is cut off once
        1 MiB waits for it (the library answered every ping: ~28 MB of memory a second)."""
        hub = LiveHub()
        async with live_server(hub) as server:
            loop = asyncio.get_running_loop()
            flood = await _stalled_feed_client(server.port)
            ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125   # masked, key 0
            async def send_until_reset() -> None:
                async with asyncio.timeout(30):
                    while True:
                        await loop.sock_sendall(flood, ping * 512)

            with structlog.testing.capture_logs() as logs, pytest.raises(OSError):
                await send_until_reset()                # until the server resets it
            flood.close()
            [cut] = [e for e in logs if e["event"] == "http.viewer_cut"]
            assert cut["unread_bytes"] > 1 << 20
            async with connect(server.url.replace("http", "ws") + "/events") as viewer:
                assert (await receive(viewer))["type"] == "state"      # others are served


async def _stalled_feed_client(port: int) -> socket.socket:
    """Open /events with a tiny receive window, complete the handshake, then never read."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock
