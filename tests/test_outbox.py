"""The durable outbox: order, persistence across restarts and kill -9, bounds, clear errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import pytest
from structlog.testing import capture_logs

from daemon.dispatch import Dispatcher
from daemon.events import TurnRecord, Word
from daemon.outbox import Outbox, OutboxError
from daemon.plugins import SinkConfig, SinkType
from daemon.queues import Delivery, MemoryQueue, SinkQueue
from daemon.reload import SinkBuilder
from daemon.runner import SinkRunner

ROOT = Path(__file__).resolve().parents[1]


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    """The entries of a dead-letter file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_turn(order: int, session: str = "sess") -> TurnRecord:
    """A small finished turn."""
    now = datetime(2026, 11, 23, 23, 10, 1, 120000, tzinfo=UTC)
    return TurnRecord(session, order, f"turn number {order}.", now, now, 0.9,
                      (Word("turn", 0, 200, 0.98),), None, "assemblyai", "test", "testhost")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3")
    yield box
    box.close()


class TestQueue:
    async def test_fifo_per_sink(self, outbox: Outbox) -> None:
        """Records come back in order per sink, and sinks do not see each other's records."""
        a, b = outbox.queue("a"), outbox.queue("b")
        for i in range(3):
            a.put(make_turn(i))
        b.put(make_turn(9))
        got = []
        for _ in range(3):
            delivery = await a.get()
            assert delivery is not None
            got.append(delivery.record)
            a.ack(delivery)
        assert [r.turn_order for r in got] == [0, 1, 2]
        assert got[0] == make_turn(0)
        assert (a.depth(), b.depth()) == (0, 1)

    async def test_get_waits_for_put(self, outbox: Outbox) -> None:
        """An empty queue's get() wakes up when a record is put."""
        queue = outbox.queue("a")
        waiter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        queue.put(make_turn(1))
        async with asyncio.timeout(2):
            delivery = await waiter
        assert delivery is not None
        assert delivery.record.id == "sess:1"

    async def test_close_drains_then_ends(self, outbox: Outbox) -> None:
        """After close(), get() hands out what is queued and then returns None."""
        queue = outbox.queue("a")
        queue.put(make_turn(1))
        queue.close()
        first = await queue.get()
        assert first is not None
        assert first.record.turn_order == 1
        assert await queue.get() is None

    async def test_unacked_and_queued_survive_reopen(self, tmp_path: Path) -> None:
        """Records not acked before close are handed out again, in order, after reopening."""
        path = tmp_path / "outbox.sqlite3"
        box = Outbox(path)
        queue = box.queue("hook")
        for i in range(4):
            queue.put(make_turn(i))
        first = await queue.get()
        assert first is not None
        queue.ack(first)
        await queue.get()  # handed out, never acked: the "crash" happens mid-delivery
        box.close()
        box = Outbox(path)
        try:
            queue = box.queue("hook")
            assert queue.depth() == 3
            orders = []
            for _ in range(3):
                delivery = await queue.get()
                assert delivery is not None
                orders.append(delivery.record.turn_order)
                queue.ack(delivery)
            assert orders == [1, 2, 3]
            queue.put(make_turn(4))
            delivery = await queue.get()
            assert delivery is not None
            assert delivery.record.turn_order == 4
        finally:
            box.close()


CHILD = """
import sys
from datetime import UTC, datetime
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from daemon.events import TurnRecord
from daemon.outbox import Outbox
box = Outbox(Path(sys.argv[1]))
queue = box.queue("hook")
now = datetime.now(UTC)
i = 0
while True:
    queue.put(TurnRecord("kill", i, "x" * 2000, now, now, 0.9, (), None, "local", "test", "h"))
    print(i, file=sys.stderr, flush=True)
    i += 1
"""


