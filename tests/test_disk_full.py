"""A full disk, on a real small filesystem: a 256 KiB tmpfs mounted for each test.

The state folder (outbox, dead letters) or a file sink's file lies on it; a filler file takes
every free byte, and deleting it gives the space back. Real dispatcher, outbox, webhook sink,
HTTP server and file sink. Mounting needs root: elsewhere the tests are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.dispatch import Dispatcher
from daemon.outbox import WAITING_RETRY_S, Outbox
from daemon.plugins import SinkContext
from daemon.queues import MemoryQueue
from daemon.runner import SinkRunner
from plugins.file import FileSink, FileSinkConfig
from plugins.file import transcribed_sink_types as file_types
from plugins.webhook import WebhookConfig, WebhookSink
from plugins.webhook import transcribed_sink_types as webhook_types
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.http_receiver import HttpReceiver, Reply
from tests.sink_watch import Watched
from tests.test_outbox import make_turn

WITHIN_S = 8.0
S1 = "espeak-s1.wav"


@dataclass
class Disk:
    """A mounted tmpfs; ``fill()`` takes all its free space, ``free()`` gives it back."""

    root: Path

    @property
    def _filler(self) -> Path:
        return self.root / "filler"

    def fill(self) -> None:
        """Write until the filesystem refuses even one byte (ENOSPC)."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, bytes(size))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:       # full, nothing else
                        raise
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 256 KiB tmpfs at ``tmp_path/disk``, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that can fill) needs root")
    root = tmp_path / "disk"
    root.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(root)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=False)


