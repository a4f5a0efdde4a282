"""Turn -> sink latency for the file, MQTT and webhook sinks, through the real dispatcher.

In one process: the daemon's own ``Dispatcher``, queues (in memory for the file sink, the
SQLite outbox in the state directory for MQTT and webhook, as the daemon builds them with
``SinkBuilder``) and built-in sinks, against a real mosquitto (``tests/mosquitto.py``) and an
HTTP receiver in a separate process (answers 204, keep-alive). Each turn (a realistic record, 12
words) goes alone: we wait for its acknowledgement, then 5 ms, then send the next.

Measured per turn, on the monotonic clock:

* **frame -> ack** (the issue's measure): from the moment the session has read the turn's final
  ``Turn`` frame (its text, as ``websockets`` hands it over) to the moment the dispatcher's worker
  acknowledges the delivery to the queue, i.e. ``sink.send`` has returned: the line is written
  and fsynced (file), the broker's PUBACK arrived (MQTT, QoS 1), the receiver answered 2xx
  (webhook). In between, what the daemon does with a frame (``FramePath``): the real
  ``parse_message``, ``TurnAssembler`` (with the session's ``Timeline``, covering the turn's
  audio in a real ``Ledger``), the daemon's ``Listener`` (logs ``turn.completed`` through the
  daemon's JSON logging, to a file here, and calls ``Dispatcher.dispatch``), the durable ``put``
  (an SQLite insert, ``synchronous=FULL``) for MQTT and webhook, and the sink.
* **dispatch -> ack**: the same from just before ``Dispatcher.dispatch(record)``.
* **frame -> removed**: frame -> ack plus the queue's ``ack`` (the outbox delete).

Run:  .venv/bin/python bench/sink_latency.py [--turns 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, busy_cpu_s, machine, now, percentile, revision, save

from daemon.app import Listener
from daemon.dispatch import Dispatcher
from daemon.events import AudioChunk, TurnRecord
from daemon.ledger import Ledger, Piece, Timeline
from daemon.logs import configure as configure_logging
from daemon.plugins import PluginHost, load_plugins
from daemon.protocol import Turn, parse_message
from daemon.queues import Delivery, SinkQueue
from daemon.reload import SinkBuilder
from daemon.sinktables import validate_sinks
from daemon.turns import TurnAssembler
from tests.mosquitto import Mosquitto

GAP_S = 0.005
RATE = 16000
SESSION = "bench-session"
TURN_CHUNKS = 40                    # 4 s of audio per turn, sent in 100 ms chunks
CHUNK = bytes(RATE // 10 * 2)
WORDS = "please schedule a meeting with the design team for next tuesday at three".split()


class TimedQueue:
    """Delegates to a sink's real queue and notes when each delivery is acknowledged."""

    def __init__(self, inner: SinkQueue, on_ack: Callable[[str, float, float], None]) -> None:
        self.inner = inner
        self.on_ack = on_ack

    def put(self, record: TurnRecord) -> None:
        self.inner.put(record)

    def batch(self) -> AbstractContextManager[object]:
        return self.inner.batch()

    async def get(self) -> Delivery | None:
        return await self.inner.get()

    def ack(self, delivery: Delivery) -> None:
        acked = time.monotonic()
        self.inner.ack(delivery)
        self.on_ack(delivery.record.id, acked, time.monotonic())

    def depth(self) -> int:
        return self.inner.depth()

    def close(self) -> None:
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def requeue(self, delivery: Delivery) -> None:
        self.inner.requeue(delivery)


class TimedDispatcher(Dispatcher):
    """The real dispatcher, noting when each record is handed to it."""

    dispatched: dict[str, float]

    def dispatch(self, record: TurnRecord) -> None:
        self.dispatched[record.id] = time.monotonic()
        super().dispatch(record)


