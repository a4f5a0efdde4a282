"""The file and console sinks, the dispatcher's isolation, and third-party sinks by entry point."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
from structlog.testing import capture_logs

from daemon.commands import synthetic_turn
from daemon.dispatch import Dispatcher
from daemon.errors import PermanentSinkError, SinkError
from daemon.events import PartialTurn, SessionInfo, TurnRecord
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl, load_plugins
from daemon.queues import Delivery, MemoryQueue
from daemon.runner import SinkRunner
from plugins.console import ConsoleSink, ConsoleSinkConfig
from plugins.file import FileSink, FileSinkConfig
from tests.conftest import REPO, TRANSCRIBED
from tests.test_outbox import NullSink

CONTEXT = SinkContext(host="h", state_dir=Path("/nonexistent"))


def record(order: int, text: str = "hello") -> TurnRecord:
    base = synthetic_turn("h")
    return TurnRecord(**{**{f: getattr(base, f) for f in base.__dataclass_fields__},
                         "session_id": "s", "turn_order": order, "transcript": text})


# A file sink's writes under a file size limit (RLIMIT_FSIZE): the kernel writes what fits, then
# fails with EFBIG, as a filling disk does with ENOSPC. argv[1]: the file.
FULL_DISK = """
import asyncio, resource, signal, sys
from pathlib import Path
from daemon.errors import SinkError
from daemon.plugins import SinkContext
from plugins.file import FileSink, FileSinkConfig
from tests.test_sinks_local import record

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the limit fails the write, not the process
path = Path(sys.argv[1])

