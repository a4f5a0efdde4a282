"""Run the real ``transcribed`` command as a child process against local test servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import REPO, TRANSCRIBED
from tests.fake_assemblyai import FakeAssemblyAI


def fake_engine_tables(fake: FakeAssemblyAI, *assemblyai: str) -> str:
    """``[transcriber]`` and ``[assemblyai]`` pointing at ``fake`` (and more assemblyai keys)."""
    more = "\n".join(assemblyai)
    return f"""
[transcriber]
engine = "assemblyai"

[assemblyai]
api_key = "{fake.api_key}"
streaming_url = "{fake.streaming_url}"
token_url = "{fake.token_url}"
{more}
"""


def cloud_config(
    tmp_path: Path, fake: FakeAssemblyAI, wav: Path | None, *, extra: str = "",
    sinks: str | None = None,
) -> Path:
    """A config streaming ``wav`` (or the microphone) to the fake, turns to ``turns.jsonl``."""
    source = f'source = "file"\npath = "{wav}"' if wav else 'source = "microphone"'
    sink_tables = sinks if sinks is not None else (
        f'[sinks.journal]\ntype = "file"\npath = "{tmp_path / "turns.jsonl"}"\n'
    )
    text = f"""
[audio]
{source}
{fake_engine_tables(fake, "connect_timeout = 5", "terminate_timeout = 5")}
[reconnect]
initial_delay = 0.05
max_delay = 0.2

[log]
format = "json"
level = "debug"

[state]
dir = "{tmp_path / "state"}"

{sink_tables}
{extra}
"""
    if "[http]" not in extra:
        text += "\n[http]\nenabled = false\n"     # tests that want the live view say so
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@dataclass
class Finished:
    """A finished daemon run."""

    code: int
    stdout: str
    stderr: str

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines (stderr)."""
        out = []
        for line in self.stderr.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log lines with this event name."""
        return [line for line in self.logs() if line.get("event") == name]


class Daemon:
    """A running ``transcribed`` child process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Daemon:
        """Start ``transcribed ARGS`` with stdout and stderr captured."""
        process = await asyncio.create_subprocess_exec(
            *TRANSCRIBED, *args, cwd=REPO, env={**os.environ, **(env or {})},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal."""
        self.process.send_signal(signum)

    async def kill_if_running(self) -> None:
        """Kill it if it has not exited (a test's ``finally``: no process outlives its test)."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def finish(self, limit_s: float = 60) -> Finished:
        """Wait for exit (killing it after ``limit_s``) and collect its output."""
        try:
            async with asyncio.timeout(limit_s):
                out, err = await self.process.communicate()
        except TimeoutError:
            self.process.kill()
            out, err = await self.process.communicate()
            message = f"daemon did not exit within {limit_s} s:\n{err.decode()}"
            raise AssertionError(message) from None
        assert self.process.returncode is not None
        return Finished(self.process.returncode, out.decode(), err.decode())


async def run_daemon(*args: str, limit_s: float = 60, env: dict[str, str] | None = None
                     ) -> Finished:
    """Run ``transcribed ARGS`` to completion."""
    daemon = await Daemon.start(*args, env=env)
    return await daemon.finish(limit_s)


def read_turns(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file sink."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