class FramePath:
    """What a session does with a text frame it has read, up to ``Dispatcher.dispatch``.

    ``StreamSession._handle``'s path for a ``Turn``: ``parse_message``, then the session's
    ``TurnAssembler`` (its ``Timeline`` maps the words to wall-clock times; a final covers its
    audio in the engine's ``Ledger``), whose record goes to the daemon's ``Listener``.
    """

    def __init__(self, dispatcher: Dispatcher, plugins: PluginHost) -> None:
        self.ledger = Ledger(RATE, backlog_seconds=120)
        self.timeline = Timeline(RATE)
        listener = Listener(dispatcher, plugins, transcripts_in_log=True)
        self.assembler = TurnAssembler(SESSION, self.timeline, format_turns=True,
                                       source="microphone", host="bench", emit=listener.turn,
                                       partial=listener.partial, cover=self.ledger.cover)

    def speak(self, order: int) -> tuple[str, str]:
        """Send a turn's audio (100 ms chunks); return its unformatted and formatted finals."""
        for _ in range(TURN_CHUNKS):
            chunk = AudioChunk(CHUNK, time.time())
            piece = Piece(self.ledger.end, chunk.pcm, chunk.captured_at)
            self.ledger.append(chunk)
            self.timeline.add(piece)
        first_ms = round(self.timeline.sent_seconds * 1000) - TURN_CHUNKS * 100 + 200
        return _final(order, first_ms, formatted=False), _final(order, first_ms, formatted=True)

    def read(self, frame: str) -> None:
        """The session has read ``frame``."""
        message = parse_message(frame)
        assert isinstance(message, Turn)
        self.assembler.handle(message)


def _final(order: int, first_ms: int, *, formatted: bool) -> str:
    """A final ``Turn`` frame as the service (and the fake) sends it: 12 words."""
    words = [{"start": first_ms + i * 300, "end": first_ms + i * 300 + 250,
              "text": w.capitalize() if formatted and i == 0 else w,
              "confidence": 0.95, "word_is_final": True} for i, w in enumerate(WORDS)]
    transcript = " ".join(str(w["text"]) for w in words) + ("." if formatted else "")
    return json.dumps({"type": "Turn", "turn_order": order, "turn_is_formatted": formatted,
                       "end_of_turn": True, "transcript": transcript,
                       "end_of_turn_confidence": 0.9, "utterance": transcript,
                       "words": words})


