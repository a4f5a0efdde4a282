"""``transcribed tail`` as a child process: under a pseudo-terminal, as JSON lines, and failing."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pty
import signal
import socket
import sys
import termios
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from websockets.asyncio.server import ServerConnection, serve

from daemon.events import TurnRecord
from daemon.live import LiveHub
from tests.conftest import REPO
from tests.live_helpers import began, live_server, partial, turn

CLEAR = "\r\x1b[2K"
_RUN_TAIL = ("import sys; from daemon.tail import tail_main; "
             "sys.exit(tail_main(sys.argv[1], sys.argv[2], sys.argv[3] == 'json', "
             "sys.argv[4:] == ['retry']))")


# A helper thread that, once a byte arrives on stdin, sends SIGINT to itself (not to the main
# thread): what the kernel may do with a Ctrl-C when the process has more than one thread.
_SIGINT_FROM_THREAD = (
    "import signal, sys, threading\n"
    "def _poke():\n"
    "    sys.stdin.buffer.read(1)\n"
    "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
    "threading.Thread(target=_poke, daemon=True).start()\n"
)


class Terminal:
    """A child process on a pseudo-terminal, with everything it writes collected."""

    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self.process = process
        self.master = master
        self.output = ""
        self._grew = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
        self.output += data.decode(errors="replace")
        self._grew.set()

    async def wait_for(self, text: str, limit_s: float = 10) -> None:
        """Wait until ``text`` has been written."""
        async with asyncio.timeout(limit_s):
            while text not in self.output:
                self._grew.clear()
                await self._grew.wait()


@asynccontextmanager
async def tail_on_terminal(url: str, token: str = "", mode: str = "text"
                           ) -> AsyncIterator[Terminal]:
    """Run tail with its stdout and stderr on a fresh pseudo-terminal, 100 columns wide."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # keep "\n" as written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    env = {**os.environ, "COLUMNS": "100", "LINES": "30", "NO_COLOR": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_TAIL, url, token, mode, cwd=REPO, env=env,
        stdin=slave, stdout=slave, stderr=slave,
    )
    os.close(slave)
    terminal = Terminal(process, master)
    try:
        yield terminal
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        asyncio.get_running_loop().remove_reader(master)
        os.close(master)


class TestTerminal:
    async def test_partial_rewritten_then_committed(self) -> None:
        """On a terminal the partial is rewritten in place and the final committed as a line."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub) as server, tail_on_terminal(server.url) as term:
            await term.wait_for("· connecting — assemblyai\n")
            hub.session_started(began())
            await term.wait_for("· live — assemblyai, session sess-0001-ab\n")
            hub.partial(partial(0, "the quick"))
            await term.wait_for(CLEAR + " " * 9 + "the quick")
            hub.partial(partial(0, "the quick brown fox"))
            await term.wait_for(CLEAR + " " * 9 + "the quick brown fox")
            hub.turn(turn(0, "The quick brown fox."))
            final = CLEAR + _clock_of(turn(0, "x")) + " The quick brown fox.\n"
            await term.wait_for(final)
            assert term.output.count("\n") == 3  # two state lines and one committed turn
            term.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
            async with asyncio.timeout(10):
                assert await term.process.wait() == 0

    async def test_long_partial_never_wraps(self) -> None:
        """A partial longer than the terminal shows its newest words on one line."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub) as server, tail_on_terminal(server.url) as term:
            await term.wait_for("· connecting")
            words = " ".join(f"word{i}" for i in range(40))
            hub.partial(partial(0, words))
            await term.wait_for("word39")
            line = term.output.rsplit(CLEAR, 1)[1]
            assert line.startswith(" " * 9 + "…") and len(line) <= 99

    async def test_wide_characters_never_wrap(self) -> None:
        """A partial in a script whose characters take two columns still fits on one line: a
        wrapped partial leaves its first half on screen at every rewrite."""
        hub = LiveHub(engine="local")
        async with live_server(hub) as server, tail_on_terminal(server.url) as term:
            await term.wait_for("· connecting")
            text = "".join(chr(0x4E00 + i) for i in range(80)) + "終"   # 81 wide = 162 columns
            hub.partial(partial(0, text))
            await term.wait_for("終")
            line = term.output.rsplit(CLEAR, 1)[1]
            columns = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)
            assert line.startswith(" " * 9 + "…") and columns <= 99


def _clock_of(record: TurnRecord) -> str:
    return record.started_at.astimezone().strftime("%H:%M:%S")


