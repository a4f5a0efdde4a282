"""The bounds of an orderly stop: the shutdown deadline and the final flush of the sinks.

After SIGTERM/SIGINT the engine gets ``SHUTDOWN_DEADLINE_S`` to finish (``deadline`` cancels
it then, and ``uncancel_on_deadline`` makes that cancellation a quiet end); the sinks then get
``flush_bound`` to deliver their queues, with ``flush_signals`` handling signals meanwhile and
``stopped_signals`` after it, until the process exits.
The composition root (``daemon.app``) wires these in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
from collections.abc import Awaitable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import structlog

from daemon import logs

if TYPE_CHECKING:
    from daemon.dispatch import Dispatcher

log = structlog.get_logger("daemon.shutdown")

SHUTDOWN_DEADLINE_S: Final = 12.0  # SIGTERM → engine finished; sinks then get FLUSH_TIMEOUT_S
FLUSH_TIMEOUT_S: Final = 3.0       # after a signal; at the end of a file, + the slowest timeout_s
EXIT_SETTLE_S: Final = 0.5         # a signal after the stop: the log writer's last lines


@contextlib.contextmanager
def flush_signals(dispatcher: Dispatcher, *, clean: bool = True) -> Iterator[None]:
    """While the sinks flush: SIGTERM/SIGINT cut the flush short, SIGHUP is ignored.

    Without handlers a signal here (a second Ctrl-C, ``systemctl reload`` at the end of a file)
    killed the process, and the turns a file or console sink still held were lost instead of
    dead-lettered.
    """
    loop = asyncio.get_running_loop()

    def cut(signum: int) -> None:
        log.warning("daemon.flush_cut_short", signal=signal.Signals(signum).name)
        dispatcher.cut_flush()

    def ignore() -> None:
        log.info("reload.ignored", reason="stopping")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, cut, signum)
    loop.add_signal_handler(signal.SIGHUP, ignore)
    try:
        yield
    finally:
        stopped_signals(loop, exit_at_once=clean)


def stopped_signals(loop: asyncio.AbstractEventLoop, *, exit_at_once: bool = True) -> None:
    """From the end of the flush until the process exits: SIGHUP ignored, SIGTERM/SIGINT exit 0.

    The process may still wait then for threads nobody can cancel (the offline engine's model
    load or a recognition, a plugin's): asyncio.run and the interpreter join them. The loop's
    handlers removed, the defaults came back: a SIGHUP (``systemctl reload``, logrotate) killed
    the stopped daemon (status 1/HUP), a SIGTERM killed it (-15), a SIGINT printed a traceback
    from ``threading._shutdown``. Now such a signal ends the wait: one line, exit 0. Not after
    a failure (``exit_at_once`` False): its own exit code (1, 77, 78) must not become 0, so a
    SIGTERM then ends the process as the signal's default does.
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(signum)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if exit_at_once:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit_now)


def _exit_now(signum: int, _frame: FrameType | None) -> None:
    """A signal once the daemon has stopped cleanly: exit 0 without waiting for the threads.

    Its line is written with ``os.write``, not through the logger: the signal may have
    interrupted a log write holding the writer's lock, which this thread would then wait for
    for ever. Nothing is flushed and the line is left out when stderr has no room for it (a
    full pipe would block the exit): the log writer thread gets a moment to write what it
    still holds, without a lock.
    """
    line = logs.rendered_line("daemon.exit_now", signal=signal.Signals(signum).name,
                              effect="threads still running (a model load, a recognition) are "
                                     "not waited for")
    logs.settle(EXIT_SETTLE_S)      # the stop's last lines, if the log writer still has them
    with contextlib.suppress(OSError, ValueError):
        if select.select([], [2], [], 0)[1]:    # room for a line: it cannot block the exit
            os.write(2, line if logs.settled() else b"\n" + line)
    os._exit(0)


def flush_bound(dispatcher: Dispatcher, signalled: bool) -> float:
    """How long the sinks get to deliver their queues when the daemon stops.

    After a signal, ``FLUSH_TIMEOUT_S`` (systemd is waiting). At the end of a file nobody is:
    long enough for the slowest sink's own timeout (``timeout_s``) plus that, so a webhook that
    answers slowly still gets the last turns before the process exits.
    """
    if signalled:
        return FLUSH_TIMEOUT_S
    timeouts = (float(getattr(r.config, "timeout_s", 0.0)) for r in dispatcher.runners.values())
    return max(timeouts, default=0.0) + FLUSH_TIMEOUT_S


def deadline(task: asyncio.Task[Any]) -> None:
    """The engine did not finish within ``SHUTDOWN_DEADLINE_S`` of the signal: cancel it."""
    log.warning("daemon.shutdown_deadline", deadline_s=SHUTDOWN_DEADLINE_S)
    task.cancel()


async def uncancel_on_deadline(
    work: Awaitable[None], task: asyncio.Task[Any], stopping: list[asyncio.TimerHandle]
) -> None:
    """Await ``work``; a cancellation we caused while stopping ends it quietly."""
    try:
        await work
    except asyncio.CancelledError:
        if not stopping:
            raise
        task.uncancel()
