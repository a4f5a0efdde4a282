"""Tests of the fake AssemblyAI v3 service itself, driven by a raw websockets/httpx client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fake_assemblyai import (
    GARBAGE,
    SPEECH_DIR,
    FakeAssemblyAI,
    load_speech_references,
)
from tests.fake_assemblyai_speech import Reference

SCALE = 40.0
S1_TEXT = "The quick brown fox jumps over the lazy dog."
S1_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
REFS: dict[str, Reference] = load_speech_references(
    SPEECH_DIR, "espeak-s1.wav", "espeak-s2.wav", "espeak-five-sentences.wav"
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(REFS, time_scale=SCALE, allow_short_sessions=True) as server:
        yield server


@dataclass
class Client:
    """A raw client session: the socket and everything the fake sent on it."""

    ws: ClientConnection
    messages: list[Any] = field(default_factory=list)
    raw: list[str | bytes] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        try:
            async for message in self.ws:
                self.raw.append(message)
                with contextlib.suppress(json.JSONDecodeError):
                    self.messages.append(json.loads(message))
                self.arrived.set()
        except ConnectionClosed:
            pass

    async def wait_for_type(self, kind: str) -> dict[str, Any]:
        """Wait (bounded) for the first message of a type."""
        async with asyncio.timeout(5):
            while not self.of_type(kind):
                self.arrived.clear()
                await self.arrived.wait()
        return self.of_type(kind)[0]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("type") == kind]

    async def stream(self, samples: np.ndarray, chunk_ms: int = 100, scale: float = SCALE) -> None:
        """Send audio in chunks, paced at ``scale`` times real time by the loop clock."""
        loop = asyncio.get_running_loop()
        step = 16 * chunk_ms
        start = loop.time()
        for k, offset in enumerate(range(0, len(samples), step)):
            chunk = samples[offset : offset + step]
            if len(chunk) < 16 * 50:
                chunk = np.concatenate((chunk, np.zeros(16 * 50 - len(chunk), dtype=np.int16)))
            await asyncio.sleep(max(0.0, start + k * chunk_ms / 1000 / scale - loop.time()))
            await self.ws.send(chunk.astype("<i2").tobytes())

    async def finish(self) -> None:
        """Wait (bounded) until the server closes the socket and the reader has drained it."""
        assert self.reader is not None
        async with asyncio.timeout(5):
            await self.reader


async def mint(fake: FakeAssemblyAI, **params: Any) -> str:
    params.setdefault("expires_in_seconds", 60)
    async with httpx.AsyncClient() as http:
        reply = await http.get(
            fake.token_url, params=params, headers={"Authorization": fake.api_key}
        )
    reply.raise_for_status()
    token: str = reply.json()["token"]
    return token


async def open_session(
    fake: FakeAssemblyAI,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **query: Any,
) -> Client:
    query = {"sample_rate": 16000, "encoding": "pcm_s16le", **query}
    if token is not None:
        query["token"] = token
    ws = await connect(f"{fake.streaming_url}?{urlencode(query)}", additional_headers=headers)
    client = Client(ws)
    client.reader = asyncio.create_task(client.read())
    return client


async def begun(fake: FakeAssemblyAI, **query: Any) -> Client:
    """Open a session with a fresh token and wait for its Begin."""
    client = await open_session(fake, await mint(fake), **query)
    await client.wait_for_type("Begin")
    return client


def s1() -> np.ndarray:
    return REFS["espeak-s1.wav"][0]


def silence(ms: int) -> np.ndarray:
    return np.zeros(16 * ms, dtype=np.int16)


class TestTokens:
    async def test_mint_returns_token_and_records_request(self, fake: FakeAssemblyAI) -> None:
        """A token request with the raw key gets a token and is recorded with its params."""
        async with httpx.AsyncClient() as http:
            reply = await http.get(
                fake.token_url,
                params={"expires_in_seconds": 30, "max_session_duration_seconds": 120},
                headers={"Authorization": fake.api_key},
            )
        assert reply.status_code == 200
        assert reply.json()["expires_in_seconds"] == 30
        assert reply.json()["token"].startswith("fake-token-")
        recorded = fake.token_requests[-1]
        assert recorded.headers["authorization"] == fake.api_key
        assert recorded.params == {
            "expires_in_seconds": ["30"],
            "max_session_duration_seconds": ["120"],
        }

    @pytest.mark.parametrize(
        ("headers", "params", "status"),
        [
            ({}, {"expires_in_seconds": 60}, 401),
            ({"Authorization": "Bearer KEY"}, {"expires_in_seconds": 60}, 401),
            ({"Authorization": "KEY"}, {}, 400),
            ({"Authorization": "KEY"}, {"expires_in_seconds": 0}, 400),
            ({"Authorization": "KEY"}, {"expires_in_seconds": 601}, 400),
            ({"Authorization": "KEY"}, {"expires_in_seconds": "soon"}, 400),
            (
                {"Authorization": "KEY"},
                {"expires_in_seconds": 60, "max_session_duration_seconds": 3},
                400,
            ),
            (
                {"Authorization": "KEY"},
                {"expires_in_seconds": 60, "max_session_duration_seconds": 10801},
                400,
            ),
        ],
    )
    async def test_bad_token_requests_are_refused(
        self, fake: FakeAssemblyAI, headers: dict[str, str], params: dict[str, Any], status: int
    ) -> None:
        """Missing/Bearer keys give 401 and out-of-range params give 400, with a JSON error."""
        headers = {k: v.replace("KEY", fake.api_key) for k, v in headers.items()}
        async with httpx.AsyncClient() as http:
            reply = await http.get(fake.token_url, params=params, headers=headers)
        assert reply.status_code == status
        assert reply.json()["error"]
        assert fake.api_key not in reply.text

    async def test_short_sessions_need_the_flag(self) -> None:
        """max_session_duration_seconds below 60 is refused unless allow_short_sessions is set."""
        async with FakeAssemblyAI() as strict, httpx.AsyncClient() as http:
            params = {"expires_in_seconds": 60, "max_session_duration_seconds": 12}
            reply = await http.get(
                strict.token_url, params=params, headers={"Authorization": strict.api_key}
            )
        assert reply.status_code == 400

    async def test_token_status_fault_queue(self, fake: FakeAssemblyAI) -> None:
        """Scripted token statuses are answered in order, then minting works again."""
        fake.faults.token_status = [500, 429]
        async with httpx.AsyncClient() as http:
            params, headers = {"expires_in_seconds": 60}, {"Authorization": fake.api_key}
            codes = [
                (await http.get(fake.token_url, params=params, headers=headers)) for _ in range(3)
            ]
        assert [c.status_code for c in codes] == [500, 429, 200]
        assert codes[1].headers["Retry-After"] == "1"

    async def test_revoked_key_refuses_tokens_and_sessions(self, fake: FakeAssemblyAI) -> None:
        """With key_revoked, minting gives 401 and even a previously minted token gets 1008."""
        token = await mint(fake)
        fake.faults.key_revoked = True
        async with httpx.AsyncClient() as http:
            reply = await http.get(
                fake.token_url,
                params={"expires_in_seconds": 60},
                headers={"Authorization": fake.api_key},
            )
        assert reply.status_code == 401
        client = await open_session(fake, token)
        await client.finish()
        assert client.ws.close_code == 1008
        assert client.messages == []


class TestAuth:
    @pytest.mark.parametrize(
        ("how", "reason"),
        [
            ("missing", "Unauthorized Connection: Missing Authorization header"),
            ("bogus", "Unauthorized Connection: Invalid token"),
            ("used", "Unauthorized Connection: Token already used"),
            ("expired", "Unauthorized Connection: Signature has expired"),
        ],
    )
    async def test_bad_credentials_close_1008_before_begin(
        self, fake: FakeAssemblyAI, how: str, reason: str
    ) -> None:
        """Bad credentials: the upgrade succeeds, then the fake closes 1008 without Begin."""
        token: str | None = {"missing": None, "bogus": "nope"}.get(how, "")
        if how in ("used", "expired"):
            token = await mint(fake)
        if how == "used":
            first = await open_session(fake, token)
            await first.ws.close()
        if how == "expired":
            fake.expire_tokens()
        client = await open_session(fake, token)
        await client.finish()
        assert (client.ws.close_code, client.ws.close_reason) == (1008, reason)
        assert client.messages == []
        assert fake.sessions[-1].close_code == 1008

    async def test_token_in_header_and_raw_key_in_header_work(self, fake: FakeAssemblyAI) -> None:
        """Authorization may carry a token (Python SDK style) or the raw key."""
        by_token = await open_session(fake, headers={"Authorization": await mint(fake)})
        by_key = await open_session(fake, headers={"Authorization": fake.api_key})
        for client in (by_token, by_key):
            async with asyncio.timeout(5):
                await (await fake.wait_for_session(1)).wait_begun()
            await client.ws.close()
            await client.finish()
        assert [s.auth for s in fake.sessions] == ["token-header", "key-header"]

    async def test_key_never_reaches_the_socket_with_query_tokens(
        self, fake: FakeAssemblyAI
    ) -> None:
        """A query-token session's URL and headers never contain the API key."""
        client = await begun(fake)
        await client.ws.close()
        session = fake.sessions[0]
        assert session.auth == "token-query"
        assert fake.api_key not in session.path
        assert fake.api_key not in json.dumps(session.headers)


