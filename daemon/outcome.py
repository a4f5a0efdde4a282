"""How a streaming session ended, or an attempt to open one failed.

Owns ``Outcome`` (the close kind and reason, and what the engine's backoff and replay decide
on) and ``close_of`` (the close code and reason a websocket peer sent). ``daemon.session``
makes them when a session ends, ``daemon.stream`` when a connection attempt fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed

from daemon.protocol import CloseKind


@dataclass
class Outcome:
    """How a session ended."""

    kind: CloseKind
    reason: str
    began: bool = False
    healthy: bool = False            # old enough for the backoff to start over
    unanswered: bool = False         # the service took speech and never answered it
    finished: bool = False           # Termination received after the input ended


def close_of(exc: ConnectionClosed) -> tuple[int, str]:
    """The close code and reason the peer sent; 1006 when the connection ended without one."""
    frame = exc.rcvd
    return (frame.code, frame.reason) if frame is not None else (1006, "abnormal closure")