class TestPipes:
    async def test_json_lines(self) -> None:
        """With --json every event is one JSON line on stdout."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub) as server:
            process = await _piped_tail(server.url, "json")
            assert process.stdout is not None
            async with asyncio.timeout(10):
                first = json.loads(await process.stdout.readline())
                assert first["type"] == "state"
                hub.partial(partial(0, "hello wor"))
                hub.turn(turn(0, "Hello world."))
                second = json.loads(await process.stdout.readline())
                third = json.loads(await process.stdout.readline())
            assert (second["type"], second["transcript"]) == ("partial", "hello wor")
            assert third == {"type": "turn", **turn(0, "Hello world.").to_dict()}
            process.send_signal(signal.SIGINT)
            _out, err = await process.communicate()
            assert process.returncode == 0 and err == b""

    async def test_ctrl_c_caught_by_another_thread(self) -> None:
        """SIGINT delivered to a thread other than the main one still ends tail at once.

        Linux hands a process's signal to any thread; the loop must wake for it even when it
        lands on, say, the resolver's executor thread (a flaky hang before the fix).
        """
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub) as server:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _SIGINT_FROM_THREAD + _RUN_TAIL, server.url, "", "json",
                cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert process.stdin is not None and process.stdout is not None
            async with asyncio.timeout(10):
                assert json.loads(await process.stdout.readline())["type"] == "state"
            process.stdin.write(b"!")          # the helper thread signals itself now
            await process.stdin.drain()
            async with asyncio.timeout(5):      # well before the feed's 20 s keepalive ping
                _out, err = await process.communicate()
        assert process.returncode == 0 and err == b""

    async def test_closed_pipe_is_a_quiet_exit(self) -> None:
        """``tail --json | head -1``: when the reader goes away tail exits 0, saying nothing."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub) as server:
            reader, writer = os.pipe()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RUN_TAIL, server.url, "", "json", cwd=REPO,
                stdout=writer, stderr=asyncio.subprocess.PIPE,
            )
            os.close(writer)
            with os.fdopen(reader, "rb") as out:
                async with asyncio.timeout(10):
                    assert json.loads(await asyncio.to_thread(out.readline))["type"] == "state"
            hub.turn(turn(0, "Nobody reads this."))        # the write that finds the pipe closed
            async with asyncio.timeout(10):
                _out, err = await process.communicate()
        assert process.returncode == 0 and err == b""

    async def test_daemon_stopping_ends_tail(self) -> None:
        """When the daemon stops, tail says so and exits 0."""
        hub = LiveHub()
        async with live_server(hub) as server:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RUN_TAIL, server.url, "", "text", cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            assert process.stderr is not None
            async with asyncio.timeout(10):
                assert b"connecting" in await process.stderr.readline()
        async with asyncio.timeout(10):
            _out, err = await process.communicate()
        assert process.returncode == 0
        assert err.decode().splitlines()[-1] == "transcribed tail: the daemon stopped"


