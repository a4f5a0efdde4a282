"""SIGHUP: re-read the config and apply sink changes without dropping a queued turn.

The file is loaded and validated exactly as ``check-config`` does. An invalid file is rejected
with one log line and the running config stays. Otherwise sinks are diffed by name: new ones
start, removed ones drain their queue and stop, changed ones (type or any key) are rebuilt and
inherit what the old one held (durable sinks keep their on-disk outbox; a type changed between a
local and a network sink moves the records between memory and the outbox). Other sections (audio,
engine, reconnect, log, http, state) need a restart: the reload says so in the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import Settings
from daemon.dispatch import Dispatcher
from daemon.errors import ConfigError, DaemonError
from daemon.logs import SecretMasker
from daemon.masking import secret_values
from daemon.plugins import SinkConfig, SinkContext, SinkType
from daemon.queues import OUTBOX_FILE, MemoryQueue, SinkQueue
from daemon.runner import SinkRunner
from daemon.sinktables import ValidatedSinks, enabled_sinks, none_enabled

if TYPE_CHECKING:  # sqlite3 loads only when a network sink is built
    from daemon.outbox import Outbox

log = structlog.get_logger("daemon.reload")

Loader = Callable[[], tuple[Settings, Path | None, ValidatedSinks]]
"""Finds, loads and checks the config (``ConfigError`` when invalid), as ``check-config`` does;
returns the settings, the file they came from (``None``: built-in defaults) and the sink tables
validated against the running plugin host (disabled ones included)."""


@dataclass
class SinkBuilder:
    """Builds sink runners with their queues; owns the outbox durable sinks share."""

    host: str
    state_dir: Path
    closers: list[Any] = field(default_factory=list)
    _outbox: Outbox | None = None

    def build(self, name: str, sink_type: SinkType, config: SinkConfig, *, fresh: bool = False
              ) -> SinkRunner:
        """A runner for one sink. ``fresh``: a new queue object even for a durable sink."""
        context = SinkContext(host=self.host, state_dir=self.state_dir)
        queue = self._durable_queue(name, fresh) if sink_type.durable else MemoryQueue()
        return SinkRunner(name, sink_type, config, sink_type.factory(name, config, context), queue)

    def warn_orphans(self, configured: Iterable[str]) -> None:
        """At start: name the outbox's queued records that no configured sink will deliver.

        A durable sink renamed or removed leaves its undelivered turns in the outbox, waiting
        for a sink of that name; said once at start, also when no durable sink is left (the
        outbox is then opened for this look only).
        """
        wanted = set(configured)
        path = self.state_dir / OUTBOX_FILE
        if self._outbox is None and not path.exists():
            return                  # nothing to look at: SQLite is not even loaded
        from daemon.outbox import Outbox, OutboxError

        try:
            if self._outbox is not None:
                queued = self._outbox.sinks()
            else:
                looked = Outbox(path)
                queued = looked.sinks()
                looked.close()
        except OutboxError as exc:
            log.warning("outbox.unchecked", error=str(exc))
            return
        for sink, count in sorted(queued.items()):
            if sink not in wanted:
                log.warning("outbox.orphaned", sink=sink, queued=count, path=str(path),
                            hint="configure a network sink of this name (e.g. rename yours "
                            "back) to deliver them")

    def _open_outbox(self) -> Outbox:
        from daemon.outbox import Outbox

        if self._outbox is None:
            self._outbox = Outbox(self.state_dir / OUTBOX_FILE)
            self.closers.append(self._outbox)
        return self._outbox

    def _durable_queue(self, name: str, fresh: bool) -> SinkQueue:
        queue: SinkQueue = self._open_outbox().queue(name, fresh=fresh)
        return queue


@dataclass(frozen=True)
class SinkPlan:
    """What a reload changes, by sink name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    kept: tuple[str, ...]


def plan_sinks(running: dict[str, SinkRunner], wanted: ValidatedSinks) -> SinkPlan:
    """Diff running sinks against the wanted ones (equal type and config = kept)."""
    changed = tuple(
        n for n in running if n in wanted
        and (running[n].sink_type.name, running[n].config) != (wanted[n][0].name, wanted[n][1])
    )
    return SinkPlan(
        added=tuple(n for n in wanted if n not in running),
        removed=tuple(n for n in running if n not in wanted),
        changed=changed,
        kept=tuple(n for n in running if n in wanted and n not in changed),
    )


