"""When a session that will expire hands over to the next one.

Owns ``rollover_plan``: from ``Begin.expires_at`` (the token's session limit), when the engine
opens the next session and when it switches to it at the latest. ``daemon.stream`` follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from daemon.protocol import Begin

ROLLOVER_MIN_S: Final = 3.0         # the smallest rollover margin (short test sessions)
ROLLOVER_MAX_S: Final = 120.0       # the largest (3-hour sessions)


@dataclass(frozen=True)
class RolloverPlan:
    """When (monotonic seconds) to open the next session and when to switch at the latest."""

    open_at: float
    switch_by: float


def rollover_plan(begin: Begin, began_wall: float, began_mono: float) -> RolloverPlan | None:
    """Plan a rollover from ``expires_at``; the margin is a quarter of the session, bounded."""
    if begin.expires_at is None:
        return None
    length = begin.expires_at.timestamp() - began_wall
    if length <= 0:
        return None
    margin = min(ROLLOVER_MAX_S, max(ROLLOVER_MIN_S, length / 4))
    expires_mono = began_mono + length
    return RolloverPlan(open_at=expires_mono - margin,
                        switch_by=expires_mono - max(1.0, margin / 3))