class TestBegin:
    async def test_begin_has_uuid_and_int_expiry(self, fake: FakeAssemblyAI) -> None:
        """Begin carries the session id and an int expires_at derived from the token's cap."""
        client = await open_session(fake, await mint(fake, max_session_duration_seconds=400))
        begin = await client.wait_for_type("Begin")
        assert begin["id"] == fake.sessions[0].id
        assert len(begin["id"]) == 36
        assert isinstance(begin["expires_at"], int)
        now = datetime.now().timestamp()
        assert now + 400 / SCALE - 2 <= begin["expires_at"] <= now + 400 / SCALE
        await client.ws.close()

    async def test_begin_iso_expiry(self) -> None:
        """With expires_at_format='iso', expires_at is an ISO-8601 string."""
        async with FakeAssemblyAI(expires_at_format="iso") as fake:
            client = await begun(fake)
            begin = client.of_type("Begin")[0]
            await client.ws.close()
        moment = datetime.fromisoformat(begin["expires_at"])
        assert moment.tzinfo is not None
        assert 10_700 < moment.timestamp() - datetime.now().timestamp() <= 10_800

    async def test_query_params_are_parsed_and_recorded(self, fake: FakeAssemblyAI) -> None:
        """Query params, including SDK-style True/False and a JSON keyterms array, are recorded."""
        client = await begun(
            fake,
            speech_model="universal-streaming-english",
            format_turns="True",
            end_of_turn_confidence_threshold=0.7,
            min_turn_silence=160,
            max_turn_silence=400,
            keyterms_prompt=json.dumps(["Tuesday", "quarterly"]),
            language_detection="false",
        )
        params = fake.sessions[0].params
        assert params is not None
        assert params.speech_model == "universal-streaming-english"
        assert params.keyterms_prompt == ["Tuesday", "quarterly"]
        assert (params.turns.format_turns, params.turns.language_detection) == (True, False)
        assert (params.turns.min_turn_silence, params.turns.max_turn_silence) == (160, 400)
        assert params.turns.end_of_turn_confidence_threshold == 0.7
        await client.ws.close()

    @pytest.mark.parametrize(
        "query",
        [
            "keyterms_prompt=a&keyterms_prompt=b",
            "keyterms_prompt=a",
            "format_turns=yes",
            "sample_rate=x",
        ],
    )
    async def test_bad_params_close_3006(self, fake: FakeAssemblyAI, query: str) -> None:
        """Repeated or non-JSON keyterms and bad values give Error 3006 and close 3006."""
        ws = await connect(f"{fake.streaming_url}?token={await mint(fake)}&{query}")
        client = Client(ws)
        await client.read()
        assert client.ws.close_code == 3006
        assert client.messages[0]["type"] == "Error"
        assert client.messages[0]["error"].startswith("User Input Validation Error: Invalid")


