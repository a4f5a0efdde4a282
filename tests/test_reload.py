"""SIGHUP reload: sinks added, removed and rebuilt without losing a turn; bad files rejected."""

from __future__ import annotations

import asyncio
import signal
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.config import Settings
from daemon.dispatch import Dispatcher
from daemon.errors import SinkError
from daemon.events import TurnRecord
from daemon.logs import SecretMasker
from daemon.outbox import Outbox, OutboxQueue
from daemon.plugins import SinkConfig, SinkType
from daemon.queues import Delivery, MemoryQueue
from daemon.reload import Reloader, SinkBuilder
from daemon.runner import SinkRunner
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, cloud_config, read_turns
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.notify_socket import NotifySocket
from tests.test_outbox import make_turn

PARTS = ("espeak-s1.wav", "espeak-s3.wav", "espeak-s5.wav")


def _three_sentences(path: Path) -> Path:
    """S1, S3 and S5 with a second of silence after each: three turns in about 14 s."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        for name in PARTS:
            with wave.open(str(SPEECH_DIR / name), "rb") as part:
                out.writeframes(part.readframes(part.getnframes()))
            out.writeframes(bytes(2 * 16000))
    return path


def _file_sink(name: str, path: Path) -> str:
    return f'[sinks.{name}]\ntype = "file"\npath = "{path}"\n'


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, *PARTS)) as server:
        yield server


async def test_reload_good_then_bad(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """A new sink starts receiving, the old one keeps going; a broken file changes nothing."""
    wav = _three_sentences(tmp_path / "three.wav")
    main, extra = tmp_path / "main.jsonl", tmp_path / "extra.jsonl"
    config = cloud_config(tmp_path, fake, wav, sinks=_file_sink("main", main))
    async with NotifySocket.listening(tmp_path / "notify.sock") as sock:
        daemon = await Daemon.start("run", "--config", str(config), env=sock.env(2_000_000))
        async with asyncio.timeout(20):
            await sock.wait_for(lambda m: "1 turns" in m.fields.get("STATUS", ""))
            cloud_config(tmp_path, fake, wav,
                         sinks=_file_sink("main", main) + _file_sink("extra", extra))
            daemon.signal(signal.SIGHUP)
            applied = await sock.wait_for(lambda m: "reload applied" in m.fields.get("STATUS", ""))
            assert "RELOADING" in sock.messages[applied - 1]
            await sock.wait_for(lambda m: "2 turns" in m.fields.get("STATUS", ""))
            cloud_config(tmp_path, fake, wav, sinks=_file_sink("main", main)
                         + _file_sink("extra", extra) + '[sinks.broken]\ntype = "nope"\n')
            daemon.signal(signal.SIGHUP)
            await sock.wait_for(lambda m: "reload rejected" in m.fields.get("STATUS", ""))
        result = await daemon.finish(30)
    assert result.code == 0, result.stderr
    expected = [TRANSCRIPTS[name] for name in PARTS]
    assert [t["transcript"] for t in read_turns(main)] == expected
    assert [t["transcript"] for t in read_turns(extra)] == expected[1:]
    (applied_line,) = result.events("reload.applied")
    assert applied_line["added"] == ["extra"] and applied_line["kept"] == ["main"]
    (rejected,) = result.events("reload.rejected")
    (problem,) = rejected["problems"]
    assert problem.startswith(f"{config}: sinks.broken.type: unknown type 'nope'")
    assert not result.events("reload.restart_required")


@pytest.mark.parametrize("found", ["nothing", "an empty file"])
async def test_reload_finding_no_sinks_is_refused(tmp_path: Path, found: str) -> None:
    """A config moved away (the lookup falls back to the defaults) or emptied mid-edit: the
    reload is refused and the running sinks stay (every turn went to stdout only)."""
    journal = {"journal": {"type": "file", "path": str(tmp_path / "t.jsonl")}}
    running = Settings(sinks=journal)
    empty = tmp_path / "config.toml"
    empty.write_text("")
    path = None if found == "nothing" else empty
    dispatcher = Dispatcher([], dead_letter_dir=tmp_path)
    reloader = Reloader(lambda: (Settings(), path, {}), running, dispatcher=dispatcher,
                        sinks=SinkBuilder("h", tmp_path), masker=SecretMasker())
    with capture_logs() as logs:
        assert await reloader.reload() == "rejected"
    [rejected] = [e for e in logs if e["event"] == "reload.rejected"]
    [problem] = rejected["problems"]
    where = f"{empty} configures" if path else "no config file found: the defaults configure"
    assert problem == (f"{where} no [sinks] (the running config has journal); restart to run "
                       "without them")
    assert reloader.settings is running


# --------------------------------------------------------------- the dispatcher's side


class _Recorder:
    """A sink that records what it receives; fails while ``failing`` is set."""

    def __init__(self, failing: bool = False) -> None:
        self.received: list[str] = []
        self.failing = failing
        self.attempted = asyncio.Event()
        self.got = asyncio.Condition()

    async def __aenter__(self) -> _Recorder:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        self.attempted.set()
        if self.failing:
            raise SinkError("destination down")
        self.received.append(record.id)
        async with self.got:
            self.got.notify_all()

    async def wait_count(self, n: int) -> None:
        async with self.got:
            await self.got.wait_for(lambda: len(self.received) >= n)


def _runner(name: str, sink: _Recorder, queue: MemoryQueue | OutboxQueue | None = None,
            durable: bool = False) -> SinkRunner:
    sink_type = SinkType("recorder", SinkConfig, lambda *_: sink, durable=durable)
    return SinkRunner(name, sink_type, SinkConfig(type="recorder"), sink, queue or MemoryQueue())


@asynccontextmanager
async def _failing_hook(tmp_path: Path) -> AsyncIterator[
        tuple[Dispatcher, _Recorder, _Recorder, Outbox]]:
    """A running dispatcher with one durable sink ``hook`` whose destination is down, and the
    recorder meant to take over; on exit: flushed, the outbox emptied and closed."""
    old, new = _Recorder(failing=True), _Recorder()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        dispatcher = Dispatcher([_runner("hook", old, outbox.queue("hook"), durable=True)],
                                dead_letter_dir=tmp_path)
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            dispatcher.start(group)
            yield dispatcher, old, new, outbox
            await dispatcher.close(5)
        assert outbox.depth("hook") == 0
    finally:
        outbox.close()


class TestDispatcherChanges:
    async def test_replace_hands_queued_and_in_flight_records_over(self, tmp_path: Path) -> None:
        """A rebuilt sink gets the old one's in-flight and queued records first, in order."""
        old, new = _Recorder(failing=True), _Recorder()
        dispatcher = Dispatcher([_runner("s", old)], dead_letter_dir=tmp_path)
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            dispatcher.start(group)
            for i in range(3):
                dispatcher.dispatch(make_turn(i))
            await old.attempted.wait()  # record 0 is in flight, backing off
            await dispatcher.replace(_runner("s", new))
            dispatcher.dispatch(make_turn(3))
            await new.wait_count(4)
            await dispatcher.close(5)
        assert new.received == [make_turn(i).id for i in range(4)] and old.received == []

    async def test_replacing_an_idle_sink_is_not_a_crash(self, tmp_path: Path) -> None:
        """The old worker, waiting for a record, retires quietly (it logged sink.crashed with
        InvalidStateError at every reload that changed a sink)."""
        old, new = _Recorder(), _Recorder()
        dispatcher = Dispatcher([_runner("s", old)], dead_letter_dir=tmp_path)
        with capture_logs() as logs:
            async with asyncio.timeout(10), asyncio.TaskGroup() as group:
                dispatcher.start(group)
                dispatcher.dispatch(make_turn(0))
                await old.wait_count(1)             # idle again: waiting in queue.get()
                await dispatcher.replace(_runner("s", new))
                dispatcher.dispatch(make_turn(1))
                await new.wait_count(1)
                await dispatcher.close(5)
        assert not [e for e in logs if e["event"] == "sink.crashed"]

    async def test_remove_drains_then_stops(self, tmp_path: Path) -> None:
        """A removed sink delivers what it had queued and receives nothing new."""
        gone, kept = _Recorder(), _Recorder()
        dispatcher = Dispatcher([_runner("gone", gone), _runner("kept", kept)],
                                dead_letter_dir=tmp_path)
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            for i in range(3):
                dispatcher.dispatch(make_turn(i))
            dispatcher.start(group)
            dispatcher.remove("gone")
            dispatcher.dispatch(make_turn(3))
            await kept.wait_count(4)
            await gone.wait_count(3)
            await dispatcher.close(5)
        assert gone.received == [make_turn(i).id for i in range(3)]
        assert sorted(dispatcher.runners) == ["kept"]

    async def test_added_sink_receives_from_now_on(self, tmp_path: Path) -> None:
        """A sink added while running gets the records dispatched after it joined."""
        first, later = _Recorder(), _Recorder()
        dispatcher = Dispatcher([_runner("first", first)], dead_letter_dir=tmp_path)
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(0))
            await dispatcher.add(_runner("later", later))
            dispatcher.dispatch(make_turn(1))
            await first.wait_count(2)
            await later.wait_count(1)
            await dispatcher.close(5)
        assert later.received == [make_turn(1).id]

    async def test_replace_durable_keeps_the_outbox(self, tmp_path: Path) -> None:
        """A rebuilt durable sink delivers what the old one left on disk, nothing twice."""
        async with _failing_hook(tmp_path) as (dispatcher, old, new, outbox):
            for i in range(3):
                dispatcher.dispatch(make_turn(i))
            await old.attempted.wait()
            fresh = OutboxQueue(outbox, "hook")
            await dispatcher.replace(_runner("hook", new, fresh, durable=True))
            await new.wait_count(3)
        assert new.received == [make_turn(i).id for i in range(3)]

    async def test_durable_sink_removed_and_back_delivers_everything_once(
            self, tmp_path: Path) -> None:
        """A durable sink removed by a reload (or disabled) while its destination is down, then
        back: the one left on disk and the new records are delivered, each once. (Its queue
        object was the closed one: the worker ended at once and the records piled up.)"""
        async with _failing_hook(tmp_path) as (dispatcher, old, new, outbox):
            dispatcher.dispatch(make_turn(0))
            await old.attempted.wait()              # in its retry backoff
            dispatcher.remove("hook")
            await dispatcher.add(_runner("hook", new, outbox.queue("hook"), durable=True))
            dispatcher.dispatch(make_turn(1))
            await new.wait_count(2)
        assert new.received == [make_turn(0).id, make_turn(1).id] and old.received == []

    async def test_rebuilt_then_removed_and_back_delivers_everything_once(
            self, tmp_path: Path) -> None:
        """Changed (rebuilt with a fresh queue), then disabled and enabled again, with the
        destination down: the record on disk is delivered once. (The rebuilt sink's queue was
        never registered, so coming back handed out the first queue, which had read past it.)"""
        async with _failing_hook(tmp_path) as (dispatcher, old, new, outbox):
            dispatcher.dispatch(make_turn(0))
            await old.attempted.wait()
            still_down = _Recorder(failing=True)
            await dispatcher.replace(_runner("hook", still_down, outbox.queue("hook", fresh=True),
                                             durable=True))
            await still_down.attempted.wait()
            dispatcher.remove("hook")
            await dispatcher.add(_runner("hook", new, outbox.queue("hook"), durable=True))
            await new.wait_count(1)
        assert new.received == [make_turn(0).id]

    async def test_memory_queue_push_front(self) -> None:
        """Handed-back deliveries go to the head, in order, and wake a waiting reader."""
        queue = MemoryQueue()
        reader = asyncio.ensure_future(queue.get())
        queue.push_front([Delivery(make_turn(1)), Delivery(make_turn(2))])
        first = await asyncio.wait_for(reader, 5)
        second = await queue.get()
        assert first is not None and second is not None
        assert [first.record.turn_order, second.record.turn_order] == [1, 2]


