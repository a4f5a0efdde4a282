"""The systemd notification protocol (``sd_notify``), by hand: one datagram per message.

systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract namespace)
to ``Type=notify`` services; each message is ``KEY=VALUE`` lines in one ``AF_UNIX`` datagram.
``$WATCHDOG_USEC`` (and optionally ``$WATCHDOG_PID``) ask for ``WATCHDOG=1`` pings. Without
``$NOTIFY_SOCKET`` every call is a no-op, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Final

import structlog

log = structlog.get_logger("daemon.notify")

STATE_KEYS: Final = frozenset({"READY", "RELOADING", "STOPPING"})  # kept until sent
HELD_MAX: Final = 8  # state changes kept while the manager does not read (the newest)


def _address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` (abstract namespace)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or ``None`` if unasked.

    ``$WATCHDOG_PID``, when set, must name this process (the variable may be inherited).
    """
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET``; silent when there is none.

    Send failures are logged once (a service manager that went away must not break capture).
    A send never blocks: with the manager not reading (busy, hung, a container runtime's proxy
    that read only until ``READY=1``) its queue fills, and a blocking send froze the daemon.
    A message that changes the state (``READY``, ``RELOADING``, ``STOPPING``) is then kept and
    sent before the next one; pings and status lines are dropped (the next ones replace them).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("notify.bad_socket", notify_socket=raw)
        self.watchdog_s = watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._failed = False
        self._held: list[str] = []  # state changes the manager has not taken yet, oldest first
        self.sent: list[str] = []  # the last few messages, for the status line and debugging

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; returns whether it went out.

        Held state changes go first, in order; after one that still cannot go, the rest wait.
        """
        if self.address is None:
            return False
        message = "\n".join(lines)
        queue, self._held = [*self._held, message], []
        for index, item in enumerate(queue):
            if not self._send_one(self.address, item):
                self._held = [m for m in queue[index:] if _changes_state(m)][-HELD_MAX:]
                return False
        return True

    def _send_one(self, address: str, message: str) -> bool:
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto(message.encode("utf-8", "replace"), address)
        except OSError as exc:
            if not self._failed:
                log.warning("notify.send_failed", error=exc.strerror or str(exc))
                self._failed = True
            return False
        self._failed = False
        self.sent = [*self.sent[-15:], message]
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (start-up or a reload finished), optionally with a status line."""
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd ≥ 253 asks for."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=`` a one-line human summary."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: still starting, and making progress."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        """Close the socket."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


def last_status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """One ``STATUS=`` as the process ends, without logging (the logs may not be set up yet).

    systemd keeps a dead unit's last status line and ``systemctl status`` shows it: this says
    why the daemon stopped instead of what it was last doing. Returns whether it went out.
    """
    env = os.environ if env is None else env
    address = _address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            data = "\n".join(_status(text)).encode("utf-8", "replace")
            sock.sendto(data, socket.MSG_DONTWAIT, address)     # never hold up the exit
    except OSError:
        return False
    return True


def _changes_state(message: str) -> bool:
    return any(line.split("=", 1)[0] in STATE_KEYS for line in message.splitlines())


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else ("STATUS=" + " ".join(text.split()),)
