"""Composition root: builds the source, engine, sinks and dispatcher, and runs them.

Shutdown order (SPEC guarantee 5): SIGTERM/SIGINT stops capture; the engine sends what it holds,
``Terminate``, and waits for ``Termination``; the dispatcher flushes every sink (bounded); exit 0.
A second signal, or the shutdown deadline, cancels what is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import structlog

from daemon.audio_base import AudioSource
from daemon.config import Settings
from daemon.deadletter import FOLDER as DEAD_LETTERS
from daemon.dispatch import Dispatcher
from daemon.engine import Engine
from daemon.events import AudioChunk, PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.hangup import Hangup
from daemon.health import Health, Heartbeat, Reporter
from daemon.live import LiveHub, Tee
from daemon.logs import SecretMasker
from daemon.masking import secret_values
from daemon.metrics import AudioMeter, StatusSnapshot, snapshot_of
from daemon.notify import Notifier
from daemon.plugins import PluginHost, load_plugins
from daemon.reload import Loader, Reloader, SinkBuilder, warn_none_enabled
from daemon.shutdown import (
    SHUTDOWN_DEADLINE_S,
    deadline,
    flush_bound,
    flush_signals,
    uncancel_on_deadline,
)
from daemon.sinktables import ValidatedSinks, enabled_sinks, validate_sinks
from daemon.web import LiveServer

log = structlog.get_logger("daemon.app")

FAILED: Final = "an error (see the log)"  # why the engine stopped, when it raised
NEWS_CHUNKS: Final = 3             # chunks after a session began that wake the reporter (READY)


@dataclass
class Listener:
    """Receives engine events: dispatches turns, informs plugins, keeps the counters."""

    dispatcher: Dispatcher
    plugins: PluginHost
    transcripts_in_log: bool
    turns: int = 0
    sessions: int = 0
    open_sessions: int = 0  # sessions begun and not yet ended (two overlap during a rollover)
    meter: AudioMeter = field(default_factory=AudioMeter)  # the audio read from the source
    chunks_at_session: int = 0  # ``meter.chunks`` when the current session began
    on_change: list[Callable[[], None]] = field(default_factory=list)

    def audio_read(self) -> None:
        """A chunk was read (and counted): the first few after a session began are news (READY).

        A few, not one: the cloud session's sender may not have run yet at the first.
        """
        if self.live and self.meter.chunks - self.chunks_at_session <= NEWS_CHUNKS:
            self._changed()

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
        """Hand partials to live-view plugins (best effort: a failing plugin is logged)."""
        self.plugins.turn_partial(partial)

    def session_started(self, session: SessionInfo) -> None:
        """A session began."""
        self.sessions += 1
        self.open_sessions += 1
        self.chunks_at_session = self.meter.chunks
        self.plugins.session_started(session)
        self._changed()

    def session_ended(self, summary: SessionSummary) -> None:
        """A session ended."""
        self.open_sessions = max(0, self.open_sessions - 1)
        self.plugins.session_ended(summary)
        self._changed()

    @property
    def live(self) -> bool:
        """A session is open."""
        return self.open_sessions > 0

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()


def build_source(settings: Settings, heartbeat: Heartbeat | None = None) -> AudioSource:
    """The configured audio source (the microphone recovers from stalls and lost devices)."""
    from daemon.audio import MicrophoneSource, WavFileSource

    audio = settings.audio
    if audio.source == "file":
        return WavFileSource(
            Path(audio.path).expanduser(), sample_rate=audio.sample_rate, chunk_ms=audio.chunk_ms
        )
    return MicrophoneSource(audio.device, sample_rate=audio.sample_rate, chunk_ms=audio.chunk_ms,
                            stall_seconds=audio.stall_seconds, heartbeat=heartbeat)


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

    tokens = TokenProvider(settings.assemblyai, client, on_token=masker.add_token)
    return AssemblyAIEngine(
        settings.assemblyai,
        settings.reconnect,
        tokens,
        sample_rate=settings.audio.sample_rate,
        chunk_ms=settings.audio.chunk_ms,
        source=source,
        host=host,
    )


@dataclass
class _Parts:
    """What ``run`` composes before the engine exists; ``closers`` are closed on the way out."""

    sinks: SinkBuilder
    dispatcher: Dispatcher
    listener: Listener
    health: Health
    capture: Heartbeat
    source: AudioSource
    closers: list[Any]
    hub: LiveHub


def _assemble(settings: Settings, masker: SecretMasker, plugins: PluginHost, host: str,
              validated: ValidatedSinks | None) -> _Parts:
    """Sinks (the enabled ones, their secrets taught to the masker), dispatcher, listener, source.

    Sinks configured but none enabled are logged once (``sinks.none_enabled``).
    """
    closers: list[Any] = []
    sinks = SinkBuilder(host, settings.state_path(), closers)
    if validated is None:
        validated = validate_sinks(plugins, settings.effective_sinks())
    runners = [sinks.build(name, t, config)
               for name, (t, config) in enabled_sinks(validated).items()]
    warn_none_enabled(validated)
    sinks.warn_orphans(name for name, (t, _c) in validated.items() if t.durable)  # disabled: kept
    masker.add(*secret_values(settings, {r.name: r.config for r in runners}))
    dispatcher = Dispatcher(runners, dead_letter_dir=settings.state_path() / DEAD_LETTERS)
    health = Health()
    capture = health.heartbeat("capture")
    health.watch(dispatcher.heartbeats)
    return _Parts(sinks, dispatcher, Listener(dispatcher, plugins, settings.log.transcripts),
                  health, capture, build_source(settings, capture), closers,
                  LiveHub(engine=settings.engine_name()))


async def run(
    settings: Settings,
    masker: SecretMasker,
    plugins: PluginHost | None = None,
    *,
    sinks: ValidatedSinks | None = None,
    loader: Loader | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Run the daemon until the input ends or a signal arrives; returns the exit code.

    Args:
        settings: the validated configuration.
        masker: the log masker (learns every secret, also those a reload brings).
        plugins: the plugin host (default: built-ins and installed entry points).
        sinks: the sink tables already validated with ``plugins``, disabled ones included
            (default: validate them).
        loader: re-reads the config on SIGHUP; without one SIGHUP is logged and ignored.
        notifier: systemd notifications (default: from ``$NOTIFY_SOCKET``).
    """
    host = socket.gethostname()
    plugins = plugins or load_plugins()
    parts = _assemble(settings, masker, plugins, host, sinks)
    listener, dispatcher = parts.listener, parts.dispatcher
    notifier = notifier or Notifier()
    try:
        async with httpx.AsyncClient() as client:
            engine = build_engine(settings, host, masker, client)
            log.info("daemon.starting", engine=engine.name, source=settings.audio.source,
                     sinks=sorted(dispatcher.runners))
            reporter = Reporter(
                notifier,
                parts.health,
                ready=lambda: _audio_flows(engine, listener),
                status=lambda: status_line(engine, parts.source, listener, dispatcher),
            )
            listener.on_change.append(reporter.changed)
            reloader = None
            if loader is not None:
                reloader = Reloader(loader, settings, dispatcher=dispatcher, sinks=parts.sinks,
                                    masker=masker, stopping=lambda: reporter.stopping)
            signalled = await _serve(settings, engine, parts, reporter, reloader)
    finally:
        notifier.close()
        for closer in parts.closers:
            closer.close()
    log.info("daemon.stopped", reason="signal" if signalled else "input ended",
             turns=listener.turns, sessions=listener.sessions)
    return 0