async def main() -> None:
    config = FileSinkConfig(type="file", path=str(path), fsync=False)
    async with FileSink("j", config, SinkContext("h", path.parent)) as sink:
        await sink.send(record(0))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
        try:
            await sink.send(record(1, "x" * 20_000))
        except SinkError as exc:
            print(exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await sink.send(record(1, "x" * 20_000))

asyncio.run(main())
"""


class WatchedFileSink(FileSink):
    """The real file sink, with an event set after each successful send (to await, not sleep)."""

    def __init__(self, name: str, config: FileSinkConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        self.wrote = asyncio.Event()

    async def send(self, record: TurnRecord) -> None:
        await super().send(record)
        self.wrote.set()


class TestFileSink:
    async def test_jsonl_per_spec(self, tmp_path: Path) -> None:
        """Each record is one JSON line with the SPEC's fields, in order."""
        path = tmp_path / "deep" / "turns.jsonl"
        async with FileSink("j", FileSinkConfig(type="file", path=str(path)), CONTEXT) as sink:
            for i in range(3):
                await sink.send(record(i, f"turn {i}"))
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["id"] for line in lines] == ["s:0", "s:1", "s:2"]
        assert list(lines[0]) == ["id", "session_id", "turn_order", "transcript", "started_at",
                                  "ended_at", "end_of_turn_confidence", "words",
                                  "language_code", "engine", "source", "host"]
        assert lines[0]["started_at"].endswith("Z")

    async def test_fifo_is_refused_not_waited_on(self, tmp_path: Path) -> None:
        """A FIFO at the path: a one-line error (opening it waited for a reader for ever, and
        the daemon could not exit)."""
        fifo = tmp_path / "turns.jsonl"
        os.mkfifo(fifo)
        async with FileSink("j", FileSinkConfig(type="file", path=str(fifo)), CONTEXT) as sink:
            with pytest.raises(SinkError, match="it is a FIFO"):
                async with asyncio.timeout(5):
                    await sink.send(record(0))

    async def test_line_separators_stay_inside_their_line(self, tmp_path: Path) -> None:
        """U+2028 / U+2029 in a transcript are written escaped: one record, one line, for any
        line splitter (Python's splitlines, JavaScript); other text stays UTF-8 as is."""
        path = tmp_path / "t.jsonl"
        async with FileSink("j", FileSinkConfig(type="file", path=str(path)), CONTEXT) as sink:
            await sink.send(record(0, "one\u2028two\u2029three café"))
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) == 1 and "café" in text
        assert json.loads(text)["transcript"] == "one\u2028two\u2029three café"

    async def test_rotation_keeps_n(self, tmp_path: Path) -> None:
        """With rotate_bytes the file rotates to .1, .2 … and only `keep` are kept."""
        path = tmp_path / "t.jsonl"
        config = FileSinkConfig(type="file", path=str(path), rotate_bytes=700, keep=2, fsync=False)
        async with FileSink("j", config, CONTEXT) as sink:
            for i in range(12):
                await sink.send(record(i))
        rotated = sorted(p.name for p in tmp_path.iterdir())
        assert rotated == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
        assert all(p.stat().st_size <= 700 for p in tmp_path.iterdir())
        ids = [json.loads(x)["id"] for p in ("t.jsonl.2", "t.jsonl.1", "t.jsonl")
               for x in (tmp_path / p).read_text().splitlines()]
        assert ids == [f"s:{i}" for i in range(12 - len(ids), 12)]

    async def test_torn_line_closed_off(self, tmp_path: Path) -> None:
        """A line torn by a crash does not swallow the next record."""
        path = tmp_path / "t.jsonl"
        path.write_text('{"id": "torn')
        async with FileSink("j", FileSinkConfig(type="file", path=str(path)), CONTEXT) as sink:
            await sink.send(record(1))
        assert json.loads(path.read_text().splitlines()[1])["id"] == "s:1"

    async def test_unwritable_is_sink_error(self, tmp_path: Path) -> None:
        """A path that cannot be written raises SinkError naming it."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        sink = FileSink("j", FileSinkConfig(type="file", path=str(blocker / "x.jsonl")), CONTEXT)
        with pytest.raises(SinkError, match=r"x\.jsonl"):
            await sink.send(record(0))

    async def test_unopenable_at_start_retries_on_send(self, tmp_path: Path) -> None:
        """A file that cannot be opened at start fails each send (to be retried), not the sink."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        path = blocker / "x.jsonl"
        async with FileSink("j", FileSinkConfig(type="file", path=str(path)), CONTEXT) as sink:
            with pytest.raises(SinkError, match=r"cannot open .*x\.jsonl"):
                await sink.send(record(0))
            blocker.unlink()
            await sink.send(record(0))
        assert json.loads(path.read_text())["id"] == "s:0"

    @pytest.mark.parametrize("how", ["delete", "rename"])
    async def test_file_deleted_or_rotated_away_is_recreated(self, tmp_path: Path,
                                                             how: str) -> None:
        """A file deleted or renamed away mid-run is created again, with one log line."""
        path = tmp_path / "turns.jsonl"
        with capture_logs() as logs:
            async with FileSink("j", FileSinkConfig(type="file", path=str(path)),
                                CONTEXT) as sink:
                await sink.send(record(0))
                if how == "delete":
                    path.unlink()
                else:
                    path.rename(tmp_path / "turns.jsonl.1")
                await sink.send(record(1))
                await sink.send(record(2))
        assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["s:1", "s:2"]
        if how == "rename":
            assert json.loads((tmp_path / "turns.jsonl.1").read_text())["id"] == "s:0"
        reopened = [e for e in logs if e["event"] == "file.reopened"]
        assert len(reopened) == 1
        assert reopened[0]["sink"] == "j" and reopened[0]["path"] == str(path)

    async def test_folder_replaced_by_file_is_retried_then_dead_lettered(
        self, tmp_path: Path
    ) -> None:
        """A folder replaced by a file fails each send with one clear line; nothing vanishes."""
        folder = tmp_path / "out"
        path = folder / "turns.jsonl"
        config = FileSinkConfig(type="file", path=str(path))
        sink = WatchedFileSink("j", config, CONTEXT)
        sink_type = SinkType("file", FileSinkConfig, lambda *_: sink)
        dispatcher = Dispatcher([SinkRunner("j", sink_type, config, sink, MemoryQueue())],
                                dead_letter_dir=tmp_path / "dead")
        with capture_logs() as logs:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                dispatcher.dispatch(record(0))
                async with asyncio.timeout(2):
                    await sink.wrote.wait()     # the file is open now
                shutil.rmtree(folder)
                folder.write_text("now a file\n")
                dispatcher.dispatch(record(1))
                await dispatcher.close(0.5)
        expected = f"cannot open {path}: {folder} is not a directory"
        failed = [e for e in logs if e["event"] == "sink.send_failed"]
        assert [e["error"] for e in failed] == [expected]
        assert not [e for e in logs if e["event"] == "file.reopened"]   # it was not: said so
        dead = [json.loads(x) for x in (tmp_path / "dead" / "j.jsonl").read_text().splitlines()]
        assert [x["record"]["id"] for x in dead] == ["s:1"]
        assert dead[0]["error"] == f"not delivered before exit ({expected})"

    async def test_full_disk_error_names_the_path(self, tmp_path: Path) -> None:
        """ENOSPC (a sink writing to /dev/full) is a one-line SinkError naming the path."""
        with capture_logs() as logs:
            await run_through(dev_full_dispatcher(tmp_path), 1, flush_s=0.5)
        expected = "cannot write /dev/full: No space left on device"
        assert [e["error"] for e in logs if e["event"] == "sink.send_failed"] == [expected]
        dead = json.loads((tmp_path / "dead" / "j.jsonl").read_text())
        assert dead["error"] == f"not delivered before exit ({expected})"


