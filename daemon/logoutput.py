"""Where log lines are written: stderr's descriptor, whole lines, never an error to the logger.

Logs that cannot be written must not stop transcription. A line the output refuses (``EPIPE``:
whoever read stderr is gone; ``ENOSPC``/``EIO``: the file it points at cannot take it; a closed
stream) is lost and counted instead of raised into the code that logged it (a sink's worker, the
session, the exit path choosing the exit code). When lines go through again, one
``log.lines_lost`` line says first how many were lost, since when and why.

``run`` writes from a thread of its own (:meth:`LogOutput.start_background`): a reader that
stops reading (a terminal paused with Ctrl-S, a pipe into a stalled program, a journald stuck on
its disk) then stalls that thread only, never the event loop with capture, streaming and the
sinks. What waits for it is bounded (:data:`QUEUE_MAX_BYTES`); lines beyond are lost and counted
the same way, and :meth:`LogOutput.close` waits at most a moment for the rest at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TextIO

QUEUE_MAX_BYTES: Final = 1 << 20    # lines waiting for a reader that stopped reading
CLOSE_WAIT_S: Final = 2.0           # at exit, what the last lines get from a stalled reader

# (event, fields) -> one rendered line ending in a line break, or b"" when the log drops it;
# the notice goes through the log's own processors
Render = Callable[[str, dict[str, object]], bytes]


@dataclass
class _Loss:
    """Lines lost in a row: how many, since when, why (the first reason)."""

    count: int
    since: float
    why: str

    def fields(self) -> dict[str, object]:
        since = datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")
        return {"lines": self.count, "since": since.replace("+00:00", "Z"), "reason": self.why}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"the log output refused them: {exc.strerror}"
    return f"the log output refused them: {type(exc).__name__}"


class LogOutput:
    """A text stream for structlog and :mod:`logging` whose ``write`` never raises.

    Each ``write`` is one rendered line (both loggers write a line in one call). Written to the
    stream's descriptor with ``os.write`` when it has one (all of it; a line cut short by an
    error is ended before the next), else with the stream's own ``write`` (a ``StringIO``).
    """

    def __init__(self, stream: TextIO, render: Render | None = None, *, own_fd: bool = False
                 ) -> None:
        """Write to ``stream`` (rendering ``log.lines_lost`` with ``render``).

        ``own_fd``: to a duplicate of its descriptor (closed by :meth:`release`); for stderr,
        whose fd 2 is parked elsewhere for a moment while PortAudio prints (``audio_noise``):
        log lines never go through that.
        """
        self._stream = stream
        self._render = render
        try:
            self._fd = os.dup(stream.fileno()) if own_fd else stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = -1
        self._own_fd = own_fd and self._fd >= 0
        self._lock = threading.Lock()       # one writer at a time (sync mode, or the thread)
        self._loss: _Loss | None = None     # lines lost since the last one written
        self._torn = False                  # the last write stopped inside a line
        self._queue: deque[bytes | _Loss] | None = None
        self._queued = 0
        self._dropped: _Loss | None = None  # lost at the queue's door, not yet queued as a mark
        self._ready = threading.Condition(threading.Lock())
        self._closing = False
        self._busy = False                  # the writer thread is writing a line it took
        self._gave_up = False               # close() found the writer stuck: it waits no more
        self._thread: threading.Thread | None = None

    # -- the text stream the loggers see
    def isatty(self) -> bool:
        """Whether the stream is a terminal (the console renderer's colours)."""
        with contextlib.suppress(AttributeError, OSError, ValueError):
            return bool(self._stream.isatty())
        return False

    def is_journal(self) -> bool:
        """Whether the stream is systemd's journal.

        ``$JOURNAL_STREAM`` (``DEVICE:INODE``) names the descriptor it writes to: systemd sets
        it for a unit whose stderr goes there.
        """
        named = os.environ.get("JOURNAL_STREAM", "")
        if not named or self._fd < 0:
            return False
        try:
            held = os.fstat(self._fd)
        except OSError:
            return False
        return named == f"{held.st_dev}:{held.st_ino}"

    def flush(self) -> None:
        """Nothing: every line is written (or queued) whole by :meth:`write`."""

    def write(self, text: str) -> int:
        """Write (or queue) one line; a failure is counted, never raised."""
        data = text.encode("utf-8", "backslashreplace")
        if not data.endswith(b"\n"):
            data += b"\n"
        if self._queue is None or not self._enqueue(data):
            with self._lock:
                self._deliver(data)
        return len(text)

    # -- background mode
    @property
    def background(self) -> bool:
        """Lines are written by the writer thread (until :meth:`close`)."""
        return self._queue is not None

    def start_background(self) -> None:
        """From now on, lines are written by a thread of their own (``run``'s daemon)."""
        if self._queue is not None or self._fd < 0:
            return
        self._queue = deque()
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)     # a path out that did not close it (a crash)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Write what is queued, for at most ``wait_s`` (a reader may never read again).

        Then lines are written as they come, by the thread that logs them; if the writer
        thread is still stuck on a reader that does not read, they are dropped instead.
        """
        thread = self._thread
        if thread is None or self._gave_up:     # the exit waits once, not at every close
            return
        with self._ready:
            self._closing = True
            self._ready.notify()
        thread.join(wait_s)
        if thread.is_alive():
            self._gave_up = True
            return
        with self._ready:
            left, self._queue, self._thread = self._queue or deque(), None, None
            if self._dropped is not None:       # said before the next line written
                left.append(self._dropped)
                self._dropped = None
        with self._lock:
            for item in left:       # came in between the thread's end and now
                self._lost(item) if isinstance(item, _Loss) else self._deliver(item)

    def release(self) -> None:
        """Close the descriptor this output duplicated (a new configuration replaces it)."""
        self.close()
        if self._gave_up:       # the writer thread is stuck in a write, holding the lock
            return
        with self._lock:
            if self._own_fd:
                os.close(self._fd)
                self._fd, self._own_fd, self._queue = -1, False, None
                self._stream = open(os.devnull, "w")

    def settle(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the queue to empty, taking no lock (a signal handler's)."""
        deadline = time.monotonic() + wait_s
        while (self._queue or self._busy) and time.monotonic() < deadline:
            time.sleep(0.01)

    @property
    def gave_up(self) -> bool:
        """:meth:`close` found the writer thread stuck on a reader that does not read."""
        return self._gave_up

    @property
    def settled(self) -> bool:
        """Nothing queued and no line half-written by the writer thread."""
        return not self._queue and not self._busy

    def _enqueue(self, data: bytes) -> bool:
        """Queue ``data`` for the writer thread; False when there is none any more."""
        with self._ready:
            if self._queue is None or self._thread is None or not self._thread.is_alive():
                return False    # closed, or the writer died: the caller writes it
            if self._queued and self._queued + len(data) > QUEUE_MAX_BYTES:
                if self._dropped is None:
                    self._dropped = _Loss(0, time.time(), "the log output stopped taking lines "
                                                           "(nobody reads it)")
                self._dropped.count += 1
                return True
            if self._dropped is not None:   # the loss goes where it happened, in order
                self._queue.append(self._dropped)
                self._dropped = None
            self._queue.append(data)
            self._queued += len(data)
            self._ready.notify()
            return True

    def _drain(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy = True
            with self._lock:
                if isinstance(item, _Loss):
                    self._lost(item)
                else:
                    self._deliver(item)
            with self._ready:
                if isinstance(item, bytes):     # its room is free once it is written
                    self._queued -= len(item)
                self._busy = False

    # -- writing
    def _deliver(self, data: bytes) -> None:
        if self._loss is not None:
            notice = self._notice(self._loss)
            if not notice or self._put(notice) is None:
                self._loss = None
        error = self._put(data)
        if error is not None:
            self._lost(_Loss(1, time.time(), _reason(error)))

    def _notice(self, loss: _Loss) -> bytes:
        """The ``log.lines_lost`` line (empty when the log's processors drop it).

        Rendered by the log's own processors, which are not ours to trust: whatever one
        raises, the notice is the plain words and ``write`` still raises nothing.
        """
        try:
            return self._render("log.lines_lost", loss.fields()) if self._render else b""
        except Exception:
            return f"log.lines_lost {loss.fields()}\n".encode("utf-8", "backslashreplace")

    def _lost(self, loss: _Loss) -> None:
        if self._loss is None:
            self._loss = loss
        else:
            self._loss.count += loss.count

    def _put(self, data: bytes) -> OSError | ValueError | None:
        """Write ``data`` whole, after a line break if the last write stopped inside a line."""
        if self._torn:
            data = b"\n" + data
        if self._fd < 0:
            try:
                self._stream.write(data.decode("utf-8", "replace"))
                self._stream.flush()
            except (OSError, ValueError) as exc:
                return exc
            self._torn = False
            return None
        written = 0
        try:
            while written < len(data):
                written += self._write_some(data, written)
        except OSError as exc:
            if written:
                self._torn = data[written - 1 : written] != b"\n"
            return exc
        self._torn = False
        return None

    def _write_some(self, data: bytes, start: int) -> int:
        """One ``os.write`` of ``data`` from ``start``; how much it took.

        A descriptor someone made non-blocking is waited for: 1 s when the caller is the thread
        that logs, for ever in the writer thread.
        """
        try:
            return os.write(self._fd, memoryview(data)[start:])
        except BlockingIOError:
            if threading.current_thread() is not self._thread:
                _, ready, _ = select.select([], [self._fd], [], 1.0)
                if not ready:
                    raise
            else:
                select.select([], [self._fd], [], None)
            return 0
