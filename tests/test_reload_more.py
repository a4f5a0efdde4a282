"""Reload edge cases: a sink back or rebuilt while its old worker still holds records."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from daemon.config import Settings
from daemon.dispatch import Dispatcher
from daemon.logs import SecretMasker
from daemon.outbox import Outbox
from daemon.plugins import SinkConfig, SinkType
from daemon.reload import Reloader, SinkBuilder
from tests.test_outbox import make_turn, read_dead_letters
from tests.test_reload import _failing_hook, _Hung, _Recorder, _runner, _validated


def _ids(*orders: int) -> list[str]:
    return [make_turn(i).id for i in orders]


async def test_memory_sink_disabled_and_back_keeps_what_it_held(tmp_path: Path) -> None:
    """A file sink disabled by a reload while it retries, enabled again before it drained: the
    records it held are delivered by the sink that is back, first. (They were dropped: the
    leaving worker stopped and its queue was forgotten, without a dead letter.)"""
    old, new = _Recorder(failing=True), _Recorder()
    dispatcher = Dispatcher([_runner("s", old)], dead_letter_dir=tmp_path)
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        dispatcher.start(group)
        for i in range(3):
            dispatcher.dispatch(make_turn(i))
        await old.attempted.wait()          # record 0 in its retry backoff, 1 and 2 queued
        dispatcher.remove("s")
        await dispatcher.add(_runner("s", new))
        dispatcher.dispatch(make_turn(3))
        await new.wait_count(4)
        await dispatcher.close(5)
    assert new.received == _ids(0, 1, 2, 3) and old.received == []


async def test_file_sink_turned_webhook_keeps_what_it_held(tmp_path: Path) -> None:
    """A memory sink rebuilt as a durable one of the same name (``type`` changed from file to
    webhook): what the old one held goes to the new one, on disk. (It was dropped.)"""
    old, new = _Recorder(failing=True), _Recorder()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        dispatcher = Dispatcher([_runner("s", old)], dead_letter_dir=tmp_path)
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            dispatcher.start(group)
            for i in range(3):
                dispatcher.dispatch(make_turn(i))
            await old.attempted.wait()
            await dispatcher.replace(_runner("s", new, outbox.queue("s", fresh=True),
                                             durable=True))
            dispatcher.dispatch(make_turn(3))
            await new.wait_count(4)
            await dispatcher.close(5)
        assert sorted(new.received) == sorted(_ids(0, 1, 2, 3)) and old.received == []
        assert outbox.depth("s") == 0
    finally:
        outbox.close()


async def test_webhook_turned_file_sink_keeps_what_it_held(tmp_path: Path) -> None:
    """A durable sink rebuilt as a memory one of the same name (``type`` changed from webhook
    to file): the records its outbox held are delivered by the new one, first, and leave the
    outbox. (They stayed on disk for no configured sink; the next start called them orphaned.)"""
    async with _failing_hook(tmp_path) as (dispatcher, old, new, _outbox):
        for i in range(3):
            dispatcher.dispatch(make_turn(i))
        await old.attempted.wait()
        await dispatcher.replace(_runner("hook", new))
        dispatcher.dispatch(make_turn(3))
        await new.wait_count(4)
    assert new.received == _ids(0, 1, 2, 3) and old.received == []


async def test_stop_while_rebuilding_dead_letters_the_new_sinks_records(tmp_path: Path) -> None:
    """The daemon stops while a reload waits for a rebuilt sink's hung send: what the old and
    the new sink hold is dead-lettered. (The records dispatched to the new sink while it waited
    to start were dropped: it had no worker, so the flush neither waited for it nor spilled it.)"""
    hung, rebuilt = _Hung(), _Recorder()
    old = _runner("s", hung)
    dispatcher = Dispatcher([old], dead_letter_dir=tmp_path)
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(make_turn(0))
        await hung.attempted.wait()
        replacing = group.create_task(dispatcher.replace(_runner("s", rebuilt)))
        await old.retiring.wait()           # the new runner is in place, not started
        dispatcher.dispatch(make_turn(1))
        await dispatcher.close(0.05)
        await asyncio.wait([replacing])
    assert rebuilt.received == []
    lettered = [e["record"]["id"] for e in read_dead_letters(tmp_path / "s.jsonl")]
    assert sorted(lettered) == sorted(_ids(0, 1))


async def test_stop_while_a_sink_comes_back_ends_the_reload_quietly(tmp_path: Path) -> None:
    """A sink removed while its send hung, enabled again (the reload waits for the old worker),
    then the daemon stops: the reload says ``ignored`` (it ended cancelled, unreported, and the
    returning sink's records were never dead-lettered)."""
    hung, back = _Hung(), _Recorder()
    old = _runner("s", hung)
    dispatcher = Dispatcher([old], dead_letter_dir=tmp_path)
    configs = iter([_validated(), _validated(s=back)])
    reloader = Reloader(lambda: next(configs), Settings(), dispatcher=dispatcher,
                        sinks=SinkBuilder("h", tmp_path), masker=SecretMasker())
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(make_turn(0))
        await hung.attempted.wait()
        assert await reloader.reload() == "applied"            # "s" removed, still sending
        returning = group.create_task(reloader.reload())      # "s" back: waits for the old one
        await old.retiring.wait()                               # "s" is back, not started
        dispatcher.dispatch(make_turn(1))
        await dispatcher.close(0.05)
        await asyncio.wait([returning])
    assert not returning.cancelled() and returning.result() == "ignored"
    lettered = [e["record"]["id"] for e in read_dead_letters(tmp_path / "s.jsonl")]
    assert sorted(lettered) == sorted(_ids(0, 1)) and back.received == []


async def test_an_outbox_that_cannot_open_fails_the_reload_in_one_line(tmp_path: Path) -> None:
    """A reload adding the first durable sink while the outbox cannot be opened (here: held by
    another process's lock) says why in one line and keeps the running sinks (it logged
    ``reload.failed`` with a traceback, as for a bug)."""
    kept = _Recorder()
    dispatcher = Dispatcher([_runner("kept", kept)], dead_letter_dir=tmp_path)
    hook = SinkType("hook", SinkConfig, lambda *_: _Recorder(), durable=True)
    wanted = {"kept": (dispatcher.runners["kept"].sink_type, dispatcher.runners["kept"].config),
              "hook": (hook, SinkConfig(type="hook"))}
    reloader = Reloader(lambda: (Settings(), None, wanted), Settings(), dispatcher=dispatcher,
                        sinks=SinkBuilder("h", tmp_path), masker=SecretMasker())
    held = Outbox(tmp_path / "outbox.sqlite3")
    try:
        with capture_logs() as logs:
            assert await reloader.reload() == "failed"
    finally:
        held.close()
    [failed] = [e for e in logs if e["event"] == "reload.failed"]
    assert failed["error"] == (f"{tmp_path / 'outbox.sqlite3'}: outbox is in use by another "
                               "transcribed process")
    assert "exc_info" not in failed and failed["kept"] == "running config"
    assert sorted(dispatcher.runners) == ["kept"]


class _HangsAtClose(_Recorder):
    """A third-party sink whose ``__aexit__`` never returns (its close waits on a dead peer)."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = asyncio.Event()

    async def __aexit__(self, *_exc: object) -> None:
        self.closing.set()
        await asyncio.Event().wait()


async def test_a_sink_whose_close_hangs_is_left_behind(tmp_path: Path) -> None:
    """A rebuilt sink whose old instance never finishes closing: the new one starts once the
    send limit has passed, with everything queued meanwhile. (The reload waited for ever, the
    new sink never started, its turns piled up, and every later reload queued behind it.)"""
    old, new = _HangsAtClose(), _Recorder()
    dispatcher = Dispatcher([_runner("s", old)], dead_letter_dir=tmp_path, send_limit_s=0.2)
    with capture_logs() as logs:
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(0))
            await old.wait_count(1)
            replacing = group.create_task(dispatcher.replace(_runner("s", new)))
            await old.closing.wait()
            dispatcher.dispatch(make_turn(1))
            await replacing
            await new.wait_count(1)
            await dispatcher.close(5)
    assert old.received == _ids(0) and new.received == _ids(1)
    [stuck] = [e for e in logs if e["event"] == "sink.close_timeout"]
    assert stuck["sink"] == "s" and stuck["timeout_s"] == 0.2


async def test_a_type_no_loaded_plugin_provides_says_to_restart(tmp_path: Path) -> None:
    """A reload naming a sink type of a plugin installed after the daemon started: rejected, and
    the line says plugins load at start (it read as a typo: "unknown type")."""
    from daemon.plugins import load_plugins
    from daemon.validate import validate

    config = tmp_path / "config.toml"
    config.write_text('[sinks.notes]\ntype = "notion"\n')
    running = Settings(sinks={"journal": {"type": "file", "path": str(tmp_path / "t.jsonl")}})
    host = load_plugins(entry_points=False)
    reloader = Reloader(lambda: validate(str(config), host), running,
                        dispatcher=Dispatcher([], dead_letter_dir=tmp_path),
                        sinks=SinkBuilder("h", tmp_path), masker=SecretMasker())
    with capture_logs() as logs:
        assert await reloader.reload() == "rejected"
    [rejected] = [e for e in logs if e["event"] == "reload.rejected"]
    assert rejected["problems"][0].startswith(f"{config}: sinks.notes.type: unknown type 'notion'")
    assert rejected["hint"] == ("sink types come from the plugins loaded at start: restart the "
                                "daemon after installing one")


async def test_a_burst_of_sighups_while_one_reload_runs_makes_one_more(tmp_path: Path) -> None:
    """SIGHUPs arriving while a reload runs are folded into one more reload after it (the file
    may have changed after the running one read it), not one each: systemd sees RELOADING=1 /
    READY=1 in pairs. (Each started a reload; their READY=1 and RELOADING=1 interleaved.)"""
    import threading

    from daemon.hangup import Hangup
    from daemon.health import Health, Reporter
    from daemon.notify import Notifier
    from tests.notify_socket import NotifySocket

    entered, gate, loads = threading.Event(), threading.Event(), []

    def loader() -> tuple[Settings, Path | None, dict[str, Any]]:
        loads.append(1)
        entered.set()
        gate.wait(10)
        return Settings(), None, {}

    reloader = Reloader(loader, Settings(), dispatcher=Dispatcher([], dead_letter_dir=tmp_path),
                        sinks=SinkBuilder("h", tmp_path), masker=SecretMasker())
    async with NotifySocket.listening(tmp_path / "notify.sock") as sock:
        notifier = Notifier(sock.env())
        reporter = Reporter(notifier, Health(), ready=lambda: True, status=lambda: "up")
        reporter.is_ready = True
        try:
            async with asyncio.timeout(10), asyncio.TaskGroup() as group:
                hup = Hangup(group, reloader, reporter)
                hup()
                await asyncio.to_thread(entered.wait, 10)
                for _ in range(3):
                    hup()
                gate.set()
                applied = "reload applied"
                first = await sock.wait_for(lambda m: applied in m.fields.get("STATUS", ""))
                await sock.wait_for(lambda m: applied in m.fields.get("STATUS", ""),
                                    after=first + 1)
        finally:
            notifier.close()
    kinds = ["RELOADING" if "RELOADING" in m else "READY" for m in sock.messages]
    assert kinds == ["RELOADING", "READY", "RELOADING", "READY"]
    assert len(loads) == 2 and reloader.reloads == 2


class _NeverStarts(_Recorder):
    """A sink whose start always fails with the same bug (a third-party ``__aenter__``)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0
        self.started = asyncio.Condition()

    async def __aenter__(self) -> _Recorder:
        async with self.started:
            self.starts += 1
            self.started.notify_all()
        raise ValueError("no such table: notes")


async def test_a_sink_crashing_the_same_way_logs_its_traceback_once(tmp_path: Path) -> None:
    """A sink whose start fails with the same bug for weeks: every restart is logged, the
    traceback only the first time (it was one traceback a minute in the journal, for ever)."""
    sink = _NeverStarts()
    dispatcher = Dispatcher([_runner("s", sink)], dead_letter_dir=tmp_path)
    with capture_logs() as logs:
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            dispatcher.start(group)
            async with sink.started:
                await sink.started.wait_for(lambda: sink.starts >= 3)
            await dispatcher.close(0.1)
    crashed = [e for e in logs if e["event"] == "sink.crashed"]
    assert len(crashed) >= 2
    assert [bool(e.get("exc_info")) for e in crashed[:2]] == [True, False]
    assert all(e["error"] == "ValueError: no such table: notes" for e in crashed)
