"""A real ``NOTIFY_SOCKET`` for tests: an AF_UNIX datagram socket that records what arrives."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self


@dataclass(frozen=True)
class Message:
    """One datagram: its arrival time (monotonic) and its ``KEY=VALUE`` fields."""

    at: float
    fields: dict[str, str]
    raw: str

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """Binds ``address`` (a path, or ``@name`` for the abstract namespace) and records messages.

    ``on_message`` (optional) runs as each message arrives, e.g. to snapshot other state.
    """

    def __init__(self, address: str | Path,
                 on_message: Callable[[Message], None] | None = None) -> None:
        self.address = str(address)
        self.messages: list[Message] = []
        self._on_message = on_message
        self._changed = asyncio.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        self._sock.bind(bind_to)
        self._sock.setblocking(False)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def listening(cls, address: str | Path,
                        on_message: Callable[[Message], None] | None = None
                        ) -> AsyncIterator[Self]:
        """Listen on ``address`` for the duration of the block."""
        listener = cls(address, on_message)
        listener._task = asyncio.create_task(listener._read())
        try:
            yield listener
        finally:
            listener._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener._task
            listener._sock.close()

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """Environment for the child: ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``)."""
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 4096)
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            message = Message(time.monotonic(), fields, text)
            self.messages.append(message)
            if self._on_message is not None:
                self._on_message(message)
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Message], bool], *, after: int = 0) -> int:
        """Wait for a message (index ≥ ``after``) matching ``predicate``; returns its index."""
        async with self._changed:
            while True:
                for index in range(after, len(self.messages)):
                    if predicate(self.messages[index]):
                        return index
                await self._changed.wait()

    def with_key(self, key: str) -> list[Message]:
        """Messages carrying ``key``."""
        return [m for m in self.messages if key in m]
