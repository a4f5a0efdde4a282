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
            if daemon.process.returncode is None:
                daemon.process.kill()
                await daemon.process.wait()
    assert result.code == 0, result.stderr[-2000:]
    assert result.events("audio.device_lost") and result.events("audio.close_stuck")
