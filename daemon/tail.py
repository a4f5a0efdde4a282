r"""``transcribed tail``: the live view in a terminal, or the raw event feed as JSON lines.

On a terminal the partial turn is one line rewritten in place (``\r`` + clear line) and each
finished turn is committed as a line with its start time; state changes get a dim line of their
own. Off a terminal, finished turns go to stdout and state lines to stderr. ``--json`` prints
every feed event as one JSON line.

``--retry`` keeps following when the daemon stops or cannot be reached: it waits for it and
reconnects (a refused token, or something that is not the daemon, still ends it). The feed
replays its last finished turns to every new connection; turns already shown are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import (
    ConnectionClosedError,
    InvalidMessage,
    InvalidStatus,
    WebSocketException,
)

from daemon.backoff import backoff
from daemon.errors import EX_FAILURE, EX_OK
from daemon.events import parse_iso_utc
from daemon.masking import MASK

CLEAR: Final = "\r\x1b[2K"
DIM: Final = "\x1b[2m"
RESET: Final = "\x1b[0m"
OPEN_TIMEOUT_S: Final = 5.0
RETRY_MAX_S: Final = 5.0            # --retry: the longest wait between two attempts
STAYED_UP_S: Final = 5.0            # --retry: a feed up this long ends an outage
SEEN_TURNS: Final = 1000            # turn ids remembered, so a replayed turn is not shown twice


class TailError(Exception):
    """A one-line reason the feed could not be followed."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting              # retrying would not help (token, not the daemon)