def dev_full_dispatcher(tmp_path: Path) -> Dispatcher:
    """A dispatcher with one file sink "j" writing to /dev/full (every write: ENOSPC)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    config = FileSinkConfig(type="file", path="/dev/full", fsync=False)
    sink = FileSink("j", config, CONTEXT)
    sink_type = SinkType("file", FileSinkConfig, lambda *_: sink)
    return Dispatcher([SinkRunner("j", sink_type, config, sink, MemoryQueue())],
                      dead_letter_dir=tmp_path / "dead")


async def test_what_a_sink_holds_at_exit_is_dead_lettered_in_one_line(tmp_path: Path) -> None:
    """A day of turns a file sink could not write went to its dead-letter file at exit with
    one ``sink.dead_lettered`` line each; it is one line with the count, and the flush's
    timeout says where the turns go."""
    with capture_logs() as logs:
        await run_through(dev_full_dispatcher(tmp_path), 5, flush_s=0.5)
    [timeout] = [e for e in logs if e["event"] == "sink.flush_timeout"]
    assert (timeout["queued"], timeout["effect"]) == (5, "dead-lettered")
    [said] = [e for e in logs if e["event"] == "sink.dead_lettered"]
    assert (said["records"], said["first_id"], said["last_id"]) == (5, "s:0", "s:4")
    assert said["path"] == str(tmp_path / "dead" / "j.jsonl")
    assert len((tmp_path / "dead" / "j.jsonl").read_text().splitlines()) == 5


async def test_console_text_and_json() -> None:
    """The console sink writes a text line or a JSON line."""
    out = io.StringIO()
    async with ConsoleSink("c", ConsoleSinkConfig(type="console"), CONTEXT, out) as sink:
        await sink.send(record(0, "Hello there."))
    async with ConsoleSink("c", ConsoleSinkConfig(type="console", format="json"), CONTEXT,
                           out) as sink:
        await sink.send(record(1))
    text, line = out.getvalue().splitlines()
    assert text.endswith("] Hello there.")
    assert json.loads(line)["id"] == "s:1"


class TestOddInput:
    async def test_created_files_are_private_and_rotation_keeps_the_mode(
            self, tmp_path: Path) -> None:
        """Transcripts: a file and folder the sink creates are 0600 / 0700 (they were 0644 /
        0755 under the usual umask); a rotated-in file keeps the mode the user gave the old."""
        path = tmp_path / "new" / "t.jsonl"
        config = FileSinkConfig(type="file", path=str(path), rotate_bytes=1, keep=1)
        async with FileSink("j", config, CONTEXT) as sink:
            await sink.send(record(0))
            assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (
                0o600, 0o700)
            path.chmod(0o640)
            await sink.send(record(1))
        assert path.stat().st_mode & 0o777 == 0o640 and json.loads(path.read_text())["id"] == "s:1"

    async def test_any_text_is_one_line_in_every_local_sink(self, tmp_path: Path) -> None:
        """A lone surrogate has no UTF-8 form: it stalled the file sink (retried for ever, every
        later turn behind it); it is written as its JSON escape and reads back the same."""
        text = "a\ud800 😀 \u05e9\u05dc\u05d5\u05dd \x00 é" + "x" * 100_000
        path, out = tmp_path / "t.jsonl", io.StringIO()
        async with FileSink("j", FileSinkConfig(type="file", path=str(path)), CONTEXT) as sink:
            await sink.send(record(0, text))
        async with ConsoleSink("c", ConsoleSinkConfig(type="console", format="json"), CONTEXT,
                               out) as console:
            await console.send(record(0, text))
        for line in (path.read_text(encoding="utf-8"), out.getvalue()):
            assert len(line.splitlines()) == 1 and json.loads(line)["transcript"] == text

    @pytest.mark.parametrize("fmt", ["text", "json"])
    async def test_console_in_a_latin1_locale(self, fmt: str) -> None:
        """What stdout's encoding cannot take was a dead-lettered turn; now JSON is ASCII-escaped
        (the same record) and text shows '?'."""
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="latin-1", write_through=True)
        config = ConsoleSinkConfig(type="console", format=fmt)
        async with ConsoleSink("c", config, CONTEXT, out) as sink:
            await sink.send(record(0, "café 😀"))
        line = raw.getvalue().decode("latin-1")
        assert (json.loads(line)["transcript"] if fmt == "json" else line.split("] ")[1]) == (
            "café 😀" if fmt == "json" else "café ?\n")

    async def test_console_with_stdout_closed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``transcribed run >&-``: Python has no sys.stdout; an AttributeError was retried as
        if transient; now it is a permanent error saying so (the turn is dead-lettered)."""
        monkeypatch.setattr("sys.stdout", None)
        async with ConsoleSink("c", ConsoleSinkConfig(type="console"), CONTEXT) as sink:
            with pytest.raises(PermanentSinkError, match=r"^cannot write to stdout: it is closed$"):
                await sink.send(record(0))

    def test_a_write_cut_short_by_a_full_disk_leaves_no_half_line(self, tmp_path: Path) -> None:
        """A write the disk takes only part of (ENOSPC; here the kernel's file size limit, which
        cuts a write short the same way) left that half line in the file, closed off by the
        retry: a line no JSON reader can parse. It is cut back off; the retry writes it whole."""
        path = tmp_path / "t.jsonl"
        done = subprocess.run([TRANSCRIBED[0], "-c", FULL_DISK, str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"cannot write {path}: File too large\n"
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and [json.loads(x)["id"] for x in lines[:-1]] == ["s:0", "s:1"]

    async def test_a_file_truncated_under_the_sink_is_not_rotated_empty(
            self, tmp_path: Path) -> None:
        """logrotate's ``copytruncate`` (or ``: > turns.jsonl``) left the sink's offset at the
        old size: the next turn rotated the empty file to .1, pushing a kept file out."""
        path = tmp_path / "t.jsonl"
        line = len(record(0).to_json()) + 1
        config = FileSinkConfig(type="file", path=str(path), rotate_bytes=3 * line - 1, keep=1)
        async with FileSink("j", config, CONTEXT) as sink:
            for i in range(2):
                await sink.send(record(i))
            os.truncate(path, 0)
            await sink.send(record(2))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
        assert json.loads(path.read_text())["id"] == "s:2"

    async def test_a_rotation_that_fails_holds_back_no_turn(self, tmp_path: Path) -> None:
        """A rotation that cannot be done (here turns.jsonl.1 is a folder) failed every send,
        naming the wrong file ("turns.jsonl: Is a directory"): turns piled up in memory for as
        long as the daemon ran. They go on into the file, with one warning naming the cause."""
        path = tmp_path / "turns.jsonl"
        (tmp_path / "turns.jsonl.1").mkdir()
        config = FileSinkConfig(type="file", path=str(path), rotate_bytes=1000, keep=1)
        with capture_logs() as logs:
            async with FileSink("j", config, CONTEXT) as sink:
                for i in range(4):
                    await sink.send(record(i))
        assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == [
            "s:0", "s:1", "s:2", "s:3"]
        failed = [e for e in logs if e["event"] == "file.rotate_failed"]
        assert [(e["path"], e["error"]) for e in failed] == [
            (str(path), f"{path}.1: Is a directory")]

    def test_a_path_no_file_can_have_is_a_config_error(self, tmp_path: Path) -> None:
        """``~nosuchuser/…`` and a NUL character passed check-config, then failed every turn
        (a sink that could not be built; ``embedded null byte``, naming nothing)."""
        config = tmp_path / "c.toml"
        config.write_text('[sinks.a]\ntype = "file"\npath = "~nosuchuser-x/t.jsonl"\n'
                          '[sinks.b]\ntype = "file"\npath = "/tmp/t\\u0000.jsonl"\n')
        done = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 78, done.stdout
        assert done.stderr.splitlines() == [
            f"transcribed: config error: {config}: sinks.a.path: cannot expand "
            "'~nosuchuser-x': no such user, or no home directory",
            f"transcribed: config error: {config}: sinks.b.path: must not contain a NUL "
            "character"]

    async def test_a_console_nobody_reads_stalls_no_other_sink(self, tmp_path: Path) -> None:
        """stdout a pipe whose reader stopped (``| less`` paused, a terminal held by Ctrl-S):
        the console sink's write blocked the event loop, and with it every other sink (and
        capture). Now the file sink delivers at once; the console's lines follow, in order,
        when the reader reads again."""
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
        os.set_blocking(write_fd, False)
        filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(write_fd, b"x" * 4096)
        os.set_blocking(write_fd, True)
        released, read, late = threading.Event(), bytearray(), []

        def reader() -> None:   # safety net: a blocked event loop cannot time out on its own
            late.append(not released.wait(5))
            with open(read_fd, "rb") as pipe:
                read.extend(pipe.read())

        thread = threading.Thread(target=reader)
        thread.start()
        path = tmp_path / "t.jsonl"
        file_config = FileSinkConfig(type="file", path=str(path), fsync=False)
        file_sink = WatchedFileSink("j", file_config, CONTEXT)
        out = io.TextIOWrapper(io.FileIO(write_fd, "w"), encoding="utf-8")   # closed below
        console_config = ConsoleSinkConfig(type="console")
        console = ConsoleSink("c", console_config, CONTEXT, out)
        dispatcher = Dispatcher([
            SinkRunner("c", SinkType("console", ConsoleSinkConfig, lambda *_: console),
                       console_config, console, MemoryQueue()),
            SinkRunner("j", SinkType("file", FileSinkConfig, lambda *_: file_sink),
                       file_config, file_sink, MemoryQueue())],
            dead_letter_dir=tmp_path / "dead")
        try:
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                for i in range(3):
                    dispatcher.dispatch(record(i, f"turn {i}"))
                async with asyncio.timeout(2):
                    while not path.exists() or len(path.read_text().splitlines()) < 3:
                        await file_sink.wrote.wait()
                        file_sink.wrote.clear()
                released.set()
                await dispatcher.close(5)
        finally:
            released.set()
            out.close()
            thread.join(10)
        assert late == [False], "the file sink waited for the console's reader"
        lines = read[filled:].decode().splitlines()
        assert [line.split("] ", 1)[1] for line in lines] == ["turn 0", "turn 1", "turn 2"]

    @pytest.mark.parametrize("fmt", ["text", "json"])
    async def test_console_never_writes_a_control_character_raw(self, fmt: str) -> None:
        """A transcript with terminal escape sequences (ESC [2J clears the screen, ESC ]0; sets
        the window title, U+009B is CSI) drove the terminal showing the text format; JSON left
        C1 controls raw. Text shows them as U+FFFD (a line break as a blank); JSON escapes them
        (the same record)."""
        text = "a\x1b[2Jb\x1b]0;title\x07c\u009b31md\re\nf\x7f"
        out = io.StringIO()
        async with ConsoleSink("c", ConsoleSinkConfig(type="console", format=fmt), CONTEXT,
                               out) as sink:
            await sink.send(record(0, text))
        line = out.getvalue()
        assert line.endswith("\n") and not re.search("[\x00-\x1f\x7f-\x9f]", line[:-1]), line
        if fmt == "json":
            assert json.loads(line)["transcript"] == text
        else:
            assert line[:-1].split("] ", 1)[1] == \
                "a\ufffd[2Jb\ufffd]0;title\ufffdc\ufffd31md e f\ufffd"

    async def test_a_send_that_is_not_async_is_not_repeated(self, tmp_path: Path) -> None:
        """A plugin's plain ``def send`` ran, then awaiting its None failed: it was retried (and
        wrote the record again) until exit. Now the record is dead-lettered once, with why."""
        sink = ScriptedSink()
        sink.send = sink.got.append  # type: ignore[assignment,method-assign]
        dispatcher = Dispatcher([runner("s", sink)], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 2, flush_s=5)
        assert len(sink.got) == 2
        dead = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert [d["record"]["id"] for d in dead] == ["s:0", "s:1"]
        assert "send() returned NoneType, not an awaitable" in dead[0]["error"]


class ScriptedSink:
    """A sink whose behaviour each test scripts: fail to open, fail, hang, or record."""

    def __init__(self, failures: list[Exception] | None = None, hang: bool = False,
                 open_failures: int = 0) -> None:
        self.failures = failures or []
        self.hang = hang
        self.open_failures = open_failures
        self.got: list[str] = []
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> Self:
        if self.open_failures:
            self.open_failures -= 1
            raise ConnectionRefusedError("scripted: cannot open")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.failures:
            raise self.failures.pop(0)
        self.got.append(record.id)
        self.arrived.set()


class DownFor(ScriptedSink):
    """A destination that is down for the first ``count`` records (every try fails)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    async def send(self, record: TurnRecord) -> None:
        if record.turn_order < self.count:
            raise SinkError("connection refused")
        await super().send(record)


class GivesUpConfig(SinkConfig):
    """A sink table with ``retry_max_s``, as the webhook's has."""

    retry_max_s: float | None = None


def runner(name: str, sink: ScriptedSink) -> SinkRunner:
    sink_type = SinkType("scripted", SinkConfig, lambda *_: sink)
    return SinkRunner(name, sink_type, SinkConfig(type="scripted"), sink, MemoryQueue())


async def run_through(dispatcher: Dispatcher, count: int, flush_s: float) -> None:
    """Start ``dispatcher``, dispatch records 0 .. count-1, then close it (flushing)."""
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        for i in range(count):
            dispatcher.dispatch(record(i))
        await dispatcher.close(flush_s)


class TestDispatcher:
    async def test_hung_sink_stalls_nothing(self, tmp_path: Path) -> None:
        """A sink that never answers delays no other sink."""
        hung, fine = ScriptedSink(hang=True), ScriptedSink()
        dispatcher = Dispatcher([runner("hung", hung), runner("fine", fine)],
                                dead_letter_dir=tmp_path)
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(record(0))
            async with asyncio.timeout(2):
                await fine.arrived.wait()
            await dispatcher.close(0.1)
        assert fine.got == ["s:0"]

    async def test_transient_retried_in_order(self, tmp_path: Path) -> None:
        """Transient failures are retried; records still arrive once each, in order."""
        sink = ScriptedSink([SinkError("down"), SinkError("still down")])
        dispatcher = Dispatcher([runner("s", sink)], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 3, flush_s=10)
        assert sink.got == ["s:0", "s:1", "s:2"]

    async def test_retry_after_never_outlasts_retry_max_s(self, tmp_path: Path) -> None:
        """A destination asking for a retry in 30 s (``Retry-After``) gets its last try at
        ``retry_max_s`` (0.3 s), then the record is dead-lettered: not 30 s later."""
        sink = ScriptedSink([SinkError("answered 429", retry_after=30.0)] * 5)
        config = GivesUpConfig(type="scripted", retry_max_s=0.3)
        dispatcher = Dispatcher([SinkRunner("s", SinkType("scripted", GivesUpConfig,
                                                          lambda *_: sink),
                                            config, sink, MemoryQueue())],
                                dead_letter_dir=tmp_path)
        await run_through(dispatcher, 1, flush_s=10)
        dead = json.loads((tmp_path / "s.jsonl").read_text())
        assert dead["record"]["id"] == "s:0" and "gave up after 0.3 s" in dead["error"]

    async def test_an_outage_is_logged_once_though_records_are_dead_lettered(
            self, tmp_path: Path) -> None:
        """With ``retry_max_s``, every record of an outage is dead-lettered in turn: the outage
        is still one ``sink.send_failed`` and one ``sink.recovered``, not a warning per turn."""
        sink = DownFor(3)
        config = GivesUpConfig(type="scripted", retry_max_s=0.05)
        dispatcher = Dispatcher([SinkRunner("s", SinkType("scripted", GivesUpConfig,
                                                          lambda *_: sink),
                                            config, sink, MemoryQueue())],
                                dead_letter_dir=tmp_path)
        with capture_logs() as logs:
            await run_through(dispatcher, 4, flush_s=10)
        events = [entry["event"] for entry in logs if entry["event"].startswith("sink.")]
        assert events == ["sink.send_failed", *["sink.dead_lettered"] * 3, "sink.recovered"]
        assert sink.got == ["s:3"]

    async def test_permanent_dead_lettered(self, tmp_path: Path) -> None:
        """A permanent failure moves the record to the dead-letter file and goes on."""
        sink = ScriptedSink([PermanentSinkError("400 bad request")])
        dispatcher = Dispatcher([runner("s", sink)], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 2, flush_s=10)
        assert sink.got == ["s:1"]
        dead = json.loads((tmp_path / "s.jsonl").read_text())
        assert dead["record"]["id"] == "s:0" and "400" in dead["error"]


class TestPlugins:
    def test_builtins_pass_check_pending(self) -> None:
        """Built-in plugins register cleanly and provide the file and console types."""
        host = load_plugins(entry_points=False)
        assert {"file", "console"} <= set(host.sink_types())

    def test_entry_point_sink(self, tmp_path: Path) -> None:
        """A third-party sink installed under `transcribed.sinks` is found and used."""
        dist = tmp_path / "site" / "transcribed_example_sink-0.1.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transcribed-example-sink\n"
                                       "Version: 0.1\n")
        (dist / "entry_points.txt").write_text(
            "[transcribed.sinks]\nexample = transcribed_example_sink\n")
        out = tmp_path / "example.txt"
        config = tmp_path / "c.toml"
        config.write_text(f'[sinks.mine]\ntype = "example"\npath = "{out}"\n')
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tmp_path / "site"), str(REPO / "tests" / "example_sink"), str(REPO)])}
        result = subprocess.run([*TRANSCRIBED, "test-sinks", "--config", str(config)],
                                capture_output=True, text=True, env=env, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert "mine (example): delivered" in result.stdout
        assert "This is a test turn from transcribed." in out.read_text()


    def test_a_failing_notification_hook_does_not_silence_other_plugins(self) -> None:
        """A plugin whose session and partial hooks raise is logged (once, not per partial);
        the plugin registered before it, which pluggy would call after it, still hears all."""
        heard, broken = Listening(), Broken()
        host = load_plugins(entry_points=False, extra=[heard, broken])
        session = SessionInfo("s1", "local")
        partial = PartialTurn("s1", 0, "hello", "local")
        with capture_logs() as logs:
            host.session_started(session)
            for _ in range(50):
                host.turn_partial(partial)
        assert heard.sessions == [session] and len(heard.partials) == 50
        failed = [entry for entry in logs if entry["event"] == "plugin.hook_failed"]
        name = host.manager.get_name(broken)
        assert [(e["plugin"], e["hook"], e["error"], e["failures"]) for e in failed] == [
            (name, "transcribed_session_started", "RuntimeError: plugin bug", 1),
            (name, "transcribed_turn_partial", "ValueError: bad partial", 1)]


class Listening:
    """A third-party plugin that records the notifications it hears."""

    def __init__(self) -> None:
        self.sessions: list[SessionInfo] = []
        self.partials: list[PartialTurn] = []

    @hookimpl
    def transcribed_session_started(self, session: SessionInfo) -> None:
        self.sessions.append(session)

    @hookimpl
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        self.partials.append(partial)


class Broken:
    """A third-party plugin whose notification hooks raise."""

    @hookimpl
    def transcribed_session_started(self, session: SessionInfo) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        raise ValueError("bad partial")


class FullQueue(MemoryQueue):
    """A queue that refuses every record, like a full outbox."""

    def put(self, record: TurnRecord) -> None:
        raise RuntimeError("outbox full for sink 's'")


class AckFailsOnce(MemoryQueue):
    """A queue whose first acknowledgement fails, like a disk error deleting from the outbox."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def ack(self, delivery: Delivery) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("scripted: disk I/O error")


class TestDispatcherEdges:
    async def test_crashed_worker_restarts(self, tmp_path: Path) -> None:
        """A sink that cannot be opened is retried; its queued turns arrive, in order."""
        sink = ScriptedSink(open_failures=2)
        dispatcher = Dispatcher([runner("s", sink)], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 3, flush_s=10)
        assert sink.got == ["s:0", "s:1", "s:2"]
        assert dispatcher.runners["s"].stats.last_error == \
            "ConnectionRefusedError: scripted: cannot open"

    async def test_crash_mid_delivery_loses_nothing(self, tmp_path: Path) -> None:
        """A worker crashing before it acknowledged a record delivers that record again."""
        sink = ScriptedSink()
        flaky = SinkRunner("s", SinkType("scripted", SinkConfig, lambda *_: sink),
                           SinkConfig(type="scripted"), sink, AckFailsOnce())
        dispatcher = Dispatcher([flaky], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 2, flush_s=10)
        assert sink.got == ["s:0", "s:0", "s:1"]     # at least once: s:0 again, nothing lost

    async def test_retry_after_is_honoured(self, tmp_path: Path) -> None:
        """A sink asking to retry in an hour is not retried within the flush window."""
        sink = ScriptedSink([SinkError("busy", retry_after=3600)])
        dispatcher = Dispatcher([runner("s", sink)], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 1, flush_s=1.0)
        assert sink.got == []

    async def test_undelivered_at_exit_is_dead_lettered(self, tmp_path: Path) -> None:
        """Turns a failing file sink still holds when the flush ends go to its dead-letter file."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        config = FileSinkConfig(type="file", path=str(blocker / "x.jsonl"))
        sink = FileSink("j", config, CONTEXT)
        sink_type = SinkType("file", FileSinkConfig, lambda *_: sink)
        dispatcher = Dispatcher([SinkRunner("j", sink_type, config, sink, MemoryQueue())],
                                dead_letter_dir=tmp_path / "dead")
        await run_through(dispatcher, 3, flush_s=0.5)
        lines = [json.loads(x) for x in (tmp_path / "dead" / "j.jsonl").read_text().splitlines()]
        assert [x["record"]["id"] for x in lines] == ["s:0", "s:1", "s:2"]
        assert lines[0]["error"].startswith("not delivered before exit (cannot open ")

    async def test_retry_after_zero_is_no_tight_loop(self, tmp_path: Path) -> None:
        """A sink that keeps asking to retry at once still gets the normal backoff."""
        sink = ScriptedSink([SinkError("busy", retry_after=0.0) for _ in range(10_000)])
        dispatcher = Dispatcher([runner("s", sink)], dead_letter_dir=tmp_path)
        await run_through(dispatcher, 1, flush_s=1.0)
        attempts = 10_000 - len(sink.failures)
        assert 1 <= attempts <= 8      # 0.1-0.3 s, 0.2-0.6 s, ... : a handful in one second

    async def test_unqueueable_turn_is_dead_lettered(self, tmp_path: Path) -> None:
        """A turn a sink's queue refuses (full outbox) lands in its dead-letter file."""
        sink = ScriptedSink()
        full = SinkRunner("s", SinkType("scripted", SinkConfig, lambda *_: sink),
                          SinkConfig(type="scripted"), sink, FullQueue())
        dispatcher = Dispatcher([full], dead_letter_dir=tmp_path)
        dispatcher.dispatch(record(7))
        dead = json.loads((tmp_path / "s.jsonl").read_text())
        assert dead["record"]["id"] == "s:7" and "outbox full" in dead["error"]


def test_hookspecs_typed_and_documented() -> None:
    """Every hook spec is prefixed, typed, has a docstring, and is named in the README."""
    import inspect

    from daemon.plugins import PluginHost

    readme = (REPO / "README.md").read_text()
    specs = [m for n, m in inspect.getmembers(PluginHost.specs) if n.startswith("transcribed_")]
    assert len(specs) >= 4
    for spec in specs:
        assert spec.__doc__ and len(spec.__doc__.strip()) > 20, spec.__name__
        hints = inspect.get_annotations(spec)
        assert "return" in hints and all(p in hints for p in inspect.signature(spec).parameters
                                         if p != "self"), spec.__name__
        assert f"`{spec.__name__}`" in readme, f"{spec.__name__} is not documented in README.md"


def test_test_sinks_masks_secrets_in_a_sink_error(tmp_path: Path) -> None:
    """A sink's error is printed through the log masker: a secret in it (here the live view's
    token, which a file path happens to contain) never reaches the output."""
    fifo = tmp_path / "s3cretTOKENvalue.jsonl"
    os.mkfifo(fifo)     # the sink refuses to open it (it would wait for a reader)
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\ntoken = "s3cretTOKENvalue"\n[sinks.notes]\ntype = "file"\n'
                      f'path = "{fifo}"\n')
    done = subprocess.run([*TRANSCRIBED, "test-sinks", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "notes (file): FAILED: " in done.stdout and "********" in done.stdout, done.stdout
    assert "s3cretTOKENvalue" not in done.stdout + done.stderr


def test_test_sinks_with_stdout_closed_ends_without_a_traceback(tmp_path: Path) -> None:
    """``transcribed test-sinks >&-``: the console sink reports stdout closed and the command
    exits 1 (it failed), without the traceback of flushing a stdout Python does not have."""
    config = tmp_path / "c.toml"
    config.write_text('[sinks.screen]\ntype = "console"\n')
    done = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *TRANSCRIBED, "test-sinks",
                           "--config", str(config)],
                          cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


class _Signalling(NullSink):
    """A sink that accepts everything and says when it has delivered."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def send(self, record: TurnRecord) -> None:
        self.sent.set()


async def test_a_replaced_sink_carries_its_counters_on(tmp_path: Path) -> None:
    """A sink rebuilt by a reload (``Dispatcher.replace``) keeps counting from its old totals:
    /metrics counters never go backwards (they restarted from 0)."""
    def runner() -> SinkRunner:
        return SinkRunner("s", SinkType("null", SinkConfig, lambda *_: _Signalling()),
                          SinkConfig(type="null"), _Signalling(), MemoryQueue())

    first = runner()
    dispatcher = Dispatcher([first], dead_letter_dir=tmp_path / "dead")
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(synthetic_turn("h"))
        assert isinstance(first.sink, _Signalling)
        await asyncio.wait_for(first.sink.sent.wait(), 10)
        await dispatcher.replace(runner())
        dispatcher.dispatch(synthetic_turn("h"))
        await dispatcher.close(flush_s=10)
    assert dispatcher.runners["s"].stats.delivered == 2


class _SlowConfig(SinkConfig):
    timeout_s: float = 300.0


class _Holding(_Signalling):
    """Takes a record and holds the send until released (a webhook answering slowly)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def send(self, record: TurnRecord) -> None:
        self.sent.set()
        await self.release.wait()


async def test_a_sink_timeout_over_the_send_limit_is_not_overdue(tmp_path: Path) -> None:
    """A sink whose own ``timeout_s`` (300 s) exceeds the 120 s send limit promises its next
    beat within twice that and 10 s: a slow answer inside its timeout does not withhold the
    watchdog (systemd restarted the daemon 120 s into such a send)."""
    sink = _Holding()
    runner = SinkRunner("hook", SinkType("slow", _SlowConfig, lambda *_: sink),
                        _SlowConfig(type="slow"), sink, MemoryQueue())
    dispatcher = Dispatcher([runner], dead_letter_dir=tmp_path / "dead")
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(synthetic_turn("h"))
        await asyncio.wait_for(sink.sent.wait(), 10)
        assert runner.heartbeat.due is not None
        assert runner.heartbeat.due - time.monotonic() > 600
        sink.release.set()
        await dispatcher.close(flush_s=10)


def test_test_sinks_never_rotates_the_daemons_file(tmp_path: Path) -> None:
    """A file at its ``rotate_bytes``: test-sinks appends its turn without rotating the file
    (a daemon running with the same config writes it and rotates it itself)."""
    journal = tmp_path / "turns.jsonl"
    journal.write_text('{"id": "earlier"}\n' * 10)
    config = tmp_path / "c.toml"
    config.write_text(f'[sinks.journal]\ntype = "file"\npath = "{journal}"\n'
                      f'rotate_bytes = {journal.stat().st_size}\n'
                      f'[state]\ndir = "{tmp_path / "state"}"\n')
    done = subprocess.run([*TRANSCRIBED, "test-sinks", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "turns.jsonl.1").exists()
    lines = journal.read_text().splitlines()
    assert len(lines) == 11 and json.loads(lines[-1])["source"] == "test"