class TestRecognition:
    async def test_s1_words_and_finals(self, fake: FakeAssemblyAI) -> None:
        """espeak-s1 yields partials, then unformatted and formatted finals with the exact words."""
        client = await begun(fake, format_turns="true", language_detection="true")
        await client.stream(np.concatenate((s1(), silence(600))))
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        turns = client.of_type("Turn")
        partials = [t for t in turns if not t["end_of_turn"]]
        raw, formatted = [t for t in turns if t["end_of_turn"]]
        assert [w["text"] for w in raw["words"]] == S1_WORDS
        assert raw["transcript"] == " ".join(S1_WORDS)
        assert not raw["turn_is_formatted"]
        assert formatted["transcript"] == S1_TEXT
        assert formatted["turn_is_formatted"]
        assert raw["turn_order"] == formatted["turn_order"] == 0
        assert formatted["language_code"] == "en"
        assert "language_code" not in partials[0]
        assert all(not p["turn_is_formatted"] for p in partials)
        assert partials[-1]["transcript"] == " ".join(S1_WORDS)
        starts = [w["start"] for w in raw["words"]]
        assert starts == sorted(starts)
        assert 0 <= starts[0] < 100
        assert 2900 <= raw["words"][-1]["end"] <= 3100
        assert fake.sessions[0].finals()[0]["transcript"] == S1_TEXT

    async def test_final_comes_after_min_turn_silence_without_terminate(
        self, fake: FakeAssemblyAI
    ) -> None:
        """The final is sent once min_turn_silence of audio follows the last word."""
        client = await begun(fake, min_turn_silence=400)
        session = fake.sessions[0]
        await client.stream(np.concatenate((s1(), silence(800))))
        async with asyncio.timeout(5):
            await session.wait_for(lambda s: len(s.finals()) == 1)
        assert session.finals()[0]["transcript"] == " ".join(S1_WORDS)
        assert client.of_type("Termination") == []
        await client.ws.close()

    async def test_non_final_tail_word_in_partials(self, fake: FakeAssemblyAI) -> None:
        """Some partial carries the next, partly received word as word_is_final false."""
        client = await begun(fake)
        await client.stream(s1(), chunk_ms=50)
        await client.ws.close()
        await client.finish()
        partials = [t for t in client.of_type("Turn") if not t["end_of_turn"]]
        tails = [t["words"][-1] for t in partials if not t["words"][-1]["word_is_final"]]
        assert tails
        assert all(t["text"] in S1_WORDS for t in tails)

    async def test_mid_stream_start_and_timestamps_are_session_relative(
        self, fake: FakeAssemblyAI
    ) -> None:
        """Audio resent from mid-sentence yields the remaining words, timed in session audio."""
        x = REFS["espeak-s2.wav"][0]
        client = await begun(fake)
        await client.stream(np.concatenate((x[31_111:], silence(500))))
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        final = client.of_type("Turn")[-1]
        assert final["transcript"].endswith("for next tuesday at three o'clock")
        assert "please" not in final["transcript"]
        assert final["words"][0]["start"] < 300

    async def test_five_sentences_give_five_turns(self, fake: FakeAssemblyAI) -> None:
        """The 25 s five-sentence file gives five formatted turns numbered 0..4."""
        client = await begun(fake, format_turns="true")
        await client.stream(np.concatenate((REFS["espeak-five-sentences.wav"][0], silence(500))))
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        finals = fake.sessions[0].finals()
        assert [f["turn_order"] for f in finals] == [0, 1, 2, 3, 4]
        assert finals[1]["transcript"].startswith("Please schedule a meeting")
        assert (
            finals[4]["transcript"] == "Turn off the lights in the kitchen and lock the front door."
        )

    async def test_noise_produces_no_words(self, fake: FakeAssemblyAI) -> None:
        """Audio that matches no reference produces no Turn messages."""
        noise = np.random.default_rng(7).integers(-4000, 4000, 16 * 1500).astype(np.int16)
        client = await begun(fake)
        await client.stream(noise)
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        assert client.of_type("Turn") == []
        assert client.of_type("Termination")[0]["audio_duration_seconds"] == 2

    async def test_force_endpoint_ends_the_turn_early(self, fake: FakeAssemblyAI) -> None:
        """ForceEndpoint finalises the words heard so far; the rest form the next turn."""
        client = await begun(fake)
        await client.stream(s1()[: 16 * 1500])
        await client.ws.send(json.dumps({"type": "ForceEndpoint"}))
        await client.stream(s1()[16 * 1500 :])
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        finals = fake.sessions[0].finals()
        assert [f["turn_order"] for f in finals] == [0, 1]
        assert " ".join(f["transcript"] for f in finals) == " ".join(S1_WORDS)


