"""A record the sink refuses for good, when its dead-letter file cannot be written either.

The dead-letter file is the last place a turn can be kept. When it cannot take one (a full disk,
a folder we may not write), a record in the outbox stays there until it can (it was acknowledged
and deleted, after a ``sink.dead_lettered`` line claiming it was kept); a record in memory has
nowhere to go, and the log says it is lost. Real dispatcher, outbox and queues; the refusing
sink is a third-party sink of the test's own.
"""

from __future__ import annotations

import asyncio
import resource
import signal
from pathlib import Path
from typing import Self

from structlog.testing import capture_logs

from daemon.app import sinks_status
from daemon.deadletter import append_dead_letter
from daemon.dispatch import Dispatcher
from daemon.errors import PermanentSinkError
from daemon.events import TurnRecord
from daemon.outbox import Outbox
from daemon.plugins import SinkConfig, SinkType
from daemon.queues import MemoryQueue, SinkQueue
from daemon.runner import SinkRunner
from tests.test_outbox import make_turn, read_dead_letters


class Refusing:
    """A sink that refuses every record for good, and says when it has been asked."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        self.asked.set()
        raise PermanentSinkError("the receiver refuses it: 400 Bad Request")


def refusing_runner(queue: SinkQueue) -> tuple[SinkRunner, Refusing]:
    sink = Refusing()
    runner = SinkRunner("hook", SinkType("refusing", SinkConfig, lambda *_: sink),
                        SinkConfig(type="refusing"), sink, queue)
    return runner, sink


async def _until(condition: asyncio.Event) -> None:
    async with asyncio.timeout(10):
        await condition.wait()


async def test_a_record_in_the_outbox_waits_until_its_dead_letter_can_be_written(
    tmp_path: Path,
) -> None:
    """The dead-letter folder cannot be made (its parent is a file): the refused record stays
    in the outbox; once the folder can be made, it is dead-lettered and only then removed."""
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    dead = blocker / "dead-letter"
    box = Outbox(tmp_path / "outbox.sqlite3")
    runner, sink = refusing_runner(box.queue("hook"))
    dispatcher = Dispatcher([runner], dead_letter_dir=dead)
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(1))
            await _until(sink.asked)        # refused, and its dead letter tried, before this
            assert [e["event"] for e in logs if e["event"].startswith("sink.dead_letter")] == [
                "sink.dead_letter_failed"]
            assert box.depth("hook") == 1, "acknowledged before it was kept anywhere"
            assert runner.stats.failed == 1     # /metrics shows the sink stuck, not idle
            assert sinks_status(dispatcher) == "hook (1 queued; hook failing)"  # and STATUS=
            blocker.unlink()                # the folder can be made now: the retry writes it
            sink.asked.clear()
            dispatcher.dispatch(make_turn(2))
            await _until(sink.asked)        # the next record: the first one is done with
            assert box.depth("hook") == 0
            await dispatcher.close(flush_s=5)
    box.close()
    assert [e["record"]["id"] for e in read_dead_letters(dead / "hook.jsonl")] == [
        "sess:1", "sess:2"]
    assert [e["event"] for e in logs if e["event"].startswith("sink.dead_letter")] == [
        "sink.dead_letter_failed", "sink.dead_lettered", "sink.dead_lettered"]
    assert runner.stats.dead_lettered == 2


async def test_a_record_in_memory_that_cannot_be_dead_lettered_is_said_lost(
    tmp_path: Path,
) -> None:
    """A queue in memory cannot keep it: ``sink.turn_lost`` names it, and no line claims it
    was dead-lettered."""
    blocker = tmp_path / "state"
    blocker.write_text("a file")
    runner, sink = refusing_runner(MemoryQueue())
    dispatcher = Dispatcher([runner], dead_letter_dir=blocker / "dead-letter")
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(2))
            await _until(sink.asked)
            await dispatcher.close(flush_s=5)
    events = [e["event"] for e in logs]
    assert "sink.dead_lettered" not in events
    [lost] = [e for e in logs if e["event"] == "sink.turn_lost"]
    assert lost["record_id"] == "sess:2"
    assert runner.stats.dead_lettered == 0


def test_a_dead_letter_cut_short_leaves_no_piece_behind(tmp_path: Path) -> None:
    """A full disk cut a dead-letter line short (here the file size limit, RLIMIT_FSIZE): the
    retry's line ran on from the piece, and neither record could be read. The piece is cut off
    again, so the file holds whole lines only."""
    path = tmp_path / "hook.jsonl"
    assert append_dead_letter(path, {"sink": "hook", "record": make_turn(1).to_dict()})
    size = path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    try:
        with capture_logs() as logs:
            kept = append_dead_letter(path, {"sink": "hook", "record": make_turn(2).to_dict()})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not kept and [e["event"] for e in logs] == ["sink.dead_letter_failed"]
    assert path.stat().st_size == size
    assert append_dead_letter(path, {"sink": "hook", "record": make_turn(2).to_dict()})
    assert [e["record"]["id"] for e in read_dead_letters(path)] == ["sess:1", "sess:2"]
