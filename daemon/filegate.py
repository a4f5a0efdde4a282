"""A file's back-pressure on the cloud engine's ledger: a file can wait, a microphone cannot.

While the ledger is full (an outage longer than ``reconnect.backlog_seconds``) the file is not
read; finished turns free room as they cover audio, and the file goes on. Owns ``FileGate``;
``daemon.stream.AssemblyAIEngine`` asks it before appending a file's chunk to a full ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import structlog

from daemon.ledger import Ledger
from daemon.pieces import SILENCE_RMS

log = structlog.get_logger("daemon.stream")

# When the live session has sent all the ledger holds and no replay is running, only the
# service's last finals can free room (a turn longer than the backlog ends only with audio after
# it): after this long the oldest audio, sent already, is let go.
STUCK_GRACE_S: Final = 2.0
SAY_PAUSED_AFTER_S: Final = 1.0  # a wait this long is said (``stream.input_paused``/``_resumed``)


class FileGate:
    """Holds a file's next chunk while the ledger is full."""

    def __init__(self, ledger: Ledger, part_samples: int, backlog_seconds: float,
                 replaying: Callable[[], bool]) -> None:
        self._ledger, self._part, self._backlog_s = ledger, part_samples, backlog_seconds
        self._replaying = replaying     # a replay session is catching up (it frees room)
        self._stopping = False          # ``stop``: the file is read no further
        self._forcing = False           # letting go of a long turn's oldest audio
        self._paused_at: float | None = None    # when a pause that was said began (loop time)

    def stop(self) -> None:
        """The input is stopping (SIGTERM): a chunk waiting for room is not kept."""
        self._stopping = True
        self._ledger.wake()

    async def room_for(self, samples: int) -> bool:
        """Wait while the ledger is full; False if stopped meanwhile (the chunk is not kept).

        Finished turns free room as they cover audio. Only one case frees none: the live session
        has sent all the ledger holds and no replay is running. Then the oldest audio, sent
        already, is let go (not counted as dropped): at once if it is silence (a backlog shorter
        than the 5 s the session waits before it covers silence), else, a turn longer than the
        backlog, after ``STUCK_GRACE_S`` for the last finals and with ``stream.backlog_full``.
        """
        loop = asyncio.get_running_loop()
        say = None if self._paused_at is not None else \
            loop.call_later(SAY_PAUSED_AFTER_S, self._say_paused, loop.time())
        try:
            return await self._wait(samples)
        finally:
            if say is not None:
                say.cancel()

    def flowing(self) -> None:
        """A chunk went in without waiting: a pause that was said is over.

        So is a long turn's letting go: its finals freed room, and a later turn longer than the
        backlog waits ``STUCK_GRACE_S`` for its own finals, and is said, again.
        """
        self._forcing = False
        if self._paused_at is not None:
            log.info("stream.input_resumed",
                     paused_s=round(asyncio.get_running_loop().time() - self._paused_at, 2))
            self._paused_at = None

    def _say_paused(self, since: float) -> None:
        self._paused_at = since
        log.info("stream.input_paused", backlog_seconds=self._backlog_s,
                 reason="the backlog is full: the file is read on as turns free room")

    async def _wait(self, samples: int) -> bool:
        ledger, stuck_since = self._ledger, None
        while ledger.full(samples):
            if self._stopping:
                return False
            if self._replaying() or not ledger.starved:
                stuck_since = None
                await ledger.wait_for_room()
                continue
            oldest = ledger.head + ledger.overflow(samples)
            if not ledger.held_speech_s(self._part, SILENCE_RMS, stop=oldest):
                break                           # silence the service has: nothing waits on it
            now = time.monotonic()
            stuck_since = now if stuck_since is None else stuck_since
            if self._forcing or now - stuck_since >= STUCK_GRACE_S:
                self._say_full()
                ledger.release(samples)
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STUCK_GRACE_S - (now - stuck_since)):
                    await ledger.wait_for_room()
        self._forcing = False
        ledger.release(samples)
        return True

    def _say_full(self) -> None:
        if not self._forcing:
            self._forcing = True
            log.warning("stream.backlog_full", backlog_seconds=self._backlog_s,
                        effect="a turn longer than the backlog: its oldest audio, sent already, "
                               "is let go (lost if this session fails or rolls over before the "
                               "turn ends)")