def run_and_kill(script: str, *args: str, lines: int) -> list[int]:
    """Run ``script`` in a child Python, read ``lines`` integers from its stderr, kill -9 it."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stderr is not None
    seen: list[int] = []
    try:
        for line in child.stderr:
            if line.strip().isdigit():
                seen.append(int(line))
                if len(seen) == lines:
                    break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert len(seen) == lines, "the child died before acknowledging enough records"
    return seen


class TestCrash:
    async def test_kill_9_keeps_every_acknowledged_record(self, tmp_path: Path) -> None:
        """After kill -9 of a writer, every record whose put() returned is there, untorn."""
        path = tmp_path / "outbox.sqlite3"
        acknowledged = run_and_kill(CHILD, str(path), lines=200)
        box = Outbox(path)
        try:
            queue = box.queue("hook")
            assert queue.depth() >= 200
            queue.close()
            stored = []
            while (delivery := await queue.get()) is not None:
                assert delivery.record.transcript == "x" * 2000
                stored.append(delivery.record.turn_order)
            assert stored[:200] == acknowledged
            assert stored == list(range(len(stored)))
        finally:
            box.close()


    async def test_delete_has_no_fsync_of_its_own(self, tmp_path: Path) -> None:
        """A delivered record's delete commits at synchronous=NORMAL; appends stay FULL.

        A lost delete (power loss only) means one more delivery, never a lost record.
        """
        path = tmp_path / "outbox.sqlite3"
        box = Outbox(path)
        try:
            queue = box.queue("hook")
            queue.put(make_turn(1))
            queue.put(make_turn(2))
            delivery = await queue.get()
            assert delivery is not None
            statements: list[str] = []
            box._db.set_trace_callback(statements.append)
            queue.ack(delivery)
            box._db.set_trace_callback(None)
            assert statements == ["PRAGMA synchronous=NORMAL",
                                  "DELETE FROM outbox WHERE sink = 'hook' AND seq = 1",
                                  "PRAGMA synchronous=FULL"]
            assert box._db.execute("PRAGMA synchronous").fetchone() == (2,)   # FULL again
        finally:
            box.close()
        box = Outbox(path)
        try:
            assert box.depth("hook") == 1
            again = await box.queue("hook").get()
            assert again is not None and again.record.turn_order == 2
        finally:
            box.close()


class NullSink:
    """A sink that accepts everything (only its queue matters here)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        return None


def null_runner(name: str, queue: SinkQueue) -> SinkRunner:
    """A runner whose sink accepts everything (only its queue matters here)."""
    return SinkRunner(name, SinkType("null", SinkConfig, lambda *_: NullSink()),
                      SinkConfig(type="null"), NullSink(), queue)


class TestBatch:
    """One turn to several durable sinks is one transaction: one fsync, all or nothing."""

    def test_one_transaction_for_all_durable_sinks(self, outbox: Outbox, tmp_path: Path) -> None:
        memory = MemoryQueue()
        dispatcher = Dispatcher([null_runner("mqtt", outbox.queue("mqtt")),
                                 null_runner("file", memory),
                                 null_runner("hook", outbox.queue("hook"))],
                                dead_letter_dir=tmp_path / "dead")
        statements: list[str] = []
        outbox._db.set_trace_callback(statements.append)   # SQLite's own statement trace
        dispatcher.dispatch(make_turn(1))
        outbox._db.set_trace_callback(None)
        assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
        assert (outbox.depth("mqtt"), outbox.depth("hook"), memory.depth()) == (1, 1, 1)

    async def test_a_refused_commit_waits_and_is_written_before_the_next_turn(
            self, outbox: Outbox, tmp_path: Path) -> None:
        """A commit the database refuses: the turn waits in memory for every durable sink (it
        was dead-lettered, and lost with the dead-letter file on the same full disk), one line
        says so, the in-memory sink gets it, and the next turn writes it first, in order."""
        memory = MemoryQueue()
        dispatcher = Dispatcher([null_runner("mqtt", outbox.queue("mqtt")),
                                 null_runner("file", memory),
                                 null_runner("hook", outbox.queue("hook"))],
                                dead_letter_dir=tmp_path / "dead")

        def refuse_commit(action: int, what: str | None, *_: object) -> int:
            denied = action == sqlite3.SQLITE_TRANSACTION and what == "COMMIT"
            return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

        outbox._db.set_authorizer(refuse_commit)        # a real refusal by SQLite itself
        with capture_logs() as logs:
            dispatcher.dispatch(make_turn(1))
        outbox._db.set_authorizer(None)
        [waiting] = logs
        assert (waiting["event"], waiting["path"]) == ("outbox.waiting", str(outbox.path))
        assert not (tmp_path / "dead").exists()
        assert (outbox.depth("mqtt"), outbox.depth("hook"), memory.depth()) == (1, 1, 1)

        dispatcher.dispatch(make_turn(2))
        for sink in ("mqtt", "hook"):
            queue = outbox.queue(sink)
            assert queue.depth() == 2
            queue.close()
            got = [d.record.turn_order async for d in _drain(queue)]
            assert got == [1, 2]


    async def test_a_record_with_a_lone_surrogate_is_queued(self, outbox: Outbox,
                                                           tmp_path: Path) -> None:
        """A lone surrogate (the protocol parser replaces them; a third-party engine might not)
        has no UTF-8 form: the record's JSON line escapes it, so the outbox takes the turn and
        gives it back unchanged (SQLite's encoder refused it: dead-lettered; before that it
        crashed the daemon)."""
        memory = MemoryQueue()
        queue = outbox.queue("hook")
        dispatcher = Dispatcher([null_runner("hook", queue), null_runner("file", memory)],
                                dead_letter_dir=tmp_path / "dead")
        record = dataclasses.replace(make_turn(1), transcript="caf\ud800e")
        with capture_logs():
            dispatcher.dispatch(record)
        assert not (tmp_path / "dead").exists()
        assert (queue.depth(), memory.depth()) == (1, 1)
        delivery = await queue.get()
        assert delivery is not None and delivery.record.transcript == "caf\ud800e"

    async def test_a_batch_the_disk_rolled_back_waits_in_memory(self, outbox: Outbox) -> None:
        """SQLite rolls a transaction back by itself on a full disk or an I/O error: what the
        batch had appended, and the later appends in it, wait in memory (they were refused
        and lost before) and are written, in order, before the next turn."""
        mqtt, hook = outbox.queue("mqtt"), outbox.queue("hook")
        with capture_logs() as logs:
            batch = outbox.batch()
            batch.__enter__()
            mqtt.put(make_turn(1))
            outbox._db.execute("ROLLBACK")            # what SQLITE_FULL / SQLITE_IOERR do
            hook.put(make_turn(1))
            batch.__exit__(None, None, None)
            assert (mqtt.depth(), hook.depth()) == (1, 1)
            assert outbox._first_after("mqtt", 0) is None       # not on disk yet
            with outbox.batch():                      # the next turn: both written first
                mqtt.put(make_turn(2))
                hook.put(make_turn(2))
        assert [e["event"] for e in logs] == ["outbox.waiting", "outbox.caught_up"]
        for queue in (mqtt, hook):
            firsts = [await queue.get(), await queue.get()]
            assert [d.record.id for d in firsts if d is not None] == ["sess:1", "sess:2"]