# --------------------------------------------------------------- reloads while stopping


class _Hung(_Recorder):
    """A sink whose send never returns (its destination accepted and never answered)."""

    async def send(self, record: TurnRecord) -> None:
        self.attempted.set()
        await asyncio.Event().wait()


def _validated(**sinks: _Recorder) -> tuple[Settings, None, dict[str, tuple[SinkType, SinkConfig]]]:
    """What a loader returns: each sink under its own type name (a new name = changed)."""
    tables = {}
    for name, sink in sinks.items():
        kind = f"{name}-{id(sink)}"
        tables[name] = (SinkType(kind, SinkConfig, lambda *_, s=sink: s), SinkConfig(type=kind))
    return Settings(), None, tables


async def test_reloads_queued_at_shutdown_change_nothing(tmp_path: Path) -> None:
    """A reload stuck rebuilding a sink whose send hangs, a second one queued behind it, then
    the daemon stops: the flush ends on time and the queued reload starts no sink (its new
    worker waited for records forever: the daemon never exited after SIGTERM)."""
    hung, rebuilt, extra = _Hung(), _Recorder(), _Recorder()
    old = _runner("s", hung)
    dispatcher = Dispatcher([old], dead_letter_dir=tmp_path)
    configs = iter([_validated(s=rebuilt), _validated(s=rebuilt, extra=extra)])
    reloader = Reloader(lambda: next(configs), Settings(), dispatcher=dispatcher,
                        sinks=SinkBuilder("h", tmp_path), masker=SecretMasker())
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(make_turn(0))
        await hung.attempted.wait()
        first = group.create_task(reloader.reload())       # waits for the hung send
        second = group.create_task(reloader.reload())      # waits for the first
        await old.retiring.wait()                           # the first is replacing "s"
        await dispatcher.close(0.05)
    assert (first.result(), second.result()) == ("ignored", "ignored")
    assert sorted(dispatcher.runners) == ["s"] and extra.received == []
