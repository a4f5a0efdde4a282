"""Microphone recovery on a private virtual mic: a suspended source and a vanished server."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.audio import MicrophoneSource, list_devices
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


async def _unload_sources(mic: VirtualMic) -> None:
    """Every source unloaded (a USB mic pulled, or not plugged in yet)."""
    for module in sorted(await _modules(mic), key=int, reverse=True):
        await _pactl(mic, "unload-module", module)


async def _load_sources(mic: VirtualMic) -> None:
    """The virtual mic's source back (a USB mic plugged in)."""
    if await _modules(mic):
        return
    await _pactl(mic, "load-module", "module-null-sink", f"sink_name={SINK}",
                 "rate=16000", "channels=1", "format=s16le", "norewinds=1")
    await _pactl(mic, "load-module", "module-remap-source", f"source_name={SOURCE}",
                 f"master={SINK}.monitor", "rate=16000", "channels=1", "format=s16le")
    await _pactl(mic, "set-default-source", SOURCE)


async def test_unopenable_device_is_an_error_without_library_noise(
        private_mic: VirtualMic, capfd: pytest.CaptureFixture[str]) -> None:
    """Every source unloaded (a USB mic pulled): the 'default' device still lists but cannot
    open; without recovery that is one AudioError, and ALSA/PortAudio print nothing on stderr
    (the log stream), as on every reopen attempt while the device is away."""
    await _unload_sources(private_mic)
    try:
        with private_mic.activated(), pytest.raises(AudioError, match=r"'default'.*no 16-bit"):
            async with MicrophoneSource(recover=False):
                pass
        err = capfd.readouterr().err
        assert "ALSA lib" not in err and "Expression" not in err, err
    finally:
        await _load_sources(private_mic)


async def test_device_missing_at_start_is_waited_for(
        private_mic: VirtualMic, capfd: pytest.CaptureFixture[str]) -> None:
    """No source when capture starts (a USB mic plugged in after login): the source waits
    for it (one warning per reason, each attempt a promise kept, no library noise), then
    opens it when it comes and audio flows."""
    logs = LogEvents()
    await _unload_sources(private_mic)
    beat = Heartbeat("capture")
    source = MicrophoneSource(stall_seconds=0.5, heartbeat=beat)
    try:
        with private_mic.activated():
            async with asyncio.timeout(30):
                entering = asyncio.create_task(source.__aenter__())
                _, waiting = await logs.wait("audio.device_waiting")
                assert source.waiting and source.recovering and beat.overdue() == 0
                await asyncio.to_thread(_wait_until, lambda: beat.beats >= 3, 20, "retrying")
                await _load_sources(private_mic)
                await entering
                opened, _ = await logs.wait("audio.device_opened")
                chunks = Chunks()
                task = asyncio.create_task(chunks.consume(source))
                await chunks.more_than(2)
                source.stop()
                await task
    finally:
        await source.__aexit__(None, None, None)
        await _load_sources(private_mic)
    assert "'default'" in waiting["error"] and "no 16-bit" in waiting["error"]
    assert waiting["device"] == "default" and "'default'" in waiting["available"]
    assert [e["event"] for e in logs.events[:opened]].count("audio.device_waiting") == 1
    err = capfd.readouterr().err
    assert "ALSA lib" not in err and "Expression" not in err, err
    assert not source.waiting and not source.recovering


async def test_stop_ends_the_wait_for_a_missing_device(private_mic: VirtualMic) -> None:
    """SIGTERM while the named device is waited for: stop() ends the wait at once, nothing is
    opened and the chunks simply end."""
    logs = LogEvents()
    with private_mic.activated():
        source = MicrophoneSource("no such microphone")
        async with asyncio.timeout(20):
            entering = asyncio.create_task(source.__aenter__())
            _, waiting = await logs.wait("audio.device_waiting")
            source.stop()
            await entering
            assert [chunk async for chunk in source.chunks()] == []
            await source.__aexit__(None, None, None)
    assert waiting["device"] == "no such microphone"
    assert "no audio input device matches 'no such microphone'" in waiting["error"]
    assert "'default'" in waiting["available"]
    assert source.device_info is None and not source.waiting
    assert source.heartbeat.overdue() == 0 and source.heartbeat.due is None


async def test_ambiguous_device_is_not_waited_for(private_mic: VirtualMic) -> None:
    """A name matching several devices is a config error: raised at once, not waited out."""
    with private_mic.activated(), pytest.raises(AudioError, match=r"matches 2 input devices"):
        async with asyncio.timeout(20), MicrophoneSource("e"):
            pass


def test_file_source_is_not_reopened(tmp_path: Path) -> None:
    """Only the microphone recovers: the file source has no reopen path at all."""
    from daemon.audio import WavFileSource

    assert not hasattr(WavFileSource(tmp_path / "x.wav"), "recover")


def _alsa_inputs(home: Path, *names: str) -> None:
    """Define ALSA input devices (each a PulseAudio client of the virtual mic) in ~/.asoundrc.

    PortAudio lists them in this order and re-reads the file on each initialisation, so
    writing a new one between two reopens moves the devices' indices, as a replug does.
    """
    home.mkdir(exist_ok=True)
    (home / ".asoundrc").write_text(
        "".join(f'pcm.{name} {{ type pulse device "{SOURCE}" }}\n' for name in names)
    )


