"""Logs that cannot be written never stop transcription: a broken, full or stalled stderr."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from daemon import logoutput, logs
from tests.conftest import REPO, SPEECH_DIR, TRANSCRIBED, TRANSCRIPTS
from tests.daemon_proc import cloud_config, read_turns
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references

S1 = "espeak-s1.wav"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as server:
        yield server


async def _run(config: Path, stderr: int, limit_s: float = 60) -> int:
    """``transcribed run --config CONFIG`` with fd ``stderr`` as its stderr: the exit code."""
    process = await asyncio.create_subprocess_exec(
        *TRANSCRIBED, "run", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    try:
        async with asyncio.timeout(limit_s):
            return await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _full_pipe() -> tuple[int, int]:
    """A pipe already full, its write end blocking again (as a reader that stopped reading)."""
    read, write = os.pipe()
    flags = fcntl.fcntl(write, fcntl.F_GETFL)
    fcntl.fcntl(write, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(write, b"x" * 4095 + b"\n")
    except BlockingIOError:
        pass
    fcntl.fcntl(write, fcntl.F_SETFL, flags)
    return read, write


@contextmanager
def _stderr(kind: str) -> Iterator[int]:
    """A stderr for the daemon: ``gone`` (nobody reads: EPIPE), ``full`` (a disk: ENOSPC),
    ``stalled`` (a reader that stopped reading)."""
    if kind == "gone":
        read, write = os.pipe()
        os.close(read)
        opened = [write]
    elif kind == "full":
        opened = [os.open("/dev/full", os.O_WRONLY)]
    else:
        opened = list(_full_pipe())
    try:
        yield opened[-1]
    finally:
        for fd in opened:
            os.close(fd)


@pytest.mark.parametrize("kind", ["gone", "full", "stalled"])
async def test_the_daemon_transcribes_whatever_its_stderr_does(
        fake: FakeAssemblyAI, tmp_path: Path, kind: str) -> None:
    """Every turn is delivered and the run ends 0 when stderr's reader is gone (it ended 1 at
    the first log line, the turn lost), when stderr is a full disk (the same), or when its
    reader stopped reading (the event loop waited on the first log line for ever; now the
    exit gives the lines waiting 2 s, once)."""
    config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
    with _stderr(kind) as stderr:
        code = await _run(config, stderr, limit_s=30)   # the file is 3.4 s
    assert code == 0
    assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]


@pytest.mark.parametrize("kind", ["gone", "stalled"])
async def test_a_config_error_keeps_its_exit_code_without_a_stderr(tmp_path: Path,
                                                                   kind: str) -> None:
    """78 stays 78 when the line saying why cannot be written (it became 1: systemd would
    restart a daemon whose configuration is wrong, RestartPreventExitStatus=78 notwithstanding),
    and comes within a bound when nobody reads it."""
    config = tmp_path / "config.toml"     # 12 problems: a stalled stderr is waited for once
    config.write_text("[audio]\n" + "".join(f"sorce{n} = 'file'\n" for n in range(12)))
    with _stderr(kind) as stderr:
        assert await _run(config, stderr, limit_s=20) == 78     # (it was 2 s a line)


def _lines(fd: int) -> list[dict[str, object]]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = b""
    while block := os.read(fd, 65536):
        text += block
    return [json.loads(line) for line in text.decode().splitlines()]


def test_lines_lost_are_counted_and_said_when_the_output_takes_lines_again(
        tmp_path: Path) -> None:
    """A full disk under the log file: the lines are lost, not raised; the first line written
    after it says how many, since when and why."""
    target = os.open("/dev/full", os.O_WRONLY)
    with open(target, "w", closefd=False) as stream:
        logs.configure(fmt="json", stream=stream)
        log = structlog.get_logger("test")
        for n in range(3):
            log.info("lost", n=n)                   # ENOSPC: no exception reaches the caller
        file = os.open(tmp_path / "log.jsonl", os.O_RDWR | os.O_CREAT)
        os.dup2(file, target)                       # the disk has room again
        log.info("kept")
        lines = _lines(file)
    os.close(file)
    os.close(target)
    assert [line["event"] for line in lines] == ["log.lines_lost", "kept"]
    notice = lines[0]
    assert notice["lines"] == 3 and notice["level"] == "warning"
    assert "No space left on device" in str(notice["reason"])
    assert str(notice["since"]).endswith("Z")


def test_a_reader_that_stops_reading_never_holds_up_the_logger() -> None:
    """In the background mode a full pipe costs lines, counted, not the logging thread's time:
    the lines beyond the queue's bound are lost and said before the next line written."""
    read, write = _full_pipe()
    stream = open(write, "w", closefd=False)
    output = logoutput.LogOutput(stream, lambda event, fields: json.dumps(
        {"event": event, **fields}).encode() + b"\n")
    output.start_background()
    line = "x" * 1000
    count = 3 * logoutput.QUEUE_MAX_BYTES // len(line)
    done = threading.Event()

    def log_all() -> None:
        for n in range(count):
            output.write(json.dumps({"event": "line", "n": n, "pad": line}))
        done.set()

    threading.Thread(target=log_all, daemon=True).start()
    assert done.wait(10), "the logging thread waited for the reader"
    output.write(json.dumps({"event": "after"}))
    received = bytearray()
    reader = threading.Thread(target=lambda: _read_all(read, received), daemon=True)
    reader.start()
    output.close(wait_s=10)
    os.close(write)
    reader.join(10)
    os.close(read)
    stream.close()
    events = [json.loads(x) for x in received.decode().split("\n")
              if x and not x.startswith("x")]
    kept = [e for e in events if e["event"] == "line"]
    lost = [e for e in events if e["event"] == "log.lines_lost"]
    assert len(lost) == 1 and lost[0]["lines"] + len(kept) == count
    assert 0 < len(kept) < count and events[-1]["event"] == "after"
    assert [e["n"] for e in kept] == sorted(e["n"] for e in kept)
    assert events.index(lost[0]) == len(kept)     # said where the lines went missing


