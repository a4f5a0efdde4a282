"""Ctrl-C where no command handles it yet: one line and exit 130, never a traceback; once `run`
handles it, its clean stop (exit 0)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from tests.conftest import REPO, SPEECH_DIR
from tests.daemon_proc import Daemon, cloud_config, fake_engine_tables
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.mosquitto import free_port

# A third-party sink that says so to a local server and waits, blocking, for its answer:
# ``at = "build"`` in its factory (called by app.run, inside asyncio.run, before the daemon
# handles SIGINT itself); ``at = "exit"`` in a default-executor thread started once ``run``'s
# main task is done (asyncio.run waits for that thread as it winds down).
_HOLDING_SINK = """
import asyncio
import socket

from daemon.plugins import SinkConfig, SinkType, hookimpl


class HoldConfig(SinkConfig):
    port: int
    at: str = "build"


class HoldSink:
    def __init__(self, name, config, context):
        self.port = config.port
        if config.at == "build":
            self.hold("building")
        else:
            asyncio.current_task().add_done_callback(lambda _task: asyncio.get_running_loop()
                                                     .run_in_executor(None, self.hold, "exiting"))

    def hold(self, what):
        with socket.create_connection(("127.0.0.1", self.port)) as conn:
            conn.sendall(what.encode() + b"\\n")
            conn.recv(1)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        return None

    async def send(self, record):
        return None


@hookimpl
def transcribed_sink_types():
    return [SinkType("hold", HoldConfig, HoldSink)]
"""


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


def _install_holding_sink(site: Path) -> dict[str, str]:
    """The ``hold`` sink type as an installed entry point; the environment that finds it."""
    dist = site / "holdsink-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: holdsink\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[transcribed.sinks]\nhold = holdsink\n")
    (site / "holdsink.py").write_text(_HOLDING_SINK)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


@asynccontextmanager
async def holding_sink(
    tmp_path: Path, holder: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[tuple[dict[str, str], int]]:
    """The ``hold`` sink installed, and ``holder`` listening for it: (environment, port)."""
    env = _install_holding_sink(tmp_path / "site")
    server = await asyncio.start_server(holder, "127.0.0.1", 0)
    async with server:
        yield env, server.sockets[0].getsockname()[1]


class _Holder:
    """The server the ``hold`` sink waits on: ``reached`` when it waits, answers on ``answer``."""

    def __init__(self) -> None:
        self.reached, self.answer = asyncio.Event(), asyncio.Event()
        self.said: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.said.append(await reader.readline())
        self.reached.set()
        await self.answer.wait()
        writer.write(b"x")
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def test_ctrl_c_while_run_starts(tmp_path: Path) -> None:
    """``run`` inside asyncio.run but before its own SIGINT handler (its sinks being built),
    then Ctrl-C: asyncio.run cancels the start-up; one line and exit 130, not a clean exit 0."""
    holder = _Holder()
    async with holding_sink(tmp_path, holder) as (env, port), FakeAssemblyAI() as fake:
        config = tmp_path / "config.toml"
        config.write_text(
            f'[audio]\nsource = "file"\npath = "{SPEECH_DIR / "espeak-s1.wav"}"\n'
            f'{fake_engine_tables(fake)}\n[state]\ndir = "{tmp_path / "state"}"\n'
            f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[sinks.held]\ntype = "hold"\nport = {port}\n')
        daemon = await Daemon.start("run", "--config", str(config), env=env)
        try:
            async with asyncio.timeout(20):
                await holder.reached.wait()
            daemon.signal(signal.SIGINT)    # pending before the factory can return
            holder.answer.set()
            result = await daemon.finish(20)
        finally:
            await daemon.kill_if_running()
    assert holder.said == [b"building\n"]
    assert result.code == 130, result.stderr
    assert result.stderr.splitlines()[-1] == "transcribed: interrupted"
    assert "Traceback" not in result.stderr
    assert "daemon.stopped" not in result.stderr


async def test_ctrl_c_once_running_is_a_clean_stop(tmp_path: Path) -> None:
    """Ctrl-C once ``run`` is up and streaming is its graceful stop: drained, exit 0; another
    Ctrl-C after that stop, while asyncio.run winds down (waiting for a plugin's thread), does
    not turn it into an interruption (130)."""
    holder = _Holder()
    wav = SPEECH_DIR / "espeak-s2.wav"
    async with holding_sink(tmp_path, holder) as (env, port), \
            FakeAssemblyAI(load_speech_references(SPEECH_DIR, wav.name)) as fake:
        config = cloud_config(tmp_path, fake, wav, sinks=(
            f'[sinks.journal]\ntype = "file"\npath = "{tmp_path / "turns.jsonl"}"\n'
            f'[sinks.held]\ntype = "hold"\nport = {port}\nat = "exit"\n'))
        daemon = await Daemon.start("run", "--config", str(config), env=env)
        try:
            session = await asyncio.wait_for(fake.wait_for_session(0), 15)
            await asyncio.wait_for(session.wait_for(lambda s: s.audio_ms >= 500), 15)
            daemon.signal(signal.SIGINT)
            async with asyncio.timeout(20):
                await holder.reached.wait()     # run's main task is done: it stopped
            daemon.signal(signal.SIGINT)
            holder.answer.set()
            result = await daemon.finish(20)
        finally:
            await daemon.kill_if_running()
    assert holder.said == [b"exiting\n"]
    assert result.code == 0, result.stderr
    assert [e["signal"] for e in result.events("daemon.stopping")] == ["SIGINT"]
    assert result.events("daemon.stopped")
    assert "interrupted" not in result.stderr and "Traceback" not in result.stderr
