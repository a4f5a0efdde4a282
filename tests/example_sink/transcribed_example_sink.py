"""An example third-party sink for transcribed, installed through the entry-point group.

A real package declares, in its ``pyproject.toml``::

    [project.entry-points."transcribed.sinks"]
    example = "transcribed_example_sink"

and provides a ``transcribed_sink_types`` hook implementation returning its sink types. Users then
configure it like any built-in sink::

    [sinks.mine]
    type = "example"
    path = "/tmp/example-turns.txt"

This one appends ``<id> <transcript>`` lines to a text file.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

from daemon.events import TurnRecord
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl


class ExampleConfig(SinkConfig):
    """``type = "example"``: where to append lines."""

    path: str


class ExampleSink:
    """Appends one text line per turn."""

    def __init__(self, name: str, config: ExampleConfig, context: SinkContext) -> None:
        self.path = Path(config.path)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        """Append ``<id> <transcript>`` (small writes; a real sink would use a thread)."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"{record.id} {record.transcript}\n")


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``example`` sink type."""
    return [SinkType("example", ExampleConfig, ExampleSink)]