async def _drain(queue: SinkQueue) -> AsyncIterator[Delivery]:
    while (delivery := await queue.get()) is not None:
        queue.ack(delivery)
        yield delivery


class TestErrors:
    def test_full_outbox_is_a_clear_logged_error(self, tmp_path: Path) -> None:
        """A full sink queue refuses the record with an error naming the file, sink and turn."""
        box = Outbox(tmp_path / "outbox.sqlite3", max_records=2)
        try:
            queue = box.queue("hook")
            queue.put(make_turn(1))
            queue.put(make_turn(2))
            with pytest.raises(OutboxError, match=r"outbox is full for sink 'hook'.*sess:3"):
                queue.put(make_turn(3))
            runner = SinkRunner("hook", SinkType("null", SinkConfig, lambda *_: NullSink()),
                                SinkConfig(type="null"), NullSink(), queue)
            dispatcher = Dispatcher([runner], dead_letter_dir=tmp_path / "dead")
            with capture_logs() as logs:
                dispatcher.dispatch(make_turn(4))
            assert [e["event"] for e in logs] == ["sink.enqueue_failed", "sink.dead_lettered"]
            dead = (tmp_path / "dead" / "hook.jsonl").read_text()
            assert "sess:4" in dead                      # the turn is kept, not dropped
            assert box.queue("other").depth() == 0
        finally:
            box.close()

    def test_corrupt_database_names_the_path(self, tmp_path: Path) -> None:
        """A file that is not an SQLite database gives one line naming it."""
        path = tmp_path / "outbox.sqlite3"
        path.write_bytes(b"this is not a database" * 100)
        with pytest.raises(OutboxError) as info:
            Outbox(path)
        message = str(info.value)
        assert message.startswith(f"{path}: outbox database is unreadable")
        assert "\n" not in message

    def test_an_unopenable_database_is_not_called_damaged(self, tmp_path: Path) -> None:
        """Only a damaged file is worth moving aside (the advice loses its queued turns); a
        database SQLite cannot open (here: a folder; also a full disk) says what SQLite says."""
        path = tmp_path / "outbox.sqlite3"
        path.mkdir()
        with pytest.raises(OutboxError) as info:
            Outbox(path)
        assert str(info.value).startswith(f"{path}: cannot open the outbox database: ")
        assert "move it aside" not in str(info.value)

    async def test_unreadable_record_goes_to_the_dead_letter_file(self, tmp_path: Path) -> None:
        """A row that does not decode (a manual edit) is not delivered, not lost and not logged
        (it holds a transcript): its body goes to the sink's dead-letter file."""
        box = Outbox(tmp_path / "outbox.sqlite3")
        try:
            queue = box.queue("hook")
            queue.put(make_turn(1))
            queue.put(make_turn(2))
            box._db.execute("UPDATE outbox SET body = ? WHERE seq = 1",
                            ('{"transcript": "secret words", "broken": true}',))
            with capture_logs() as logs:
                delivery = await queue.get()
            assert delivery is not None and delivery.record.turn_order == 2
            [event] = [e for e in logs if e["event"] == "outbox.record_unreadable"]
            assert "secret words" not in repr(event)
            [entry] = read_dead_letters(tmp_path / "dead-letter" / "hook.jsonl")
            assert "secret words" in entry["body"] and entry["error"].startswith("unreadable")
            assert box.depth("hook") == 1
        finally:
            box.close()

    def test_orphaned_records_are_named_at_start(self, tmp_path: Path) -> None:
        """Records of a sink no longer configured (renamed, removed) are named at start, also
        when no network sink is left; they stay for a sink of that name."""
        box = Outbox(tmp_path / "outbox.sqlite3")
        box.queue("old-hook").put(make_turn(1))
        box.queue("bus").put(make_turn(1))
        box.close()
        with capture_logs() as logs:
            SinkBuilder("h", tmp_path).warn_orphans(["bus"])
            SinkBuilder("h", tmp_path).warn_orphans([])
        orphaned = [(e["sink"], e["queued"]) for e in logs if e["event"] == "outbox.orphaned"]
        assert orphaned == [("old-hook", 1), ("bus", 1), ("old-hook", 1)]
        kept = Outbox(tmp_path / "outbox.sqlite3")
        assert kept.depth("old-hook") == 1
        kept.close()

    def test_second_process_is_refused(self, tmp_path: Path) -> None:
        """Opening an outbox that is already open fails instead of delivering twice."""
        path = tmp_path / "outbox.sqlite3"
        box = Outbox(path)
        try:
            with pytest.raises(OutboxError, match="in use by another"):
                Outbox(path)
        finally:
            box.close()
        Outbox(path).close()


