"""``Liveness``: what a service's heartbeats (and their absence) say, on a hand-moved clock."""

from __future__ import annotations

import math

from daemon.liveness import Liveness
from daemon.protocol import Heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(received_s: float, service_s: float) -> Heartbeat:
    return Heartbeat(round(received_s * 1000), service_s * 1000, 1.0, 0.0)


def silent_after(live: Liveness, clock: Clock, seconds: float) -> float | None:
    """Advance the clock and ask twice (the first overdue answer is only a doubt)."""
    clock.now += seconds
    return live.silent() or live.silent()


def test_without_heartbeats_silence_is_just_silence() -> None:
    clock = Clock()
    live = Liveness(clock)
    assert live.limit_s == math.inf and live.received_ms is None
    assert silent_after(live, clock, 3600) is None


def test_silent_after_three_periods_and_a_second_doubted_once() -> None:
    clock = Clock()
    live = Liveness(clock)
    for k in range(3):
        clock.now += 5
        live.frame()
        assert live.beat(beat(5 * k, 5 * k), 5 * k) is None
    assert live.limit_s == 16
    clock.now += 15.9
    assert live.silent() is None
    clock.now += 0.2
    assert live.silent() is None            # doubted: frames may wait behind a stalled loop
    assert math.isclose(live.silent() or 0, 16.1)
    live.frame()                             # one came after all
    assert live.silent() is None


def test_queued_heartbeats_keep_the_service_period() -> None:
    """Heartbeats read back to back (a rollover's next session waited unread): their service
    clock is 5 s apart, so the limit stays 16 s (it was about 1 s: healthy sessions ended)."""
    clock = Clock()
    live = Liveness(clock)
    for k in range(4):
        live.frame()
        live.beat(beat(0, 5 * k), 0)
    assert live.limit_s == 16
    assert silent_after(live, clock, 4.9) is None


def test_period_follows_the_service_and_has_a_floor() -> None:
    clock = Clock()
    live = Liveness(clock)
    live.beat(beat(0, 10), 0)
    live.beat(beat(0, 12), 0)
    assert live.limit_s == 7
    live.beat(beat(0, 12.01), 0)             # a misread clock: not a 10 ms period
    assert live.limit_s == 4


def test_behind_when_audio_sent_a_limit_ago_never_arrived() -> None:
    """It stopped reading at 20 s of audio: sent goes on (socket buffers), received does not."""
    clock = Clock()
    live = Liveness(clock)
    sent = 0.0
    for _ in range(4):                      # healthy: everything sent arrives
        clock.now += 5
        sent += 5
        assert live.beat(beat(sent, clock.now - 1000), sent) is None
    results = []
    for _ in range(5):
        clock.now += 5
        sent += 5
        results.append(live.beat(beat(20, clock.now - 1000), sent))
    # the first audio it lacks went out at 1025 s: not yet 16 s ago at 1040 s, then it is
    assert results == [None, None, None, None, 25.0]


def test_a_burst_of_backlog_is_not_behind() -> None:
    """A session that starts with 30 s of backlog sends it faster than the service reports it:
    only audio sent more than a limit ago counts."""
    clock = Clock()
    live = Liveness(clock)
    sent = 30.0
    for k in range(1, 5):
        clock.now += 5
        assert live.beat(beat(5 * k + 2, 5 * k), sent + 5 * k) is None   # catching up


def test_a_blocked_sender_is_still_seen() -> None:
    """Small buffers: the sender blocks 2 s past what the service got; after the limit the
    audio sent then has still not arrived."""
    clock = Clock()
    live = Liveness(clock)
    live.beat(beat(0, 0), 0)
    verdicts = []
    for k in range(1, 6):
        clock.now += 5
        verdicts.append(live.beat(beat(10, 5 * k), 12))
    assert verdicts[:2] == [None, None] and verdicts[-1] == 2.0