class _NoContent(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_http() -> None:
    """``--serve-http``: answer every POST with 204; print the port; stop when stdin closes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoContent)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()


def sink_tables(kind: str, work: Path, mqtt_port: int, http_port: int) -> dict[str, Any]:
    """The ``[sinks.*]`` tables for one measurement."""
    secret = "whsec_" + base64.b64encode(b"bench-secret-0123456789").decode()
    tables: dict[str, dict[str, Any]] = {
        "file": {"type": "file", "path": str(work / "turns.jsonl"), "fsync": True},
        "mqtt": {"type": "mqtt", "host": "127.0.0.1", "port": mqtt_port, "qos": 1},
        "webhook": {"type": "webhook", "url": f"http://127.0.0.1:{http_port}/hook",
                    "secret": secret},
    }
    return tables if kind == "all" else {kind: tables[kind]}


async def measure(kind: str, turns: int, work: Path, mqtt_port: int,
                  http_port: int) -> dict[str, Any]:
    """Send ``turns`` final frames one at a time to the sinks of ``kind``; latencies in ms."""
    plugins = load_plugins()
    closers: list[Any] = []
    builder = SinkBuilder("bench", work / f"state-{kind}", closers)
    validated = validate_sinks(plugins, sink_tables(kind, work, mqtt_port, http_port))
    runners = [builder.build(name, t, config) for name, (t, config) in validated.items()]
    timing = Timing({r.name: [] for r in runners})

    for runner in runners:
        runner.queue = TimedQueue(runner.queue, timing.on_ack(runner.name))
    dispatcher = TimedDispatcher(runners, dead_letter_dir=work / "dead-letter")
    dispatcher.dispatched = timing.dispatched
    path = FramePath(dispatcher, plugins)
    busy, wall = busy_cpu_s(), time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            for order in range(20):     # warm-up (connections made, files open): not counted
                await _deliver_one(path, runners, timing, order)
            timing.clear()
            for order in range(20, turns + 20):
                await _deliver_one(path, runners, timing, order)
                await asyncio.sleep(GAP_S)
            await dispatcher.close(5)
    finally:
        for closer in closers:
            closer.close()
    elapsed = time.monotonic() - wall
    return {name: timing.stats(name) | {"kind": kind}
            for name in timing.acked} | {"_busy_cores": (busy_cpu_s() - busy) / elapsed}


class Timing:
    """When each turn's frame was read and dispatched, and when each sink acknowledged it."""

    def __init__(self, acked: dict[str, list[tuple[str, float, float]]]) -> None:
        self.acked = acked                      # sink -> (record id, acked, removed)
        self.read: dict[str, float] = {}
        self.dispatched: dict[str, float] = {}
        self.pending: set[tuple[str, str]] = set()
        self.done = asyncio.Event()

    def on_ack(self, sink: str) -> Callable[[str, float, float], None]:
        def note(record_id: str, at: float, gone: float) -> None:
            self.acked[sink].append((record_id, at, gone))
            self.pending.discard((sink, record_id))
            if not self.pending:
                self.done.set()
        return note

    def clear(self) -> None:
        for notes in self.acked.values():
            notes.clear()

    def stats(self, sink: str) -> dict[str, Any]:
        notes = self.acked[sink]
        frame = [(at - self.read[rid]) * 1000 for rid, at, _ in notes]
        dispatch = [(at - self.dispatched[rid]) * 1000 for rid, at, _ in notes]
        removed = [(gone - self.read[rid]) * 1000 for rid, _, gone in notes]
        return {"n": len(frame), "p50_ms": percentile(frame, 0.5),
                "p90_ms": percentile(frame, 0.9), "p99_ms": percentile(frame, 0.99),
                "max_ms": max(frame), "dispatch_p50_ms": percentile(dispatch, 0.5),
                "dispatch_p99_ms": percentile(dispatch, 0.99),
                "removed_p50_ms": percentile(removed, 0.5),
                "removed_p99_ms": percentile(removed, 0.99)}


async def _deliver_one(path: FramePath, runners: list[Any], timing: Timing, order: int) -> None:
    """Read turn ``order``'s final frame and wait until every sink has acknowledged it."""
    unformatted, formatted = path.speak(order)
    path.read(unformatted)                  # held for the formatted final, which follows it
    record_id = f"{SESSION}:{order}"
    timing.pending.update((r.name, record_id) for r in runners)
    timing.done.clear()
    timing.read[record_id] = time.monotonic()
    path.read(formatted)
    async with asyncio.timeout(30):
        await timing.done.wait()


async def run_all(turns: int, work: Path, mqtt_port: int, http_port: int) -> dict[str, Any]:
    """Each sink alone, then all three together; the daemon's log lines (JSON, as under
    systemd) go to a file in ``work``."""
    results: dict[str, Any] = {}
    with (work / "daemon.log").open("a", encoding="utf-8") as daemon_log:
        configure_logging(level="info", fmt="json", stream=daemon_log)
        for kind in ("file", "mqtt", "webhook", "all"):
            measured = await measure(kind, turns, work, mqtt_port, http_port)
            busy = measured.pop("_busy_cores")
            for name, stats in measured.items():
                key = name if kind != "all" else f"{name} (all three at once)"
                results[key] = stats | {"machine_busy_cores": busy}
            print(json.dumps({kind: measured}), file=sys.stderr, flush=True)
    return results


def measure_all(turns: int) -> dict[str, Any]:
    """Start mosquitto and the HTTP receiver, then measure."""
    with tempfile.TemporaryDirectory(prefix="bench-sinks-") as tmp:
        work = Path(tmp)
        http = subprocess.Popen([sys.executable, __file__, "--serve-http"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, cwd=REPO)
        assert http.stdout is not None
        assert http.stdin is not None
        http_port = int(http.stdout.readline())
        try:
            with Mosquitto(work / "mosquitto") as broker:
                return asyncio.run(run_all(turns, work, broker.port, http_port))
        finally:
            http.stdin.close()
            http.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--serve-http", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_http:
        serve_http()
        return
    started = now()
    results = measure_all(args.turns)
    print(save("sinks", {"date": started, "machine": machine(), "revision": revision(),
                         "command": f".venv/bin/python bench/sink_latency.py --turns {args.turns}",
                         "turns": args.turns, "gap_ms": GAP_S * 1000, "sinks": results}))


if __name__ == "__main__":
    main()
