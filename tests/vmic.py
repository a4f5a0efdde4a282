"""A virtual microphone for tests: a private PulseAudio whose default source is a clocked null sink.

Mirrors ``/work/shared/tools/vmic-setup.sh`` (see ``docs/virtual-mic.md``): a 16 kHz mono null
sink with ``norewinds=1`` and a remap source on its monitor made the default source. Anything
played into the sink comes out of the microphone bit-exact, at real-time pace, and PortAudio sees
it as the ``default``/``pulse`` input device once ``PULSE_SERVER`` points at our server.

Usage (a session fixture in a test module)::

    @pytest.fixture(scope="session")
    def vmic(tmp_path_factory):
        with VirtualMic.running(tmp_path_factory.mktemp("vmic")) as mic:
            yield mic
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Self

import pytest

SINK: Final = "vmic_sink"
SOURCE: Final = "vmic"
RATE: Final = 16000
_TOOLS: Final = ("pulseaudio", "pactl", "paplay", "pacat")

_MODULES: Final = f"""\
.fail
load-module module-native-protocol-unix auth-anonymous=1
load-module module-null-sink sink_name={SINK} rate={RATE} channels=1 format=s16le norewinds=1 \
sink_properties=device.description=VirtualMicFeed
load-module module-remap-source source_name={SOURCE} master={SINK}.monitor rate={RATE} \
channels=1 format=s16le source_properties=device.description=VirtualMic
set-default-sink {SINK}
set-default-source {SOURCE}
"""


def _require_tools() -> None:
    """Skip when PulseAudio is missing locally; fail under CI, where it must be installed."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"virtual mic needs {', '.join(missing)} (apt: pulseaudio pulseaudio-utils)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class VirtualMic:
    """A private PulseAudio server (our own subprocess) acting as the default microphone."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runtime = base / "run"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        """The ``PULSE_SERVER`` value clients need."""
        return f"unix:{self.runtime / 'pulse' / 'native'}"

    @property
    def log_path(self) -> Path:
        """PulseAudio's own log file."""
        return self.base / "pulse.log"

    def env(self) -> dict[str, str]:
        """A full environment for client subprocesses (paplay, a daemon under test)."""
        return {**os.environ, "PULSE_SERVER": self.server, "XDG_RUNTIME_DIR": str(self.runtime)}

    @classmethod
    @contextlib.contextmanager
    def running(cls, base: Path, timeout: float = 10.0) -> Iterator[Self]:
        """Start a virtual mic in ``base`` and stop it (by PID) on exit."""
        mic = cls(base)
        mic.start(timeout)
        try:
            yield mic
        finally:
            mic.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start PulseAudio and wait until it answers ``pactl info`` (fails after ``timeout``)."""
        _require_tools()
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        script = self.base / "vmic.pa"
        script.write_text(_MODULES)
        server_env = {**self.env(), "HOME": str(self.base)}  # keep its cookie out of ~
        self._process = subprocess.Popen(
            ["pulseaudio", "--daemonize=no", "--system=false", "--exit-idle-time=-1",
             "--disallow-exit", "-n", "-F", str(script), f"--log-target=file:{self.log_path}"],
            env=server_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll the readiness probe (``pactl info``) against a deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                self._fail(f"pulseaudio exited with {self._process.returncode}")
            probe = subprocess.run(
                ["pactl", "info"], env=self.env(), capture_output=True, check=False
            )
            if probe.returncode == 0 and f"Default Source: {SOURCE}" in probe.stdout.decode():
                return
            time.sleep(0.05)  # readiness polling, not test synchronisation
        self._fail(f"pulseaudio not ready after {timeout:g} s")

    def _fail(self, reason: str) -> None:
        """Stop the server and fail with the tail of its log."""
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        pytest.fail(f"virtual mic: {reason}; log tail:\n{tail}")

    def stop(self) -> None:
        """Stop our PulseAudio by PID (TERM, then KILL after 5 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Our PulseAudio hung (see :meth:`freeze`) for the block, resumed on exit."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def freeze(self) -> None:
        """Stop our PulseAudio (SIGSTOP by PID), as a hung sound server: its clients hang,
        a new connection never gets its answer, nor does a running stream."""
        assert self._process is not None and self._process.poll() is None
        os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume our PulseAudio after :meth:`freeze` (SIGCONT by PID)."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Point this process's PulseAudio clients (pyaudio via ALSA) at the virtual mic.

        PortAudio reads the ALSA configuration, and with it the pulse routing, on each
        ``PyAudio()``; so create PyAudio instances (sources, ``list_devices()``) inside.
        """
        saved = os.environ.get("PULSE_SERVER")
        os.environ["PULSE_SERVER"] = self.server
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("PULSE_SERVER", None)
            else:
                os.environ["PULSE_SERVER"] = saved

    async def play(self, path: str | os.PathLike[str]) -> None:
        """Play a sound file into the mic; returns when it has been played in full."""
        await self._run(["paplay", f"--device={SINK}", os.fspath(path)])

    async def play_pcm(self, pcm: bytes, rate: int = RATE) -> None:
        """Play raw 16-bit mono PCM into the mic; returns when it has been played in full."""
        await self._run(
            ["pacat", "--playback", "-d", SINK, f"--rate={rate}", "--channels=1",
             "--format=s16le", "--raw"],
            stdin=pcm,
        )  # fmt: skip

    async def _run(self, argv: list[str], stdin: bytes | None = None) -> None:
        """Run a PulseAudio client to completion; fail the test if it fails."""
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=self.env(),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await process.communicate(stdin)
        if process.returncode != 0:
            pytest.fail(f"{argv[0]} failed ({process.returncode}): {err.decode(errors='replace')}")
