"""Ctrl-C where no command handles it yet: one line and exit 130, never a traceback."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.daemon_proc import Daemon


async def test_ctrl_c_during_test_sinks(tmp_path: Path) -> None:
    """``test-sinks`` waiting on a webhook that never answers, then Ctrl-C."""
    arrived, gone = asyncio.Event(), asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()                   # never answer; wait for the client to go
        writer.close()
        await writer.wait_closed()
        gone.set()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(f'[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:{port}/in"\n'
                      f'[state]\ndir = "{tmp_path / "state"}"\n')
    async with server:
        daemon = await Daemon.start("test-sinks", "--config", str(config))
        async with asyncio.timeout(20):
            await arrived.wait()
        daemon.signal(signal.SIGINT)
        result = await daemon.finish(20)
        async with asyncio.timeout(10):
            await gone.wait()
    assert result.code == 130, result.stderr
    assert result.stderr.splitlines()[-1] == "transcribed: interrupted"
    assert "Traceback" not in result.stderr