def _refuse_a_vanished_config(old: Settings, new: Settings, path: Path | None) -> None:
    """A reload that would swap configured sinks for the built-in console sink is refused.

    What it finds then is a config moved away, emptied or cut short by an editor mid-write
    (the lookup falls back to built-in defaults); applying it sent every turn to stdout only.
    To run without sinks, restart.

    Raises:
        ConfigError: the new config configures no sink while the running one did.
    """
    if old.sinks and not new.sinks:
        where = f"{path} configures" if path else "no config file found: the defaults configure"
        raise ConfigError(f"{where} no [sinks] (the running config has "
                          f"{', '.join(sorted(old.sinks))}); restart to run without them")


def warn_none_enabled(sinks: ValidatedSinks) -> None:
    """At start and after a reload: sinks configured, none enabled, means turns go nowhere."""
    if disabled := none_enabled(sinks):
        log.warning("sinks.none_enabled", disabled=disabled,
                    hint="turns are delivered to no sink: set enabled = true on one")


def restart_sections(old: Settings, new: Settings) -> list[str]:
    """The non-sink sections whose values differ (they only take effect after a restart)."""
    return [
        name for name in type(old).model_fields
        if name != "sinks" and getattr(old, name) != getattr(new, name)
    ]


class Reloader:
    """Applies a reloaded config to the running daemon; one reload at a time."""

    def __init__(
        self,
        loader: Loader,
        settings: Settings,
        *,
        dispatcher: Dispatcher,
        sinks: SinkBuilder,
        masker: SecretMasker,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.loader = loader
        self.settings = settings
        self.dispatcher = dispatcher
        self.sinks = sinks
        self.masker = masker
        self._stopping = stopping or (lambda: dispatcher.closing)
        self._lock = asyncio.Lock()
        self.reloads = 0

    async def reload(self) -> str:
        """Reload once: ``"applied"``, ``"rejected"``, ``"failed"`` or ``"ignored"``; never raises.

        ``"ignored"``: the daemon is stopping, and nothing more is started.

        A reload waiting for another (a burst of SIGHUPs) or for a rebuilt sink's last send
        may find the daemon stopping: a sink it started then would keep the process from
        exiting (its worker waits for records that never come).
        """
        async with self._lock:
            if self._stopping():
                return _ignored()
            try:
                return await self._reload()
            except DaemonError as exc:   # e.g. the outbox a new network sink needs cannot open
                log.error("reload.failed", error=str(exc), kept="running config")
                return "failed"
            except Exception:  # supervision boundary: a reload must never stop the daemon
                log.exception("reload.failed")
                return "failed"

    async def _reload(self) -> str:
        log.info("reload.started")
        path: Path | None = None
        try:
            settings, path, configured = await asyncio.to_thread(self.loader)
            _refuse_a_vanished_config(self.settings, settings, path)
            wanted = enabled_sinks(configured)
            plan = plan_sinks(self.dispatcher.runners, wanted)
            built = {
                name: self.sinks.build(name, *wanted[name], fresh=name in plan.changed)
                for name in (*plan.added, *plan.changed)
            }
        except ConfigError as exc:
            where: dict[str, str] = {"path": str(path)} if path else {}  # else the problems do
            if any(".type: unknown type " in problem for problem in exc.problems):
                where["hint"] = ("sink types come from the plugins loaded at start: restart the "
                                 "daemon after installing one")
            log.error("reload.rejected", problems=exc.problems, kept="running config", **where)
            return "rejected"
        self.masker.add(*secret_values(settings, {n: c for n, (_t, c) in wanted.items()}))
        if not await self._apply(plan, built):
            return _ignored()
        sections = restart_sections(self.settings, settings)
        self.settings = settings.model_copy(update={
            name: getattr(self.settings, name) for name in sections
        })
        self.reloads += 1
        log.info("reload.applied", path=str(path or "built-in defaults"),
                 added=list(plan.added), removed=list(plan.removed),
                 changed=list(plan.changed), kept=list(plan.kept))
        if sections:
            log.warning("reload.restart_required", sections=sections,
                        hint="these settings take effect after a restart")
        warn_none_enabled(configured)
        return "applied"

    async def _apply(self, plan: SinkPlan, built: dict[str, SinkRunner]) -> bool:
        """Apply ``plan``; False when the daemon began stopping first (the rest is left out)."""
        if self._stopping():
            return False
        for name in plan.removed:
            self.dispatcher.remove(name)
        steps = [(self.dispatcher.add, name) for name in plan.added]
        steps += [(self.dispatcher.replace, name) for name in plan.changed]
        for start, name in steps:   # each may wait for a leaving worker of that name
            if self._stopping():
                return False
            try:
                await start(built[name])
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                return False    # the old worker, mid-send, was cut off by the final flush
        return True


def _ignored() -> str:
    log.info("reload.ignored", reason="stopping")
    return "ignored"