class LogWatch:
    """The log lines, as structlog's ``capture_logs`` keeps them; ``seen`` awaits one."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._new = asyncio.Event()

    def __call__(self, _logger: object, method: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        self.lines.append({**event, "log_level": method})
        self._new.set()
        raise structlog.DropEvent

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e["event"] == name]

    async def seen(self, name: str) -> dict[str, Any]:
        """The first line called ``name``, once there is one."""
        async with asyncio.timeout(WITHIN_S):
            while not (found := self.named(name)):
                self._new.clear()
                await self._new.wait()
        return found[0]


@contextmanager
def watch_logs() -> Iterator[LogWatch]:
    """``structlog.testing.capture_logs``, with lines that can be awaited."""
    watch = LogWatch()
    processors = structlog.get_config()["processors"]
    kept = processors.copy()
    processors.clear()
    processors.append(watch)
    structlog.configure(processors=processors)
    try:
        yield watch
    finally:
        processors.clear()
        processors.extend(kept)
        structlog.configure(processors=processors)


def webhook_runner(name: str, url: str, box: Outbox) -> SinkRunner:
    cfg = WebhookConfig.model_validate({"type": "webhook", "timeout_s": 2, "url": url})
    return SinkRunner(name, webhook_types()[0], cfg, WebhookSink(name, cfg), box.queue(name))


async def received_ids(receiver: HttpReceiver, until: str) -> list[str]:
    """The ids of the turns the server receives, up to and including ``until``."""
    ids: list[str] = []
    while not ids or ids[-1] != until:
        request = await receiver.next(within=WITHIN_S)
        if request.status == 200:
            ids.append(json.loads(request.body)["data"]["id"])
    return ids


async def test_a_full_state_disk_does_not_make_the_webhook_send_a_turn_again_and_again(
        disk: Disk) -> None:
    """The outbox's disk fills while a webhook that works has turns queued. SQLite needs room
    even to delete a delivered record: the failed delete crashed the sink's worker, which sent
    the same turn again at every restart (six times in five seconds, without end while the disk
    stayed full) and never got to the next. Now each turn goes once, in order; one line says
    the deletes wait; with space back they are done and the outbox is empty."""
    box = Outbox(disk.root / "state" / "outbox.sqlite3")
    async with HttpReceiver() as receiver:
        dispatcher = Dispatcher([webhook_runner("hook", receiver.url + "/hook", box)],
                                dead_letter_dir=disk.root / "state" / "dead-letter")
        for order in (1, 2, 3):
            dispatcher.dispatch(make_turn(order))
        disk.fill()
        with watch_logs() as logs:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                assert await received_ids(receiver, "sess:3") == ["sess:1", "sess:2", "sess:3"]
                disk.free()
                dispatcher.dispatch(make_turn(4))
                assert await received_ids(receiver, "sess:4") == ["sess:4"]
                await dispatcher.close(flush_s=5)
    box.close()
    assert not logs.named("sink.crashed")
    [deferred] = logs.named("outbox.delete_deferred")
    assert deferred["path"] == str(box.path) and "full" in deferred["error"]
    assert logs.named("outbox.deletes_done")        # 2 or 3: the last ack may come after the free
    assert Outbox(box.path).depth("hook") == 0          # nothing to deliver again at a start


async def test_a_stop_while_the_deletes_wait_delivers_those_turns_again_at_the_start(
        disk: Disk) -> None:
    """Stopped before the disk has room, the delivered turns are still in the outbox: the stop
    says so in one line, and the next start delivers them once more (a duplicate, never a
    loss); with room, their deletes are done."""
    box = Outbox(disk.root / "outbox.sqlite3")
    queue = box.queue("hook")
    queue.put(make_turn(1))
    queue.put(make_turn(2))
    disk.fill()
    with watch_logs() as logs:
        delivery = await queue.get()
        assert delivery is not None
        queue.ack(delivery)
        assert queue.depth() == 1
        again = await queue.get()               # the next one, not the delivered one again
        assert again is not None and again.record.id == "sess:2"
        box.close()
    [_, stopped] = logs.named("outbox.delete_deferred")
    assert stopped["records"] == 1
    disk.free()
    box = Outbox(box.path)
    try:
        assert box.depth("hook") == 2
    finally:
        box.close()


async def test_turns_that_come_while_the_state_disk_is_full_wait_and_lose_nothing(
        disk: Disk, tmp_path: Path) -> None:
    """The state disk is full and the webhook server down while turns come. Dispatch neither
    blocks nor raises (transcription goes on) and a sink elsewhere gets every turn. The turns
    the disk refused wait in memory (one line says so) and are written once it has room:
    every turn reaches the server, in order (the two the disk refused were lost, each with
    three error lines, before)."""
    box = Outbox(disk.root / "state" / "outbox.sqlite3")
    async with HttpReceiver() as receiver:
        url = receiver.url + "/hook"
        receiver.script(*[Reply(503)] * 200)            # down until the script is cleared
        journal = tmp_path / "journal.jsonl"
        file_cfg = FileSinkConfig(type="file", path=str(journal), fsync=False)
        file_sink = FileSink("journal", file_cfg, SinkContext("h", tmp_path))
        dispatcher = Dispatcher([webhook_runner("hook", url, box),
                                 SinkRunner("journal", file_types()[0], file_cfg, file_sink,
                                            MemoryQueue())],
                                dead_letter_dir=disk.root / "state" / "dead-letter")
        with watch_logs() as logs:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                dispatcher.dispatch(make_turn(1))
                await receiver.next(within=WITHIN_S)       # 503: the server is down
                disk.fill()
                for order in (2, 3):
                    dispatcher.dispatch(make_turn(order))
                disk.free()
                dispatcher.dispatch(make_turn(4))
                receiver.clear_script()
                assert await received_ids(receiver, "sess:4") == [
                    "sess:1", "sess:2", "sess:3", "sess:4"]
                await dispatcher.close(flush_s=5)
    box.close()
    [waiting] = logs.named("outbox.waiting")
    assert waiting["path"] == str(box.path) and "full" in waiting["error"]
    [caught_up] = logs.named("outbox.caught_up")
    assert caught_up["records"] == 2
    assert not logs.named("sink.turn_lost") and not logs.named("sink.enqueue_failed")
    assert [json.loads(line)["id"] for line in journal.read_text().splitlines()] == [
        "sess:1", "sess:2", "sess:3", "sess:4"]


async def test_waiting_turns_go_once_there_is_room_without_another_turn(disk: Disk) -> None:
    """No turn comes after the disk has room again (silence): the idle sink's ``get`` writes
    the waiting turn itself (every ``WAITING_RETRY_S``) and hands it out."""
    box = Outbox(disk.root / "state" / "outbox.sqlite3")
    queue = box.queue("hook")
    disk.fill()
    queue.put(make_turn(1))
    assert box.depth("hook") == 1 and box._first_after("hook", 0) is None
    getter = asyncio.create_task(queue.get())
    with pytest.raises(TimeoutError):           # tried, the disk still full: it waits
        await asyncio.wait_for(asyncio.shield(getter), 0.5)
    disk.free()
    delivery = await asyncio.wait_for(getter, WAITING_RETRY_S + WITHIN_S)
    assert delivery is not None and delivery.record.id == "sess:1"
    box.close()


async def test_a_stop_while_turns_wait_dead_letters_them(disk: Disk, tmp_path: Path) -> None:
    """The daemon stops while the disk still refuses the outbox: the waiting turn goes to the
    sink's dead-letter file (here on another disk), not lost."""
    box = Outbox(disk.root / "state" / "outbox.sqlite3")
    disk.fill()
    with watch_logs() as logs:
        box.queue("hook").put(make_turn(1))
        dead = tmp_path / "dead-letter"
        dead.mkdir()
        (disk.root / "state" / "dead-letter").symlink_to(dead, target_is_directory=True)
        box.close()
    [entry] = (dead / "hook.jsonl").read_text().splitlines()
    assert json.loads(entry)["record"]["id"] == "sess:1"
    [said] = logs.named("sink.dead_lettered")
    assert said["sink"] == "hook" and said["record_id"] == "sess:1"
    assert not logs.named("sink.turn_lost")


