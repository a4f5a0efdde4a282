"""The live view's model: what is happening now, fanned out to whoever is watching.

``LiveHub`` is an ``EngineListener``: the app feeds it partial turns, finished turns and session
events (``Tee(listener, hub)``), plus connection-state updates. Each event becomes one JSON text,
serialised once and offered to every subscriber's bounded queue. A subscriber that falls
``client_queue`` events behind is dropped (its ``on_drop`` callback closes its connection):
a slow viewer never blocks or grows the daemon. A new subscriber first receives a replay: the
state, the open sessions, the last ``history`` finished turns and the current partial.

Event forms (one JSON object per message, documented in the README)::

    {"type": "state", "connection": "live", "engine": "assemblyai", "session_id": "…",
     "backlog_s": 0, "audio": true, "at": "…Z"}
    {"type": "session", "event": "started", "session_id": "…", "engine": "…", "expires_at": …}
    {"type": "session", "event": "ended", "session_id": "…", "engine": "…", "duration_s": …,
     "audio_s": …, "turns": …, "reason": "…"}
    {"type": "partial", "id": "…:3", "session_id": "…", "turn_order": 3, "transcript": "…",
     "engine": "…"}
    {"type": "turn", <every field of the turn record>}
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal

import structlog

from daemon.engine import EngineListener
from daemon.events import (
    PartialTurn,
    SessionInfo,
    SessionSummary,
    TurnRecord,
    iso_utc,
    json_line,
)

log = structlog.get_logger("daemon.live")

ConnectionState = Literal["connecting", "live", "reconnecting", "paused", "stopped"]
CONNECTION_STATES: Final[tuple[ConnectionState, ...]] = (
    "connecting", "live", "reconnecting", "paused", "stopped",
)
DEFAULT_HISTORY: Final = 50
DEFAULT_CLIENT_QUEUE: Final = 256
_UNSET: Final[Any] = object()


class Subscription:
    """One watcher's bounded queue of serialised events."""

    def __init__(self, limit: int, on_drop: Callable[[], None] | None = None) -> None:
        self._items: deque[str] = deque()
        self._limit = limit
        self._wake = asyncio.Event()
        self.on_drop = on_drop
        self.dropped = False
        self.closed = False

    def offer(self, text: str) -> bool:
        """Queue one event; on overflow mark the subscription dropped and return False."""
        if self.dropped or self.closed:
            return False
        if len(self._items) >= self._limit:
            self.dropped = True
            self._items.clear()
            self._wake.set()
            if self.on_drop is not None:
                self.on_drop()
            return False
        self._items.append(text)
        self._wake.set()
        return True

    async def next(self) -> str | None:
        """The next event, or ``None`` once the subscription is dropped or closed."""
        while not self._items:
            if self.dropped or self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return None if self.dropped else self._items.popleft()

    def close(self) -> None:
        """End the subscription: ``next`` returns ``None`` once the queue is empty."""
        self.closed = True
        self._wake.set()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken."""
        return len(self._items)


class LiveHub:
    """Current state, recent turns and the open partial; fans events out to subscribers."""

    def __init__(
        self,
        *,
        engine: str | None = None,
        history: int = DEFAULT_HISTORY,
        client_queue: int = DEFAULT_CLIENT_QUEUE,
    ) -> None:
        self._state: dict[str, Any] = {
            "type": "state", "connection": "connecting", "engine": engine,
            "session_id": None, "backlog_s": 0, "audio": False, "at": _now(),
        }
        self._sessions: dict[str, dict[str, Any]] = {}  # open sessions' starts, oldest first
        self._turns: deque[str] = deque(maxlen=history)
        self._partial: PartialTurn | None = None
        self._subscribers: set[Subscription] = set()
        self._client_queue = client_queue
        self._input_ended = False
        self.dropped_clients = 0

    # -- EngineListener --------------------------------------------------------------------

    def partial(self, partial: PartialTurn) -> None:
        """An unfinished turn's text so far: replaces the current partial."""
        self._partial = partial
        self._publish(_partial_event(partial))

    def turn(self, record: TurnRecord) -> None:
        """A finished turn: remembered for replay; the partial it settles is cleared."""
        if self._partial is not None and self._partial.session_id == record.session_id and (
            self._partial.turn_order <= record.turn_order
        ):
            self._partial = None
        text = json_line({"type": "turn", **record.to_dict()})
        self._turns.append(text)
        self._publish_text(text)

    def session_started(self, session: SessionInfo) -> None:
        """A session began: the connection is live."""
        expires = iso_utc(session.expires_at) if session.expires_at else None
        event = {
            "type": "session", "event": "started", "session_id": session.session_id,
            "engine": session.engine, "expires_at": expires,
        }
        self._sessions[session.session_id] = event
        self._publish(event)
        self.state("live", engine=session.engine, session_id=session.session_id)

    def input_ended(self) -> None:
        """No more audio will come (end of file, or stopping): sessions now end for good."""
        self._input_ended = True

    def session_ended(self, summary: SessionSummary) -> None:
        """A session ended: unless another one is still open, the engine is reconnecting.

        Two overlap during a rollover and while a replay lane catches up after an outage;
        whichever ends first, the view stays live on the other. Not once the input has ended:
        then the daemon is finishing, and the app says ``state("stopped")`` when it is done
        (which this never overrides).
        """
        current = self._state["session_id"] in (None, summary.session_id)
        self._sessions.pop(summary.session_id, None)
        if self._partial is not None and self._partial.session_id == summary.session_id:
            self._partial = None
        self._publish({
            "type": "session", "event": "ended", "session_id": summary.session_id,
            "engine": summary.engine, "duration_s": summary.duration_s,
            "audio_s": summary.audio_s, "turns": summary.turns, "reason": summary.reason,
        })
        if not current or self._input_ended or self._state["connection"] == "stopped":
            return
        if self._sessions:                  # still live on the newest session left open
            newest = next(reversed(self._sessions.values()))
            self.state(engine=newest["engine"], session_id=newest["session_id"])
        else:
            self.state("reconnecting", session_id=None)

    # -- state -----------------------------------------------------------------------------

    def state(
        self,
        connection: ConnectionState | None = None,
        *,
        engine: str | None = _UNSET,
        session_id: str | None = _UNSET,
        backlog_s: float | None = None,
        audio: bool | None = None,
    ) -> None:
        """Update the connection state; an event goes out only when something changed.

        ``backlog_s`` is rounded to whole seconds so a ticking backlog is not chatty.
        """
        update: dict[str, Any] = {}
        if connection is not None:
            if connection not in CONNECTION_STATES:
                raise ValueError(f"unknown connection state {connection!r}")
            update["connection"] = connection
        if engine is not _UNSET:
            update["engine"] = engine
        if session_id is not _UNSET:
            update["session_id"] = session_id
        if backlog_s is not None:
            update["backlog_s"] = round(backlog_s)
        if audio is not None:
            update["audio"] = audio
        if all(self._state.get(k) == v for k, v in update.items()):
            return
        self._state = {**self._state, **update, "at": _now()}
        self._publish(self._state)

    def capture_paused(self, paused: bool) -> None:
        """The microphone is being reopened (``live`` → ``paused``) or flows again (→ ``live``).

        Only a live view pauses: ``connecting``/``reconnecting`` say more, and a session event
        that arrives meanwhile wins until the next refresh.
        """
        connection = self._state["connection"]
        if paused and connection == "live":
            self.state("paused")
        elif not paused and connection == "paused":
            self.state("live")

    @property
    def current(self) -> dict[str, Any]:
        """The current state event (a copy)."""
        return dict(self._state)

    # -- subscribers -----------------------------------------------------------------------

    def subscribe(self, on_drop: Callable[[], None] | None = None) -> Subscription:
        """A new subscription, preloaded with the replay (state, open sessions, turns, partial)."""
        replay = [json_line(self._state)]
        replay.extend(json_line(session) for session in self._sessions.values())
        replay.extend(self._turns)
        if self._partial is not None:
            replay.append(json_line(_partial_event(self._partial)))
        sub = Subscription(self._client_queue + len(replay), on_drop)
        for text in replay:
            sub.offer(text)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a subscription (idempotent)."""
        self._subscribers.discard(sub)
        sub.close()

    @property
    def subscribers(self) -> int:
        """How many watchers are connected."""
        return len(self._subscribers)

    def _publish(self, event: dict[str, Any]) -> None:
        self._publish_text(json_line(event))

    def _publish_text(self, text: str) -> None:
        for sub in list(self._subscribers):
            if not sub.offer(text):
                self._subscribers.discard(sub)
                self.dropped_clients += 1
                log.warning("live.client_dropped", reason="too slow", queued=self._client_queue)


class Tee:
    """An ``EngineListener`` forwarding every call to several listeners, in order.

    The first listener (the app's, which dispatches turns to sinks) is called plainly; a failure
    in any later one (a live view) is logged and never reaches the engine.
    """

    def __init__(self, primary: EngineListener, *others: EngineListener) -> None:
        self._primary = primary
        self._others = others

    def turn(self, record: TurnRecord) -> None:
        """Forward a finished turn."""
        self._primary.turn(record)
        self._each("turn", record)

    def partial(self, partial: PartialTurn) -> None:
        """Forward a partial turn."""
        self._primary.partial(partial)
        self._each("partial", partial)

    def session_started(self, session: SessionInfo) -> None:
        """Forward a session start."""
        self._primary.session_started(session)
        self._each("session_started", session)

    def session_ended(self, summary: SessionSummary) -> None:
        """Forward a session end."""
        self._primary.session_ended(summary)
        self._each("session_ended", summary)

    def _each(self, method: str, value: object) -> None:
        for listener in self._others:
            try:
                getattr(listener, method)(value)
            except Exception:  # supervision boundary: a live view never breaks the stream
                log.exception("live.listener_failed", method=method)


def _partial_event(partial: PartialTurn) -> dict[str, Any]:
    return {"type": "partial", "id": f"{partial.session_id}:{partial.turn_order}",
            **partial.to_dict()}


def _now() -> str:
    return iso_utc(datetime.now(UTC))
