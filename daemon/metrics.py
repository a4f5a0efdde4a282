"""Health and Prometheus metrics from one snapshot of the daemon's counters.

The app fills a :class:`StatusSnapshot` on demand (``snapshot_of`` reads the engine, the audio
source, the dispatcher and an :class:`AudioMeter`); ``/healthz`` judges it with :func:`health`
and ``/metrics`` renders it with :class:`MetricsRenderer` in the Prometheus text format 0.0.4,
written by hand (no client library at run time).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from daemon.dispatch import Dispatcher
from daemon.events import AudioChunk

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                          60.0)
PREFIX: Final = "transcribed_"


@dataclass(frozen=True)
class SinkSnapshot:
    """One sink's figures. ``latencies`` are the dispatcher's recent turn→sink seconds."""

    name: str
    queue_depth: int = 0
    delivered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    latencies: Sequence[float] = ()


@dataclass(frozen=True)
class StatusSnapshot:
    """What the daemon is doing now; every counter is a total since start."""

    engine: str
    engine_live: bool = False
    audio_seconds: float = 0.0
    audio_age_s: float | None = None  # seconds since the last chunk arrived; None = none yet
    chunks_dropped: int = 0
    input_overflows: int = 0  # capture buffers PortAudio flagged as overflowed (audio lost)
    capture_recovering: bool = False  # the microphone is being reopened (capture paused)
    capture_waiting: bool = False  # at start: the microphone is not there yet and waited for
    sessions: int = 0
    reconnects: int = 0
    backlog_seconds: float = 0.0
    backlog_dropped_seconds: float = 0.0  # audio the full reconnect backlog dropped (lost)
    turns: int = 0
    sinks: tuple[SinkSnapshot, ...] = ()


@dataclass(frozen=True)
class Health:
    """The verdict of ``/healthz``."""

    ok: bool
    reason: str

    def to_dict(self, snapshot: StatusSnapshot) -> dict[str, Any]:
        """The JSON body: status, reason and the facts behind them."""
        age = snapshot.audio_age_s
        return {
            "status": "ok" if self.ok else "unhealthy",
            "reason": self.reason,
            "engine": snapshot.engine,
            "engine_live": snapshot.engine_live,
            "audio_age_s": None if age is None else round(age, 3),
            "backlog_s": round(snapshot.backlog_seconds, 3),
        }


def health(snapshot: StatusSnapshot, stale_s: float) -> Health:
    """Healthy when audio arrived within ``stale_s`` seconds and the engine session is live."""
    if snapshot.capture_waiting:
        return Health(False, "waiting for the microphone (audio.device) to appear")
    if snapshot.audio_age_s is None:
        return Health(False, "no audio received yet")
    if snapshot.audio_age_s > stale_s:
        return Health(False, f"no audio for {snapshot.audio_age_s:.1f} s")
    if not snapshot.engine_live:
        return Health(False, f"{snapshot.engine} session is not live")
    return Health(True, "audio flowing, session live")


class AudioMeter:
    """Counts the audio that reaches the engine and remembers when the last chunk came."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds = 0.0
        self.chunks = 0
        self.last_at: float | None = None

    def count(self, chunk: AudioChunk) -> None:
        """One more chunk reached the engine."""
        self.seconds += chunk.duration
        self.chunks += 1
        self.last_at = self._clock()

    async def wrap(self, chunks: AsyncIterator[AudioChunk]) -> AsyncIterator[AudioChunk]:
        """Yield ``chunks`` unchanged, counting each one."""
        try:
            async for chunk in chunks:
                self.count(chunk)
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def age(self) -> float | None:
        """Seconds since the last chunk, or ``None`` before the first."""
        return None if self.last_at is None else max(0.0, self._clock() - self.last_at)


def snapshot_of(
    *,
    engine: Any,
    source: Any,
    dispatcher: Dispatcher,
    meter: AudioMeter,
    sessions: int,
    turns: int,
    engine_live: bool,
) -> StatusSnapshot:
    """Read the running parts into a snapshot (engine extras are optional: local has none)."""
    ledger = getattr(engine, "ledger", None)
    sinks = tuple(
        SinkSnapshot(
            name, runner.queue.depth(), runner.stats.delivered, runner.stats.failed,
            runner.stats.dead_lettered, runner.stats.latencies,
        )
        for name, runner in sorted(dispatcher.runners.items())
    )
    return StatusSnapshot(
        engine=str(engine.name),
        engine_live=engine_live,
        audio_seconds=meter.seconds,
        audio_age_s=meter.age(),
        chunks_dropped=int(getattr(source, "dropped_chunks", 0)),
        input_overflows=int(getattr(source, "input_overflows", 0)),
        capture_recovering=bool(getattr(source, "recovering", False)),
        capture_waiting=bool(getattr(source, "waiting", False)),
        sessions=sessions,
        reconnects=int(getattr(engine, "reconnects", 0)),
        backlog_seconds=float(ledger.seconds_held()) if ledger is not None else 0.0,
        backlog_dropped_seconds=(ledger.dropped_samples / ledger.sample_rate
                                 if ledger is not None else 0.0),
        turns=turns,
        sinks=sinks,
    )