class TestAudioRules:
    @pytest.mark.parametrize("chunk_ms", [20, 1200])
    async def test_chunk_duration_violation_closes_3007(
        self, fake: FakeAssemblyAI, chunk_ms: int
    ) -> None:
        """Frames shorter than 50 ms or longer than 1000 ms give Error 3007 and close 3007."""
        client = await begun(fake)
        await client.ws.send(silence(chunk_ms).tobytes())
        await client.finish()
        error = client.of_type("Error")[0]
        assert error["error_code"] == client.ws.close_code == 3007
        assert (
            error["error"]
            == f"Input duration violation: {chunk_ms} ms. Expected between 50 and 1000 ms"
        )
        assert fake.sessions[0].frames[0].duration_ms == chunk_ms

    async def test_faster_than_real_time_closes_3007(self) -> None:
        """Bursting audio faster than real time gives 'Audio Transmission Rate Exceeded'."""
        async with FakeAssemblyAI() as fake:
            client = await begun(fake)
            for _ in range(10):
                await client.ws.send(silence(100).tobytes())
            await client.finish()
        assert client.ws.close_code == 3007
        assert client.of_type("Error")[0]["error"].startswith("Audio Transmission Rate Exceeded")
        assert fake.sessions[0].close_code == 3007

    @pytest.mark.parametrize(
        ("text", "prefix"),
        [
            ("{not json", "Invalid JSON"),
            ('{"type": "Dance"}', "Invalid Message Type: Dance"),
            ("[1, 2]", "Invalid Message"),
        ],
    )
    async def test_bad_client_text_closes_3006(
        self, fake: FakeAssemblyAI, text: str, prefix: str
    ) -> None:
        """Invalid JSON, unknown types and non-objects give Error 3006 and close 3006."""
        client = await begun(fake)
        await client.ws.send(text)
        await client.finish()
        assert client.ws.close_code == 3006
        assert client.of_type("Error")[0]["error"].startswith(prefix)
        assert fake.sessions[0].texts == [text]

    async def test_keepalive_and_update_configuration_are_accepted(
        self, fake: FakeAssemblyAI
    ) -> None:
        """KeepAlive is ignored and UpdateConfiguration changes the turn settings."""
        client = await begun(fake)
        await client.ws.send(json.dumps({"type": "KeepAlive"}))
        update = {"type": "UpdateConfiguration", "min_turn_silence": 900, "keyterms_prompt": ["x"]}
        await client.ws.send(json.dumps(update))
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        params = fake.sessions[0].params
        assert params is not None
        assert (params.turns.min_turn_silence, params.keyterms_prompt) == (900, ["x"])
        assert client.ws.close_code == 1000

    @pytest.mark.parametrize("asked", [True, False])
    async def test_heartbeats_only_when_asked(self, asked: bool) -> None:
        """``session_heartbeat=true``: a Heartbeat every ``heartbeat_s`` (fake time) with the
        audio received so far; without it, none."""
        async with FakeAssemblyAI(REFS, time_scale=SCALE, heartbeat_s=0.5) as fake:
            client = await begun(fake, **({"session_heartbeat": "true"} if asked else {}))
            await client.stream(s1()[: 16 * 3000])
            if asked:
                await client.wait_for_type("Heartbeat")
            await client.ws.send(json.dumps({"type": "Terminate"}))
            await client.finish()
        beats = client.of_type("Heartbeat")
        assert bool(beats) == asked
        for beat in beats:
            assert 0 <= beat["total_audio_received_ms"] <= 3000
            assert beat["total_duration_ms"] > 0 and beat["realtime_factor"] >= 0
        assert any(beat["max_speech_probability"] == 0.99 for beat in beats) == asked

    async def test_terminate_sends_termination_and_closes_1000(self, fake: FakeAssemblyAI) -> None:
        """Terminate flushes the open turn, then Termination with durations, then close 1000."""
        client = await begun(fake)
        await client.stream(s1()[: 16 * 2000])
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        assert client.messages[-1]["type"] == "Termination"
        assert client.messages[-2]["end_of_turn"] is True
        assert client.messages[-1]["audio_duration_seconds"] == 2
        assert isinstance(client.messages[-1]["session_duration_seconds"], int)
        assert client.ws.close_code == 1000
        session = fake.sessions[0]
        assert (session.close_code, session.closed_by) == (1000, "server")
        assert len(session.audio) == 2 * 16 * 2000
        assert {f.nbytes for f in session.frames} == {3200}

    async def test_session_cap_closes_3008(self, fake: FakeAssemblyAI) -> None:
        """At the token's max session duration the fake sends Error 3008 and closes 3008."""
        client = await open_session(fake, await mint(fake, max_session_duration_seconds=12))
        await client.finish()
        assert client.of_type("Error")[0]["error_code"] == 3008
        assert client.ws.close_code == 3008
        assert client.ws.close_reason == "Session Expired: Maximum session duration exceeded"