async def test_a_file_sink_on_a_full_disk_waits_and_loses_nothing(
        disk: Disk, tmp_path: Path) -> None:
    """The file sink's disk fills: its turns wait (retried), another file sink elsewhere gets
    every turn meanwhile, and once there is room the file gets each turn once, whole, in
    order."""
    path = disk.root / "turns.jsonl"
    cfg = FileSinkConfig(type="file", path=str(path), fsync=True)
    full = Watched(FileSink("full", cfg, SinkContext("h", tmp_path)))
    other_path = tmp_path / "other.jsonl"
    other_cfg = FileSinkConfig(type="file", path=str(other_path), fsync=False)
    other = Watched(FileSink("other", other_cfg, SinkContext("h", tmp_path)))
    dispatcher = Dispatcher([SinkRunner("full", file_types()[0], cfg, full, MemoryQueue()),
                             SinkRunner("other", file_types()[0], other_cfg, other,
                                        MemoryQueue())],
                            dead_letter_dir=tmp_path / "dead-letter")
    with watch_logs() as logs:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            disk.fill()
            for order in range(1, 6):
                dispatcher.dispatch(make_turn(order))
            async with asyncio.timeout(WITHIN_S):
                await full.failed.wait()
            await other.delivered(5)
            assert full.sent == 0
            disk.free()
            await dispatcher.close(flush_s=WITHIN_S)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"sess:{n}" for n in range(1, 6)]
    [failed] = logs.named("sink.send_failed")
    assert str(path) in failed["error"]
    assert not logs.named("sink.turn_lost") and not (tmp_path / "dead-letter").exists()


