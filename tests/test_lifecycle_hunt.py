"""Signals at awkward moments of the daemon's life: after it stopped, while the offline engine
recognises the last turn, and the reason its session gives when SIGTERM ended the input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SPEECH_DIR
from tests.daemon_proc import Daemon, cloud_config
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.notify_socket import NotifySocket
from tests.test_interrupt import holding_sink


class _Holder:
    """The server the ``hold`` sink's exit thread waits on; it is never answered."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        self.reached.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()                 # until the daemon is gone
        writer.close()


class _Lines:
    """A running daemon's JSON log lines, read as they come."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.seen: list[dict[str, Any]] = []

    async def until(self, event: str) -> dict[str, Any]:
        """Read stderr up to the first line with this event."""
        stream = self.daemon.process.stderr
        assert stream is not None
        while line := await stream.readline():
            with contextlib.suppress(ValueError):
                self.seen.append(json.loads(line))
                if self.seen[-1].get("event") == event:
                    return self.seen[-1]
        raise AssertionError(f"the daemon ended before {event}: {self.seen[-5:]}")


async def test_signals_after_the_stop_while_a_thread_is_waited_for(tmp_path: Path) -> None:
    """Stopped, the process still waits for a thread (a plugin's here; the offline model's load
    or a recognition in practice). A SIGHUP then is ignored and a SIGTERM exits 0 at once.

    The loop's handlers removed after the flush, the defaults were back: the SIGHUP killed the
    stopped daemon (status -1, what systemd shows as 1/HUP), a SIGTERM killed it (-15).
    """
    holder = _Holder()
    wav = SPEECH_DIR / "espeak-s1.wav"
    async with holding_sink(tmp_path, holder) as (env, port), \
            FakeAssemblyAI(load_speech_references(SPEECH_DIR, wav.name)) as fake:
        config = cloud_config(tmp_path, fake, wav, sinks=(
            f'[sinks.held]\ntype = "hold"\nport = {port}\nat = "exit"\n'))
        daemon = await Daemon.start("run", "--config", str(config), env=env)
        lines = _Lines(daemon)
        try:
            try:
                async with asyncio.timeout(30):
                    session = await fake.wait_for_session(0)
                    await session.wait_for(lambda s: s.audio_ms >= 500)
                    daemon.signal(signal.SIGTERM)
                    await lines.until("daemon.stopped")
                    await holder.reached.wait()  # run is done; asyncio.run waits for the thread
            except TimeoutError:                # say where the daemon was (seen once, loaded)
                await daemon.kill_if_running()
                raise AssertionError(f"no stop within 30 s; the daemon said: {lines.seen[-10:]} "
                                     f"{(await daemon.finish(5)).stderr[-3000:]}") from None
            daemon.signal(signal.SIGHUP)
            daemon.signal(signal.SIGTERM)
            result = await daemon.finish(20)
        finally:
            await daemon.kill_if_running()
    assert result.code == 0, result.stderr
    logs = lines.seen + result.logs()
    assert [e["signal"] for e in logs if e.get("event") == "daemon.exit_now"] == ["SIGTERM"]
    assert [e["signal"] for e in logs if e.get("event") == "daemon.stopping"] == ["SIGTERM"]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def local_model() -> Any:
    """The bundled offline model (the test is skipped without the ``local`` extra)."""
    pytest.importorskip("faster_whisper", reason="the local engine needs the 'local' extra")
    from daemon.config import LocalConfig
    from daemon.local import load_model

    return load_model(LocalConfig.model_validate({}))


class TestLocalEngineStopped:
    async def test_sigterm_ends_the_session_as_stopped(self, tmp_path: Path) -> None:
        """SIGTERM while the offline engine transcribes a file: its session ends ``stopped``,
        exit 0 (it said ``end_of_input``, as if the file had ended)."""
        pytest.importorskip("faster_whisper", reason="the local engine needs the 'local' extra")
        from tests.test_e2e_local import local_config

        config = local_config(tmp_path, f'[audio]\nsource = "file"\n'
                                        f'path = "{SPEECH_DIR / "espeak-s5.wav"}"\n')
        async with NotifySocket.listening(tmp_path / "notify.sock") as notify:
            daemon = await Daemon.start("run", "--config", str(config),
                                        env={**notify.env(), "HF_HUB_OFFLINE": "1"})
            try:
                await asyncio.wait_for(notify.wait_for(
                    lambda m: m.fields.get("STATUS", "").startswith("local: ready")), 60)
                daemon.signal(signal.SIGTERM)
                result = await daemon.finish(30)
            finally:
                await daemon.kill_if_running()
        assert result.code == 0, result.stderr[-2000:]
        [ended] = result.events("local.session_ended")
        assert ended["reason"] == "stopped"

    async def test_turns_still_recognised_when_cancelled_are_reported(
            self, local_model: Any) -> None:
        """Cancelled (a second SIGTERM, the deadline) while the turns the input's end left are
        recognised: ``local.turns_lost`` counts every one. The emitter, cancelled with the run
        that awaited it, took the turn it was waiting for off the count: lost without a word."""
        from daemon.config import LocalConfig
        from daemon.local import LocalEngine
        from tests.test_local import cancelled_run, chunks_of
        from tests.test_local_more import speech_only

        silence = bytes(16000 * 2)          # 1 s: the first turn ends, the emitter awaits it
        pcm = speech_only(SPEECH_DIR / "espeak-s2.wav") + silence \
            + speech_only(SPEECH_DIR / "espeak-s1.wav")    # the second ends with the input
        fed = asyncio.Event()

        async def file_then_stop() -> Any:
            async for chunk in chunks_of(pcm):
                yield chunk
            fed.set()               # next, the run flushes the last turn and awaits the emitter

        engine = LocalEngine(LocalConfig.model_validate({}), sample_rate=16000,
                             source_name="file", host="h", model=local_model)
        listener, logs = await cancelled_run(engine, file_then_stop(), fed)
        lost = [e for e in logs if e["event"] == "local.turns_lost"]
        assert len(lost) == 1 and lost[0]["reason"] == "cancelled", logs
        assert len(listener.turns) + lost[0]["turns"] == 2, (listener.turns, lost)
        assert listener.ended[0].reason == "cancelled"


def test_the_exit_line_is_rendered_without_the_loggers_lock() -> None:
    """The line a signal after the stop writes is rendered by the configured processors (JSON,
    secrets masked) and written with os.write: logging from the handler could wait for ever on
    the writer's lock held by the write the signal interrupted."""
    import io

    from daemon.logs import configure, rendered_line

    configure(fmt="json", secrets=["sk-live-123456"], stream=io.StringIO())
    line = rendered_line("daemon.exit_now", signal="SIGTERM", effect="key sk-live-123456")
    entry = json.loads(line)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert entry["event"] == "daemon.exit_now" and entry["level"] == "warning"
    assert "sk-live-123456" not in line.decode()