class TestFaults:
    async def test_http_status_on_upgrade(self, fake: FakeAssemblyAI) -> None:
        """An armed upgrade status rejects the handshake over HTTP, once."""
        fake.faults.http_status_on_upgrade = [503]
        with pytest.raises(InvalidStatus) as caught:
            await connect(f"{fake.streaming_url}?token={await mint(fake)}")
        assert caught.value.response.status_code == 503
        client = await begun(fake)
        await client.ws.close()
        assert [status for _, status in fake.upgrade_requests] == [503, 101]

    async def test_reject_handshake_closes_before_begin(self, fake: FakeAssemblyAI) -> None:
        """reject_handshake closes the next session with the given code before Begin."""
        fake.faults.reject_handshake = [1011]
        client = await open_session(fake, await mint(fake))
        await client.finish()
        assert client.ws.close_code == 1011
        assert client.messages == []

    async def test_drop_after_audio_is_an_abrupt_disconnect(self, fake: FakeAssemblyAI) -> None:
        """A scripted drop aborts TCP after the given audio: the client sees 1006."""
        fake.faults.drop_after_audio_ms(1000)
        client = await begun(fake)
        with pytest.raises(ConnectionClosed):
            await client.stream(np.concatenate((s1(), s1())))
        await client.finish()
        session = fake.sessions[0]
        assert client.ws.close_code == 1006
        assert (session.close_code, session.closed_by) == (1006, "abort")
        assert session.audio_ms == 1000
        second = await begun(fake)
        await second.ws.close()
        async with asyncio.timeout(5):
            await fake.sessions[1].wait_closed()
        assert (fake.sessions[1].close_code, fake.sessions[1].closed_by) == (1000, "client")

    async def test_error_after_audio(self, fake: FakeAssemblyAI) -> None:
        """A scripted error sends Error with the code, then closes with it."""
        fake.faults.error_after_audio_ms(500, code=3005)
        client = await begun(fake)
        with pytest.raises(ConnectionClosed):
            await client.stream(s1())
        await client.finish()
        assert client.ws.close_code == 3005
        assert client.of_type("Error")[0]["error"] == "Session Cancelled: An error occurred"

    @pytest.mark.parametrize("kind", ["non_json", "unknown_type", "malformed", "binary"])
    async def test_send_garbage(self, fake: FakeAssemblyAI, kind: str) -> None:
        """A scripted garbage frame is sent once and the session carries on."""
        fake.faults.send_garbage(kind, after_audio_ms=200)
        client = await begun(fake)
        await client.stream(s1()[: 16 * 500])
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        assert GARBAGE[kind] in client.raw
        assert GARBAGE[kind] in fake.sessions[0].sent
        assert client.of_type("Termination")

    async def test_no_termination(self, fake: FakeAssemblyAI) -> None:
        """With no_termination, Terminate is recorded but never answered."""
        fake.faults.no_termination = True
        client = await begun(fake)
        await client.ws.send(json.dumps({"type": "Terminate"}))
        session = fake.sessions[0]
        async with asyncio.timeout(5):
            await session.wait_for(lambda s: len(s.texts) == 1)
        assert not session.closed
        await client.ws.close()
        await client.finish()
        async with asyncio.timeout(5):
            await session.wait_closed()
        assert client.of_type("Termination") == []
        assert session.closed_by == "client"

    async def test_abort_drops_a_live_session(self, fake: FakeAssemblyAI) -> None:
        """session.abort() drops the connection at once, without a close frame."""
        client = await begun(fake)
        session = await fake.wait_for_session(0)
        session.abort()
        await client.finish()
        assert client.ws.close_code == 1006
        async with asyncio.timeout(5):
            await session.wait_closed()
        assert (session.close_code, session.closed_by) == (1006, "abort")

    async def test_other_encodings_count_as_silence(self, fake: FakeAssemblyAI) -> None:
        """pcm_mulaw audio is accepted and timed (1 byte per sample) but recognises nothing."""
        client = await begun(fake, encoding="pcm_mulaw")
        await client.ws.send(bytes(800))
        await client.ws.send(json.dumps({"type": "Terminate"}))
        await client.finish()
        assert fake.sessions[0].frames[0].duration_ms == 50
        assert client.of_type("Turn") == []
        assert client.ws.close_code == 1000