async def test_device_given_by_index_is_followed_when_indices_move(
        private_mic: VirtualMic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``audio.device`` as an index: a device plugged in meanwhile moves ours to the next index.
    The reopen follows the device it had opened (same name), not whatever now sits there."""
    home = tmp_path / "home"
    _alsa_inputs(home, "zmic")
    monkeypatch.setenv("HOME", str(home))
    logs = LogEvents()
    with private_mic.activated():
        index = next(d.index for d in await asyncio.to_thread(list_devices) if d.name == "zmic")
        source = MicrophoneSource(str(index), stall_seconds=0.5)
        async with source, asyncio.timeout(30):
            chunks = Chunks()
            task = asyncio.create_task(chunks.consume(source))
            await chunks.more_than(2)
            _alsa_inputs(home, "amic", "zmic")  # "amic" now has our index, zmic the next
            await _pactl(private_mic, "suspend-source", SOURCE, "1")
            lost, _ = await logs.wait("audio.device_lost")
            await _pactl(private_mic, "suspend-source", SOURCE, "0")
            await logs.wait("audio.device_recovered", after=lost)
            source.stop()
            await task
    assert source.device_info is not None
    assert (source.device_info.name, source.device_info.index) == ("zmic", index + 1)


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (a state another thread changes, with no event to await) to a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout:g} s"
        time.sleep(0.01)


def test_log_lines_get_out_while_the_sound_server_hangs(private_mic: VirtualMic) -> None:
    """A hung sound server blocks PortAudio's start-up (a reopen, `devices`) for ever. Its noise
    is kept off stderr meanwhile, but only for a few seconds: the daemon's own lines (the
    watchdog saying capture is stuck) must reach the journal, not pile up unseen."""
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    pipe = os.fstat(2).st_ino
    lister = threading.Thread(target=list_devices, name="hung-lister", daemon=True)
    try:
        with private_mic.activated(), private_mic.frozen():
            lister.start()
            _wait_until(lambda: os.fstat(2).st_ino != pipe, 10, "silenced")  # PortAudio's turn
            os.write(2, b"watchdog.withheld capture: overdue\n")
            ready, _, _ = select.select([read_end], [], [], 30)
            heard = os.read(read_end, 4096) if ready else b""
            assert b"watchdog.withheld capture: overdue\n" in heard
    finally:
        if lister.ident is not None:  # it swaps fd 2 back to the pipe as it ends
            lister.join(30)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write_end)
        os.close(read_end)
    assert not lister.is_alive()


async def _portaudio_call_running() -> None:
    """Until a PortAudio call of the source is under way (no event says so: polled)."""
    def running() -> bool:
        return any(t.name == "portaudio-call" for t in threading.enumerate())

    await asyncio.to_thread(_wait_until, running, 20, "calling PortAudio")


async def _portaudio_calls_ended() -> None:
    """Wait for the source's PortAudio threads (what they opened after all is closed again)."""
    while calls := [t for t in threading.enumerate() if t.name.startswith("portaudio-")]:
        await asyncio.to_thread(calls[0].join)


async def test_stop_and_close_leave_a_hung_sound_server_behind(private_mic: VirtualMic) -> None:
    """The sound server hangs: capture stalls and the reopen hangs inside PortAudio (stopping
    the old stream never returns). SIGTERM's stop() still ends the chunks (so the engine ends
    its turns cleanly) and closing gives up after a while, logged, instead of holding the
    daemon's exit until systemd kills it."""
    logs = LogEvents()
    chunks = Chunks()
    with private_mic.activated():
        source = MicrophoneSource(stall_seconds=0.5)
        try:
            async with asyncio.timeout(60):  # a hang guard only: each step below is prompt
                async with source:
                    task = asyncio.create_task(chunks.consume(source))
                    await chunks.more_than(0)
                    private_mic.freeze()
                    await logs.wait("audio.device_lost")
                    await _portaudio_call_running()  # the reopen, stuck stopping the stream
                    source.stop()
                    await task
                _, stuck = await logs.wait("audio.close_stuck")
        finally:
            private_mic.thaw()
            async with asyncio.timeout(20):  # the calls left behind end once it answers
                await _portaudio_calls_ended()
    assert stuck["device"] == "default" and not source.recovering


async def test_listing_devices_gives_up_on_a_hung_sound_server(private_mic: VirtualMic) -> None:
    """`transcribed devices` while the sound server hangs: one clear error after a while, not a
    hang that even Ctrl-C cannot end (PortAudio's start-up blocks the main thread in C)."""
    with private_mic.activated():
        try:
            with private_mic.frozen(), pytest.raises(
                AudioError, match=r"^listing audio devices: no answer within 1 s "
                                  r"\(is the sound server \(PipeWire/PulseAudio\) hung\?\)$"):
                list_devices(limit_s=1)
        finally:
            async with asyncio.timeout(20):  # the listing left behind ends once it answers
                await _portaudio_calls_ended()
