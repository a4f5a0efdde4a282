"""Built-in webhook sink (placeholder until the network-sinks work lands)."""

from __future__ import annotations

from daemon.plugins import SinkType, hookimpl


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """No webhook sink yet."""
    return []
