"""structlog setup: JSON lines off a TTY, readable console lines on one, secrets always masked.

Logs go to stderr (journald stores them under systemd); stdout is left to the console sink, so
``transcribed run | jq`` sees turns only. A JSON line starts with its ``event`` and ``level``;
when stderr is the journal (``$JOURNAL_STREAM`` names it) each line carries its syslog priority
(``<3>`` for an error, as sd-daemon(3) prefixes), which journald takes off and stores, so
``journalctl -p warning`` finds warnings and errors and shows them highlighted.
Standard-library loggers (websockets, httpx, aiomqtt) are routed through the same processors.
Both write through one :class:`LogOutput`: a line stderr refuses is counted, never raised, and
``run`` writes from a thread of its own.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any, Final, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from daemon.logoutput import LogOutput
from daemon.masking import MASK

_TOKEN_IN_URL: Final = re.compile(r"(?i)([?&](?:token|api_key|key)=)[^&\s\"']+")
# ``scheme://user:password@``: a URL's user info, wherever a URL is written (an error message,
# httpx's request line); and an ``Authorization`` header's credentials (websockets logs the
# handshake's headers at debug: a URL's user info is sent as ``Basic <base64>``).
_URL_USER_INFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@\"'<>\\]+@")
_AUTH_HEADER: Final = re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
                                 r"(?:(?:basic|bearer|digest|token)\s+)?)[^\s\"',;}\\]+")
_TRANSCRIPT_KEYS: Final = frozenset({"transcript", "text", "words", "partial", "frame"})
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_PRIORITIES: Final = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2,
                      "exception": 3}
_output: list[LogOutput] = []   # the one configure() made (a list: no `global`)
_stuck: list[bool] = []         # say() found stderr not taking a line: it tries no more


class SecretMasker:
    """A processor that replaces every known secret (and URL tokens) in an event with ``MASK``."""

    def __init__(self, secrets: Iterable[str] = (), *, recent_tokens: int = 16) -> None:
        self._secrets: set[str] = set()
        self._tokens: deque[str] = deque(maxlen=recent_tokens)
        self._ordered: tuple[str, ...] = ()
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Start masking these values too (the config's secrets, also those a reload brings)."""
        fresh = {s for s in secrets if s and len(s) >= 4}
        if fresh - self._secrets:
            self._secrets |= fresh
            self._order()

    def add_token(self, token: str) -> None:
        """Mask a freshly minted temporary token; only the most recent ones are kept.

        A daemon that runs for weeks mints thousands; older ones have long expired, and
        keeping them all would grow memory and the cost of every log line without bound.
        """
        if token and len(token) >= 4 and token not in self._tokens:
            self._tokens.append(token)
            self._order()

    def __len__(self) -> int:
        """How many values are masked (URL token parameters aside)."""
        return len(self._ordered)

    def _order(self) -> None:
        self._ordered = tuple(sorted({*self._secrets, *self._tokens}, key=len, reverse=True))

    def mask(self, text: str) -> str:
        """Return ``text`` with secrets and URL token parameters masked."""
        for secret in self._ordered:          # longest first: a secret inside another one
            if secret in text:
                text = text.replace(secret, MASK)
        if "@" in text:
            text = _URL_USER_INFO.sub(rf"\g<1>{MASK}@", text)
        if "uthorization" in text or "UTHORIZATION" in text:
            text = _AUTH_HEADER.sub(rf"\g<1>{MASK}", text)
        return _TOKEN_IN_URL.sub(rf"\g<1>{MASK}", text)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {k: self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v) for v in value]
        if isinstance(value, BaseException):
            return self.mask(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        """Structlog processor entry point."""
        for key, value in event_dict.items():
            if key == "exc_info":
                continue
            event_dict[key] = self._walk(value)
        return event_dict


def _event_first(renderer: Processor) -> Processor:
    """A JSON line reads ``{"event": …, "level": …, <fields>, "timestamp": …}``.

    What happened first: where a person tailing the log looks.
    """

    def process(logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        ordered = {key: event_dict[key] for key in ("event", "level") if key in event_dict}
        return renderer(logger, name, {**ordered, **event_dict})

    return process


def _with_priority(renderer: Processor) -> Processor:
    """Prefix each line with its syslog priority for journald (``<4>`` for a warning)."""

    def process(logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        priority = _PRIORITIES.get(str(event_dict.get("level", "")), 6)
        line = renderer(logger, name, event_dict)
        return f"<{priority}>{line}" if isinstance(line, str) else line

    return process


def _mask_rendered(masker: SecretMasker) -> Processor:
    """Mask the final rendered line too (tracebacks are rendered late)."""

    def process(_logger: WrappedLogger, _name: str, event: Any) -> Any:
        return masker.mask(event) if isinstance(event, str) else event

    return process


def _drop_transcripts(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    for key in _TRANSCRIPT_KEYS & event_dict.keys():
        if not isinstance(event_dict[key], int | float):    # a count (words=9) tells nothing
            event_dict[key] = "[hidden]"
    return event_dict


def configure(
    *,
    level: str = "info",
    fmt: Literal["json", "console", "auto"] = "auto",
    transcripts: bool = True,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> SecretMasker:
    """Configure structlog and the stdlib bridge once, from ``cli.py``. Returns the masker."""
    own_fd = stream is None         # stderr: a descriptor of our own (see LogOutput)
    stream = stream or sys.stderr or open(os.devnull, "w")  # 2>&-
    if _output:
        _output.pop().release()
    output = LogOutput(stream, lambda event, fields: rendered_line(event, **fields),
                       own_fd=own_fd)
    _output[:] = [output]
    masker = SecretMasker(secrets)
    use_console = fmt == "console" or (fmt == "auto" and output.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # a terminal's reader wants the local time of day; a stored JSON line the UTC instant
        structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False) if use_console
        else structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not use_console:     # the traceback as text, masked before JSON escapes a secret in it
        shared.append(structlog.processors.format_exc_info)
    if not transcripts:
        shared.append(_drop_transcripts)
    shared.append(masker)
    renderer: Processor = (
        # fields in the order the line gives them (what matters first), the event padded less
        structlog.dev.ConsoleRenderer(colors=output.isatty(), sort_keys=False, pad_event_to=24)
        if use_console
        else _event_first(structlog.processors.JSONRenderer())
    )
    if output.is_journal():
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[*shared, renderer, _mask_rendered(masker)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, output)),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib(shared, renderer, cast(TextIO, output), _LEVELS[level], masker)
    return masker


def write_in_background() -> None:
    """Write log lines from a thread of their own from now on (``run``): see :mod:`logoutput`.

    What Python itself would print to stderr (a warning, an exception in a thread or one
    "ignored" in a finaliser) is logged instead, so a stalled stderr cannot stall it either.
    """
    if not _output:
        return
    _output[-1].start_background()
    logging.captureWarnings(True)                       # py.warnings, through the root handler
    threading.excepthook = _thread_crashed
    sys.unraisablehook = _exception_ignored


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("daemon").error(
        "thread.crashed", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _exception_ignored(args: sys.UnraisableHookArgs) -> None:
    structlog.get_logger("daemon").warning(
        "exception.ignored", where=args.err_msg or "Exception ignored in",
        object=repr(args.object),     # whole: masking sees a secret whole
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def close() -> None:
    """Write what is still queued (bounded), then write in the caller's thread again."""
    if _output:
        _output[-1].close()


def settle(wait_s: float) -> None:
    """Give the log writer thread up to ``wait_s`` to write what it holds; takes no lock."""
    if _output:
        _output[-1].settle(wait_s)


def settled() -> bool:
    """Whether the log writer has written everything it was given (no line half-written)."""
    return not _output or _output[-1].settled


def say(text: str, priority: int = 3) -> None:
    """One plain line on stderr, after the log lines before it; an error is never raised.

    On the ``sys.stderr`` of now unless ``run``'s background writer is on: a command run again
    in one process (tests) must not write to the stderr of an earlier configuration. To the
    journal each line carries ``priority`` (3: an error, why the command failed).
    """
    if _output and _output[-1].background:     # run's: in order after its log lines
        _output[-1].write(_prioritised(text, priority, _output[-1]))
    elif sys.stderr is not None and not _stuck:   # a stalled stderr waits a moment, once
        output = LogOutput(sys.stderr, own_fd=True)
        output.start_background()
        output.write(_prioritised(text, priority, output))
        output.release()
        _stuck[:] = [True] if output.gave_up else []


def _prioritised(text: str, priority: int, output: LogOutput) -> str:
    """``text`` with each line's syslog priority when ``output`` is the journal."""
    if not output.is_journal():
        return text
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def rendered_line(event: str, **fields: object) -> bytes:
    """A warning, ``event``, rendered by the configured processors (masking too) as one line.

    Empty when a processor drops it.

    For lines written around the loggers: the writer thread's ``log.lines_lost`` and the
    signal handler's ``daemon.exit_now``, which must not wait on the loggers' locks.
    """
    entry: Any = {"event": event, **fields}
    try:
        for processor in structlog.get_config()["processors"]:
            entry = processor(None, "warning", entry)
    except structlog.DropEvent:     # a processor drops it (a BaseException): nothing to write
        return b""
    except Exception:               # a line that cannot be rendered: the plain words
        entry = f"{event} {fields}"
    text = entry.decode("utf-8", "replace") if isinstance(entry, bytes) else str(entry)
    return text.encode("utf-8", "replace") + b"\n"


def _bridge_stdlib(
    shared: list[Processor],
    renderer: Processor,
    stream: TextIO,
    level: int,
    masker: SecretMasker,
) -> None:
    pre_chain: list[Processor] = [structlog.stdlib.ExtraAdder(), *shared]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
            _mask_rendered(masker),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (websockets frames, httpx requests) only when asked for debug.
    root.setLevel(level if level <= logging.DEBUG else logging.WARNING)
