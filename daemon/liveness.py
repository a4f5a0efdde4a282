"""Is the service still there? Its heartbeats say, once it sends them.

The daemon asks for ``session_heartbeat`` (a service that does not know it ignores it). A
service that sends heartbeats and then falls silent, socket open, or whose heartbeats show it
no longer receives what is sent (it stopped reading: the audio waits in socket buffers) counts
as gone after ``MISSED_BEATS`` of its heartbeat periods and a second. Until its first heartbeat,
a service's silence is just silence (an older service, or a quiet room).

The period is read from the service's own clock (``total_duration_ms``), so heartbeats that
queued up unread (a rollover's next session waits before it is read) do not shorten it. It is
kept between ``MIN_PERIOD_S`` and ``MAX_PERIOD_S``: a jump in the service's clock (or a gap of
heartbeats it never sent) must not stretch the silence limit to minutes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from daemon.protocol import Heartbeat

HEARTBEAT_S: Final = 5.0        # the period assumed until two heartbeats show the service's own
MIN_PERIOD_S: Final = 1.0       # a shorter one (a misread clock) would make every pause silence
MAX_PERIOD_S: Final = 30.0      # the service's is 5 s; a longer one would hide a silent service
MISSED_BEATS: Final = 3


class Liveness:
    """Heartbeats seen in one session, and what they say about the service."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.received_ms: int | None = None        # audio the last heartbeat says was received
        self._period_s = HEARTBEAT_S
        self._service_ms = 0.0                  # the last heartbeat's service clock
        self._last_frame = clock()
        self._doubted = False
        self._sent: deque[tuple[float, float]] = deque()    # (when, audio sent by then)

    @property
    def limit_s(self) -> float:
        """How long the service may say nothing (infinite until its first heartbeat)."""
        if self.received_ms is None:
            return math.inf
        return MISSED_BEATS * self._period_s + 1.0

    def restart(self) -> None:
        """Reading starts (or starts again): silence is counted from now."""
        self._last_frame = self._clock()
        self._doubted = False

    def frame(self) -> None:
        """A frame of any kind arrived."""
        self.restart()

    def silent(self) -> float | None:
        """Seconds without a frame if that makes the service gone, else None.

        The first time it would, it is doubted instead: the caller reads once more, since
        frames may be waiting behind a stalled event loop.
        """
        silent = self._clock() - self._last_frame
        if silent <= self.limit_s:
            return None
        if not self._doubted:
            self._doubted = True
            return None
        return silent

    def beat(self, beat: Heartbeat, sent_s: float) -> float | None:
        """Record a heartbeat; ``sent_s``: audio sent so far in the session.

        Returns the seconds of audio the service has not received when it is missing audio
        sent over ``limit_s`` ago (it stopped reading), else None.
        """
        now = self._clock()
        if self.received_ms is not None and beat.duration_ms > self._service_ms:
            period = (beat.duration_ms - self._service_ms) / 1000
            self._period_s = min(MAX_PERIOD_S, max(MIN_PERIOD_S, period))
        self._service_ms = max(self._service_ms, beat.duration_ms)
        self.received_ms = beat.received_ms
        self._sent.append((now, sent_s))
        cutoff = now - self.limit_s
        while len(self._sent) > 1 and self._sent[1][0] <= cutoff:
            self._sent.popleft()                # keep the newest sample at or before the cutoff
        when, then_sent_s = self._sent[0]
        received_s = beat.received_ms / 1000
        if when <= cutoff and received_s + 0.5 < then_sent_s:
            return sent_s - received_s
        return None