class TestDeletedWhileRunning:
    @pytest.mark.parametrize("removed", ["database", "state dir"])
    async def test_records_survive_the_file_being_deleted(self, tmp_path: Path,
                                                          removed: str) -> None:
        """Deleted while the daemon runs (the file, or the whole state dir), the database is
        created again at the next append with what it held: nothing acknowledged is lost."""
        state = tmp_path / "state"
        path = state / "outbox.sqlite3"
        box = Outbox(path)
        box.queue("bus").put(make_turn(0))
        if removed == "database":
            path.unlink()
        else:
            for leftover in state.iterdir():
                leftover.unlink()
            state.rmdir()
        with capture_logs() as logs:
            box.queue("bus").put(make_turn(1))
        box.close()
        assert [e["queued"] for e in logs if e["event"] == "outbox.recreated"] == [1]
        again = Outbox(path)
        try:
            queue = again.queue("bus")
            got = [await queue.get() for _ in range(2)]
            assert [d.record.id for d in got if d is not None] == ["sess:0", "sess:1"]
            with pytest.raises(OutboxError, match="in use by another"):
                Outbox(path)                    # the recreated lock is held again
        finally:
            again.close()


class TestWaitingTurnsAndAFileGone:
    """Turns waiting in memory (the disk refused them) when the outbox file was deleted: at
    close they were written into the deleted file (``outbox.caught_up``) and lost with it."""

    def test_they_are_dead_lettered_with_the_stranded_ones(self, tmp_path: Path) -> None:
        box = Outbox(tmp_path / "outbox.sqlite3")
        queue = box.queue("hook")
        queue.put(make_turn(1))
        pages = box._db.execute("PRAGMA page_count").fetchone()[0]
        box._db.execute(f"PRAGMA max_page_count = {pages}")    # SQLite's own SQLITE_FULL
        queue.put(dataclasses.replace(make_turn(2), transcript="x" * 20_000))
        assert box._first_after("hook", 1) is None               # it waits in memory
        box._db.execute("PRAGMA max_page_count = 1000000")
        box.path.unlink()
        with capture_logs() as logs:
            box.close()
        lines = (tmp_path / "dead-letter" / "hook.jsonl").read_text().splitlines()
        entries = [json.loads(line) for line in lines]      # the file's rows, then ours
        ids = [e["record"]["id"] if "record" in e else json.loads(e["body"])["id"]
               for e in entries]
        assert ids == ["sess:1", "sess:2"]
        assert "outbox.caught_up" not in [e["event"] for e in logs]
