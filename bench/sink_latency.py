"""Turn -> sink latency for the file, MQTT and webhook sinks, through the real dispatcher.

In one process: the daemon's own ``Dispatcher``, queues (in memory for the file sink, the
SQLite outbox in the state directory for MQTT and webhook, as the daemon builds them with
``SinkBuilder``) and built-in sinks, against a real mosquitto (``tests/mosquitto.py``) and an
HTTP receiver in a separate process (answers 204, keep-alive). Each turn (a realistic record, 12
words) is dispatched alone: we wait for its acknowledgement, then 5 ms, then dispatch the next.

Measured per turn, on the monotonic clock:

* **dispatch -> ack**: from just before ``Dispatcher.dispatch(record)`` (what the engine
  listener calls when a final turn is complete) to the moment the dispatcher's worker
  acknowledges the delivery to the queue, i.e. ``sink.send`` has returned: the line is written
  and fsynced (file), the broker's PUBACK arrived (MQTT, QoS 1), the receiver answered 2xx
  (webhook). This includes the durable ``put`` (an SQLite insert, ``synchronous=FULL``) for
  MQTT and webhook.
* **dispatch -> removed**: the same plus the queue's ``ack`` (the outbox delete).

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
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog
from common import REPO, busy_cpu_s, machine, now, percentile, revision, save

from daemon.dispatch import Dispatcher
from daemon.events import TurnRecord, Word
from daemon.plugins import load_plugins
from daemon.queues import Delivery, SinkQueue
from daemon.reload import SinkBuilder
from daemon.sinktables import validate_sinks
from tests.mosquitto import Mosquitto

GAP_S = 0.005
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


def record(order: int) -> TurnRecord:
    """A realistic turn: 12 words, about 700 bytes of JSON."""
    start = datetime.now(UTC)
    words = tuple(Word(w, i * 300, i * 300 + 250, 0.95) for i, w in enumerate(WORDS))
    return TurnRecord("bench-session", order, " ".join(WORDS).capitalize() + ".", start,
                      start + timedelta(seconds=3.6), 0.93, words, None, "assemblyai",
                      "microphone", "bench")


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
    """Dispatch ``turns`` records one at a time to the sinks of ``kind``; latencies in ms."""
    plugins = load_plugins()
    closers: list[Any] = []
    builder = SinkBuilder("bench", work / f"state-{kind}", closers)
    validated = validate_sinks(plugins, sink_tables(kind, work, mqtt_port, http_port))
    runners = [builder.build(name, t, config) for name, (t, config) in validated.items()]
    sent: dict[str, float] = {}
    acked: dict[str, list[float]] = {r.name: [] for r in runners}
    removed: dict[str, list[float]] = {r.name: [] for r in runners}
    pending: set[tuple[str, str]] = set()
    done = asyncio.Event()

    def on_ack(sink: str) -> Callable[[str, float, float], None]:
        def note(record_id: str, at: float, gone: float) -> None:
            acked[sink].append((at - sent[record_id]) * 1000)
            removed[sink].append((gone - sent[record_id]) * 1000)
            pending.discard((sink, record_id))
            if not pending:
                done.set()
        return note

    for runner in runners:
        runner.queue = TimedQueue(runner.queue, on_ack(runner.name))
    dispatcher = Dispatcher(runners, dead_letter_dir=work / "dead-letter")
    busy, wall = busy_cpu_s(), time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            for order in range(-20, 0):     # warm-up (connections made, files open): not counted
                await _deliver_one(dispatcher, runners, pending, done, sent, order)
            for name in acked:
                acked[name].clear()
                removed[name].clear()
            for order in range(1, turns + 1):
                await _deliver_one(dispatcher, runners, pending, done, sent, order)
                await asyncio.sleep(GAP_S)
            await dispatcher.close(5)
    finally:
        for closer in closers:
            closer.close()
    elapsed = time.monotonic() - wall
    return {name: _stats(acked[name], removed[name]) | {"kind": kind}
            for name in acked} | {"_busy_cores": (busy_cpu_s() - busy) / elapsed}


async def _deliver_one(dispatcher: Dispatcher, runners: list[Any],
                       pending: set[tuple[str, str]], done: asyncio.Event,
                       sent: dict[str, float], order: int) -> None:
    """Dispatch turn ``order`` and wait until every sink has acknowledged it."""
    turn = record(order)
    pending.update((r.name, turn.id) for r in runners)
    done.clear()
    sent[turn.id] = time.monotonic()
    dispatcher.dispatch(turn)
    async with asyncio.timeout(30):
        await done.wait()


def _stats(acked: list[float], removed: list[float]) -> dict[str, Any]:
    return {"n": len(acked), "p50_ms": percentile(acked, 0.5), "p90_ms": percentile(acked, 0.9),
            "p99_ms": percentile(acked, 0.99), "max_ms": max(acked),
            "removed_p50_ms": percentile(removed, 0.5),
            "removed_p99_ms": percentile(removed, 0.99)}


async def run_all(turns: int, work: Path, mqtt_port: int, http_port: int) -> dict[str, Any]:
    """Each sink alone, then all three together."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    results: dict[str, Any] = {}
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
