"""``transcribed tail`` with text its output cannot encode: lone surrogates, a narrow locale."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import REPO
from tests.test_tail import _RUN_TAIL

STARTED = "2026-11-23T23:10:01.120Z"
EVENTS: list[dict[str, Any]] = [
    {"type": "turn", "id": "s:0", "transcript": "half an emoji \ud83d here", "started_at": STARTED},
    {"type": "turn", "id": "s:1", "transcript": "Grüße, 終わり.", "started_at": STARTED},
    {"type": "turn", "id": "s:2", "transcript": "Plain.", "started_at": STARTED},
]


async def _tail_output(mode: str, encoding: str) -> tuple[int, str, str]:
    """Run tail against a feed that sends ``EVENTS`` (as the daemon does: JSON with its lone
    surrogates escaped) and then closes; stdout in ``encoding``."""
    async def feed(ws: ServerConnection) -> None:
        for event in EVENTS:
            await ws.send(json.dumps(event))
        await ws.close()

    async with serve(feed, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RUN_TAIL, f"http://127.0.0.1:{port}", "", mode, cwd=REPO,
            env={**os.environ, "PYTHONIOENCODING": encoding},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(15):
            out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(encoding), err.decode(encoding, "replace")


class TestUnencodableText:
    @pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
    async def test_text_lines(self, encoding: str) -> None:
        """Every turn is printed, what the output cannot carry replaced, and tail ends as usual.
        (It was a traceback at the first such turn, exit 1.)"""
        code, out, err = await _tail_output("text", encoding)
        assert code == 0, err
        assert err.splitlines() == ["transcribed tail: the daemon stopped"]
        lines = [line.split(" ", 1)[1] for line in out.splitlines()]
        if encoding == "utf-8":
            assert lines == ["half an emoji \ufffd here", "Grüße, 終わり.", "Plain."]
        else:
            assert lines == ["half an emoji ? here", "Gr??e, ???.", "Plain."]

    @pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
    async def test_json_lines(self, encoding: str) -> None:
        """--json prints each event as valid JSON that decodes to what the feed sent (escaped
        where the output cannot carry it). (It was a traceback at the first such event.)"""
        code, out, err = await _tail_output("json", encoding)
        assert code == 0, err
        assert [json.loads(line) for line in out.splitlines()] == EVENTS


async def test_closed_stdout_is_one_line() -> None:
    """``transcribed tail >&-`` (no standard output at all): one line on stderr and exit 1, not a
    traceback from the first write."""
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", 'exec "$@" >&-', "tail", sys.executable, "-c", _RUN_TAIL,
        "ws://127.0.0.1:9/events", "", "text", cwd=REPO, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _out, err = await process.communicate()
    assert process.returncode == 1
    assert err.decode() == ("transcribed tail: standard output is closed: nothing to show the "
                            "feed on\n")


async def test_a_daemon_at_its_connection_cap_is_not_called_absent() -> None:
    """The daemon cuts connections beyond its cap: tail says so, instead of asking whether
    ``transcribed run`` is running (it is)."""
    from daemon.live import LiveHub
    from tests.live_helpers import live_server
    from tests.test_tail import _run_tail

    async with live_server(LiveHub(), max_connections=1) as server:
        held = await asyncio.open_connection("127.0.0.1", server.port)
        code, err = await _run_tail(server.url, "")
        held[1].close()
    assert code == 1
    assert "is `transcribed run` running" not in err, err
    assert err.endswith("(the daemon cut the connection unanswered, as it does beyond 256 open "
                        "at once)\n"), err
