"""The dispatcher: one queue and one worker per sink, so a slow sink stalls nothing.

``dispatch()`` is synchronous and never blocks the caller: it appends the record to every sink's
queue (in memory, or the on-disk outbox for durable sinks: one write and one fsync for all of
them) and returns. Each worker delivers its queue in order, retrying transient failures with
jittered backoff (logged once per state change, not per attempt) and moving records that fail
permanently to a dead-letter file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import structlog

from daemon.backoff import backoff
from daemon.deadletter import append_dead_letter, dead_letter_file
from daemon.errors import DaemonError, PermanentSinkError, SinkError
from daemon.events import TurnRecord
from daemon.health import Heartbeat
from daemon.queues import Delivery, MemoryQueue, hand_over
from daemon.runner import (
    Retry,
    SinkRunner,
    failure_reason,
    note_delivery,
    note_failure,
    retry_wait,
    send_record,
    wait_backoff,
)

log = structlog.get_logger("daemon.dispatch")

SEND_LIMIT_S = 120.0  # one send attempt running longer than this means the sink is stuck
CRASH_RETRY_S = 1.0  # a crashed sink worker restarts at once, then after 1, 2, 4 ... s
CRASH_RETRY_MAX_S = 60.0


class Dispatcher:
    """Fans each record out to every sink's queue and runs one delivery worker per sink.

    Sinks can be added, removed and replaced while running (a config reload) without losing a
    queued record: a removed sink's worker drains its queue and ends; a replaced one stops after
    its current send (or mid-backoff) and hands what it holds to its successor.
    """

    def __init__(self, runners: list[SinkRunner], *, dead_letter_dir: Path,
                 send_limit_s: float = SEND_LIMIT_S) -> None:
        self.runners = {r.name: r for r in runners}
        self.send_limit_s = send_limit_s
        self._dead_letter_dir = dead_letter_dir
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._leaving: dict[asyncio.Task[None], SinkRunner] = {}
        self._group: asyncio.TaskGroup | None = None
        self._cut = asyncio.Event()                  # set: stop waiting for the flush
        self._closing = False                        # close() has begun

    def dispatch(self, record: TurnRecord) -> None:
        """Queue ``record`` for every sink. Never blocks, never raises for one sink's sake.

        The durable sinks' queues share one outbox: their appends are one transaction, so a turn
        costs one fsync however many of them there are.
        """
        with ExitStack() as batches:
            for runner in self.runners.values():
                try:
                    batches.enter_context(runner.queue.batch())
                    runner.queue.put(record)
                except Exception as exc:  # supervision boundary: one sink's queue must not
                    self._not_queued(runner, record, exc)   # hurt the others

    def _not_queued(self, runner: SinkRunner, record: TurnRecord, exc: Exception) -> None:
        """Never a silent drop: a turn a sink's queue refused lands in its dead-letter file."""
        expected = isinstance(exc, DaemonError)         # a traceback only for what is a bug
        log.error("sink.enqueue_failed", sink=runner.name, record_id=record.id,
                  error=str(exc) if expected else failure_reason(exc), exc_info=not expected)
        if not self._dead_letter(runner, Delivery(record), f"could not queue: {exc}"):
            log.error("sink.turn_lost", sink=runner.name, record_id=record.id)

    def start(self, group: asyncio.TaskGroup) -> None:
        """Start one worker per sink inside the caller's task group."""
        self._group = group
        for runner in self.runners.values():
            self._start(runner)

    def heartbeats(self) -> Iterator[Heartbeat]:
        """The heartbeat of every worker still running (current and leaving sinks)."""
        for runner in [*self.runners.values(), *self._leaving.values()]:
            yield runner.heartbeat

    @property
    def closing(self) -> bool:
        """``close`` has begun: the daemon is flushing for the exit."""
        return self._closing

    def queued(self) -> int:
        """Records waiting across all sinks."""
        return sum(r.queue.depth() for r in self.runners.values())

    async def add(self, runner: SinkRunner) -> None:
        """Start delivering to a new sink (it receives records dispatched from now on).

        A removed sink of that name still delivering what it had queued (it was disabled or
        removed, and is back) is retired first and hands what it holds over, as ``replace``
        does: one worker per queue, no record dropped.
        """
        if runner.name in self.runners:
            raise ValueError(f"sink {runner.name!r} already running")
        self.runners[runner.name] = runner
        for task, old in list(self._leaving.items()):
            if old.name == runner.name:
                task.remove_done_callback(self._left)   # not removed: back, with what it held
                old.retiring.set()
                try:
                    await asyncio.shield(task)
                finally:
                    self._leaving.pop(task, None)
                await self._hand_over(old, runner)
        self._start(runner)

    def remove(self, name: str) -> None:
        """Stop sending new records to ``name``; its worker delivers what is queued, then ends."""
        runner = self.runners.pop(name)
        runner.queue.close()
        task = self._workers.pop(name, None)
        if task is not None and not task.done():
            self._leaving[task] = runner
            task.add_done_callback(self._left)

    async def replace(self, runner: SinkRunner) -> None:
        """Swap in a rebuilt sink of the same name; queued and in-flight records carry over.

        New records go to the new queue at once. The old worker finishes the send in progress
        (a backoff wait is cut short), then its undelivered records go to the new one
        (``_hand_over``; also when the type changed between a local and a network sink).
        """
        old = self.runners[runner.name]
        runner.stats = old.stats        # the same sink, rebuilt: its counters carry on
        self.runners[runner.name] = runner
        task = self._workers.pop(runner.name, None)
        old.retiring.set()
        if task is not None and not task.done():
            self._leaving[task] = old
            try:
                await asyncio.shield(task)
            finally:
                self._leaving.pop(task, None)
        await self._hand_over(old, runner)
        self._start(runner)

    async def _hand_over(self, old: SinkRunner, new: SinkRunner) -> None:
        """What a retired runner still holds goes to its successor of the same name."""
        held, old.abandoned = old.abandoned, None
        with structlog.contextvars.bound_contextvars(sink=new.name):
            await hand_over(old.queue, held, new.queue,
                            lambda record, exc: self._not_queued(new, record, exc))

    def _start(self, runner: SinkRunner) -> None:
        if self._group is None:
            return  # not started yet: start() picks it up
        if self._closing:       # a reload's sink, too late: close() no longer waits for it
            runner.queue.close()
            self._spill(runner)
            return
        self._workers[runner.name] = self._group.create_task(
            self._work(runner), name=f"sink:{runner.name}"
        )

    def _left(self, task: asyncio.Task[None]) -> None:
        runner = self._leaving.pop(task, None)
        if runner is not None:
            log.info("sink.removed", sink=runner.name, undelivered=runner.queue.depth())

    async def close(self, flush_s: float) -> None:
        """Stop accepting work, deliver what is queued for up to ``flush_s``, then stop."""
        self._closing = True
        for runner in self.runners.values():
            runner.queue.close()
        tasks = {**{t: r for r in self.runners.values() if (t := self._workers.get(r.name))},
                 **self._leaving}
        workers = [t for t in tasks if not t.done()]
        if workers:
            await self._flush(workers, tasks, flush_s)
        for runner in list(self.runners.values()):
            if runner.name not in self._workers:    # a reload's sink, waiting for its start
                self._spill(runner)

    async def _flush(self, workers: list[asyncio.Task[None]],
                     tasks: dict[asyncio.Task[None], SinkRunner], flush_s: float) -> None:
        """Wait for ``workers`` until done, ``flush_s`` or the cut; spill the ones cut off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_s
        cut = asyncio.create_task(self._cut.wait(), name="flush-cut")
        try:                            # until every worker is done, the cut, or the deadline
            while not cut.done() and (left := [t for t in workers if not t.done()]) \
                    and (remaining := deadline - loop.time()) > 0:
                await asyncio.wait([*left, cut], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        pending = {t for t in workers if not t.done()}
        for task in pending:
            runner = tasks[task]
            in_memory = isinstance(runner.queue, MemoryQueue)
            held = runner.holding is not None and in_memory
            log.warning("sink.flush_timeout", sink=runner.name, timeout_s=flush_s,
                        queued=runner.queue.depth() + held,
                        effect="dead-lettered" if in_memory
                        else "kept in the outbox: delivered at the next start")
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in pending:
            self._spill(tasks[task])

    def cut_flush(self) -> None:
        """End a running ``close`` now, as if its time were up.

        What the sinks still hold is dead-lettered (memory queues) or stays in the outbox.
        """
        self._cut.set()

    def _spill(self, runner: SinkRunner) -> None:
        """Dead-letter what an in-memory queue still holds at exit (an outbox keeps its own)."""
        if not isinstance(runner.queue, MemoryQueue):
            return
        held, runner.holding = runner.holding, None
        reason = f"not delivered before exit ({runner.stats.last_error or 'sink too slow'})"
        written: list[str] = []         # one line for them all: a day of turns is one line
        for delivery in ([held] if held is not None else []) + runner.queue.take_all():
            if self._dead_letter(runner, delivery, reason, say=False):
                written.append(delivery.record.id)
            else:
                log.error("sink.turn_lost", sink=runner.name, record_id=delivery.record.id)
        if written:
            log.error("sink.dead_lettered", sink=runner.name, records=len(written),
                      first_id=written[0], last_id=written[-1], error=reason,
                      path=str(dead_letter_file(self._dead_letter_dir, runner.name)))

    async def _work(self, runner: SinkRunner) -> None:
        """Run a sink's worker; restart it (with backoff) whenever it crashes."""
        delays = backoff(CRASH_RETRY_S, CRASH_RETRY_MAX_S)
        with structlog.contextvars.bound_contextvars(sink=runner.name):
            try:
                while True:
                    try:
                        await self._serve(runner)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # supervision boundary: never reaches capture
                        if not await self._crashed(runner, exc, next(delays)):
                            return
            finally:
                runner.heartbeat.idle()

    async def _serve(self, runner: SinkRunner) -> None:
        """Open the sink and deliver its queue until it closes or the sink retires."""
        await runner.sink.__aenter__()
        try:
            while (delivery := await self._next(runner)) is not None:
                runner.holding = delivery
                if not await self._deliver(runner, delivery):
                    runner.abandoned = delivery
                    break
                runner.holding = None
        except BaseException as exc:
            await self._close_sink(runner, exc)
            raise
        await self._close_sink(runner, None)

    async def _close_sink(self, runner: SinkRunner, exc: BaseException | None) -> None:
        """The sink's ``__aexit__``, given as long as a send: a close that hangs is left behind.

        Else a reload rebuilding the sink waited for ever (the new one never started, its
        turns piled up, later reloads queued behind it) and nothing noticed: no send was due.
        """
        limit = self._limit(runner)
        tb = exc.__traceback__ if exc is not None else None
        try:
            async with asyncio.timeout(limit) as bound:
                await runner.sink.__aexit__(type(exc) if exc is not None else None, exc, tb)
        except TimeoutError:
            if not bound.expired():
                raise
            log.error("sink.close_timeout", sink=runner.name, timeout_s=limit,
                      hint="left open; a third-party sink's close should not wait for ever")

    async def _crashed(self, runner: SinkRunner, exc: Exception, delay: float) -> bool:
        """Log a crashed worker and put back its record; wait, then True to restart it."""
        held, runner.holding = runner.holding, None
        if held is not None:
            runner.queue.requeue(held)
        expected = isinstance(exc, SinkError | OSError)
        reason = failure_reason(exc)
        again = reason == runner.stats.last_error   # the same bug: its traceback was logged
        runner.stats.last_error = reason
        log.error("sink.crashed", sink_type=runner.sink_type.name, error=reason,
                  queued=runner.queue.depth(), retry_in_s=round(delay, 2),
                  exc_info=not expected and not again)    # a traceback for a bug, once
        if runner.queue.closed and runner.queue.depth() == 0:
            return False
        return await self._backoff(runner, delay)

    async def _next(self, runner: SinkRunner) -> Delivery | None:
        """The next record, or ``None`` when the queue is closed and drained or the sink retires."""
        runner.heartbeat.idle()
        if runner.retiring.is_set():
            return None
        getter = asyncio.ensure_future(runner.queue.get())
        retired = asyncio.ensure_future(runner.retiring.wait())
        try:
            await asyncio.wait((getter, retired), return_when=asyncio.FIRST_COMPLETED)
        finally:
            retired.cancel()
            if not getter.done():
                getter.cancel()     # takes effect at its next step: wait for it
                with suppress(asyncio.CancelledError):
                    await asyncio.wait((getter,))
        if getter.cancelled():
            return None
        return getter.result()  # a record that raced the retirement is still delivered

    async def _backoff(self, runner: SinkRunner, delay: float) -> bool:
        """Wait ``delay`` before a retry; False if the sink retired meanwhile."""
        return await wait_backoff(runner, delay, self.send_limit_s)

    async def _deliver(self, runner: SinkRunner, delivery: Delivery) -> bool:
        """Deliver one record, retrying transient failures; dead-letter permanent ones.

        Returns False, leaving the record unacknowledged, when the sink retires mid-backoff.
        """
        retry = Retry(getattr(runner.config, "retry_max_s", None))
        limit = self._limit(runner)
        while True:
            runner.heartbeat.beat(limit)
            try:
                await send_record(runner, delivery.record)
            except asyncio.CancelledError:
                raise
            except PermanentSinkError as exc:
                return await self._give_up(runner, delivery, str(exc))
            except Exception as exc:  # supervision boundary: classify, then back off
                wait = note_failure(runner, delivery, exc, retry)
                if wait is None:
                    return await self._give_up(runner, delivery, f"gave up after "
                                               f"{retry.max_s:g} s: {failure_reason(exc)}")
                if not await retry_wait(runner, wait, self.send_limit_s, retry):
                    return False
                continue
            note_delivery(runner, delivery)
            runner.queue.ack(delivery)
            return True

    async def _give_up(self, runner: SinkRunner, delivery: Delivery, reason: str) -> bool:
        """Dead-letter a record the sink will not take, then acknowledge it.

        One the dead-letter file cannot take (a full disk, a folder we may not write) is not
        acknowledged while the outbox holds it: the write is retried with backoff, and a stop
        meanwhile leaves it in the outbox for the next start. A queue in memory has nowhere else
        to keep it: it is lost, and said so (``sink.turn_lost``).
        """
        delays = backoff(CRASH_RETRY_S, CRASH_RETRY_MAX_S)
        next(delays)                        # not at once: the write just failed
        while not self._dead_letter(runner, delivery, reason):
            if isinstance(runner.queue, MemoryQueue):
                log.error("sink.turn_lost", record_id=delivery.record.id, error=reason)
                break
            runner.stats.failed += 1        # in /metrics: the sink is stuck, not idle
            if runner.stats.failing_since is None:  # and in STATUS=, until a delivery
                runner.stats.failing_since = time.monotonic()
            if not await self._backoff(runner, next(delays)):
                return False
        runner.queue.ack(delivery)
        return True

    def _limit(self, runner: SinkRunner) -> float:
        """How long one send (or the sink's close) may take before it counts as stuck.

        A sink's own timeout_s may exceed ``send_limit_s`` (a slow webhook is not a stuck
        daemon): then twice it and 10 s (MQTT's connect and publish are each bounded by it).
        """
        timeout = getattr(runner.config, "timeout_s", None)
        return max(self.send_limit_s, 2 * float(timeout) + 10) if timeout else self.send_limit_s

    def _dead_letter(self, runner: SinkRunner, delivery: Delivery, reason: str, *,
                     say: bool = True) -> bool:
        """Append the record and the reason to ``<state>/dead-letter/<sink>.jsonl``.

        False when it could not be written (``sink.dead_letter_failed`` names it). ``say``:
        log it (else the caller says it for several at once).
        """
        path = dead_letter_file(self._dead_letter_dir, runner.name)
        if not append_dead_letter(path, {"sink": runner.name, "error": reason,
                                         "record": delivery.record.to_dict()}):
            return False
        runner.stats.dead_lettered += 1
        if say:
            log.error("sink.dead_lettered", record_id=delivery.record.id, error=reason,
                      path=str(path))
        return True