def _read_all(fd: int, into: bytearray) -> None:
    while block := os.read(fd, 65536):
        into += block


def test_a_stuck_writer_is_waited_for_once() -> None:
    """``close`` waits its bound for a reader that does not read, once: a second close (the
    exit's, after run's) returns at once; ``settled`` says a line is still unwritten."""
    read, write = _full_pipe()
    stream = open(write, "w", closefd=False)
    output = logoutput.LogOutput(stream)
    output.start_background()
    output.write("a line the reader never takes")
    output.close(wait_s=0.2)
    assert not output.settled
    started = time.monotonic()
    output.close(wait_s=5)
    assert time.monotonic() - started < 1
    received = bytearray()
    reader = threading.Thread(target=lambda: _read_all(read, received), daemon=True)
    reader.start()
    output.settle(10)       # the reader came back: the writer finishes the line
    assert output.settled
    os.close(write)
    reader.join(10)
    os.close(read)
    stream.close()
    assert received.endswith(b"a line the reader never takes\n")


def test_a_notice_the_processors_drop_raises_nothing() -> None:
    """The ``log.lines_lost`` notice is rendered by the log's own processors; one that drops
    it (structlog's ``DropEvent``, a BaseException: ``capture_logs`` raises it for every event)
    made the logging call that followed a lost line raise, inside asyncio callbacks too."""
    stream = io.StringIO()
    logs.configure(fmt="json", stream=stream)
    stream.close()                                  # a line now is lost (ValueError)
    logging.getLogger("lib").warning("lost")
    with structlog.testing.capture_logs() as captured:  # its processor drops every event
        logging.getLogger("lib").warning("after")   # the notice is rendered first: no raise
        structlog.get_logger("t").warning("still")
    assert [e["event"] for e in captured][-1] == "still"
