"""Plugin contracts: hook specifications, the ``Sink`` protocol and the typed plugin host.

pluggy is synchronous and used for discovery and rare lifecycle events only. Sinks are async
objects that the dispatcher drives directly, each with its own queue and worker.

Built-in sink modules are registered explicitly (``BUILTIN_PLUGINS``), so they work from a source
checkout; third-party sinks are found through the ``transcribed.sinks`` entry-point group.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Protocol, Self, cast

import pluggy
import structlog
from pydantic import BaseModel, ConfigDict

from daemon.errors import ConfigError
from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.supervise import error_line, guarded

PROJECT: Final = "transcribed"
ENTRY_POINT_GROUP: Final = f"{PROJECT}.sinks"
BUILTIN_PLUGINS: Final = ("plugins.file", "plugins.console", "plugins.webhook", "plugins.mqtt")

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
HOOK_FAILURE_LOG_S: Final = 60.0  # a hook that keeps failing is logged again at most this often

log = structlog.get_logger("daemon.plugins")


class SinkConfig(BaseModel):
    """Base of every sink's config table; subclasses add their own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: str
    enabled: bool = True


@dataclass(frozen=True)
class SinkContext:
    """What a sink factory may need from the daemon besides its own config.

    ``test``: the sink is built by ``test-sinks``, beside a daemon that may be running with
    the same config: leave out lasting side effects (a retained message, a status topic) and
    take no identity the daemon holds (a broker disconnects a client whose id comes again).
    """

    host: str
    state_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    test: bool = False


