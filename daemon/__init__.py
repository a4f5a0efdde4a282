"""transcribed: an always-on speech-to-text daemon with plugin sinks."""

from __future__ import annotations

__version__ = "0.1.0"
