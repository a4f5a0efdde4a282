"""The microphone under a hung sound server, end to end: the daemon still stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import Daemon
from tests.notify_socket import NotifySocket
from tests.test_e2e_local import local_config
from tests.vmic import VirtualMic

pytest.importorskip("faster_whisper")


@pytest.fixture(scope="module")
def hung_mic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualMic]:
    """A virtual mic of our own: this module freezes its server."""
    with VirtualMic.running(tmp_path_factory.mktemp("hung-mic")) as mic:
        yield mic


@pytest.mark.slow
async def test_sigterm_while_the_sound_server_hangs(hung_mic: VirtualMic, tmp_path: Path) -> None:
    """PulseAudio/PipeWire hangs: capture stalls, the reopen hangs inside PortAudio. SIGTERM
    still ends the daemon with 0 (the device left behind, logged), not a SIGKILL from systemd
    at `TimeoutStopSec` because a thread stuck in PortAudio held the exit."""
    config = local_config(tmp_path, "[audio]\nstall_seconds = 1\n")
    async with NotifySocket.listening(tmp_path / "notify.sock") as notify:
        daemon = await Daemon.start("run", "--config", str(config),
                                    env={**hung_mic.env(), **notify.env(), "HF_HUB_OFFLINE": "1"})
        try:
            await asyncio.wait_for(notify.wait_for(lambda m: m.fields.get("READY") == "1"), 60)
            with hung_mic.frozen():
                await asyncio.wait_for(notify.wait_for(
                    lambda m: "reopening the device" in m.fields.get("STATUS", "")), 30)
                daemon.signal(signal.SIGTERM)
                result = await daemon.finish(25)
        finally:
            await daemon.kill_if_running()
    assert result.code == 0, result.stderr[-2000:]
    assert result.events("audio.device_lost") and result.events("audio.close_stuck")


WAITING = "capture waiting for the device"


async def _waiting_daemon(tmp_path: Path, mic: VirtualMic, notify: NotifySocket) -> Daemon:
    """A daemon whose microphone ``pulse`` is not there (its server is not up): it waits."""
    config = local_config(tmp_path, '[audio]\ndevice = "pulse"\nstall_seconds = 1\n')
    daemon = await Daemon.start("run", "--config", str(config), env={
        **mic.env(), **notify.env(watchdog_usec=2_000_000), "HF_HUB_OFFLINE": "1"})
    at = await asyncio.wait_for(
        notify.wait_for(lambda m: WAITING in m.fields.get("STATUS", "")), 60)
    # still alive for the watchdog and kept "activating", never READY while waiting
    await asyncio.wait_for(notify.wait_for(lambda m: "WATCHDOG" in m, after=at), 30)
    await asyncio.wait_for(notify.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m), 30)
    assert not notify.with_key("READY")
    return daemon


@pytest.mark.slow
async def test_microphone_appearing_after_start_is_waited_for(tmp_path: Path) -> None:
    """The named microphone is not there when the daemon starts (a USB mic at login): it is
    waited for, not an exit 1 that systemd's start limit turns into a dead unit; when it
    appears, it opens and audio flows (READY=1)."""
    mic = VirtualMic(tmp_path / "late-mic")
    async with NotifySocket.listening(tmp_path / "notify.sock") as notify:
        daemon = await _waiting_daemon(tmp_path, mic, notify)
        try:
            await asyncio.to_thread(mic.start)
            await asyncio.wait_for(notify.wait_for(lambda m: m.fields.get("READY") == "1"), 60)
            daemon.signal(signal.SIGTERM)
            result = await daemon.finish(30)
        finally:
            await daemon.kill_if_running()
            mic.stop()
    assert result.code == 0, result.stderr[-2000:]
    waiting = result.events("audio.device_waiting")
    assert len(waiting) == 1 and waiting[0]["device"] == "pulse", waiting
    assert "no audio input device matches 'pulse'" in waiting[0]["error"]
    assert [e["device"] for e in result.events("audio.device_opened")] == ["pulse"]


@pytest.mark.slow
async def test_sigterm_ends_the_wait_for_the_microphone(tmp_path: Path) -> None:
    """SIGTERM while the microphone is waited for: exit 0 at once, never READY."""
    mic = VirtualMic(tmp_path / "absent-mic")
    async with NotifySocket.listening(tmp_path / "notify.sock") as notify:
        daemon = await _waiting_daemon(tmp_path, mic, notify)
        try:
            daemon.signal(signal.SIGTERM)
            result = await daemon.finish(20)
        finally:
            await daemon.kill_if_running()
    assert result.code == 0, result.stderr[-2000:]
    assert not notify.with_key("READY")
    assert "stopping (SIGTERM received)" in notify.with_key("STATUS")[-1].fields["STATUS"]
    assert result.events("daemon.stopped") and not result.events("audio.device_opened")
