"""One sink as the dispatcher drives it, and one attempt at delivering a record to it.

Owns ``SinkRunner`` (a configured sink with its queue, counters, heartbeat and retirement
state), ``SinkStats``, the retry schedule of one record (``Retry``), one send attempt
(``send_record``), the one-line reason of a failed send (``failure_reason``), what one
attempt's outcome does to the counters and the log (``note_failure``, ``note_delivery``) and
the wait before a retry (``wait_backoff``; ``retry_wait`` cuts it short when the sink says it is
ready again). The queues, workers and the delivery loop are ``daemon.dispatch.Dispatcher``'s.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.errors import PermanentSinkError, SinkError
from daemon.events import TurnRecord
from daemon.health import Heartbeat
from daemon.plugins import Sink, SinkConfig, SinkType
from daemon.queues import Delivery, SinkQueue
from daemon.supervise import error_line

EARLY_RETRY_MIN_S = 1.0  # a sink's ready() cuts a retry wait short, never below this

log = structlog.get_logger("daemon.dispatch")


@dataclass
class SinkStats:
    """Counters a sink worker keeps (for the status line and metrics)."""

    delivered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    latencies: list[float] = field(default_factory=list)
    last_error: str = ""
    failing_since: float | None = None  # the sink's outage, across records (some dead-lettered)


@dataclass
class SinkRunner:
    """A configured sink instance with its queue."""

    name: str
    sink_type: SinkType
    config: SinkConfig
    sink: Sink
    queue: SinkQueue
    stats: SinkStats = field(default_factory=SinkStats)
    heartbeat: Heartbeat = field(init=False)
    retiring: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    abandoned: Delivery | None = field(init=False, default=None)
    holding: Delivery | None = field(init=False, default=None)  # taken, not yet acknowledged

    def __post_init__(self) -> None:
        self.heartbeat = Heartbeat(f"sink {self.name}")


@dataclass
class Retry:
    """One record's retries: when it first failed, and the next backoff step."""

    max_s: float | None                 # the sink's ``retry_max_s``: give up after this long
    first_failure: float | None = None
    delay: float = 0.2
    early: int = 0                      # retries made early (the sink's ``ready()``) so far
    ready_failed: bool = False          # its ``ready()`` raised (said once per record)

    def next_wait(self, asked: float | None) -> float:
        """Jittered exponential backoff, or the sink's ``Retry-After`` when that is longer.

        A ``Retry-After`` of 0, in the past or not a number never makes a tight retry loop.
        """
        wait = self.delay * (0.5 + random.random())
        self.delay = min(self.delay * 2, 30.0)
        if asked is not None and math.isfinite(asked):
            wait = max(wait, asked)
        return wait


async def send_record(runner: SinkRunner, record: TurnRecord) -> None:
    """``runner.sink.send(record)``, refusing a ``send`` that is not ``async``.

    A plain ``def send`` has already run when its result turns out not to be awaitable: retrying
    it would deliver the record again and again, so it is dead-lettered (permanent) instead.
    """
    pending = runner.sink.send(record)
    if not inspect.isawaitable(pending):
        raise PermanentSinkError(
            f"sink type {runner.sink_type.name!r}: send() returned {type(pending).__name__}, "
            "not an awaitable (it must be 'async def send'); it may have delivered the record")
    await pending


def failure_reason(exc: Exception) -> str:
    """A sink failure as one line: a ``SinkError``'s own message, else the exception's type too."""
    return str(exc) if isinstance(exc, SinkError) else error_line(exc)


def note_failure(runner: SinkRunner, delivery: Delivery, exc: Exception,
                 retry: Retry) -> float | None:
    """Log and count a failed send; the wait before the retry, or None: give up."""
    reason = failure_reason(exc)
    now = time.monotonic()
    if retry.first_failure is None:
        retry.first_failure = now
        if runner.stats.failing_since is None or reason != runner.stats.last_error:
            log.warning("sink.send_failed", record_id=delivery.record.id, error=reason,
                        retrying=True)      # once per outage (or change of error)
        if runner.stats.failing_since is None:
            runner.stats.failing_since = now
        runner.stats.last_error = reason
    if retry.max_s is not None and now - retry.first_failure >= retry.max_s:
        return None
    runner.stats.failed += 1
    wait = retry.next_wait(exc.retry_after if isinstance(exc, SinkError) else None)
    if retry.max_s is not None:     # the last try comes at retry_max_s, not after a longer wait
        wait = min(wait, retry.first_failure + retry.max_s - now)
    return wait


def note_delivery(runner: SinkRunner, delivery: Delivery) -> None:
    """Count a delivery and its latency; log the end of an outage."""
    if runner.stats.failing_since is not None:
        log.info("sink.recovered", record_id=delivery.record.id,
                 outage_s=round(time.monotonic() - runner.stats.failing_since, 3))
        runner.stats.failing_since = None
    runner.stats.delivered += 1
    runner.stats.latencies.append(time.monotonic() - delivery.enqueued_at)
    if len(runner.stats.latencies) > 4096:
        del runner.stats.latencies[:2048]


async def wait_backoff(runner: SinkRunner, delay: float, send_limit_s: float,
                       until: asyncio.Future[Any] | None = None) -> bool:
    """Wait ``delay`` before a retry, or until ``until`` is done; False if the sink retired."""
    runner.heartbeat.beat(delay + send_limit_s)
    retired = asyncio.ensure_future(runner.retiring.wait())
    try:
        await asyncio.wait([retired] if until is None else [retired, until], timeout=delay,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        retired.cancel()
    return not runner.retiring.is_set()


async def retry_wait(runner: SinkRunner, delay: float, send_limit_s: float,
                     retry: Retry) -> bool:
    """The backoff before a failed record's retry, cut short when the sink's ``ready()`` returns.

    A sink may say when a retry is worth making before its backoff ends (the MQTT sink: when
    its broker connection is made again), so the first turn after a long outage goes at once,
    not up to 45 s later. Never sooner than ``EARLY_RETRY_MIN_S`` after the failure, doubled for
    each early retry of the record that failed again, so a ``ready()`` that returns at once (up,
    but the far end still failing) makes no tight loop; False if the sink retired.
    """
    ready = getattr(runner.sink, "ready", None)
    floor = EARLY_RETRY_MIN_S * 2 ** min(retry.early, 16)
    if not inspect.iscoroutinefunction(ready) or delay <= floor:
        return await wait_backoff(runner, delay, send_limit_s)
    loop = asyncio.get_running_loop()
    start = loop.time()
    waiter = asyncio.ensure_future(ready())
    try:
        if not await wait_backoff(runner, delay, send_limit_s, until=waiter):
            return False
    finally:
        waiter.cancel()
        waiter.add_done_callback(_retrieved)
    finished = waiter.done() and not waiter.cancelled()
    failed = waiter.exception() if finished else None
    said = finished and failed is None
    if failed is not None and not retry.ready_failed:
        retry.ready_failed = True           # once per record, not at every backoff
        log.warning("sink.ready_failed", error=str(failed) or type(failed).__name__,
                    effect="its retries wait out their backoff")
    retry.early += said
    rest = start + (floor if said else delay) - loop.time()
    return rest <= 0 or await wait_backoff(runner, rest, send_limit_s)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A ``ready()`` that failed after its wait ended: retrieved, not printed by asyncio."""
    if not task.cancelled():
        task.exception()