def tail_main(url: str, token: str, json_lines: bool, retry: bool = False) -> int:
    """Follow the daemon's feed at ``url`` until Ctrl-C (0) or a failure (1, one line)."""
    if sys.stdout is None or sys.stderr is None:    # started with ``>&-``: nowhere to write
        if sys.stderr is not None:
            print("transcribed tail: standard output is closed: nothing to show the feed on",
                  file=sys.stderr)
        return EX_FAILURE
    screen = Screen(sys.stdout, sys.stderr, json_lines=json_lines)
    try:
        asyncio.run(_until_interrupted(follow(url, token, screen, retry=retry)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        screen.finish()
        return EX_OK
    except TailError as exc:
        screen.finish()
        print(f"transcribed tail: {_printable(str(exc))}", file=sys.stderr)  # a peer's words
        return EX_FAILURE
    except BrokenPipeError:
        return EX_OK
    screen.finish()
    return EX_OK


async def _until_interrupted(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``; Ctrl-C (SIGINT) cancels it, whichever thread the kernel hands it to.

    ``asyncio.run``'s own SIGINT handler only runs once the main thread executes Python again:
    a signal delivered to another thread (the resolver's executor thread, say) left the loop
    asleep until the feed's next keepalive. The loop's handler wakes it through its self-pipe.
    """
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, task.cancel)
    await task


def feed_of(url: str) -> str:
    """``http://host:port`` (or a ``ws://…/events`` URL) → the feed's ``ws://`` URL."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise TailError(f"not a daemon URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/events"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


async def follow(url: str, token: str, screen: Screen, *, retry: bool = False) -> None:
    """Connect and render events until the daemon goes away (with ``retry``: until Ctrl-C)."""
    feed = feed_of(url)
    if not retry:
        await _follow_once(feed, token, screen)
        screen.note("the daemon stopped")
        return
    loop = asyncio.get_running_loop()
    delays, waiting = _retry_delays(), False
    while True:
        heard, news = asyncio.Event(), asyncio.Event()
        began = loop.time()
        try:
            await _follow_once(feed, token, screen, heard.set, news.set)
            why = "the daemon stopped"
        except TailError as exc:
            if exc.lasting:
                raise
            why = str(exc)
        # it was up (a new turn, or events for a while): the next outage is a new one
        if news.is_set() or (heard.is_set() and loop.time() - began >= STAYED_UP_S):
            delays, waiting = _retry_delays(), False
        if not waiting:                     # one line per outage, not one per attempt
            screen.note(f"{why}; waiting for it (--retry)")
            waiting = True
        await asyncio.sleep(next(delays))


def _retry_delays() -> Iterator[float]:
    """Waits between attempts: never none (a feed that closes at once is no tight loop)."""
    delays = backoff(0.5, RETRY_MAX_S)
    next(delays)                            # the backoff's immediate first retry
    return delays


async def _follow_once(feed: str, token: str, screen: Screen,
                       heard: Callable[[], None] | None = None,
                       news: Callable[[], None] | None = None) -> None:
    """Connect once and render events until the feed ends.

    ``heard``: called after each event; ``news``: after each turn not shown before.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with connect(feed, additional_headers=headers, open_timeout=OPEN_TIMEOUT_S,
                           close_timeout=1.0,       # Ctrl-C never waits long on a stuck daemon
                           compression=None, max_size=2**22) as ws:
            async for message in ws:
                new_turn = screen.event(_event(message, feed))
                if heard is not None:
                    heard()
                if new_turn and news is not None:
                    news()
    except InvalidStatus as exc:
        code = exc.response.status_code
        if code == 401:
            raise TailError(f"the daemon at {feed} refused the token (check http.token)",
                            lasting=True) from None
        raise TailError(f"the daemon at {feed} answered HTTP {code}",
                        lasting=400 <= code < 500 and code != 429) from None
    except ConnectionClosedError as exc:
        raise TailError(f"the feed at {feed} closed: {exc}") from None
    except BrokenPipeError:
        raise                               # our reader went away (| head): not the daemon
    except (OSError, TimeoutError, WebSocketException) as exc:
        reason = _reason(exc, feed)
        if token:
            reason = reason.replace(token, MASK)    # a library error may quote our header
        raise TailError(f"cannot reach the daemon at {feed}: {reason} ({_hint(exc)})") from None


def _reason(exc: BaseException, feed: str) -> str:
    """Why connecting to ``feed`` failed, in plain words.

    asyncio words a refused connection ``Connect call failed ('127.0.0.1', 8765)``, and a host
    name with two addresses (``localhost``: ``::1`` and ``127.0.0.1``) ``Multiple exceptions:
    [Errno 111] …``: both only say that nothing listens there.
    """
    parts = urlsplit(feed)
    where = parts.netloc.rpartition("@")[2]
    if parts.port is None:                  # websockets' default, as it connected
        where = f"{where}:{443 if parts.scheme == 'wss' else 80}"
    code = _errno(exc)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {parts.hostname}: {exc.strerror}"
    if code == errno.ECONNREFUSED:
        return f"connection refused: nothing listens on {where}"
    if isinstance(exc, TimeoutError) or code == errno.ETIMEDOUT:
        return f"no answer from {where} within {OPEN_TIMEOUT_S:g} s"
    if code:
        return os.strerror(code)
    return str(exc) or type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    """The error number of a failed connection: its own, or the one all its addresses gave."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno is not None:
        return exc.errno
    codes = set(re.findall(r"\[Errno (\d+)\]", str(exc)))   # "Multiple exceptions: …"
    return int(codes.pop()) if len(codes) == 1 else None


def _hint(exc: BaseException) -> str:
    """What a failed connection suggests: nobody listening, or a daemon that cut it unanswered."""
    if isinstance(exc, ConnectionResetError) or (
            isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, EOFError)):
        return "the daemon cut the connection unanswered, as it does beyond 256 open at once"
    return "is `transcribed run` running with http.enabled?"


def _event(message: str | bytes, feed: str) -> dict[str, Any]:
    """A feed message as an event; anything else ends ``tail`` with one line."""
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        event = None
    if not isinstance(event, dict):
        raise TailError(f"the feed at {feed} sent something that is not an event: "
                        f"{str(message)[:60]!r}", lasting=True)
    return event


def _printable(text: str) -> str:
    """Text for a terminal, control characters dropped, a lone surrogate shown as U+FFFD.

    An escape sequence in a transcript could retitle, clear or reprogram the terminal; a lone
    surrogate (half an emoji from the service) cannot be written at all.
    """
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text))


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class Screen:
    """Renders feed events on a terminal, as plain lines, or as JSON lines."""

    def __init__(self, out: TextIO, err: TextIO, *, json_lines: bool) -> None:
        self._out = out
        self._err = err
        self._json = json_lines
        self._tty = out.isatty() and not json_lines
        self._color = self._tty and "NO_COLOR" not in os.environ
        self._partial = ""
        self._partial_session: Any = None
        self._connection: str | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()   # ids of the last turns shown
        self._encoding = out.encoding or "utf-8"

    def event(self, event: dict[str, Any]) -> bool:
        """Render one feed event; True for a turn not shown before.

        A turn already shown (the feed replays its last ones to a new connection) is skipped.
        """
        kind = event.get("type")
        if kind == "turn" and self._shown(str(event.get("id"))):
            return False
        if self._json:
            line = json.dumps(event, ensure_ascii=False)
            if not _encodes(line, self._encoding):   # a lone surrogate, or a narrow locale
                line = json.dumps(event)            # escaped: still the same JSON
            self._write(line + "\n")
            return kind == "turn"
        if kind == "partial":
            self._partial_session = event.get("session_id")
            self._show_partial(_printable(str(event.get("transcript", ""))))
        elif kind == "turn":
            self._commit(event)
        elif kind == "state":
            self._state(event)
        elif kind == "session" and event.get("event") == "ended":
            if self._partial_session == event.get("session_id"):
                self._show_partial("")
        return kind == "turn"

    def _shown(self, turn_id: str) -> bool:
        if turn_id in self._seen:
            return True
        self._seen[turn_id] = None
        if len(self._seen) > SEEN_TURNS:
            self._seen.popitem(last=False)
        return False

    def note(self, text: str) -> None:
        """A status line (dim on a terminal, stderr otherwise: stdout stays events only)."""
        text = _printable(text)             # it may quote what the feed's peer said
        if not self._tty:
            print(f"transcribed tail: {text}", file=self._err, flush=True)
            return
        line = f"{DIM}· {text}{RESET}" if self._color else f"· {text}"
        self._write(CLEAR + line + "\n" + self._partial_line())

    def finish(self) -> None:
        """Leave the terminal on a fresh line."""
        if self._tty and self._partial:
            self._partial = ""
            self._write("\n")

    def _state(self, event: dict[str, Any]) -> None:
        connection = str(event.get("connection"))
        if connection == self._connection:
            return
        self._connection = connection
        details = [str(event.get("engine") or "")]
        if event.get("session_id"):
            details.append(f"session {str(event['session_id'])[:12]}")
        if connection != "live" and event.get("backlog_s"):
            details.append(f"backlog {event['backlog_s']} s")
        self.note(" ".join([connection, "—", ", ".join(d for d in details if d)]))

    def _show_partial(self, text: str) -> None:
        self._partial = text
        if self._tty:
            self._write(CLEAR + self._partial_line())

    def _commit(self, turn: dict[str, Any]) -> None:
        self._partial = ""
        when = _clock(str(turn.get("started_at", "")))
        stamp = f"{DIM}{when}{RESET}" if self._color else when
        line = f"{stamp} {_printable(str(turn.get('transcript', '')))}\n"
        self._write(CLEAR + line if self._tty else line)

    def _partial_line(self) -> str:
        if not self._partial:
            return ""
        width = max(20, shutil.get_terminal_size().columns - 1)
        line = f"{'':8} {_newest(self._partial, width - 9)}"  # the line must never wrap
        return f"{DIM}{line}{RESET}" if self._color else line

    def _write(self, text: str) -> None:
        if not _encodes(text, self._encoding):       # "?" for what the locale cannot show
            text = text.encode(self._encoding, "replace").decode(self._encoding)
        self._out.write(text)
        self._out.flush()


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _newest(text: str, columns: int) -> str:
    """The end of ``text`` that fits in ``columns`` terminal cells, after a ``…`` if cut.

    Cells, not characters: CJK and other wide characters take two, combining marks none.
    """
    if sum(map(_cells, text)) <= columns:
        return text
    used, start = 1, len(text)                  # 1: the "…"
    while start > 0 and used + _cells(text[start - 1]) <= columns:
        start -= 1
        used += _cells(text[start])
    return "…" + text[start:]


def _cells(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _clock(iso: str) -> str:
    try:
        return parse_iso_utc(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return "--:--:--"
