"""The durable outbox: one SQLite file holding every network sink's undelivered turns.

A record is appended (and synced to disk) before ``dispatch()`` returns, and deleted once its
sink has delivered it, so a turn survives a crash, a kill -9 or a power loss at any moment and
is delivered at least once, in order, per sink.

Durability: WAL journal with ``synchronous=FULL``: each append is one transaction whose WAL frames
are fsynced before the commit returns (``Outbox.batch`` makes the appends of one turn to several
sinks a single transaction: one fsync). A crash can lose only a transaction that had not yet
returned (so the caller never saw it acknowledged), and a half-written WAL frame fails its
checksum and is discarded on recovery, so no record is ever torn. (``NORMAL`` would also never
tear a record but could lose the last acknowledged ones on power loss.)

A delivered record's delete is committed with ``synchronous=NORMAL``: no fsync of its own (it
reaches the disk with the next append's, or at a checkpoint). A kill -9 loses nothing (the
commit is in the kernel's cache); a power loss can undo the last deletes, and their records are
delivered once more after it: a duplicate (receivers deduplicate on ``id``), never a loss. With
two network sinks this is one fsync per turn instead of three, and the fsyncs of the deletes no
longer hold up the event loop (and the file sink) after every delivery.

A delete the disk refuses (full: SQLite needs room in the WAL even to delete) is done later: the
record counts as delivered, is never handed out again by this run, and its delete is tried again
before the next write (``outbox.delete_deferred`` once, ``outbox.deletes_done`` when done). Were it
raised instead, the sink's worker would crash and send the same record again at every restart for
as long as the disk stays full, with every later turn waiting behind it. A stop before the disk
has room leaves those records to be delivered once more at the next start (a duplicate).

A turn the disk refuses to store (full, or failing) is not lost: it waits in memory, behind any
turn already waiting and in order, and is written as soon as the disk takes it (tried before
every write, and every ``WAITING_RETRY_S`` by an idle sink's ``get``): ``outbox.waiting`` once,
``outbox.caught_up`` when written. Until then it is not handed out (a network sink delivers its
turns on disk first, then waits), and a crash or kill loses it, as it would any turn held in
memory. Still waiting at ``close``, it goes to the sink's dead-letter file, or is named as lost
(``sink.turn_lost``) when that cannot be written either (it is on the same full disk). At most
``WAITING_MAX`` turns wait; beyond that ``put`` refuses, as it does for a sink over
``max_records``.

Only one process may use an outbox at a time (an ``flock`` on ``<path>.lock`` and on the
database file: ``daemon.outboxdb``): two daemons sharing a state directory would deliver every
turn twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from daemon.deadletter import FOLDER as DEAD_LETTERS
from daemon.deadletter import append_dead_letter, dead_letter_file
from daemon.events import TurnRecord
from daemon.outboxdb import OutboxError as OutboxError
from daemon.outboxdb import lock, open_database, release, relock, same_file
from daemon.outboxdb import sqlite_errors as _sqlite_errors
from daemon.queues import Delivery

log = structlog.get_logger("daemon.outbox")

WAITING_MAX: Final = 10_000      # turns held in memory while the disk refuses them
WAITING_RETRY_S: Final = 5.0     # an idle sink tries to write them this often
ENDED_BY_THE_DISK: Final = "the disk's error ended the transaction"  # SQLite's own rollback

@dataclass(frozen=True, slots=True)
class Waiting:
    """A record accepted for ``queue``'s sink: in the open batch, or held (the disk refused)."""

    queue: OutboxQueue
    record: TurnRecord


