"""Microphone recovery on a private virtual mic: a suspended source and a vanished server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.audio import MicrophoneSource
from daemon.errors import AudioError
from daemon.events import AudioChunk
from daemon.health import Heartbeat
from tests.vmic import SINK, SOURCE, VirtualMic


class LogEvents:
    """Routes structlog events into a list and wakes waiters (reset by the conftest fixture)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        structlog.configure(processors=[self._collect])

    def _collect(self, _logger: Any, _name: str,
                 event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        self.events.append(dict(event))
        self._loop.call_soon_threadsafe(self._wake.set)
        raise structlog.DropEvent

    def _find(self, name: str, after: int) -> tuple[int, dict[str, Any]] | None:
        for index in range(after, len(self.events)):
            if self.events[index]["event"] == name:
                return index, self.events[index]
        return None

    async def wait(self, name: str, *, after: int = 0) -> tuple[int, dict[str, Any]]:
        """The first event ``name`` at index ≥ ``after`` (waits for it)."""
        while (found := self._find(name, after)) is None:
            self._wake.clear()
            if (found := self._find(name, after)) is not None:
                break
            await self._wake.wait()
        return found


@pytest.fixture(scope="module")
def private_mic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualMic]:
    """A virtual mic of our own: these tests suspend it and kill its server."""
    with VirtualMic.running(tmp_path_factory.mktemp("recovery-mic")) as mic:
        yield mic


@pytest.fixture
async def capture(private_mic: VirtualMic) -> AsyncIterator[tuple[MicrophoneSource, Chunks]]:
    """A recovering microphone source on the private mic, consumed by a background task."""
    with private_mic.activated():
        source = MicrophoneSource(stall_seconds=0.5, heartbeat=Heartbeat("capture"))
        async with source:
            chunks = Chunks()
            task = asyncio.create_task(chunks.consume(source))
            try:
                yield source, chunks
            finally:
                source.stop()
                async with asyncio.timeout(10):
                    await task


class Chunks:
    """What the source yielded, with a wake-up per chunk."""

    def __init__(self) -> None:
        self.items: list[AudioChunk] = []
        self._changed = asyncio.Condition()

    async def consume(self, source: MicrophoneSource) -> None:
        async for chunk in source.chunks():
            self.items.append(chunk)
            async with self._changed:
                self._changed.notify_all()

    async def more_than(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.items) > n)


async def _pactl(mic: VirtualMic, *args: str) -> None:
    process = await asyncio.create_subprocess_exec("pactl", *args, env=mic.env())
    assert await process.wait() == 0


async def test_suspended_source_is_reopened(private_mic: VirtualMic,
                                            capture: tuple[MicrophoneSource, Chunks]) -> None:
    """A suspend (as on laptop sleep) stalls capture; it is reopened and the gap is logged."""
    logs = LogEvents()
    source, chunks = capture
    async with asyncio.timeout(20):
        await chunks.more_than(2)
        await _pactl(private_mic, "suspend-source", SOURCE, "1")
        lost, _ = await logs.wait("audio.device_lost")
        assert source.recovering or source.recoveries == 1
        await _pactl(private_mic, "suspend-source", SOURCE, "0")
        _, recovered = await logs.wait("audio.device_recovered", after=lost)
        seen = len(chunks.items)
        await chunks.more_than(seen + 2)
    assert recovered["gap_s"] > 0.25 and source.recoveries >= 1 and not source.recovering
    assert source.heartbeat.overdue() == 0


async def test_vanished_server_is_waited_for(private_mic: VirtualMic,
                                             capture: tuple[MicrophoneSource, Chunks]) -> None:
    """The sound server dies: reopen fails with backoff until it is back, then capture resumes."""
    logs = LogEvents()
    source, chunks = capture
    async with asyncio.timeout(30):
        await chunks.more_than(2)
        await asyncio.to_thread(private_mic.stop)
        lost, _ = await logs.wait("audio.device_lost")
        failed, failure = await logs.wait("audio.reopen_failed", after=lost)
        assert "no default audio input device" in failure["error"]
        await asyncio.to_thread(private_mic.start)
        _, recovered = await logs.wait("audio.device_recovered", after=failed)
        seen = len(chunks.items)
        await chunks.more_than(seen + 2)
    assert recovered["gap_s"] > 0.25 and source.recoveries >= 1


async def _modules(mic: VirtualMic) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        "pactl", "list", "short", "modules", env=mic.env(), stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    return [line.split()[0] for line in out.decode().splitlines()
            if "null-sink" in line or "remap-source" in line]


async def test_unopenable_device_is_an_error_without_library_noise(
        private_mic: VirtualMic, capfd: pytest.CaptureFixture[str]) -> None:
    """Every source unloaded (a USB mic pulled): the 'default' device still lists but cannot
    open; that is one AudioError, and ALSA/PortAudio print nothing on stderr (the log stream),
    as on every reopen attempt while the device is away."""
    for module in sorted(await _modules(private_mic), key=int, reverse=True):
        await _pactl(private_mic, "unload-module", module)
    try:
        with private_mic.activated(), pytest.raises(AudioError, match=r"'default'.*no 16-bit"):
            async with MicrophoneSource():
                pass
        err = capfd.readouterr().err
        assert "ALSA lib" not in err and "Expression" not in err, err
    finally:
        await _pactl(private_mic, "load-module", "module-null-sink", f"sink_name={SINK}",
                     "rate=16000", "channels=1", "format=s16le", "norewinds=1")
        await _pactl(private_mic, "load-module", "module-remap-source", f"source_name={SOURCE}",
                     f"master={SINK}.monitor", "rate=16000", "channels=1", "format=s16le")
        await _pactl(private_mic, "set-default-source", SOURCE)


def test_file_source_is_not_reopened(tmp_path: Path) -> None:
    """Only the microphone recovers: the file source has no reopen path at all."""
    from daemon.audio import WavFileSource

    assert not hasattr(WavFileSource(tmp_path / "x.wav"), "recover")