class Sink(Protocol):
    """An async destination for turn records.

    ``__aenter__`` opens connections, ``send`` delivers one record (raising ``SinkError`` or
    ``PermanentSinkError`` on failure; the dispatcher decides about retrying), ``__aexit__``
    flushes and closes. Optional, not part of the protocol: ``async def ready(self) -> None``,
    returning when a retry is worth making before its backoff ends (a connection made again);
    the dispatcher awaits it beside a retry backoff and cancels it when the backoff ends, and
    retries no sooner than 1 s after the failure whenever it returns.
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

    def __init__(self, manager: pluggy.PluginManager, failed: dict[str, str] | None = None
                 ) -> None:
        self.manager = manager
        self.failed: dict[str, str] = dict(failed or {})   # plugin -> why it provides nothing
        self._types: dict[str, SinkType] | None = None
        self._hook_failures: dict[tuple[str, str], _Failures] = {}

    def sink_types(self) -> dict[str, SinkType]:
        """Return every known sink type by name; duplicate names are a configuration error.

        A plugin whose hook raises or returns something else than ``SinkType``s provides no
        type (``failed`` says why); every factory is guarded (``daemon.supervise.guarded``).
        """
        if self._types is None:
            found: dict[str, SinkType] = {}
            owner: dict[str, str] = {}
            for impl in self.manager.hook.transcribed_sink_types.get_hookimpls():
                for sink_type in self._provided(impl.plugin_name, impl.function):
                    if sink_type.name in found:
                        raise ConfigError(
                            f"sink type {sink_type.name!r} is provided by two plugins, "
                            f"{owner[sink_type.name]} and {impl.plugin_name}: uninstall one")
                    supervised = impl.plugin_name not in BUILTIN_PLUGINS
                    found[sink_type.name] = replace(
                        sink_type, factory=guarded(sink_type, supervised=supervised))
                    owner[sink_type.name] = impl.plugin_name
            self._types = found
        return self._types

    def _provided(self, plugin: str, hook: Callable[[], object]) -> list[SinkType]:
        """What one plugin's ``transcribed_sink_types`` returns; a failure goes to ``failed``."""
        try:
            batch = list(cast(Iterable[object], hook()))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # supervision boundary: one plugin must not stop the daemon
            self.failed[plugin] = f"failed: transcribed_sink_types raised {error_line(exc)}"
            return []
        if not all(isinstance(item, SinkType) for item in batch):
            self.failed[plugin] = "failed: transcribed_sink_types must return SinkType objects"
            return []
        for item in cast(list[SinkType], batch):
            if problem := _type_problem(item):
                self.failed[plugin] = f"failed: sink type {item.name!r}: {problem}"
                return []
        return cast(list[SinkType], batch)

    def session_started(self, session: SessionInfo) -> None:
        """Tell plugins a session began."""
        self._notify("transcribed_session_started", session=session)

    def session_ended(self, summary: SessionSummary) -> None:
        """Tell plugins a session ended."""
        self._notify("transcribed_session_ended", summary=summary)

    def turn_partial(self, partial: PartialTurn) -> None:
        """Hand a partial turn to live-view plugins."""
        self._notify("transcribed_turn_partial", partial=partial)

    def _notify(self, hook: str, **kwargs: object) -> None:
        """Call every plugin's implementation of a notification hook, each on its own.

        pluggy ends a hook call at the first implementation that raises, so one broken plugin
        would silence every plugin after it; here a failure is logged (``plugin.hook_failed``,
        then at most every ``HOOK_FAILURE_LOG_S`` with a count) and the others are still called,
        in pluggy's order. Never raises: notifications run on the engine's path.
        """
        for impl in reversed(getattr(self.manager.hook, hook).get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                self._hook_failed(impl.plugin_name, hook, "a wrapper cannot implement a "
                                  "notification hook (nothing to wrap); it is not called")
                continue
            try:
                result = impl.function(*(kwargs[name] for name in impl.argnames))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # supervision boundary: a plugin must not break the
                self._hook_failed(impl.plugin_name, hook, error_line(exc), exc)    # stream
                continue
            if inspect.iscoroutine(result):     # ``async def``: it would never run, unsaid
                result.close()
                self._hook_failed(impl.plugin_name, hook, "it is 'async def': a notification "
                                  "hook must be a plain function (start a task for async work)")

    def _hook_failed(self, plugin: str, hook: str, error: str,
                     exc: BaseException | None = None) -> None:
        """Log a failing hook: first with its traceback (the plugin's bug), then once a minute."""
        now = time.monotonic()
        failures = self._hook_failures.setdefault((plugin, hook), _Failures(now))
        failures.count += 1
        if failures.count == 1 or now - failures.logged_at >= HOOK_FAILURE_LOG_S:
            log.error("plugin.hook_failed", plugin=plugin, hook=hook, error=error,
                      failures=failures.count, exc_info=exc if failures.count == 1 else None)
            failures.logged_at = now


@dataclass
class _Failures:
    """How often one plugin's hook has failed, and when that was last logged."""

    logged_at: float
    count: int = 0


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
    manager.check_pending()
    failed = _load_entry_points(manager) if entry_points else {}
    for plugin in extra:
        manager.register(plugin)
    manager.check_pending()
    return PluginHost(manager, failed)


def _load_entry_points(manager: pluggy.PluginManager) -> dict[str, str]:
    """Register the ``transcribed.sinks`` entry points, each on its own.

    One that cannot be imported (its import raised, or called ``sys.exit()``) or registered,
    that implements an unknown hook or none at all, is left out and named with the reason,
    instead of stopping every command with a traceback (or silently providing nothing).
    """
    from importlib.metadata import entry_points

    failed: dict[str, str] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if manager.get_plugin(point.name) is not None or manager.is_blocked(point.name):
            continue
        where = f"{point.name} (entry point {point.value})"
        try:
            plugin = point.load()
            manager.register(plugin, name=point.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # supervision boundary: a broken package (one calling
            # sys.exit() at import when a dependency is missing) must not stop us
            failed[where] = f"cannot be loaded: {error_line(exc)}"
            continue
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            manager.unregister(name=point.name)
            failed[where] = f"cannot be loaded: {error_line(exc)}"
            continue
        if not manager.get_hookcallers(plugin):     # another marker (a typo'd project name)
            manager.unregister(name=point.name)
            failed[where] = ("provides nothing: it implements no transcribed hook (mark its "
                             "functions with daemon.plugins.hookimpl)")
    return failed


def _type_problem(sink_type: SinkType) -> str | None:
    """What makes a plugin's ``SinkType`` unusable (it crashed validation later), or None.

    A ``config_model`` that is a plain pydantic model has no ``enabled`` key, nor ``type``.
    """
    model = sink_type.config_model
    if not isinstance(sink_type.name, str) or not sink_type.name:
        return "its name must be a non-empty string"
    if not isinstance(model, type) or not issubclass(model, SinkConfig):
        return (f"its config_model ({getattr(model, '__name__', type(model).__name__)}) must "
                "be a subclass of daemon.plugins.SinkConfig")
    if not callable(sink_type.factory):
        return "its factory must be callable: (name, config, context) -> sink"
    return None
