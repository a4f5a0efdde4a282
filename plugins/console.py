"""The ``console`` sink: each turn on standard output, as text or as a JSON line."""

from __future__ import annotations

import json
import sys
from types import TracebackType
from typing import Literal, Self, TextIO

from pydantic import Field

from daemon.errors import PermanentSinkError
from daemon.events import TurnRecord
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl


class ConsoleSinkConfig(SinkConfig):
    """``type = "console"``."""

    format: Literal["text", "json"] = Field("text", description="'text' or 'json' lines")


class ConsoleSink:
    """Prints turns to stdout (logs go to stderr, so the two never mix)."""

    def __init__(self, name: str, config: ConsoleSinkConfig, context: SinkContext,
                 stream: TextIO | None = None) -> None:
        self.name = name
        self.config = config
        self._stream = stream

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        """Write one line and flush."""
        stream = self._stream or sys.stdout
        if stream is None:      # started with stdout closed (``>&-``): Python has none
            raise PermanentSinkError("cannot write to stdout: it is closed")
        try:
            stream.write(self._line(record, stream.encoding) + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:
            raise PermanentSinkError(f"cannot write to stdout: {exc}") from None

    def _line(self, record: TurnRecord, encoding: str | None) -> str:
        """The line, in what stdout's encoding can take (a non-UTF-8 locale, say latin-1).

        JSON falls back to ASCII escapes (the same record); text to ``?`` for what is missing.
        """
        if self.config.format == "json":
            line = record.to_json()
        else:
            local = record.started_at.astimezone().strftime("%H:%M:%S")
            line = f"[{local}] {record.transcript}"
        try:
            line.encode(encoding or "utf-8")
        except UnicodeEncodeError:
            if self.config.format == "json":
                return json.dumps(record.to_dict(), separators=(",", ":"))   # ensure_ascii
            return line.encode(encoding or "utf-8", "replace").decode(encoding or "utf-8")
        except LookupError:         # an encoding Python does not know: let write() say so
            pass
        return line


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``console`` sink type."""
    return [SinkType("console", ConsoleSinkConfig, ConsoleSink)]
