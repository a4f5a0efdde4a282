"""An in-process fake of AssemblyAI Universal Streaming v3, for tests on 127.0.0.1.

Usage::

    refs = load_speech_references(SPEECH_DIR, "espeak-s1.wav")
    async with FakeAssemblyAI(references=refs, time_scale=20) as fake:
        fake.faults.drop_after_audio_ms(2000)          # next session: TCP drop after 2 s of audio
        ...  # point the client at fake.token_url / fake.streaming_url with fake.api_key
        session = await fake.wait_for_session(0)
        await session.wait_closed()
        assert session.finals()[0]["transcript"] == "The quick brown fox ..."

One ``websockets`` server on an ephemeral port serves both endpoints:

* ``GET /v3/token`` (plain HTTP, answered from ``process_request``): the raw API key in
  ``Authorization`` (no ``Bearer``) else 401 ``{"error": ...}``; ``expires_in_seconds`` 1..600
  required and ``max_session_duration_seconds`` 60..10800 optional (down to 5 with
  ``allow_short_sessions=True``) else 400; answers ``{"token", "expires_in_seconds"}``. Tokens
  are single use: the first upgrade that presents one consumes it, whatever happens next. Every
  request is recorded in ``fake.token_requests``.
* ``/v3/ws`` (WebSocket): credentials from ``?token=``, else ``Authorization`` (a token or the
  raw key). Bad, missing, used or expired credentials: the upgrade is accepted, then closed 1008
  ``Unauthorized Connection: …`` before ``Begin`` (no ``Error`` frame). Bad query params (e.g. a
  repeated or non-JSON ``keyterms_prompt``): ``Error`` 3006 + close 3006 before ``Begin``.
  Otherwise ``Begin`` {id, expires_at, configuration} is sent at once; ``expires_at`` is int Unix
  seconds (rounded down) or, with ``expires_at_format="iso"``, an ISO-8601 string.
* Audio rules: each binary frame must hold 50..1000 ms (else ``Error`` + close 3007 "Input
  duration violation"); the audio received since ``Begin`` may run ahead of the elapsed time by
  at most 0.3 s + 2 % of the elapsed time (else 3007 "Audio Transmission Rate Exceeded"). Frames
  over 128 KiB are closed 1009 by ``websockets`` itself.
* Text frames: ``Terminate`` → final turns, ``Termination``, close 1000; ``ForceEndpoint`` ends
  the open turn; ``KeepAlive`` is accepted; ``UpdateConfiguration`` updates the turn settings;
  bad JSON / unknown ``type`` / bad values → ``Error`` 3006 + close 3006.
* Session cap: the token's ``max_session_duration_seconds`` (``max_session_seconds`` for raw-key
  sessions, default 10800); at the cap ``Error`` 3008 + close 3008, *without* flushing the open
  turn (the stricter reading of the docs).
* Recognition: see ``fake_assemblyai_speech`` (content-based, deterministic) and
  ``fake_assemblyai_turns`` (partials, unformatted and formatted finals).

Observing: ``fake.token_requests``, ``fake.upgrade_requests`` and ``fake.sessions`` (one
``SessionRecord`` per accepted upgrade, rejected ones included: headers, query, params, auth kind,
id, frames, raw audio, client texts, every message sent, close code/reason and who closed).
``await fake.wait_for_session(i)`` (0-based), ``await fake.wait_for_token_requests(n)``,
``await session.wait_begun()``, ``await session.wait_closed()`` and
``await session.wait_for(predicate)`` wake on every change; they have no timeout of their own,
so wrap them in ``asyncio.timeout``. ``session.abort()`` drops a live session;
``fake.expire_tokens()`` ages every minted token past its window.

Faults (``fake.faults``, see ``Faults`` in ``fake_assemblyai_records``): queues consumed one per
request or session (``token_status``, ``http_status_on_upgrade``, ``reject_handshake``,
``begin_delay_s``), flags (``key_revoked``, ``no_termination``, ``close_without_termination``,
``termination_without_finals``, ``termination_delay_s``, ``token_retry_after``,
``token_raw_body``; ``abandon_turns``: turns ended mid-session without any final) and
per-session faults armed for the next session that reaches ``Begin``
(``drop_after_audio_ms``, ``error_after_audio_ms``, ``deaf_after_audio_ms``,
``stall_after_audio_ms``, ``freeze_after_audio_ms``, ``send_garbage``).

``time_scale`` (default 1): the fake's notion of time runs that many times faster than the
event loop's clock, for the audio-rate limit, the session cap (``expires_at`` is in real wall
time, i.e. ``now + cap / time_scale``), the token redemption window and
``Termination.session_duration_seconds``. Turn timing is measured in received audio, so it is
unaffected. With ``time_scale=20`` a client may send 3 s of audio in 0.15 s.

Heartbeats: with ``session_heartbeat=true`` a ``Heartbeat`` every ``heartbeat_s`` of fake time
(default 5; received audio, elapsed time, realtime factor, and a speech probability of 0.99 if any
sample since the last one was loud); a "deaf" session stops sending them. ``heartbeat_s=None``:
the parameter is ignored, as a server from before heartbeats does.

Deviations from the real service: no ``inactivity_timeout``, ``SpeechStarted``,
``Warning``, diarization or new-session rate limit (3009 only as a scripted fault); recognition
only for 16 kHz ``pcm_s16le`` (other audio counts as silence); ``keyterms_prompt`` and the
turn-detection threshold are recorded but change nothing; only ``GET`` is understood; the
``configuration`` object in ``Begin`` is minimal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.fake_assemblyai_records import (
    CLOSE_REASONS,
    GARBAGE,
    Faults,
    FrameRecord,
    InputError,
    SessionFault,
    SessionParams,
    SessionRecord,
    TokenRequest,
    apply_turn_settings,
    parse_keyterms,
    parse_number,
)
from tests.fake_assemblyai_speech import Reference, ReferenceIndex, load_speech_references
from tests.fake_assemblyai_turns import TurnBuilder

__all__ = [
    "API_KEY",
    "CLOSE_REASONS",
    "GARBAGE",
    "SPEECH_DIR",
    "FakeAssemblyAI",
    "Faults",
    "FrameRecord",
    "SessionParams",
    "SessionRecord",
    "TokenRequest",
    "load_speech_references",
]

API_KEY: Final = "fake-assemblyai-key-0123456789abcdef"
SPEECH_DIR: Final = Path(__file__).resolve().parent / "data" / "speech"
RATE_SLACK_S: Final = 0.3
RATE_SLACK_FRACTION: Final = 0.02
_TCP_ESTABLISHED: Final = 1     # Linux tcp_states.h
_INDEX_CACHE: dict[tuple[tuple[str, str, str], ...], ReferenceIndex] = {}


@dataclass(slots=True)
class _Token:
    issued_at: float
    expires_in: int
    max_session: int
    used: bool = False


class FakeAssemblyAI:
    """The fake service; use as ``async with FakeAssemblyAI(...) as fake:``."""

    def __init__(
        self,
        references: Mapping[str, Reference] | None = None,
        *,
        api_key: str = API_KEY,
        time_scale: float = 1.0,
        expires_at_format: Literal["int", "iso"] = "int",
        allow_short_sessions: bool = False,
        max_session_seconds: int = 10_800,
        heartbeat_s: float | None = 5.0,
    ) -> None:
        self.api_key = api_key
        self.heartbeat_s = heartbeat_s
        self.time_scale = time_scale
        self.expires_at_format = expires_at_format
        self.allow_short_sessions = allow_short_sessions
        self.max_session_seconds = max_session_seconds
        self.index = _reference_index(references or {})
        self.faults = Faults()
        self.token_requests: list[TokenRequest] = []
        self.upgrade_requests: list[tuple[dict[str, str], int]] = []
        self.sessions: list[SessionRecord] = []
        self._tokens: dict[str, _Token] = {}
        self._changed = asyncio.Condition()
        self._server: Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            max_size=128 * 1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def token_url(self) -> str:
        """``http://127.0.0.1:<port>/v3/token``."""
        return f"http://127.0.0.1:{self.port}/v3/token"

    @property
    def streaming_url(self) -> str:
        """``ws://127.0.0.1:<port>/v3/ws``."""
        return f"ws://127.0.0.1:{self.port}/v3/ws"

    def expire_tokens(self) -> None:
        """Make every token minted so far unusable (as if its redemption window had passed)."""
        for token in self._tokens.values():
            token.issued_at = -1e18

    async def wait_for_session(self, index: int) -> SessionRecord:
        """Wait for the session with this 0-based index (in ``fake.sessions``) to exist."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]

    async def wait_for_token_requests(self, count: int) -> None:
        """Wait until ``count`` token requests have been answered."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.token_requests) >= count)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- HTTP side -------------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        if path == "/v3/token":
            status, body = self._mint(headers, parse_qs(urlsplit(request.path).query))
            await self._notify()
            injected = str(body.get("error", "")).startswith("Injected")
            if injected and self.faults.token_raw_body is not None:
                response = connection.respond(HTTPStatus(status), self.faults.token_raw_body)
                response.headers["Content-Type"] = "text/html"
                return response
            retry_after = self.faults.token_retry_after if status in (429, 503) else ""
            return _json_response(connection, status, body, retry_after)
        if path != "/v3/ws":
            return _json_response(connection, 404, {"error": f"Not found: {path}"})
        status = (
            self.faults.http_status_on_upgrade.pop(0) if self.faults.http_status_on_upgrade else 101
        )
        self.upgrade_requests.append((headers, status))
        await self._notify()
        if status != 101:
            return _json_response(connection, status, {"error": "Injected upgrade failure"})
        return None

    def _mint(
        self, headers: dict[str, str], params: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        status, body = self._mint_checked(headers, params)
        self.token_requests.append(TokenRequest(headers, params, status))
        return status, body

    def _mint_checked(
        self, headers: dict[str, str], params: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        if self.faults.token_status:
            status = self.faults.token_status.pop(0)
            return status, {"error": f"Injected failure ({status})"}
        key = headers.get("authorization")
        if key is None:
            return 401, {"error": "Missing Authorization header"}
        if key != self.api_key or self.faults.key_revoked:
            return 401, {"error": f"Invalid API key: {key}" if self.faults.echo_key
                         else "Invalid API key"}
        one = {k: v[-1] for k, v in params.items()}
        if "expires_in_seconds" not in one:
            return 400, {"error": "Missing required query parameter 'expires_in_seconds'"}
        low = 5 if self.allow_short_sessions else 60
        try:
            expires_in = parse_number(one, "expires_in_seconds", int, 1, 600)
            cap = self.max_session_seconds
            if "max_session_duration_seconds" in one:
                cap = parse_number(one, "max_session_duration_seconds", int, low, 10_800)
        except InputError as exc:
            return 400, {"error": str(exc)}
        token = "fake-token-" + secrets.token_urlsafe(24)
        self._tokens[token] = _Token(asyncio.get_running_loop().time(), expires_in, cap)
        return 200, {"token": token, "expires_in_seconds": expires_in}

    # ---- WebSocket side --------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        split = urlsplit(ws.request.path)
        record = SessionRecord(
            index=len(self.sessions),
            path=ws.request.path,
            _changed=self._changed,
            headers={k.lower(): v for k, v in ws.request.headers.raw_items()},
            query=parse_qs(split.query, keep_blank_values=True),
            _connection=ws,
        )
        self.sessions.append(record)
        await self._notify()
        try:
            await _Session(self, ws, record).run()
        except ConnectionClosed:
            pass
        finally:
            record.closed = True
            if not record.closed_by:
                record.closed_by = "client"
            if record.close_code is None:
                record.close_code = ws.close_code if record.closed_by != "abort" else 1006
                record.close_reason = ws.close_reason or ""
            await self._notify()

    def _authenticate(self, record: SessionRecord) -> tuple[str, int] | str:
        """Return ``(auth kind, session cap in s)`` or the reason for refusing."""
        token = record.query.get("token", [None])[-1]
        kind = "token-query"
        header = record.headers.get("authorization")
        if token is None and header == self.api_key:
            if self.faults.key_revoked:
                return "Invalid API key"
            return "key-header", self.max_session_seconds
        if token is None and header is not None:
            token, kind = header, "token-header"
        if token is None:
            return "Missing Authorization header"
        info = self._tokens.get(token)
        if info is None:
            return "Invalid token"
        if info.used:
            return "Token already used"
        info.used = True
        elapsed = (asyncio.get_running_loop().time() - info.issued_at) * self.time_scale
        if elapsed > info.expires_in:
            return "Signature has expired"
        if self.faults.key_revoked:
            return "Invalid API key"
        return kind, info.max_session


class _Session:
    """Runs one WebSocket session of the fake."""

    def __init__(self, fake: FakeAssemblyAI, ws: ServerConnection, record: SessionRecord) -> None:
        self.fake, self.ws, self.record = fake, ws, record
        self.loop = asyncio.get_running_loop()
        self.turns: TurnBuilder | None = None
        self.faults: list[SessionFault] = []
        self.deaf = False                   # a "deaf" fault fired: audio is discarded
        self.began = 0.0
        self.speech_probability = 0.0       # since the last Heartbeat (loud audio: 0.99)

    async def run(self) -> None:
        auth = self.fake._authenticate(self.record)
        if isinstance(auth, str):
            await self.close(1008, f"Unauthorized Connection: {auth}")
            return
        self.record.auth, cap = auth
        if self.fake.faults.reject_handshake:
            code = self.fake.faults.reject_handshake.pop(0)
            await self.close(code, CLOSE_REASONS.get(code, "Rejected by the fake"))
            return
        try:
            params = SessionParams.parse(self.record.query)
        except InputError as exc:
            await self.fail(3006, f"User Input Validation Error: {exc}")
            return
        self.record.params = params
        self.turns = TurnBuilder(self.fake.index, params.turns)
        self.turns.abandon = self.fake.faults.abandon_turns
        if self.fake.faults.session_faults:
            self.faults = [self.fake.faults.session_faults.pop(0)]
        await self.begin(cap)
        timers = [asyncio.create_task(self.expire_after(cap / self.fake.time_scale))]
        if params.session_heartbeat and self.fake.heartbeat_s is not None:
            timers.append(asyncio.create_task(self.heartbeats(self.fake.heartbeat_s)))
        try:
            await self.trigger_faults()
            async for message in self.ws:
                if not await (
                    self.on_audio(message) if isinstance(message, bytes) else self.on_text(message)
                ):
                    return
        finally:
            for timer in timers:
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer

    async def begin(self, cap: int) -> None:
        if self.fake.faults.begin_delay_s:     # a slow service, not test synchronisation
            await asyncio.sleep(self.fake.faults.begin_delay_s.pop(0))
        self.began = self.loop.time()
        self.record.began_at = self.began
        expiry = time.time() + cap / self.fake.time_scale
        expires_at: int | str = int(expiry)
        if self.fake.expires_at_format == "iso":
            expires_at = datetime.fromtimestamp(expiry, UTC).isoformat(timespec="milliseconds")
        self.record.id, self.record.expires_at = str(uuid.uuid4()), expires_at
        assert self.record.params is not None
        model = self.record.params.speech_model or "universal-streaming-english"
        await self.send(
            {
                "type": "Begin",
                "id": self.record.id,
                "expires_at": expires_at,
                "configuration": {"model": model, "mode": None, "api_version": None},
            }
        )

    def elapsed(self) -> float:
        """Seconds since ``Begin`` in the fake's (scaled) time."""
        return (self.loop.time() - self.began) * self.fake.time_scale

    async def expire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        with contextlib.suppress(ConnectionClosed):
            await self.fail(3008, CLOSE_REASONS[3008])

    async def heartbeats(self, every_s: float) -> None:
        """``Heartbeat`` every ``every_s`` (fake time) until the session ends or goes deaf."""
        while True:
            await asyncio.sleep(every_s / self.fake.time_scale)
            if self.deaf:       # a stuck service: the heartbeat stops with everything else
                return
            received, duration = self.record.audio_ms, self.elapsed() * 1000
            with contextlib.suppress(ConnectionClosed):
                await self.send({
                    "type": "Heartbeat",
                    "total_audio_received_ms": round(received),
                    "total_duration_ms": round(duration),
                    "realtime_factor": round(received / duration, 4) if duration else 0.0,
                    "max_speech_probability": self.speech_probability,
                })
            self.speech_probability = 0.0

    async def on_audio(self, data: bytes) -> bool:
        assert self.record.params is not None
        assert self.turns is not None
        params = self.record.params
        width = 2 if params.encoding == "pcm_s16le" else 1
        duration_ms = len(data) / width / params.sample_rate * 1000
        self.record.frames.append(
            FrameRecord(len(data), duration_ms, self.loop.time() - self.began)
        )
        self.record.audio += data
        await self.fake._notify()           # ``wait_for`` wakes on every frame too
        if not 50 <= duration_ms <= 1000:
            return await self.fail(
                3007,
                f"Input duration violation: {duration_ms:.0f} ms. Expected between 50 and 1000 ms",
            )
        elapsed, sent_s = self.elapsed(), self.record.audio_ms / 1000
        if sent_s > elapsed * (1 + RATE_SLACK_FRACTION) + RATE_SLACK_S:
            return await self.fail(
                3007,
                "Audio Transmission Rate Exceeded: "
                f"Received {sent_s:.1f} sec. audio in {elapsed:.1f} sec",
            )
        if self.deaf:
            return True
        if params.encoding == "pcm_s16le" and params.sample_rate == 16_000:
            samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.int16)
            if samples.size and int(np.abs(samples.astype(np.int32)).max()) > 1000:
                self.speech_probability = 0.99
            messages = self.turns.feed(samples)
        else:
            messages = self.turns.skip(round(duration_ms * 16))
        for message in messages:
            await self.send(message)
        return await self.trigger_faults()

    async def trigger_faults(self) -> bool:
        """Fire the armed faults whose audio threshold is reached; False when the session ended."""
        while self.faults and self.faults[0].after_audio_ms <= self.record.audio_ms:
            fault = self.faults.pop(0)
            if fault.kind == "drop":
                self.record.abort()
                return False
            if fault.kind == "error":
                return await self.fail(fault.code, fault.message)
            if fault.kind == "deaf":
                self.deaf = True
                continue
            if fault.kind == "stall":           # read nothing more: websockets stops reading
                await self.ws.wait_closed()     # the socket once its queue is full
                return False
            if fault.kind == "freeze":
                self.deaf = True                # the heartbeats stop too
                await self.frozen()
                return False
            await self.ws.send(fault.payload)
            self.record.sent.append(fault.payload)
            await self.fake._notify()
        return True

    async def frozen(self) -> None:
        """Read and send nothing until the client drops the connection, then drop it too.

        Reading stops (as for a stall), so the client's FIN or RST is not read either: it is
        seen in the kernel's TCP state, looked at every 50 ms. Without that the session stayed
        open, unread, until the fake's own close gave up on it 10 s later.
        """
        sock = self.ws.transport.get_extra_info("socket")
        closed = asyncio.ensure_future(self.ws.wait_closed())
        try:
            while not closed.done() and _tcp_state(sock) == _TCP_ESTABLISHED:
                await asyncio.wait([closed], timeout=0.05)
        finally:
            closed.cancel()
        self.ws.transport.abort()
        await self.ws.wait_closed()

    async def on_text(self, text: str) -> bool:
        self.record.texts.append(text)
        await self.fake._notify()
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            return await self.fail(3006, f"Invalid JSON: {exc.msg} at position {exc.pos}")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return await self.fail(3006, "Invalid Message: expected an object with a 'type'")
        return await self.on_control(message)

    async def on_control(self, message: dict[str, Any]) -> bool:
        assert self.turns is not None
        assert self.record.params is not None
        kind = message["type"]
        if kind == "Terminate":
            return await self.terminate()
        if kind == "ForceEndpoint":
            for turn in self.turns.end_turn():
                await self.send(turn)
        elif kind == "UpdateConfiguration":
            try:
                apply_turn_settings(self.turns.settings, message)
                if "keyterms_prompt" in message:
                    self.record.params.keyterms_prompt = parse_keyterms(message["keyterms_prompt"])
            except InputError as exc:
                return await self.fail(3006, f"User Input Validation Error: {exc}")
        elif kind != "KeepAlive":
            return await self.fail(3006, f"Invalid Message Type: {kind}")
        return True

    async def terminate(self) -> bool:
        assert self.turns is not None
        if self.fake.faults.no_termination or self.deaf:
            return True
        if self.fake.faults.termination_delay_s:    # a slow service, not test synchronisation
            await asyncio.sleep(self.fake.faults.termination_delay_s)
        if not self.fake.faults.termination_without_finals:
            for turn in self.turns.end_turn():
                await self.send(turn)
        if self.fake.faults.close_without_termination:
            await self.close(1000, "")
            return False
        await self.send(
            {
                "type": "Termination",
                "audio_duration_seconds": round(self.record.audio_ms / 1000),
                "session_duration_seconds": round(self.elapsed()),
            }
        )
        await self.close(1000, "")
        return False

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))
        self.record.sent.append(message)
        await self.fake._notify()

    async def fail(self, code: int, error: str) -> bool:
        """Send an ``Error`` frame and close with the same code; returns False (session over)."""
        await self.send({"type": "Error", "error_code": code, "error": error})
        await self.close(code, error)
        return False

    async def close(self, code: int, reason: str) -> None:
        if len(reason.encode()) > 123:
            reason = "See Error message for details"
        self.record.close_code, self.record.close_reason = code, reason
        self.record.closed_by = "server"
        await self.ws.close(code, reason)


def _tcp_state(sock: socket.socket | None) -> int:
    """The kernel's state of a TCP socket (Linux ``TCP_INFO``); -1 when it has none."""
    if sock is None:
        return -1
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return -1


def _json_response(connection: ServerConnection, status: int, body: dict[str, Any],
                   retry_after: str = "1") -> Response:
    response = connection.respond(HTTPStatus(status), json.dumps(body))
    response.headers["Content-Type"] = "application/json"
    if status in (429, 503) and retry_after:
        response.headers["Retry-After"] = retry_after
    return response


def _reference_index(references: Mapping[str, Reference]) -> ReferenceIndex:
    """Build (or reuse) the content index of these references; building costs ~0.3 s for all."""
    key = tuple(
        (name, text, hashlib.sha1(np.ascontiguousarray(samples).tobytes()).hexdigest())
        for name, (samples, text) in references.items()
    )
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = ReferenceIndex(references)
    return _INDEX_CACHE[key]
