"""SIGHUP while the daemon runs: one config reload at a time, each announced to systemd.

Owns ``Hangup``, the SIGHUP handler ``daemon.app`` installs; the reload itself is
``daemon.reload.Reloader``'s, the notifications ``daemon.health.Reporter``'s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from daemon.health import Reporter
    from daemon.reload import Reloader

log = structlog.get_logger("daemon.hangup")


@dataclass
class Hangup:
    """SIGHUP: run one reload at a time as a task, bracketed by RELOADING=1 / READY=1.

    SIGHUPs while a reload runs are folded into one more after it (the file may have changed
    after the running one read it): a burst makes two reloads, not one each.
    """

    group: asyncio.TaskGroup
    reloader: Reloader | None
    reporter: Reporter
    _task: asyncio.Task[None] | None = None
    _again: bool = False

    def __call__(self) -> None:
        """Handle one SIGHUP: start a reload, or fold it into the one under way."""
        if self.reloader is None:
            log.warning("reload.unavailable", reason="no config loader")
            return
        if self.reporter.stopping:
            log.info("reload.ignored", reason="stopping")
            return
        if self._task is not None and not self._task.done():
            self._again = True
            log.info("reload.queued", reason="a reload is under way: one more follows it")
            return
        self._task = self.group.create_task(self._reload(self.reloader), name="reload")

    async def _reload(self, reloader: Reloader) -> None:
        while True:
            self._again = False
            self.reporter.reloading()
            outcome = await reloader.reload()
            self.reporter.reloaded(outcome)
            if not self._again or self.reporter.stopping:
                return
