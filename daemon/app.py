"""Composition root: builds the source, engine, sinks and dispatcher, and runs them.

Shutdown order (SPEC guarantee 5): SIGTERM/SIGINT stops capture; the engine sends what it holds,
``Terminate``, and waits for ``Termination``; the dispatcher flushes every sink (bounded); exit 0.
A second signal, or the shutdown deadline, cancels what is still running.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import structlog

from daemon.audio_base import AudioSource
from daemon.config import Settings, secret_values
from daemon.dispatch import Dispatcher, MemoryQueue, SinkQueue, SinkRunner, validate_sinks
from daemon.engine import Engine
from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.logs import SecretMasker
from daemon.plugins import PluginHost, SinkContext, load_plugins

log = structlog.get_logger("daemon.app")

SHUTDOWN_DEADLINE_S: Final = 12.0  # SIGTERM → engine finished; sinks then get FLUSH_TIMEOUT_S
FLUSH_TIMEOUT_S: Final = 3.0


@dataclass
class Listener:
    """Receives engine events: dispatches turns, informs plugins, keeps the counters."""

    dispatcher: Dispatcher
    plugins: PluginHost
    transcripts_in_log: bool
    turns: int = 0
    sessions: int = 0
    live: bool = False
    on_change: list[Callable[[], None]] = field(default_factory=list)

    def turn(self, record: TurnRecord) -> None:
        """A finished turn: log it and queue it for every sink."""
        self.turns += 1
        fields: dict[str, Any] = {"record_id": record.id, "words": len(record.words)}
        if self.transcripts_in_log:
            fields["transcript"] = record.transcript
        log.info("turn.completed", **fields)
        self.dispatcher.dispatch(record)
        self._changed()

    def partial(self, partial: PartialTurn) -> None:
        """Hand partials to live-view plugins (best effort)."""
        try:
            self.plugins.turn_partial(partial)
        except Exception:  # supervision boundary: a plugin must not break the stream
            log.exception("plugin.partial_failed")

    def session_started(self, session: SessionInfo) -> None:
        """A session began."""
        self.sessions += 1
        self.live = True
        self._hook(self.plugins.session_started, session)
        self._changed()

    def session_ended(self, summary: SessionSummary) -> None:
        """A session ended."""
        self.live = False
        self._hook(self.plugins.session_ended, summary)
        self._changed()

    def _hook(self, hook: Callable[[Any], None], value: Any) -> None:
        try:
            hook(value)
        except Exception:  # supervision boundary: a plugin must not break the stream
            log.exception("plugin.hook_failed", hook=getattr(hook, "__name__", "?"))

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()


def build_runners(
    settings: Settings, plugins: PluginHost, host: str, stack: list[Any]
) -> list[SinkRunner]:
    """Validate the sink tables and build each sink with its queue."""
    validated = validate_sinks(plugins, settings.effective_sinks())
    context = SinkContext(host=host, state_dir=settings.state_path())
    outbox: Any = None
    runners = []
    for name, (sink_type, config) in validated.items():
        queue: SinkQueue
        if sink_type.durable:
            if outbox is None:
                from daemon.outbox import Outbox

                outbox = Outbox(settings.state_path() / "outbox.sqlite3")
                stack.append(outbox)
            queue = outbox.queue(name)
        else:
            queue = MemoryQueue()
        runners.append(
            SinkRunner(name, sink_type, config, sink_type.factory(name, config, context), queue)
        )
    return runners


def build_source(settings: Settings) -> AudioSource:
    """The configured audio source."""
    from daemon.audio import MicrophoneSource, WavFileSource

    audio = settings.audio
    if audio.source == "file":
        return WavFileSource(
            Path(audio.path).expanduser(), sample_rate=audio.sample_rate, chunk_ms=audio.chunk_ms
        )
    return MicrophoneSource(audio.device, sample_rate=audio.sample_rate, chunk_ms=audio.chunk_ms,
                            stall_seconds=audio.stall_seconds)


def build_engine(
    settings: Settings, host: str, masker: SecretMasker, client: httpx.AsyncClient
) -> Engine:
    """The configured (or, for ``auto``, the available) engine."""
    source = settings.audio.source
    if settings.engine_name() == "local":
        from daemon.local import LocalEngine

        return LocalEngine(
            settings.local, sample_rate=settings.audio.sample_rate, source_name=source, host=host
        )
    from daemon.stream import AssemblyAIEngine
    from daemon.tokens import TokenProvider

    tokens = TokenProvider(settings.assemblyai, client, on_token=masker.add)
    return AssemblyAIEngine(
        settings.assemblyai,
        settings.reconnect,
        tokens,
        sample_rate=settings.audio.sample_rate,
        chunk_ms=settings.audio.chunk_ms,
        source=source,
        host=host,
    )


async def run(settings: Settings, masker: SecretMasker, plugins: PluginHost | None = None) -> int:
    """Run the daemon until the input ends or a signal arrives; returns the exit code."""
    host = socket.gethostname()
    plugins = plugins or load_plugins()
    closers: list[Any] = []
    runners = build_runners(settings, plugins, host, closers)
    masker.add(*secret_values(settings, {r.name: r.config for r in runners}))
    dispatcher = Dispatcher(runners, dead_letter_dir=settings.state_path() / "dead-letter")
    listener = Listener(dispatcher, plugins, settings.log.transcripts)
    source = build_source(settings)
    try:
        async with httpx.AsyncClient() as client:
            engine = build_engine(settings, host, masker, client)
            log.info(
                "daemon.starting",
                engine=engine.name,
                source=settings.audio.source,
                sinks=sorted(dispatcher.runners),
            )
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                try:
                    await _run_engine(engine, source, listener)
                finally:
                    await dispatcher.close(FLUSH_TIMEOUT_S)
    finally:
        for closer in closers:
            closer.close()
    log.info("daemon.stopped", turns=listener.turns, sessions=listener.sessions)
    return 0


async def _run_engine(engine: Engine, source: AudioSource, listener: Listener) -> None:
    """Run the engine over the source, stopping gracefully on SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping: list[asyncio.TimerHandle] = []

    def on_signal(signum: int) -> None:
        if stopping:
            log.warning("daemon.forced_stop", signal=signal.Signals(signum).name)
            task.cancel()
            return
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        source.stop()
        stopping.append(loop.call_later(SHUTDOWN_DEADLINE_S, _deadline, task))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        async with source:
            await _uncancel_on_deadline(engine.run(source.chunks(), listener), task, stopping)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for handle in stopping:
            handle.cancel()


def _deadline(task: asyncio.Task[Any]) -> None:
    log.warning("daemon.shutdown_deadline", deadline_s=SHUTDOWN_DEADLINE_S)
    task.cancel()


async def _uncancel_on_deadline(
    work: Awaitable[None], task: asyncio.Task[Any], stopping: list[asyncio.TimerHandle]
) -> None:
    """Await ``work``; a cancellation we caused while stopping ends it quietly."""
    try:
        await work
    except asyncio.CancelledError:
        if not stopping:
            raise
        task.uncancel()