@dataclass
class LatencyHistogram:
    """A cumulative histogram fed from a sink's delivered count and its recent latencies."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0
    seen: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def catch_up(self, delivered: int, latencies: Sequence[float]) -> None:
        """Observe the latencies of deliveries made since the last call."""
        new = delivered - self.seen
        self.seen = delivered
        if new <= 0:
            return
        for value in list(latencies[-new:]):
            self.count += 1
            self.total += value
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[index] += 1


@dataclass
class Carried:
    """A counter kept monotonic when its source restarts from 0 (a sink a reload rebuilt)."""

    base: float = 0.0
    last: float = 0.0

    def __call__(self, raw: float) -> float:
        """The running total for the source's ``raw`` figure now."""
        if raw < self.last:                 # a fresh source: what the old one counted stays
            self.base += self.last
        self.last = raw
        return self.base + raw


class MetricsRenderer:
    """Renders snapshots as Prometheus text; keeps the per-sink histograms between scrapes."""

    def __init__(self) -> None:
        self._histograms: dict[str, LatencyHistogram] = {}
        self._counters: dict[tuple[str, str], Carried] = {}

    def render(self, snap: StatusSnapshot, extra: Sequence[tuple[str, str, str, float]] = ()
               ) -> str:
        """The exposition text. ``extra`` adds ``(name, type, help, value)`` unlabelled samples."""
        out: list[str] = []
        plain = [
            ("audio_seconds_total", "counter", "Seconds of audio that reached the engine.",
             snap.audio_seconds),
            ("audio_chunks_dropped_total", "counter",
             "Audio chunks dropped because the consumer fell behind.", snap.chunks_dropped),
            ("audio_input_overflows_total", "counter",
             "Capture buffers the audio system flagged as overflowed (input lost before them).",
             snap.input_overflows),
            ("sessions_total", "counter", "Engine sessions begun.", snap.sessions),
            ("reconnects_total", "counter", "Reconnections to the streaming service.",
             snap.reconnects),
            ("backlog_seconds", "gauge", "Audio held that no finished turn covers yet.",
             snap.backlog_seconds),
            ("audio_backlog_dropped_seconds_total", "counter",
             "Seconds of audio dropped, never transcribed, because the reconnect backlog "
             "(reconnect.backlog_seconds) was full.", snap.backlog_dropped_seconds),
            ("turns_total", "counter", "Finished turns.", snap.turns),
            ("engine_live", "gauge", "1 while an engine session is live.",
             1 if snap.engine_live else 0),
            ("audio_age_seconds", "gauge", "Seconds since the last audio chunk (NaN: none yet).",
             math.nan if snap.audio_age_s is None else snap.audio_age_s),
            *extra,
        ]
        for name, kind, text, value in plain:
            _family(out, name, kind, text, [(PREFIX + name, "", value)])
        self._sinks(out, snap.sinks)
        return "\n".join(out) + "\n"

    def _sinks(self, out: list[str], sinks: Sequence[SinkSnapshot]) -> None:
        per_sink = [
            ("sink_queue_depth", "gauge", "Turns queued for the sink.", "queue_depth"),
            ("sink_deliveries_total", "counter", "Turns delivered.", "delivered"),
            ("sink_failures_total", "counter", "Failed delivery attempts (retried).", "failed"),
            ("sink_dead_lettered_total", "counter", "Turns moved to the dead-letter file.",
             "dead_lettered"),
        ]
        for name, kind, text, attr in per_sink:
            samples = [(PREFIX + name, _labels(s.name), self._figure(s, attr, kind))
                       for s in sinks]
            _family(out, name, kind, text, samples)
        self._latencies(out, sinks)

    def _figure(self, sink: SinkSnapshot, attr: str, kind: str) -> float:
        value = float(getattr(sink, attr))
        if kind != "counter":
            return value
        return self._counters.setdefault((sink.name, attr), Carried())(value)

    def _latencies(self, out: list[str], sinks: Sequence[SinkSnapshot]) -> None:
        name = PREFIX + "sink_latency_seconds"
        out += [f"# HELP {name} Seconds from a turn's end to its delivery by the sink.",
                f"# TYPE {name} histogram"]
        for sink in sinks:
            hist = self._histograms.setdefault(sink.name, LatencyHistogram())
            hist.catch_up(sink.delivered, sink.latencies)
            for bound, count in zip(hist.buckets, hist.counts, strict=True):  # cumulative
                out.append(f"{name}_bucket{_labels(sink.name, le=_num(bound))} {count}")
            out.append(f'{name}_bucket{_labels(sink.name, le="+Inf")} {hist.count}')
            out.append(f"{name}_count{_labels(sink.name)} {hist.count}")
            out.append(f"{name}_sum{_labels(sink.name)} {_num(hist.total)}")


def _family(out: list[str], name: str, kind: str, text: str,
            samples: Sequence[tuple[str, str, float]]) -> None:
    out.append(f"# HELP {PREFIX}{name} {text}")
    out.append(f"# TYPE {PREFIX}{name} {kind}")
    out.extend(f"{sample}{labels} {_num(value)}" for sample, labels, value in samples)


def _labels(sink: str, **more: str) -> str:
    pairs = {"sink": sink, **more}
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
