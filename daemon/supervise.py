"""Supervision of third-party sinks: a plugin's bug becomes a sink failure, never a crash.

Owns the wrappers ``PluginHost.sink_types`` puts around every sink factory (``guarded``): a
factory that raises builds a sink that fails to start (``Unbuilt``), and a third-party sink's
``BaseException``s become ``SinkError``s (``Supervised``). ``error_line`` renders a plugin's
exception as one bounded line that never raises.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

from daemon.errors import SinkError, one_line
from daemon.events import TurnRecord

if TYPE_CHECKING:
    from daemon.plugins import Sink, SinkContext, SinkFactory, SinkType

REASON_MAX: Final = 500  # a plugin's error message is cut to this many characters, on one line

_T = TypeVar("_T")


def guarded(sink_type: SinkType, *, supervised: bool = False) -> SinkFactory:
    """``sink_type.factory``, made safe: a factory that raises builds a sink that fails to start.

    Its worker is restarted with backoff like any sink that cannot start (each start calls the
    factory again), and ``test-sinks`` reports the error, instead of the daemon crashing.
    ``supervised`` (a third-party type): the sink is wrapped in ``Supervised`` too.
    """
    factory = sink_type.factory

    def build(name: str, config: Any, context: SinkContext) -> Sink:
        sink: Sink
        try:
            sink = factory(name, config, context)
        except Exception as exc:  # supervision boundary: a plugin's bug
            sink = Unbuilt(name, sink_type.name, lambda: factory(name, config, context), exc)
        return Supervised(sink, f"sink {name!r} (type {sink_type.name!r})") if supervised \
            else sink

    return build


class Supervised:
    """A third-party sink whose ``BaseException``s are made ordinary failures.

    A stray ``CancelledError`` out of a plugin's ``send`` (a library's inner task cancelled,
    not the worker) ended the sink's worker without a word: the sink never delivered again,
    and what its memory queue held was lost at exit. Any other ``BaseException`` that is not
    an ``Exception`` (a plugin's own subclass, ``SystemExit``, ``KeyboardInterrupt``) ended the
    whole daemon. Both are a ``SinkError`` now (retried, or a failed start), as is an
    exception whose ``str()`` raises; a cancellation of the worker itself still goes through.
    """

    def __init__(self, inner: Sink, what: str) -> None:
        self.inner = inner
        self._what = what

    async def __aenter__(self) -> Self:
        await self._contained(self.inner.__aenter__(), "__aenter__")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._contained(self.inner.__aexit__(exc_type, exc, tb), "__aexit__")

    def send(self, record: TurnRecord) -> Any:  # awaited, or refused if not an awaitable
        """The inner sink's ``send``, its ``BaseException``s contained."""
        pending = self.inner.send(record)
        if not inspect.isawaitable(pending):
            return pending          # a plain ``def send`` has run: the dispatcher says so
        return self._contained(pending, "send")

    async def _contained(self, pending: Awaitable[_T], method: str) -> _T:
        try:
            return await pending
        except (Exception, KeyboardInterrupt) as exc:
            if isinstance(exc, Exception) and not _showable(exc):   # else the dispatcher's
                raise SinkError(f"{self._what}: {method}() raised {error_line(exc)}") from None
            raise       # an error line for it raised; Ctrl-C where no loop handler takes it
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise                           # the worker is being cancelled: go
            raise SinkError(f"{self._what}: {method}() raised {error_line(exc)} though nothing "
                            "cancelled it (a bug in its plugin)") from None
        except BaseException as exc:  # supervision boundary: a plugin's bug
            raise SinkError(f"{self._what}: {method}() raised {error_line(exc)}, not an Exception "
                            "(a bug in its plugin)") from None


class Unbuilt:
    """A sink whose factory raised: each ``__aenter__`` tries to build it again."""

    def __init__(self, name: str, type_name: str, build: Callable[[], Sink],
                 error: Exception) -> None:
        self._what = f"sink {name!r} (type {type_name!r})"
        self._build = build
        self._error = error
        self._sink: Sink | None = None

    async def __aenter__(self) -> Self:
        if self._sink is None:
            try:
                self._sink = self._build()
            except Exception as exc:  # supervision boundary: reported as a failed start
                self._error = exc
                raise SinkError(f"{self._what} cannot be built: {error_line(exc)}") from None
        await self._sink.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sink is not None:
            await self._sink.__aexit__(exc_type, exc, tb)

    def send(self, record: TurnRecord) -> Any:  # as ``Supervised.send``
        """Deliver through the built sink (its result as is: a plain ``def send``'s too)."""
        if self._sink is None:
            return self._unbuilt()
        return self._sink.send(record)

    async def _unbuilt(self) -> None:
        raise SinkError(f"{self._what} cannot be built: {error_line(self._error)}")


def _showable(exc: BaseException) -> bool:
    """``str(exc)`` works (a plugin's ``__str__`` may raise)."""
    try:
        str(exc)
    except Exception:  # a plugin's broken __str__
        return False
    return True


def error_line(exc: BaseException) -> str:
    """An exception as one bounded, printable line; never raises (a plugin's ``__str__`` may)."""
    try:
        text = str(exc)
    except Exception as failure:  # a plugin's broken __str__
        text = f"<str() failed: {type(failure).__name__}>"
    text = one_line(text, REASON_MAX)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
