"""Per-sink queues: what the dispatcher appends turns to and each sink's worker delivers from.

``SinkQueue`` is the contract; ``MemoryQueue`` holds the local sinks' records (file, console) and
``daemon.outbox.OutboxQueue`` the durable ones' on disk (``OUTBOX_FILE`` in the state directory;
named here, so that a daemon with no durable sink never loads ``daemon.outbox`` and SQLite).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

from daemon.errors import DaemonError
from daemon.events import TurnRecord

log = structlog.get_logger("daemon.dispatch")

OUTBOX_FILE: Final = "outbox.sqlite3"   # the durable queues' database, in the state directory


@dataclass
class Delivery:
    """A record taken from a queue; ``key`` lets a durable queue delete it once delivered."""

    record: TurnRecord
    key: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)


class SinkQueue(Protocol):
    """A per-sink FIFO. ``put`` never blocks; ``get`` returns ``None`` once closed and empty."""

    def put(self, record: TurnRecord) -> None:
        """Append a record; must not block."""

    def batch(self) -> AbstractContextManager[object]:
        """Group the ``put``s made inside into one write with those of queues sharing storage.

        One fsync per turn, not one per durable sink; nested batches join the outer one.
        """

    async def get(self) -> Delivery | None:
        """The oldest undelivered record, or ``None`` once closed and empty."""

    def ack(self, delivery: Delivery) -> None:
        """The record was delivered (or dead-lettered): forget it."""

    def depth(self) -> int:
        """Records waiting."""

    def close(self) -> None:
        """No more ``put``; ``get`` returns ``None`` once drained."""

    @property
    def closed(self) -> bool:
        """``close`` was called."""

    def requeue(self, delivery: Delivery) -> None:
        """Hand back a record taken by ``get`` but not acknowledged (its worker crashed)."""


class MemoryQueue:
    """An in-memory queue for local sinks (file, console). Unbounded: turns are never dropped."""

    def __init__(self) -> None:
        self._items: deque[Delivery] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, record: TurnRecord) -> None:
        """Append a record."""
        self._items.append(Delivery(record))
        self._ready.set()

    def batch(self) -> AbstractContextManager[object]:
        """Nothing to group: a ``put`` is complete when it returns."""
        return nullcontext()

    async def get(self) -> Delivery | None:
        """Next record, or ``None`` when closed and drained. Cancelling loses nothing."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def ack(self, delivery: Delivery) -> None:
        """Nothing to do: the record left the queue on ``get``."""

    def depth(self) -> int:
        """Records waiting."""
        return len(self._items)

    def close(self) -> None:
        """Let ``get`` return ``None`` once the queue is empty."""
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        """``close`` was called."""
        return self._closed

    def requeue(self, delivery: Delivery) -> None:
        """Put a record taken by ``get`` back at the head."""
        self.push_front([delivery])

    def take_all(self) -> list[Delivery]:
        """Remove and return everything waiting (to hand it to a rebuilt sink)."""
        items = list(self._items)
        self._items.clear()
        return items

    def push_front(self, deliveries: list[Delivery]) -> None:
        """Put ``deliveries`` back at the head, in order (records handed back by a retired sink)."""
        self._items.extendleft(reversed(deliveries))
        if deliveries:
            self._ready.set()


async def hand_over(old: SinkQueue, held: Delivery | None, new: SinkQueue,
                    refused: Callable[[TurnRecord, Exception], None]) -> None:
    """Move what ``old`` (a retired sink's queue) holds, ``held`` first, to ``new`` (its successor).

    Two durable queues share the records on disk (the new one reads them). Otherwise ``old`` is
    drained: into the head of a new in-memory queue, in order, or onto the end of a new durable
    one (after the records dispatched while the old worker finished; one ``new.put`` refused
    goes to ``refused``); a record leaves the outbox only once the new queue holds it.
    """
    if not isinstance(old, MemoryQueue) and not isinstance(new, MemoryQueue):
        return
    if held is not None:
        old.requeue(held)
    old.close()
    taken: list[Delivery] = []
    try:
        while (delivery := await old.get()) is not None:
            taken.append(delivery)
    except DaemonError as exc:          # the outbox unreadable: the rest stays on disk
        log.error("sink.handover_failed", error=str(exc), moved=len(taken))
    if isinstance(new, MemoryQueue):
        new.push_front(taken)
    else:
        for delivery in taken:
            try:
                new.put(delivery.record)
            except Exception as exc:  # supervision boundary: dead-lettered, never dropped
                refused(delivery.record, exc)
    try:
        for delivery in taken:
            old.ack(delivery)
    except DaemonError as exc:          # on disk too: named as orphaned at the next start
        log.error("sink.handover_failed", error=str(exc), moved=len(taken))