class Outbox:
    """An SQLite-backed store of per-sink FIFO queues.

    Args:
        path: the database file (created with its directory if missing), conventionally
            ``<state dir>/outbox.sqlite3``.
        max_records: how many undelivered records one sink may hold before ``put`` refuses.
    """

    def __init__(self, path: Path, *, max_records: int = 100_000) -> None:
        self.path = path
        self.max_records = max_records
        self._lock_fds: tuple[int, ...] = lock(path)
        try:
            self._db = open_database(path)
            self._depths, self._next_seq = self._load_counters()
        except BaseException:
            release(self._lock_fds)
            raise
        self._carried: list[tuple[object, ...]] | None = None  # a deleted file's records
        self._queues: dict[str, OutboxQueue] = {}
        self._batched: list[Waiting] | None = None   # appended in the open batch
        self._waiting: list[Waiting] = []           # accepted; the disk refused to store them
        self._undeleted: dict[str, set[int]] = {}   # delivered; their delete the disk refused
        log.info("outbox.opened", path=str(path), queued=sum(self._depths.values()))

    def queue(self, sink: str, *, fresh: bool = False) -> OutboxQueue:
        """The durable queue of the sink named ``sink``.

        The same object on every call until it is closed (the sink was removed, and is back) or
        a ``fresh`` one is asked for (a rebuilt sink: its old worker keeps the old one until it
        retires; the new one reads what that left on disk).
        """
        queue = self._queues.get(sink)
        if fresh or queue is None or queue.closed:
            queue = self._queues[sink] = OutboxQueue(self, sink)
        return queue

    def depth(self, sink: str) -> int:
        """Records the sink has not yet delivered."""
        return self._depths.get(sink, 0)

    def sinks(self) -> dict[str, int]:
        """Depth of every sink with undelivered records (including ones no longer configured)."""
        return {name: n for name, n in self._depths.items() if n}

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make every append inside one transaction: one fsync for all of them.

        Leaving commits them (also when the body raised: what was appended is kept). If the
        disk refuses the transaction or its commit, its records wait in memory (module
        docstring). Nested calls join the open batch.
        """
        if self._batched is not None:
            yield
            return
        self._recreate_if_deleted()
        self._retry_deletes()
        self._flush_waiting()
        if not self._waiting:           # else its appends wait too, behind those (in order)
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._refused(str(exc))
        self._batched = []
        try:
            yield
        finally:
            try:
                self._commit()
            finally:
                self._batched = None

    def _commit(self) -> None:
        """Commit the batch; appends the disk refuses wait in memory (module docstring)."""
        if not self._db.in_transaction:   # never begun, or ended by SQLite (full, I/O error)
            self._undone(ENDED_BY_THE_DISK)
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._undone(str(exc))

    def close(self) -> None:
        """Close the database and release the lock. Undelivered records stay for the next run.

        Unless the file was deleted or another took its place while the daemon ran (and no
        turn since made it again): the records would go with the deleted file, so they are
        moved to the dead-letter files (``outbox.stranded``).
        """
        if not self._lock_fds:
            return
        if self._carried is None and not same_file(self.path, self._lock_fds[1]):
            self._set_aside_stranded()      # and what waits in memory: not into that file
        else:
            self._retry_deletes()
            self._flush_waiting()
        self._spill_waiting()
        if any(self._undeleted.values()):
            log.warning("outbox.delete_deferred", path=str(self.path),
                        records=sum(map(len, self._undeleted.values())),
                        effect="delivered once more at the next start: their delete was refused")
        self._db.close()
        release(self._lock_fds)
        self._lock_fds = ()

    def _set_aside_stranded(self) -> None:
        """The records of a database no longer at the path (deleted, replaced) to dead letters."""
        try:
            with _sqlite_errors(self.path, "read"):
                rows = [(sink, body) for sink, seq, body in self._db.execute(
                    "SELECT sink, seq, body FROM outbox ORDER BY sink, seq")
                    if seq not in self._undeleted.get(sink, ())]    # those were delivered
        except OutboxError as exc:
            log.error("outbox.stranded", path=str(self.path), error=str(exc))
            return
        for sink, body in rows:
            path = dead_letter_file(self.path.parent / DEAD_LETTERS, sink)
            append_dead_letter(path, {"sink": sink, "body": body, "error": "its outbox database "
                                      "was deleted or replaced while the daemon ran"})
        if rows:
            log.error("outbox.stranded", path=str(self.path), records=len(rows),
                      moved_to=str(self.path.parent / DEAD_LETTERS))

    def _recreate_if_deleted(self) -> None:
        """Create the database again if it was deleted while running, keeping its records.

        SQLite would go on writing to the deleted file: every turn queued from then on would be
        acknowledged, and gone at the next start. A file that is not ours at the path (another
        daemon's, after someone deleted ours and its locks; a copy moved in) is not merged into:
        appends are refused (the turns go to the dead-letter files) until a restart.

        Raises:
            OutboxError: another file is at the path.
        """
        if self._carried is None and same_file(self.path, self._lock_fds[1]):
            return
        if self._carried is None and self.path.exists():
            raise OutboxError(f"{self.path}: the outbox database was replaced while the daemon "
                              "ran (by another transcribed process, or a file moved there): "
                              "restart the daemon")
        if self._carried is None:
            with _sqlite_errors(self.path, "read"):
                self._carried = [row for row in self._db.execute("SELECT * FROM outbox")
                                 if row[1] not in self._undeleted.get(row[0], ())]
            self._undeleted.clear()         # not carried: delivered
            self._db.close()        # it checkpoints into the deleted file: then its WAL is stale
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        self._lock_fds = relock(self.path, self._lock_fds)
        self._db = open_database(self.path)
        with _sqlite_errors(self.path, "write to"):
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?)", self._carried)
            self._db.execute("COMMIT")
        log.warning("outbox.recreated", path=str(self.path), queued=len(self._carried),
                    reason="the database file was deleted while the daemon ran")
        self._carried = None

    # -- used by OutboxQueue ----------------------------------------------------------------

    def _append(self, queue: OutboxQueue, record: TurnRecord) -> None:
        """Store ``record`` (or hold it, in order, while the disk refuses: module docstring)."""
        sink = queue.sink
        depth = self._depths.get(sink, 0)
        if depth >= self.max_records:
            raise OutboxError(
                f"{self.path}: outbox is full for sink {sink!r} ({depth} undelivered records); "
                f"turn {record.id} was not queued"
            )
        if self._batched is None:
            self._recreate_if_deleted()
            self._retry_deletes()
            self._flush_waiting()
        entry = Waiting(queue, record)
        in_batch = self._batched is not None
        if in_batch and not self._db.in_transaction:     # SQLite ended it (full, I/O error)
            self._undone(ENDED_BY_THE_DISK)
        if self._waiting or (in_batch and not self._db.in_transaction):
            self._hold(entry)
        else:
            try:
                self._insert(entry)
            except sqlite3.Error as exc:
                self._rollback()
                self._undone(str(exc))
                self._refused(str(exc))
                self._hold(entry)
            else:
                if self._batched is not None:
                    self._batched.append(entry)
        self._depths[sink] = depth + 1

    def _insert(self, entry: Waiting) -> None:
        """INSERT one record (in the open transaction, if any)."""
        sink, record = entry.queue.sink, entry.record
        seq = self._next_seq.get(sink, 1)
        self._db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
                         (sink, seq, record.id, record.to_json(), time.time()))
        self._next_seq[sink] = seq + 1

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with suppress(sqlite3.Error):   # a failed statement may have ended it already
                self._db.execute("ROLLBACK")

    def _hold(self, entry: Waiting) -> None:
        """Keep ``entry`` in memory, behind the turns already waiting."""
        if len(self._waiting) >= WAITING_MAX:
            raise OutboxError(f"{self.path}: the disk does not take the outbox's writes and "
                              f"{len(self._waiting)} turns wait in memory; turn "
                              f"{entry.record.id} was not queued")
        self._waiting.append(entry)

    def _undone(self, why: str) -> None:
        """The open batch's transaction ended uncommitted: what it had written waits."""
        if self._batched:
            self._refused(why)
            self._waiting.extend(self._batched)
            self._batched.clear()

    def _refused(self, why: str) -> None:
        """Say once per outage of the disk that turns wait in memory."""
        if not self._waiting:
            log.warning("outbox.waiting", path=str(self.path), error=why,
                        effect="turns wait in memory until the disk takes them (a kill or "
                        "crash meanwhile loses them); network sinks deliver them after that")

    def _flush_waiting(self) -> bool:
        """Write the waiting turns, in order, in one transaction; whether none waits now."""
        if not self._waiting:
            return True
        if self._db.in_transaction:
            return False
        seqs = dict(self._next_seq)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for entry in self._waiting:
                self._insert(entry)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            self._next_seq = seqs
            return False
        log.info("outbox.caught_up", path=str(self.path), records=len(self._waiting))
        sinks = {entry.queue.sink for entry in self._waiting}
        self._waiting.clear()
        for sink in sinks:          # the sink's queue now: a reload may have made a fresh one
            if (queue := self._queues.get(sink)) is not None:
                queue.wake()
        return True

    def _waits_for(self, sink: str) -> bool:
        return any(entry.queue.sink == sink for entry in self._waiting)

    def _spill_waiting(self) -> None:
        """At close, turns still waiting go to their dead-letter files, or are named lost."""
        for entry in self._waiting:
            sink, record = entry.queue.sink, entry.record
            path = dead_letter_file(self.path.parent / DEAD_LETTERS, sink)
            reason = f"{self.path}: the disk did not take it before the exit"
            if append_dead_letter(path, {"sink": sink, "error": reason,
                                         "record": record.to_dict()}):
                log.error("sink.dead_lettered", sink=sink, record_id=record.id, error=reason,
                          path=str(path))
            else:
                log.error("sink.turn_lost", sink=sink, record_id=record.id, error=reason)
            self._depths[sink] = max(0, self._depths.get(sink, 0) - 1)
        self._waiting.clear()

    def _first_after(self, sink: str, seq: int) -> tuple[int, str] | None:
        with _sqlite_errors(self.path, "read"):
            row = self._db.execute(
                "SELECT seq, body FROM outbox WHERE sink = ? AND seq > ? ORDER BY seq LIMIT 1",
                (sink, seq),
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def _delete(self, sink: str, seq: int) -> None:
        """Forget a delivered record, without an fsync of its own (module docstring).

        One the disk refuses to delete is kept to be deleted later (module docstring).
        """
        if self._delivered(sink, seq):
            return
        self._retry_deletes()
        try:
            deleted = self._execute_deletes([(sink, seq)])
        except sqlite3.Error as exc:
            if not any(self._undeleted.values()):       # once per outage of the disk
                log.warning("outbox.delete_deferred", path=str(self.path), sink=sink,
                            error=str(exc), effect="the record counts as delivered; its delete "
                            "is tried again before the next write")
            self._undeleted.setdefault(sink, set()).add(seq)
            deleted = 1
        if deleted:
            self._depths[sink] = max(0, self._depths.get(sink, 0) - deleted)

    def _retry_deletes(self) -> None:
        """Delete what an earlier delete left (the disk refused it); quiet while it still does."""
        rows = [(sink, seq) for sink, seqs in self._undeleted.items() for seq in sorted(seqs)]
        if not rows or self._db.in_transaction:
            return
        try:
            self._execute_deletes(rows)
        except sqlite3.Error:
            return
        self._undeleted.clear()
        log.info("outbox.deletes_done", path=str(self.path), records=len(rows))

    def _execute_deletes(self, rows: list[tuple[str, int]]) -> int:
        """Delete ``rows`` (sink, seq) in one transaction with ``synchronous=NORMAL``; how many.

        Raises:
            sqlite3.Error: nothing was deleted.
        """
        own = len(rows) > 1 and not self._db.in_transaction   # one: a statement is atomic
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            if own:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                deleted = sum(self._db.execute("DELETE FROM outbox WHERE sink = ? AND seq = ?",
                                               row).rowcount for row in rows)
                if own:
                    self._db.execute("COMMIT")
            except sqlite3.Error:
                if own and self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        finally:
            self._db.execute("PRAGMA synchronous=FULL")
        return deleted

    def _delivered(self, sink: str, seq: int) -> bool:
        """Whether the record was delivered and only its delete is still to be done."""
        return seq in self._undeleted.get(sink, ())

    def _load_counters(self) -> tuple[dict[str, int], dict[str, int]]:
        with _sqlite_errors(self.path, "read"):
            rows = self._db.execute(
                "SELECT sink, COUNT(*), MAX(seq) FROM outbox GROUP BY sink"
            ).fetchall()
        depths = {str(sink): int(count) for sink, count, _ in rows}
        next_seq = {str(sink): int(top) + 1 for sink, _, top in rows}
        return depths, next_seq


class OutboxQueue:
    """One sink's queue in the outbox; implements ``daemon.queues.SinkQueue``.

    ``get`` hands out records in order, starting with those left by a previous run; a record
    stays on disk until ``ack``. One consumer per queue (the sink's dispatcher worker).
    """

    def __init__(self, outbox: Outbox, sink: str) -> None:
        self._outbox = outbox
        self.sink = sink
        self._cursor = 0  # seq of the last record handed out by get()
        self._wakeup = asyncio.Event()
        self._closed = False

    def put(self, record: TurnRecord) -> None:
        """Append ``record`` durably; once this returns the turn survives a crash.

        Inside ``batch`` that holds once the batch has ended. While the disk refuses writes the
        turn waits in memory instead (module docstring).

        Raises:
            OutboxError: the sink's queue is full, too many turns wait for the disk, or the
                database was replaced under the daemon.
        """
        self._outbox._append(self, record)
        self._wakeup.set()

    def wake(self) -> None:
        """Records were written for this queue: let a waiting ``get`` look."""
        self._wakeup.set()

    def batch(self) -> AbstractContextManager[object]:
        """The outbox's batch: appends of every sink inside it share one transaction."""
        return self._outbox.batch()

    async def get(self) -> Delivery | None:
        """The oldest record not yet handed out; waits for one; ``None`` once closed and empty."""
        while True:
            row = self._outbox._first_after(self.sink, self._cursor)
            if row is not None:
                self._cursor, body = row
                if self._outbox._delivered(self.sink, self._cursor):
                    continue
                record = self._decode(body)
                if record is not None:
                    return Delivery(record, key=self._cursor)
                continue
            if self._outbox._waits_for(self.sink):     # turns the disk has not taken yet
                if self._outbox._flush_waiting():
                    continue
                if self._closed:
                    return None                         # the outbox's close deals with them
                self._wakeup.clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(WAITING_RETRY_S):
                        await self._wakeup.wait()
                continue
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def ack(self, delivery: Delivery) -> None:
        """Delete a delivered (or dead-lettered) record."""
        self._outbox._delete(self.sink, delivery.key)

    def depth(self) -> int:
        """Records not yet delivered, including the one being delivered."""
        return self._outbox.depth(self.sink)

    def close(self) -> None:
        """Let ``get`` return ``None`` once every queued record has been handed out."""
        self._closed = True
        self._wakeup.set()

    @property
    def closed(self) -> bool:
        """``close`` was called."""
        return self._closed

    def requeue(self, delivery: Delivery) -> None:
        """Let ``get`` hand out ``delivery`` again (it is still in the outbox until ``ack``)."""
        self._cursor = min(self._cursor, delivery.key - 1)
        self._wakeup.set()

    def _decode(self, body: str) -> TurnRecord | None:
        try:
            return TurnRecord.from_dict(json.loads(body))
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError,
                RecursionError) as exc:       # a hand edit, another version's schema
            self._set_aside(body, exc)
            return None

    def _set_aside(self, body: str, exc: Exception) -> None:
        """Move an unreadable row to the dead-letter file; it stays if that cannot be written.

        Never deliver garbage, never lose it either (nor log it: it holds a transcript, which
        ``log.transcripts = false`` keeps out). A row kept is tried again at the next start.
        """
        path = dead_letter_file(self._outbox.path.parent / DEAD_LETTERS, self.sink)
        entry = {"sink": self.sink, "error": f"unreadable outbox record: {exc}", "body": body}
        if append_dead_letter(path, entry):
            log.error("outbox.record_unreadable", sink=self.sink, seq=self._cursor,
                      error=str(exc), moved_to=str(path))
            self._outbox._delete(self.sink, self._cursor)
            return
        log.error("outbox.record_unreadable", sink=self.sink, seq=self._cursor, error=str(exc),
                  kept_in=str(self._outbox.path),
                  hint="its dead-letter file cannot be written: it is moved there at a start "
                  "once it can")