class TestRetry:
    async def test_waits_for_the_daemon_and_follows_it_across_a_restart(self) -> None:
        """``--retry``: no daemon yet, one line and wait; a daemon, its turns; it stops and a
        new one starts on the same port: one line, reconnected, a turn shown before (the feed
        replays its last turns) not shown twice."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RUN_TAIL, f"http://127.0.0.1:{port}", "", "text", "retry",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        out, err = process.stdout, process.stderr
        async with asyncio.timeout(20):
            assert (await err.readline()).decode().endswith(
                "(is `transcribed run` running with http.enabled?); waiting for it (--retry)\n")
            first = LiveHub()
            first.turn(turn(0, "First."))
            async with live_server(first, listen=f"127.0.0.1:{port}"):
                assert (await out.readline()).decode().endswith(" First.\n")
            assert (await _line_with(err, b"the daemon stopped")).endswith(
                b"the daemon stopped; waiting for it (--retry)\n")
            second = LiveHub()
            second.turn(turn(0, "First."))          # the restarted daemon's feed replays it
            second.turn(turn(1, "Second."))
            async with live_server(second, listen=f"127.0.0.1:{port}"):
                assert (await out.readline()).decode().endswith(" Second.\n")
                process.send_signal(signal.SIGINT)
                rest, _ = await process.communicate()
        assert process.returncode == 0 and rest == b""

    async def test_a_feed_that_closes_at_once_is_no_tight_loop(self) -> None:
        """A server that accepts, sends its state and closes at once: attempts at least 0.25 s
        apart, one line for the outage (on stderr in --json mode too). (It was ~1000 attempts
        and lines a second: a connection that opened reset the backoff, whose first wait is
        none.)"""
        arrivals: list[float] = []
        loop = asyncio.get_running_loop()

        async def close_at_once(ws: ServerConnection) -> None:
            arrivals.append(loop.time())
            await ws.send(json.dumps({"type": "state", "connection": "live"}))
            await ws.close()

        async with serve(close_at_once, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RUN_TAIL, f"http://127.0.0.1:{port}", "", "json", "retry",
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            assert process.stdout is not None
            async with asyncio.timeout(20):     # its state, each time (4 connections)
                shown = [json.loads(await process.stdout.readline()) for _ in range(4)]
                process.send_signal(signal.SIGINT)
                _out, err = await process.communicate()
        assert process.returncode == 0 and {e["connection"] for e in shown} == {"live"}
        assert len(arrivals) >= 4
        assert all(b - a >= 0.2 for a, b in itertools.pairwise(arrivals)), arrivals
        assert err.decode().splitlines() == [
            "transcribed tail: the daemon stopped; waiting for it (--retry)"]

    async def test_a_refused_token_still_ends_it(self) -> None:
        """Retrying cannot fix a wrong token: one line, exit 1."""
        async with live_server(LiveHub(), token="right-token") as server:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RUN_TAIL, server.url, "wrong-token", "text", "retry",
                cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(15):
                _out, err = await process.communicate()
        assert process.returncode == 1 and err.count(b"\n") == 1
        assert b"refused the token (check http.token)" in err


async def _line_with(stream: asyncio.StreamReader, text: bytes) -> bytes:
    """The next line of ``stream`` that contains ``text``."""
    while text not in (line := await stream.readline()):
        assert line, f"{text!r} never came"
    return line


class TestFailures:
    async def test_unreachable(self) -> None:
        """No daemon listening: one clear line on stderr, exit 1."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        code, err = await _run_tail(f"http://127.0.0.1:{port}", "")
        assert code == 1
        assert err.count("\n") == 1
        assert err.startswith(f"transcribed tail: cannot reach the daemon at "
                              f"ws://127.0.0.1:{port}/events: ")
        assert err.endswith("(is `transcribed run` running with http.enabled?)\n")

    async def test_wrong_token(self) -> None:
        """A refused token: one line naming http.token, exit 1, the token not echoed."""
        async with live_server(LiveHub(), token="right-token") as server:
            code, err = await _run_tail(server.url, "wrong-token")
        assert code == 1 and err.count("\n") == 1
        assert "refused the token (check http.token)" in err and "wrong-token" not in err


    async def test_feed_that_is_not_events(self) -> None:
        """A server on the feed that sends something else: one line, exit 1 (a traceback)."""
        async def garbage(ws: ServerConnection) -> None:
            await ws.send("not json at all")
            await ws.wait_closed()

        async with serve(garbage, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            code, err = await _run_tail(f"http://127.0.0.1:{port}", "")
        assert code == 1 and err.count("\n") == 1, err
        assert "sent something that is not an event: 'not json at all'" in err


class TestHostileText:
    async def test_escape_sequences_never_reach_the_terminal(self) -> None:
        """A transcript with terminal escapes (retitle, clear screen) is printed without them."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub) as server:
            process = await _piped_tail(server.url, "text")
            assert process.stdout is not None
            hub.turn(turn(0, "Hello \x1b]0;pwned\x07there\x1b[2J."))
            async with asyncio.timeout(10):
                line = (await process.stdout.readline()).decode()
            process.send_signal(signal.SIGINT)
            await process.communicate()
        assert line.endswith(" Hello ]0;pwnedthere[2J.\n") and "\x1b" not in line

    async def test_escape_sequences_in_a_close_reason(self) -> None:
        """Whatever closes the feed with escapes in its reason, the error line has none."""
        async def hostile(ws: ServerConnection) -> None:
            await ws.close(1011, "bye\x1b]0;pwned\x07\x1b[2J")

        async with serve(hostile, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            code, err = await _run_tail(f"http://127.0.0.1:{port}", "")
        assert code == 1 and err.count("\n") == 1, err
        assert "bye]0;pwned[2J" in err and "\x1b" not in err and "\x07" not in err


async def _piped_tail(url: str, mode: str) -> asyncio.subprocess.Process:
    """``tail`` (``mode``: "json" or "text") with stdout and stderr on pipes."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_TAIL, url, "", mode, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def _run_tail(url: str, token: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_TAIL, url, token, "text", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        _out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()