async def _serve(settings: Settings, engine: Engine, parts: _Parts, reporter: Reporter,
                 reloader: Reloader | None) -> bool:
    """Run the live view (if enabled), sinks, reporter and engine; then flush the sinks.

    Returns True if a signal stopped it, False if the input ended.
    """
    listener, dispatcher = parts.listener, parts.dispatcher

    def status() -> StatusSnapshot:
        return snapshot_of(engine=engine, source=parts.source, dispatcher=dispatcher,
                           meter=listener.meter, sessions=listener.sessions, turns=listener.turns,
                           engine_live=listener.live)

    async with contextlib.AsyncExitStack() as web:
        if settings.http.enabled:
            await web.enter_async_context(LiveServer.from_config(
                settings.http, parts.hub, status, stale_s=settings.audio.stall_seconds))
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            reporting = group.create_task(reporter.run(), name="systemd-reporter")
            hup = Hangup(group, reloader, reporter)
            signalled = True                 # until the engine returns of its own accord
            why = "input ended"
            try:
                signalled = await _run_engine(engine, parts.source, listener, reporter, hup,
                                              parts.capture, parts.hub)
            except Exception:
                why = FAILED                    # run's last STATUS= names it
                raise
            finally:
                parts.hub.state("stopped")
                reporter.stop(why)
                with flush_signals(dispatcher, clean=why != FAILED):
                    bound = flush_bound(dispatcher, signalled)
                    log.info("sinks.flushing", queued=dispatcher.queued(), timeout_s=bound)
                    await dispatcher.close(bound)
                reporting.cancel()
    return signalled


