"""The AssemblyAI v3 engine: sessions opened, rolled over and reconnected forever.

Audio flows source → ``Ledger`` → session (``daemon.session``). Each connection attempt mints a
fresh temporary token. A new session replays the ledger's uncovered audio first, so nothing said
is lost across drops, errors, token failures or rollovers.

Close codes are classified (``protocol.classify_close``): transient problems back off with jitter
(the first retry after a healthy session is immediate), rejected credentials get one retry with a
fresh token and then ``AuthError`` (exit 77), rejected settings raise ``ConfigError`` (exit 78).
Attempts that fail in a row are one outage (``outcome.Outage``): a warning when it starts or its
reason changes, the retries at debug, a summary every 5 minutes, a line when it is over.

Rollover is make-before-break: ahead of ``Begin.expires_at`` (by a margin that scales with the
session's length) the next session is opened; the audio switches to it at a turn boundary (or at
a hard deadline), and the old one is terminated and drained in the background.

A file can wait, a microphone cannot: while the ledger is full (an outage longer than
``reconnect.backlog_seconds``) a file run stops reading the file until finished turns free room,
where a microphone run drops the oldest audio (``daemon.filegate``).

Catch-up is parallel (``daemon.catchup``): a (re)connect far behind live starts the live session
at a silence close to live and replays the older backlog in a second session, each in its own
*lane* that reconnects and rolls over on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Final

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from daemon import __version__
from daemon.backoff import backoff
from daemon.catchup import SPLIT_AFTER_S, CatchUp, HoldingListener, find_split
from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.engine import EngineListener
from daemon.errors import AuthError, ConfigError
from daemon.events import AudioChunk, SourceName
from daemon.filegate import FileGate
from daemon.ledger import Ledger
from daemon.outcome import (
    SUMMARY_EVERY_S,
    Outage,
    Outcome,
    auth_message,
    backlog_fields,
    close_of,
    connect_failed,
    endpoint,
    refused_after_begin,
    token_failed,
)
from daemon.pieces import SILENCE_RMS
from daemon.protocol import (
    Begin,
    CloseKind,
    Message,
    ProtocolError,
    ServerError,
    Unknown,
    classify_close,
    parse_message,
    streaming_url,
)
from daemon.rollover import RolloverPlan, rollover_plan
from daemon.session import StreamSession
from daemon.shutdown import SHUTDOWN_DEADLINE_S
from daemon.tokens import TokenError, TokenProvider

log = structlog.get_logger("daemon.stream")

# Frames a connection buffers unread before it stops reading the socket (websockets' default is
# 16). A rollover's next session waits unread for up to 80 s (``rollover_plan``) while its
# heartbeats (one per 5 s) pile up; had reading stopped, the keepalive pong would go unread
# and the connection be closed just before it was needed.
MAX_QUEUE: Final = 64


class _Failed(Exception):
    """A connection attempt ended before ``Begin``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class AssemblyAIEngine:
    """Streams the ledger to AssemblyAI Universal Streaming v3 and reports turns."""

    name: Final = "assemblyai"

    def __init__(
        self,
        config: AssemblyAIConfig,
        reconnect: ReconnectConfig,
        tokens: TokenProvider,
        *,
        sample_rate: int,
        chunk_ms: int,
        source: SourceName,
        host: str,
        delays: Callable[[], Iterator[float]] | None = None,
        summary_every_s: float = SUMMARY_EVERY_S,
    ) -> None:
        self.config = config
        self._reconnect = reconnect
        self._tokens = tokens
        self.sample_rate = sample_rate
        self.chunk_samples = sample_rate * chunk_ms // 1000
        self.source: SourceName = source
        self.host = host
        self._delays = delays or (lambda: backoff(reconnect.initial_delay, reconnect.max_delay))
        self.ledger = Ledger(sample_rate, reconnect.backlog_seconds)
        self.reconnects = 0
        self.senders = 0                 # sessions currently sending audio
        self.catch_up: CatchUp | None = None
        self._listener: EngineListener | None = None     # the caller's (replay sessions use it)
        self._replaying: set[asyncio.Task[Outcome]] = set()   # replay sessions still running
        self._dropped_reported = 0
        self._gate = FileGate(self.ledger, self.chunk_samples, reconnect.backlog_seconds,
                              lambda: self.catch_up is not None)
        self._outage = Outage(self._held, summary_every_s)

    @property
    def live(self) -> bool:
        """A session is open and audio is flowing to it."""
        return self.senders > 0

    async def run(self, chunks: AsyncIterator[AudioChunk], listener: EngineListener) -> None:
        """Stream until the input ends and the last session has terminated."""
        self._listener = listener
        ended = False                           # the last session terminated as asked
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(chunks), name="ledger-pump")
                live = HoldingListener(listener, lambda: self.catch_up)
                await self._lane(live, group, None)
            ended = True
        finally:
            if not ended:                       # stopped during an outage: its loss too
                self._report_backlog_loss()
            speech_s = 0.0 if ended else self.ledger.held_speech_s(self.chunk_samples,
                                                                    SILENCE_RMS)
            if speech_s:                        # stopped (SIGTERM) before the service answered
                log.error("stream.untranscribed", held_s=round(speech_s, 2),
                          effect="audio with speech that no finished turn covers is lost")
            if self.catch_up is not None:       # stopped before the replay finished
                log.warning("stream.replay_unfinished", held_turns=len(self.catch_up.held))
                self._finish_catch_up(listener)

    def stop(self) -> None:
        """The input is stopping (SIGTERM): a file waiting for room in the ledger reads no more."""
        self._outage.stop_by = time.monotonic() + SHUTDOWN_DEADLINE_S
        self._gate.stop()

    def cover(self, position: int, *, replay: bool) -> None:
        """A session's finished turns cover the ledger before ``position``."""
        catch_up = self.catch_up
        if catch_up is None:
            self.ledger.cover(position)
        elif replay:
            self.ledger.cover(min(position, catch_up.split))
        else:
            catch_up.cover_live(position)   # the replay still needs the audio before it

    def skipped(self, samples: int, *, replay: bool) -> None:
        """A session skipped ``samples`` of silence (counted for the catch-up report)."""
        if replay and self.catch_up is not None:
            self.catch_up.skipped_samples += samples

    def _start_for(self, stop: int | None) -> int:
        """Where a new session of a lane starts: the ledger head, or after a replay's split."""
        if stop is None and self.catch_up is not None:
            return self.catch_up.live_start()
        return self.ledger.head

    async def _pump(self, chunks: AsyncIterator[AudioChunk]) -> None:
        try:
            async for chunk in chunks:
                samples = len(chunk.pcm) // 2
                if self.source == "file":
                    if not self.ledger.full(samples):
                        self._gate.flowing()
                    elif not await self._gate.room_for(samples):
                        continue
                self.ledger.append(chunk)
        finally:
            self.ledger.finish()

    def _done(self, stop: int | None) -> bool:
        if stop is not None:
            return self.ledger.head >= stop
        return self.ledger.eof and self._start_for(None) >= self.ledger.end

    async def _lane(self, listener: EngineListener, group: asyncio.TaskGroup,
                    stop: int | None) -> None:
        """Sessions back to back until the input ends (live) or ``stop`` is replayed."""
        delays = self._delays()
        auth_failures = 0
        while not self._done(stop):
            try:
                session = await self._open(listener, stop)
                self._outage.recovered()
                self._report_backlog_loss()
                if stop is None:
                    self._maybe_split(group)
                outcome = await self._drive(session, listener, group)
                auth_failures = refused_after_begin(outcome, auth_failures)
            except TokenError as exc:
                auth_failures += exc.rejected
                delay = token_failed(exc, auth_failures, delays)
                self._outage.token_failed(exc, endpoint(self.config.token_url), delay)
                await self._pause(delay)
                continue
            except _Failed as failed:
                outcome = failed.outcome
                if outcome.kind is CloseKind.AUTH:
                    auth_failures += 1
                    if auth_failures >= 2:
                        raise AuthError(auth_message(outcome.reason)) from None
                    self._outage.counted(outcome.reason)
                    log.warning("stream.auth_rejected", reason=outcome.reason, retrying=True)
                    continue
            if outcome.finished:
                return
            if outcome.kind is CloseKind.CONFIG:
                raise ConfigError(
                    f"assemblyai: the service rejected our settings: {outcome.reason}"
                )
            if outcome.healthy:
                delays = self._delays()
            delay = self._delay_for(outcome, delays)
            self.reconnects += 1
            held_s = round(self.ledger.seconds_held(), 2)
            self._outage.reconnecting(outcome, delay, backlog_s=held_s,
                                      lane="live" if stop is None else "replay")
            await self._pause(delay)

    def _held(self) -> dict[str, object]:
        """What the backlog holds during an outage (this outage's loss included)."""
        lost_s = (self.ledger.dropped_samples - self._dropped_reported) / self.sample_rate
        return backlog_fields(self.ledger.seconds_held(), lost_s,
                              self._reconnect.backlog_seconds, file=self.source == "file")

    async def _pause(self, delay: float) -> None:
        """The wait before the next attempt, cut short once when the input ends.

        A stop (or the end of a file) gives the held audio a bounded time to be sent: one more
        attempt now beats a backoff that may outlast it (up to ``reconnect.max_delay``). Only
        the wait the input ends in: after that the backoff applies again (no tight loop).
        """
        if self.ledger.eof:
            await asyncio.sleep(delay)
            return
        try:
            async with asyncio.timeout(delay):
                await self.ledger.ended.wait()
        except TimeoutError:
            return
        log.info("stream.retrying_now",
                 reason="stopping" if self._outage.stop_by is not None else "the input ended",
                 backlog_s=round(self.ledger.seconds_held(), 2))

    def _maybe_split(self, group: asyncio.TaskGroup) -> None:
        """Far behind live: start the live session at a silence near live, replay the rest."""
        if self.catch_up is not None:
            return
        behind = self.ledger.end - self.ledger.head
        if behind < SPLIT_AFTER_S * self.sample_rate:
            return
        split = find_split(self.ledger, SILENCE_RMS)
        if split is None:
            log.info("stream.no_split", behind_live_s=round(behind / self.sample_rate, 2))
            return
        catch_up = CatchUp(split, self.ledger.head, self.ledger.end, self.sample_rate)
        self.catch_up = catch_up
        log.info("stream.catch_up_started", replay_s=round(catch_up.replay_s, 2),
                 live_behind_s=round(catch_up.live_behind_s, 2))
        group.create_task(self._replay(catch_up, group), name="replay")

    async def _replay(self, catch_up: CatchUp, group: asyncio.TaskGroup) -> None:
        """The replay lane: send ``[head, split)`` in sessions of its own, then release."""
        assert self._listener is not None
        await self._lane(self._listener, group, catch_up.split)
        if self._replaying:                     # a rolled-over one may still be draining
            await asyncio.wait(self._replaying)
        self._finish_catch_up(self._listener)

    def _finish_catch_up(self, listener: EngineListener) -> None:
        """Cover up to the split and the live session's turns; release the held records."""
        catch_up = self.catch_up
        if catch_up is None:
            return
        self.catch_up = None
        held = catch_up.finish(self.ledger)
        now = time.time()
        lag = max((now - record.ended_at.timestamp() for record in held), default=0.0)
        log.info("stream.replay_finished",
                 catch_up_s=round(time.monotonic() - catch_up.started, 2),
                 replay_s=round(catch_up.replay_s, 2),
                 live_behind_s=round(catch_up.live_behind_s, 2),
                 silence_skipped_s=round(catch_up.skipped_samples / self.sample_rate, 2),
                 held_turns=len(held), records_lag_s=round(lag, 2))
        for record in held:
            listener.turn(record)
        self.ledger.wake()              # a file waiting for room: the replay no longer holds any

    def _report_backlog_loss(self) -> None:
        """Once per outage: how much audio the full backlog forced us to drop."""
        lost = self.ledger.dropped_samples - self._dropped_reported
        if lost > 0:
            self._dropped_reported = self.ledger.dropped_samples
            log.error("stream.backlog_dropped", lost_s=round(lost / self.sample_rate, 3),
                      lost_samples=lost, backlog_seconds=self._reconnect.backlog_seconds)

    def _delay_for(self, outcome: Outcome, delays: Iterator[float]) -> float:
        """The wait before the next attempt; none only after a session that lived (no tight loop).

        An expiry (or a normal end) of a healthy session reconnects at once; any other close
        backs off, an expiry refused before ``Begin`` or cut short included.
        """
        expired = outcome.kind is CloseKind.EXPIRED
        if outcome.healthy and (expired or outcome.kind is CloseKind.NORMAL):
            return 0.0
        delay = next(delays)
        if outcome.kind is CloseKind.RATE:
            return max(delay, self._reconnect.max_delay)
        if outcome.kind is CloseKind.CLIENT_BUG:
            log.error("stream.client_rejected", reason=outcome.reason)
        return delay

    async def _drive(self, session: StreamSession, listener: EngineListener,
                     group: asyncio.TaskGroup) -> Outcome:
        """Run sessions back to back through rollovers; return how the last one ended."""
        while True:
            running = group.create_task(session.run(self._start_for(session.stop)),
                                        name=f"session-{session.lane}")
            if session.stop is not None:
                self._replaying.add(running)
                running.add_done_callback(self._replaying.discard)
            plan = rollover_plan(session.begin, session.began_wall, session.began_at)
            if plan is None:
                return await running
            await asyncio.wait([running], timeout=max(0.0, plan.open_at - time.monotonic()))
            if running.done():
                return running.result()
            successor = await self._open_successor(listener, running, plan, session.stop)
            if successor is None:
                return await running
            await session.switch_over(plan.switch_by)
            if not session.rolled_over:         # it stopped sending for another reason:
                await successor.abandon()       # input or replay range done, or it failed
                return await running
            log.info("stream.rolled_over", previous=session.begin.id, next=successor.begin.id)
            session = successor

    async def _open_successor(self, listener: EngineListener, running: asyncio.Task[Outcome],
                              plan: RolloverPlan, stop: int | None) -> StreamSession | None:
        """Open the next session while the current one runs; None if that cannot be done."""
        delay = 0.2
        while not running.done() and time.monotonic() < plan.switch_by:
            try:
                successor = await self._open(listener, stop)
            except (TokenError, _Failed) as exc:
                log.warning("stream.rollover_open_failed", error=str(exc))
                await asyncio.sleep(min(delay, max(0.0, plan.switch_by - time.monotonic())))
                delay *= 2
                continue
            if running.done():
                await successor.abandon()
                return None
            return successor
        return None

    async def _open(self, listener: EngineListener, stop: int | None) -> StreamSession:
        """Mint a token, connect, and wait for ``Begin``.

        Raises:
            TokenError: no token could be had.
            _Failed: the connection ended before ``Begin``.
        """
        token = await self._tokens.fresh()
        url = streaming_url(self.config, sample_rate=self.sample_rate, token=token)
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                ws = await connect(url, open_timeout=None, close_timeout=2, max_size=2**20,
                                   compression=None,  # PCM barely compresses; deflate cost 20 % CPU
                                   max_queue=MAX_QUEUE,
                                   user_agent_header=f"transcribed/{__version__}")
                first = await ws.recv()
        except InvalidStatus as exc:
            status = exc.response.status_code
            kind = CloseKind.AUTH if status in (401, 403) else \
                CloseKind.RATE if status == 429 else CloseKind.TRANSIENT    # as a 3009 close
            raise _Failed(Outcome(kind, f"handshake answered HTTP {status}")) from None
        except ConnectionClosed as exc:
            close = close_of(exc)
            raise _Failed(Outcome(close.kind, f"closed before Begin: {close}")) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            if ws is not None:      # no Begin in time: close it, or it stays open (and billed)
                await ws.close()
            raise _Failed(Outcome(CloseKind.TRANSIENT, connect_failed(
                exc, endpoint(self.config.streaming_url), connected=ws is not None,
                limit_s=self.config.connect_timeout))) from None
        try:
            begin = parse_message(first)
        except ProtocolError as exc:
            await ws.close()
            shown = f": {exc.frame}" if exc.frame else ""     # a Begin: no transcript in it
            raise _Failed(Outcome(CloseKind.TRANSIENT,
                                  f"first frame unreadable: {exc}{shown}")) from None
        if isinstance(begin, ServerError):
            await ws.close()
            raise _Failed(Outcome(classify_close(begin.code, begin.message), begin.message))
        if not isinstance(begin, Begin):
            await ws.close()
            raise _Failed(Outcome(CloseKind.TRANSIENT,
                                  f"first frame was {_kind_of(begin)}, not Begin"))
        return StreamSession(self, ws, begin, listener, stop=stop)


def _kind_of(message: Message) -> str:
    """A message's type as the service names it; one we do not know quoted and cut."""
    if isinstance(message, Unknown):
        return f"type {message.type[:40]!r}"
    return type(message).__name__.removeprefix("Server")     # ServerWarning: "Warning"