async def test_a_refused_turn_waits_in_the_outbox_while_its_dead_letter_file_cannot_be_written(
        disk: Disk) -> None:
    """The webhook refuses a turn (400) while the state disk is full: its dead-letter line
    cannot be written, so it stays in the outbox (one line naming the file), the next turn
    waits behind it, and with room again it is dead-lettered and the next one delivered."""
    state = disk.root / "state"
    box = Outbox(state / "outbox.sqlite3")
    async with HttpReceiver() as receiver:
        receiver.script(Reply(400))
        dispatcher = Dispatcher([webhook_runner("hook", receiver.url + "/hook", box)],
                                dead_letter_dir=state / "dead-letter")
        dispatcher.dispatch(make_turn(1))
        dispatcher.dispatch(make_turn(2))
        disk.fill()
        with watch_logs() as logs:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                refused = await receiver.next(within=WITHIN_S)
                assert refused.status == 400
                await logs.seen("sink.dead_letter_failed")
                assert box.depth("hook") == 2
                disk.free()
                assert await received_ids(receiver, "sess:2") == ["sess:2"]
                await dispatcher.close(flush_s=5)
    box.close()
    [failed] = logs.named("sink.dead_letter_failed")
    assert failed["path"] == str(state / "dead-letter" / "hook.jsonl")
    assert failed["record_id"] == "sess:1"
    [entry] = (state / "dead-letter" / "hook.jsonl").read_text().splitlines()
    assert json.loads(entry)["record"]["id"] == "sess:1"
    assert Outbox(box.path).depth("hook") == 0


async def test_a_run_whose_state_disk_is_full_at_the_start_exits_naming_the_outbox(
        disk: Disk, tmp_path: Path) -> None:
    """``transcribed run`` with its state folder on a full disk and a webhook sink: the outbox
    cannot be made, and the daemon exits 1 in one line naming the file and the full disk."""
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as fake, \
            HttpReceiver() as receiver:
        config = run_config(tmp_path, fake, receiver, disk.root / "state")
        disk.fill()
        result = await run_daemon("run", "--config", str(config), limit_s=30)
    assert result.code == 1, result.stderr
    [failed] = result.events("daemon.failed")
    assert failed["error"] == (f"{disk.root / 'state' / 'outbox.sqlite3'}: cannot open the "
                               "outbox database: database or disk is full")
    assert [e["event"] for e in result.logs() if e.get("level") == "error"] == ["daemon.failed"]


async def test_a_run_whose_state_disk_fills_transcribes_on_and_names_the_turn_it_loses(
        disk: Disk, tmp_path: Path) -> None:
    """The state disk fills once the daemon runs, and stays full to the end: the file sink
    elsewhere still gets the turn; the webhook's copy waits in memory (one line) and, still
    waiting at the exit with its dead-letter file on the same full disk, is named as lost;
    the run ends with exit 0."""
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as fake, \
            HttpReceiver() as receiver:
        config = run_config(tmp_path, fake, receiver, disk.root / "state")
        daemon = await Daemon.start("run", "--config", str(config))
        try:
            assert daemon.process.stderr is not None
            async with asyncio.timeout(WITHIN_S):
                while b'"outbox.opened"' not in await daemon.process.stderr.readline():
                    pass
            disk.fill()
            result = await daemon.finish(limit_s=30)
        finally:
            await daemon.kill_if_running()
    assert result.code == 0, result.stderr
    assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]
    [waiting] = result.events("outbox.waiting")
    assert "database or disk is full" in waiting["error"]
    [lost] = result.events("sink.turn_lost")
    assert lost["sink"] == "hook" and "did not take it before the exit" in lost["error"]
    assert not receiver.received


def run_config(tmp_path: Path, fake: FakeAssemblyAI, receiver: HttpReceiver,
               state: Path) -> Path:
    """A run of S1 to a file sink in ``tmp_path`` and a webhook, its state folder ``state``."""
    sinks = (f'[sinks.journal]\ntype = "file"\npath = "{tmp_path / "turns.jsonl"}"\n'
             f'[sinks.hook]\ntype = "webhook"\nurl = "{receiver.url}/hook"\n')
    config = cloud_config(tmp_path, fake, SPEECH_DIR / S1, sinks=sinks)
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(state)))
    config.chmod(0o600)
    return config