def _audio_flows(engine: Engine, listener: Listener) -> bool:
    """READY: a live session (the cloud engine's own flag when it has one) receiving audio."""
    live = bool(getattr(engine, "live", listener.live)) and listener.live
    return live and listener.meter.chunks > listener.chunks_at_session


def status_line(engine: Engine, source: AudioSource, listener: Listener,
                dispatcher: Dispatcher) -> str:
    """The one-line human summary systemd shows (``STATUS=``)."""
    if listener.live:
        session = "session live"
    else:
        session = "reconnecting" if listener.sessions else "connecting"
    if engine.name == "local":
        session = "ready" if listener.live else "session ended" if listener.sessions else "loading"
    ledger = getattr(engine, "ledger", None)
    backlog = f", backlog {ledger.seconds_held():.0f} s" if ledger is not None else ""
    capture = ("waiting for the device" if getattr(source, "waiting", False)
               else "reopening the device" if getattr(source, "recovering", False) else "ok")
    return (f"{engine.name}: {session}, {listener.turns} turns{backlog}; capture {capture}; "
            f"sinks {sinks_status(dispatcher)}")


def sinks_status(dispatcher: Dispatcher) -> str:
    """The sinks, what they hold, and which are failing (sends or dead letters), for STATUS=."""
    names = ", ".join(sorted(dispatcher.runners)) or "none"
    failing = sorted(name for name, runner in dispatcher.runners.items()
                     if runner.stats.failing_since is not None)
    trouble = f"; {', '.join(failing)} failing" if failing else ""
    return f"{names} ({dispatcher.queued()} queued{trouble})"


async def _beating(
    chunks: AsyncIterator[AudioChunk], heartbeat: Heartbeat, listener: Listener, within: float,
    ended: Callable[[], None],
) -> AsyncIterator[AudioChunk]:
    """Pass chunks through, beating the capture heartbeat and counting them for ``listener``.

    The next chunk is owed only while the engine asks for one: a file run's engine holds a chunk
    while its backlog is full (an outage), and the watchdog then restarted a waiting daemon.
    """
    try:
        async for chunk in chunks:
            heartbeat.idle()
            listener.meter.count(chunk)
            listener.audio_read()
            yield chunk
            heartbeat.beat(within)
    finally:
        ended()
        heartbeat.idle()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _run_engine(
    engine: Engine,
    source: AudioSource,
    listener: Listener,
    reporter: Reporter,
    hup: Callable[[], None],
    capture: Heartbeat,
    hub: LiveHub,
) -> bool:
    """Run the engine over the source, stopping gracefully on SIGTERM/SIGINT.

    Returns True if a signal stopped it, False if the input ended.
    """
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
        reporter.stop(f"{signal.Signals(signum).name} received")
        source.stop()
        stop = getattr(engine, "stop", None)    # local: its session ends "stopped"; cloud: a
                                                # file waiting for room in the backlog stops
        if stop is not None:
            stop()
        stopping.append(loop.call_later(SHUTDOWN_DEADLINE_S, deadline, task))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, hup)
    within = _chunk_deadline(source)
    try:
        async with source:
            if stopping:    # stopped while the microphone was waited for: nothing to transcribe
                return True
            chunks = _beating(source.chunks(), capture, listener, within, hub.input_ended)
            await uncancel_on_deadline(engine.run(chunks, Tee(listener, hub)), task, stopping)
    finally:        # the handlers stay until the flush replaces them (flush_signals)
        for handle in stopping:
            handle.cancel()
    return bool(stopping)


def _chunk_deadline(source: AudioSource) -> float:
    """How long after one chunk the next must have arrived (or a recovery have begun)."""
    from daemon.audio import OPEN_LIMIT_S

    return float(getattr(source, "stall_seconds", 5.0)) + OPEN_LIMIT_S
