"""Built-in mqtt sink (placeholder until the network-sinks work lands)."""

from __future__ import annotations

from daemon.plugins import SinkType, hookimpl


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """No mqtt sink yet."""
    return []
