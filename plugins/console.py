"""The ``console`` sink: each turn on standard output, as text or as a JSON line.

A line goes to stdout's file descriptor from a thread of the sink's own, so a reader that stops
reading (a full pipe, a terminal paused with Ctrl-S) stalls this sink only, never the event loop
and with it capture and every other sink. Control characters in a transcript (a terminal escape
sequence) are never written raw: they cannot drive the terminal that shows it.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import sys
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Literal, Self, TextIO

from pydantic import Field

from daemon.errors import PermanentSinkError
from daemon.events import TurnRecord
from daemon.fdio import write_all
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl

# C0 and C1 controls and DEL: ESC [ … drives a terminal, and so does CSI (U+009B) where it is
# a byte of its own (a latin-1 locale). In text: a blank for a line break or tab, else U+FFFD.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BLANKS = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029")
_C1 = re.compile("[\x7f-\x9f]")   # what JSON leaves raw (it escapes C0 itself)

# (descriptor, encoded line, its result) for a writer thread; None ends it
_LineQueue = queue.SimpleQueue[tuple[int, bytes, Future[None]] | None]


class ConsoleSinkConfig(SinkConfig):
    """``type = "console"``."""

    format: Literal["text", "json"] = Field("text", description="'text' or 'json' lines")


class ConsoleSink:
    """Prints turns to stdout (logs go to stderr, so the two never mix)."""

    def __init__(self, name: str, config: ConsoleSinkConfig, context: SinkContext,
                 stream: TextIO | None = None) -> None:
        self.name = name
        self.config = config
        self._stream = stream
        self._lines: _LineQueue | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lines is not None:     # the writer ends after what it was given
            self._lines.put(None)
            self._lines = None

    async def send(self, record: TurnRecord) -> None:
        """Write one line (the event loop never waits on the reader)."""
        stream = self._stream or sys.stdout
        if stream is None:      # started with stdout closed (``>&-``): Python has none
            raise PermanentSinkError("cannot write to stdout: it is closed")
        line = self._line(record, stream.encoding) + "\n"
        try:
            fd = stream.fileno()
        except (OSError, ValueError):   # no descriptor (a StringIO): write it here
            fd = -1
        try:
            if fd < 0:
                stream.write(line)
                stream.flush()
                return
            stream.flush()      # what others printed first (nothing, in ``run``) stays first
            data = line.encode(stream.encoding or "utf-8", getattr(stream, "errors", None)
                               or "strict")
            written: Future[None] = Future()
            self._writer().put((fd, data, written))
            await asyncio.wrap_future(written)
        except (OSError, ValueError) as exc:
            raise PermanentSinkError(f"cannot write to stdout: {exc}") from None

    def _writer(self) -> _LineQueue:
        """The queue of this sink's writer thread (started at the first line)."""
        if self._lines is None:
            self._lines = queue.SimpleQueue()
            # a daemon thread: one blocked on a reader that never reads does not hold up exit
            threading.Thread(target=_write_lines, args=(self._lines,), daemon=True,
                             name=f"console:{self.name}").start()
        return self._lines

    def _line(self, record: TurnRecord, encoding: str | None) -> str:
        """The line, in what stdout's encoding can take (a non-UTF-8 locale, say latin-1).

        JSON falls back to ASCII escapes (the same record); text to ``?`` for what is missing.
        """
        if self.config.format == "json":
            line = _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", record.to_json())
        else:
            local = record.started_at.astimezone().strftime("%H:%M:%S")
            line = f"[{local}] {_CONTROLS.sub(_shown, record.transcript)}"
        try:
            line.encode(encoding or "utf-8")
        except UnicodeEncodeError:
            if self.config.format == "json":
                return json.dumps(record.to_dict(), separators=(",", ":"))   # ensure_ascii
            return line.encode(encoding or "utf-8", "replace").decode(encoding or "utf-8")
        except LookupError:         # an encoding Python does not know: let write() say so
            pass
        return line


def _shown(match: re.Match[str]) -> str:
    return " " if match.group() in _BLANKS else "\ufffd"


def _write_lines(lines: _LineQueue) -> None:
    """The writer thread: each line whole (a pipe may take part of it), in order, until None."""
    while (item := lines.get()) is not None:
        fd, data, done = item
        if not done.set_running_or_notify_cancel():
            continue        # the send was given up on (the flush at exit timed out)
        try:
            write_all(fd, data)
        except OSError as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``console`` sink type."""
    return [SinkType("console", ConsoleSinkConfig, ConsoleSink)]
