"""Odd replies of the token endpoint (or a proxy in front of it), from raw servers on 127.0.0.1:
each is one short line naming what is wrong, never the API key, never a hang or a traceback."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from daemon.config import AssemblyAIConfig
from daemon.errors import ConfigError
from daemon.tokens import TokenError, TokenProvider
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references

KEY = "hunt-key-5f0c2a9e7b1d4c3a8e6f"
Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


def reply(status: str, body: bytes | str = b"", *headers: str) -> bytes:
    """A raw HTTP/1.1 reply (``status`` is the code and reason phrase)."""
    data = body.encode() if isinstance(body, str) else body
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(data)}", "", ""]
    return "\r\n".join(lines).encode() + data


def answers(raw: bytes) -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
    return handler


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A server that reads a request's head, then lets ``handler`` answer; yields its URL."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(writer)
        except (OSError, asyncio.IncompleteReadError):
            pass                                    # the client hung up: what we test
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v3/token"
    finally:
        server.close()


async def mint(url: str, connect_timeout: float = 10.0) -> str:
    config = AssemblyAIConfig(api_key=KEY, token_url=url, streaming_url="ws://127.0.0.1:9/v3/ws",
                              max_session_seconds=60, connect_timeout=connect_timeout)
    async with httpx.AsyncClient() as client, asyncio.timeout(connect_timeout + 5):
        return await TokenProvider(config, client).fresh()


async def failure(handler: Handler, kind: type[Exception] = TokenError) -> Exception:
    """What minting against ``handler`` raises: one printable line without the key."""
    async with raw_server(handler) as url:
        with pytest.raises(kind) as info:
            await mint(url)
    line = str(info.value)
    assert line.isprintable() and len(line) < 300, line
    assert KEY[:8] not in line, line
    return info.value


JSON = "Content-Type: application/json"


@pytest.mark.parametrize(("body", "named"), [
    ("<html>captive portal</html>", "body that is not JSON (text/html)"),
    ("[1, 2]", "JSON list, not an object"),
    (json.dumps({"expires_in_seconds": 60}), "without a 'token' field"),
    (json.dumps({"error": "quota"}), "without a 'token' field (error: quota)"),
    (json.dumps({"token": None}), "'token' that is null"),
    (json.dumps({"token": 12345}), "'token' that is int"),
    (json.dumps({"token": ""}), "'token' that is empty"),
    (json.dumps({"token": "ab c&x=1\r\nHost: evil"}), "spaces, control or non-ASCII"),
    (json.dumps({"token": "t" * 10_000}), "10000 characters long"),
    (json.dumps({"token": KEY}), "is the API key itself"),
])
async def test_200_without_a_usable_token(body: str, named: str) -> None:
    """A 200 that is not a token says what it is instead (the key itself is never sent in the
    socket's URL; a token that cannot be one is not tried against the service)."""
    kind = "text/html" if body.startswith("<") else "application/json"
    error = await failure(answers(reply("200 OK", body, f"Content-Type: {kind}")))
    assert named in str(error)
    assert not isinstance(error, TokenError) or not error.rejected


@pytest.mark.parametrize("status", ["200 OK", "401 Unauthorized", "503 Service Unavailable"])
async def test_deeply_nested_json_is_no_crash(status: str) -> None:
    """60,000 nested brackets made ``json`` raise RecursionError, through the daemon: exit 1."""
    error = await failure(answers(reply(status, "[" * 60_000, JSON)))
    assert isinstance(error, TokenError)


async def test_key_echoed_and_cut_is_not_half_shown() -> None:
    """An error echoing the key past the 200th character was cut inside the key: the masker,
    which knows only the whole key, let its first half through."""
    body = json.dumps({"error": "x" * 160 + f" Invalid API key: {KEY}"})
    error = await failure(answers(reply("401 Unauthorized", body, JSON)))
    assert isinstance(error, TokenError) and error.rejected


@pytest.mark.parametrize(("status", "body", "kind"), [
    ("500 Internal Server Error", json.dumps({"error": "a\nb\x1b[31mc"}), TokenError),
    ("400 Bad Request", json.dumps({"error": "bad\nREADY=1"}), ConfigError),
    ("502 " + "R" * 3000, "", TokenError),
    (f"502 Bad Gateway for {KEY}", "", TokenError),
])
async def test_server_text_is_one_short_line(status: str, body: str,
                                            kind: type[Exception]) -> None:
    """The service's error and a reason phrase: printable (a newline split the exit message
    and the systemd STATUS= line), cut, the key masked."""
    await failure(answers(reply(status, body, JSON)), kind)


async def test_redirect_named_and_not_followed() -> None:
    """A redirect is not followed (the key would go along); the line says where it pointed,
    without the target's query or user info, and what to fix."""
    hits: list[bytes] = []

    async def elsewhere(writer: asyncio.StreamWriter) -> None:
        hits.append(b"request")
        writer.write(reply("200 OK", json.dumps({"token": "stolen"}), JSON))

    async with raw_server(elsewhere) as target:
        location = target.replace("http://", "http://user:pw@") + "?token=secret"
        error = await failure(answers(reply("301 Moved Permanently", "", f"Location: {location}")))
    line = str(error)
    assert f"a redirect to {target}: not followed" in line and "assemblyai.token_url" in line
    assert "pw" not in line and "secret" not in line and not hits


async def test_trickled_reply_is_bounded() -> None:
    """A reply trickled a byte at a time never tripped httpx's per-read timeout: the token
    request (and the daemon's reconnect loop) hung for ever. Now ``connect_timeout`` bounds
    the whole exchange."""
    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with raw_server(trickle) as url:
        with pytest.raises(TokenError, match=r"no complete answer within 0.5 s"):
            await mint(url, connect_timeout=0.5)


async def test_huge_reply_is_not_held() -> None:
    """A 50 MB "token" was read whole (and parsed twice): ~150 MB of memory, then sent in a URL.
    At most 64 KiB is read."""
    size = 50 * 1024 * 1024

    async def huge(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\n{JSON}\r\nContent-Length: {size + 13}\r\n\r\n".encode())
        writer.write(b'{"token": "')
        chunk = b"a" * 65536
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write(b'"}')

    tracemalloc.start()
    try:
        error = await failure(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "body over 65536 bytes" in str(error)
    assert peak < 8 * 1024 * 1024, peak


async def test_network_failures_say_what_failed() -> None:
    """"ConnectError" alone said neither refused, nor DNS, nor TLS: the cause is named."""
    async with raw_server(answers(b"")) as url:
        pass                                        # closed: nothing listens there any more
    with pytest.raises(TokenError, match=r"ConnectError: .*Connect call failed"):
        await mint(url)
    error = await failure(answers(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    assert "RemoteProtocolError: illegal status line" in str(error)


async def test_daemon_survives_a_nested_error_page(tmp_path: Path) -> None:
    """End to end: a proxy's error page of nested brackets crashed ``transcribed run`` (exit 1,
    RecursionError); now it is one ``stream.token_failed`` line, a retry, and no word lost."""
    speech = load_speech_references(SPEECH_DIR, "espeak-s1.wav")
    async with FakeAssemblyAI(speech) as fake:
        fake.faults.token_status = [502]
        fake.faults.token_raw_body = "[" * 60_000
        config = cloud_config(tmp_path, fake, SPEECH_DIR / "espeak-s1.wav")
        result = await run_daemon("run", "--config", str(config), limit_s=30)
    assert result.code == 0, result.stderr[-2000:]
    [failed] = result.events("stream.token_failed")
    assert failed["error"] == "token endpoint answered 502: Bad Gateway"
    turns = read_turns(tmp_path / "turns.jsonl")
    assert [t["transcript"] for t in turns] == [TRANSCRIPTS["espeak-s1.wav"]]


async def test_retry_after_with_a_year_beyond_the_calendar() -> None:
    """A date with year 3000000000 raised OverflowError out of ``retry_after_s``: a crash, not a
    retry. Now it is unreadable, and the backoff applies."""
    when = "Retry-After: Mon, 1 Jan 3000000000 00:00:00 GMT"
    error = await failure(answers(reply("429 Too Many Requests", "", when)))
    assert isinstance(error, TokenError) and error.retry_after is None


async def test_not_found_names_the_setting() -> None:
    """A 404 (a token_url with a wrong path, e.g. /v2/token) is retried like any failure, but
    the line says which setting to check."""
    error = await failure(answers(reply("404 Not Found", json.dumps({"error": "Not found"}), JSON)))
    assert str(error) == "token endpoint answered 404: Not found; check assemblyai.token_url"


def gzipped(*parts: bytes, repeat: int = 1) -> bytes:
    """``parts`` gzip-compressed, the middle one ``repeat`` times (never all in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [packer.compress(parts[0])]
    out += [packer.compress(parts[1]) for _ in range(repeat)]
    out += [packer.compress(parts[2]), packer.flush()]
    return b"".join(out)


async def test_gzipped_token_is_read() -> None:
    """A server (or proxy) that compresses anyway, though identity is asked for, still works."""
    body = gzipped(b'{"token": "', b"tok-123", b'"}')
    async with raw_server(answers(reply("200 OK", body, JSON, "Content-Encoding: gzip"))) as url:
        assert await mint(url) == "tok-123"


async def test_gzip_bomb_is_not_inflated() -> None:
    """200 KB of gzip that inflate to 200 MB: httpx inflated each 64 KiB chunk whole (~150 MB
    at once); the cap now holds for the inflated bytes."""
    body = gzipped(b'{"token": "', b"a" * 1024 * 1024, b'"}', repeat=200)
    tracemalloc.start()
    try:
        error = await failure(answers(reply("200 OK", body, JSON, "Content-Encoding: gzip")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "body over 65536 bytes" in str(error)
    assert peak < 8 * 1024 * 1024, peak
