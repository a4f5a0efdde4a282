"""Liveness: heartbeats with promises, and the task that reports to systemd.

Every component on the audio path keeps a :class:`Heartbeat`. Each beat is a promise: "I will
beat again within N seconds" (a chunk is due within the stall window; a reopen attempt within
its backoff plus the open time; a sink send within its limit). A component with nothing to do
(a sink with an empty queue, a source that has ended) is *idle* and promises nothing. A broken
promise means that component is stuck, and :class:`Reporter` stops the ``WATCHDOG=1`` pings so
systemd restarts the service: restarting helps a stuck component, never a network outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog

from daemon.notify import Notifier

log = structlog.get_logger("daemon.health")

STATUS_MIN_INTERVAL_S = 1.0  # at most one STATUS= per second
IDLE_POLL_S = 5.0  # with no change signalled, look again this often (backlog, stuck components)
EXTEND_EVERY_S = 10.0  # while starting and healthy, extend the start timeout this often…
EXTEND_BY_S = 30.0  # …by this much


class Heartbeat:
    """One component's liveness: the time by which it promised to beat again."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.due: float | None = None
        self.beats = 0

    def beat(self, within: float) -> None:
        """Progress: the next beat is due within ``within`` seconds."""
        self.due = self._clock() + within
        self.beats += 1

    def idle(self) -> None:
        """Nothing to do (waiting for work, or finished): no promise outstanding."""
        self.due = None

    def overdue(self) -> float:
        """Seconds past the promise (0 when on time or idle)."""
        return 0.0 if self.due is None else max(0.0, self._clock() - self.due)


class Health:
    """The heartbeats of the audio path: fixed ones and providers of changing sets (sinks)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._fixed: list[Heartbeat] = []
        self._providers: list[Callable[[], Iterable[Heartbeat]]] = []

    def heartbeat(self, name: str) -> Heartbeat:
        """A new heartbeat watched from now on."""
        beat = Heartbeat(name, self._clock)
        self._fixed.append(beat)
        return beat

    def watch(self, provider: Callable[[], Iterable[Heartbeat]]) -> None:
        """Watch the heartbeats ``provider`` returns at each check."""
        self._providers.append(provider)

    def problems(self) -> list[str]:
        """One line per stuck component, e.g. ``capture: overdue by 3.2 s``."""
        beats = [*self._fixed, *(b for p in self._providers for b in p())]
        return [f"{b.name}: overdue by {b.overdue():.1f} s" for b in beats if b.overdue() > 0]


class Reporter:
    """Tells systemd the truth: READY once audio flows, STATUS on change, WATCHDOG while alive.

    Args:
        notifier: where messages go (a no-op outside systemd).
        health: the heartbeats that must be on time for ``WATCHDOG=1``.
        ready: whether audio flows to a live session (checked on every wake-up).
        status: the current one-line human summary.
    """

    def __init__(
        self,
        notifier: Notifier,
        health: Health,
        *,
        ready: Callable[[], bool],
        status: Callable[[], str],
    ) -> None:
        self.notifier = notifier
        self.health = health
        self._ready_check = ready
        self._status = status
        self.is_ready = False
        self.stopping = False
        self._stop_reason = ""
        self._wake = asyncio.Event()
        self._last_status = ""
        self._status_at = -float("inf")
        self._withheld: list[str] = []

    def changed(self) -> None:
        """Something worth reporting changed (a turn, a session, a reload): wake up."""
        self._wake.set()

    async def run(self) -> None:
        """Report until cancelled."""
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_s
        next_ping = next_extend = loop.time()
        while True:
            now = loop.time()
            alive = self._check_alive()
            if interval is not None and now >= next_ping:
                if alive:
                    self.notifier.watchdog()
                next_ping = now + interval
            self._maybe_ready()
            if not self.is_ready and alive and now >= next_extend and not self.stopping:
                self.notifier.extend_timeout(EXTEND_BY_S)
                next_extend = now + EXTEND_EVERY_S
            wait = self._maybe_status()
            if interval is not None:
                wait = min(wait, next_ping - now)
            self._wake.clear()
            try:
                async with asyncio.timeout(max(wait, 0.01)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _check_alive(self) -> bool:
        problems = self.health.problems()
        if problems and not self._withheld:
            log.error("watchdog.withheld", problems=problems)
        elif self._withheld and not problems:
            log.info("watchdog.resumed")
        self._withheld = problems
        return not problems

    def _maybe_ready(self) -> None:
        if self.is_ready or self.stopping or not self._ready_check():
            return
        self.is_ready = True
        text = self._current_status()
        self.notifier.ready(text)
        self._last_status, self._status_at = text, time.monotonic()
        log.info("daemon.ready", status=text)

    def _maybe_status(self) -> float:
        """Send STATUS= if it changed and the rate limit allows; returns when to look again."""
        text = self._current_status()
        if text == self._last_status:
            return IDLE_POLL_S
        since = time.monotonic() - self._status_at
        if since < STATUS_MIN_INTERVAL_S:
            return STATUS_MIN_INTERVAL_S - since
        self.notifier.status(text)
        self._last_status, self._status_at = text, time.monotonic()
        return IDLE_POLL_S

    def _current_status(self) -> str:
        """The status line; once stopping, it says so (the engine then looks "reconnecting")."""
        text = self._status()
        return f"stopping ({self._stop_reason}); {text}" if self.stopping else text

    def reloading(self) -> None:
        """A reload begins (``RELOADING=1``): only once READY and not stopping (systemd)."""
        if self.is_ready and not self.stopping:
            self.notifier.reloading()

    def reloaded(self, outcome: str) -> None:
        """A reload ended, applied or rejected: ``READY=1`` again with a status line.

        Never after ``STOPPING=1``: a reload under way when the stop came ends unreported.
        """
        if self.is_ready and not self.stopping:
            self.notifier.ready(f"{self._status()}; reload {outcome}")
        self.changed()

    def stop(self, reason: str) -> None:
        """Shutdown has begun: ``STOPPING=1``, and no more READY or RELOADING."""
        if self.stopping:
            return
        self.stopping, self._stop_reason = True, reason
        text = self._current_status()
        self.notifier.stopping(text)
        self._last_status, self._status_at = text, time.monotonic()
