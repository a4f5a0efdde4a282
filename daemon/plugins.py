"""Plugin contracts: hook specifications, the ``Sink`` protocol and the typed plugin host.

pluggy is synchronous and used for discovery and rare lifecycle events only. Sinks are async
objects that the dispatcher drives directly, each with its own queue and worker.

Built-in sink modules are registered explicitly (``BUILTIN_PLUGINS``), so they work from a source
checkout; third-party sinks are found through the ``transcribed.sinks`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Protocol, Self

import pluggy
from pydantic import BaseModel, ConfigDict

from daemon.errors import ConfigError
from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord

PROJECT: Final = "transcribed"
ENTRY_POINT_GROUP: Final = f"{PROJECT}.sinks"
BUILTIN_PLUGINS: Final = ("plugins.file", "plugins.console", "plugins.webhook", "plugins.mqtt")

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class SinkConfig(BaseModel):
    """Base of every sink's config table; subclasses add their own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: str
    enabled: bool = True


@dataclass(frozen=True)
class SinkContext:
    """What a sink factory may need from the daemon besides its own config."""

    host: str
    state_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)


class Sink(Protocol):
    """An async destination for turn records.

    ``__aenter__`` opens connections, ``send`` delivers one record (raising ``SinkError`` or
    ``PermanentSinkError`` on failure; the dispatcher decides about retrying), ``__aexit__``
    flushes and closes.
    """

    async def __aenter__(self) -> Self:
        """Prepare; must not fail just because a remote end is down."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Flush and close."""

    async def send(self, record: TurnRecord) -> None:
        """Deliver one record or raise ``SinkError``/``PermanentSinkError``."""


SinkFactory = Callable[[str, Any, SinkContext], Sink]


@dataclass(frozen=True)
class SinkType:
    """A kind of sink a plugin provides.

    Attributes:
        name: the ``type =`` value in the TOML sink table.
        config_model: validates the sink's table (``extra="forbid"``).
        factory: builds a sink from (instance name, validated config, context).
        durable: records are kept in the on-disk outbox until ``send`` succeeds
            (network sinks); otherwise the queue is in memory.
    """

    name: str
    config_model: type[SinkConfig]
    factory: SinkFactory
    durable: bool = False


class _Specs:
    """Hook specifications. Hooks are always called with keyword arguments."""

    @hookspec
    def transcribed_sink_types(self) -> Sequence[SinkType]:  # type: ignore[empty-body]
        """Return the sink types this plugin provides.

        Called once at startup (and again on reload). Each ``SinkType.name`` must be unique
        across all plugins.
        """

    @hookspec
    def transcribed_session_started(self, session: SessionInfo) -> None:
        """Called when a transcription session begins (cloud ``Begin`` or local engine start).

        Must return quickly and never block: it runs on the event loop.
        """

    @hookspec
    def transcribed_session_ended(self, summary: SessionSummary) -> None:
        """Called when a session ends, with its summary figures. Must return quickly."""

    @hookspec
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        """Called with each partial (unfinished) turn, best effort, for live views.

        Partials are never queued or persisted; an implementation must return quickly.
        """


class PluginHost:
    """Typed façade over a pluggy ``PluginManager``."""

    specs: ClassVar[type[_Specs]] = _Specs

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self._types: dict[str, SinkType] | None = None

    def sink_types(self) -> dict[str, SinkType]:
        """Return every known sink type by name; duplicate names are a configuration error."""
        if self._types is None:
            found: dict[str, SinkType] = {}
            for batch in self.manager.hook.transcribed_sink_types():
                for sink_type in batch:
                    if sink_type.name in found:
                        raise ConfigError(f"two plugins provide sink type {sink_type.name!r}")
                    found[sink_type.name] = sink_type
            self._types = found
        return self._types

    def session_started(self, session: SessionInfo) -> None:
        """Tell plugins a session began."""
        self.manager.hook.transcribed_session_started(session=session)

    def session_ended(self, summary: SessionSummary) -> None:
        """Tell plugins a session ended."""
        self.manager.hook.transcribed_session_ended(summary=summary)

    def turn_partial(self, partial: PartialTurn) -> None:
        """Hand a partial turn to live-view plugins."""
        self.manager.hook.transcribed_turn_partial(partial=partial)


def load_plugins(
    *,
    builtins: Iterable[str] = BUILTIN_PLUGINS,
    entry_points: bool = True,
    blocked: Iterable[str] = (),
    extra: Iterable[object] = (),
) -> PluginHost:
    """Build a fresh plugin host: built-ins, then entry points, then ``extra`` plugin objects."""
    import importlib

    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(_Specs)
    for name in blocked:
        manager.set_blocked(name)
    for module_name in builtins:
        manager.register(importlib.import_module(module_name), name=module_name)
    if entry_points:
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        manager.register(plugin)
    manager.check_pending()
    return PluginHost(manager)
