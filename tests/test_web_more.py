"""The live-view server: text UTF-8 cannot carry (a lone surrogate), HEAD requests."""

from __future__ import annotations

import asyncio

import httpx
from websockets.asyncio.client import connect

from daemon.live import LiveHub
from tests.live_helpers import StatusBox, began, live_server, partial, receive, turn

BROKEN = "half an emoji \ud83d here"   # what json.loads makes of a service's "\ud83d"


class TestLoneSurrogate:
    async def test_feed_carries_a_turn_with_a_lone_surrogate(self) -> None:
        """A transcript with a lone surrogate (UTF-8 cannot encode it) reaches every viewer, and
        so does everything after it. (It was a traceback per viewer and a cut connection: the
        replay stopped at that turn for every new viewer until 50 more turns pushed it out.)"""
        hub = LiveHub(engine="assemblyai")
        hub.session_started(began())
        hub.turn(turn(0, "Before."))
        hub.turn(turn(1, BROKEN))
        hub.turn(turn(2, "After."))
        async with live_server(hub) as server, connect(
                server.url.replace("http", "ws", 1) + "/events") as ws:
            async with asyncio.timeout(10):
                kinds = [(await receive(ws))["type"] for _ in range(2)]
                assert kinds == ["state", "session"]
                replayed = [(await receive(ws))["transcript"] for _ in range(3)]
                assert replayed == ["Before.", BROKEN, "After."]
                hub.partial(partial(3, BROKEN))
                hub.turn(turn(3, BROKEN + "!"))
                hub.turn(turn(4, "Still here."))
                live = [await receive(ws) for _ in range(3)]
        assert [(e["type"], e["transcript"]) for e in live] == [
            ("partial", BROKEN), ("turn", BROKEN + "!"), ("turn", "Still here.")]


class TestHead:
    async def test_head_answers_as_get_without_a_body(self) -> None:
        """``wget --spider`` and ``curl -I`` (the usual container health checks) send HEAD: the
        same status and headers as GET, no body. (It was 405 for a healthy daemon.)"""
        status = StatusBox()
        async with live_server(LiveHub(), status) as server, httpx.AsyncClient(
                base_url=server.url) as http:
            for path in ("/healthz", "/metrics", "/"):
                status.set(audio_age_s=0.1, engine_live=path != "/healthz")
                got, head = await http.get(path), await http.head(path)
                assert (head.status_code, head.content) == (got.status_code, b""), path
                assert head.headers["content-type"] == got.headers["content-type"]
            status.set(engine_live=True)
            assert (await http.head("/healthz")).status_code == 200
            feed = await http.head("/events")
            assert feed.status_code == 405 and feed.headers["allow"] == "GET"
            post = await http.post("/healthz")
            assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
