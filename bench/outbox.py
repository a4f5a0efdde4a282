"""Benchmark the durable outbox (issue 4): latency of ``put`` (the dispatch acknowledgement).

``put`` runs on the event loop and fsyncs (WAL, ``synchronous=FULL``) before returning, so its
latency is what one finished turn costs the loop. Also measured: ``get`` + ``ack`` (the delivery
side) and reopening a full outbox (startup after a long outage).

Run from the repository root::

    .venv/bin/python bench/outbox.py [--dir DIR] [--count N]

``--dir`` should sit on the file system of the real state directory: fsync cost depends on it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from daemon.events import TurnRecord, Word
from daemon.outbox import Outbox


def turn(order: int) -> TurnRecord:
    """A typical 12-word turn."""
    now = datetime.now(UTC)
    words = tuple(Word(f"word{i}", i * 300, i * 300 + 250, 0.95) for i in range(12))
    text = " ".join(w.text for w in words)
    return TurnRecord("bench-session", order, text, now, now, 0.9, words, None, "assemblyai",
                      "microphone", "bench")


def percentiles(samples_ms: list[float]) -> str:
    """p50/p99/max of a list of milliseconds."""
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.3f} ms, p99 {p99:.3f} ms, max {ordered[-1]:.3f} ms"


async def measure(directory: Path, count: int) -> None:
    """Print put latency, get+ack latency and reopen time."""
    path = directory / "outbox.sqlite3"
    box = Outbox(path, max_records=count + 1)
    queue = box.queue("bench")
    puts = []
    for i in range(count):
        record = turn(i)
        start = time.perf_counter()
        queue.put(record)
        puts.append((time.perf_counter() - start) * 1000)
    print(f"put     ({count} records): {percentiles(puts)}")
    box.close()
    start = time.perf_counter()
    box = Outbox(path, max_records=count + 1)
    print(f"reopen  ({count} queued): {(time.perf_counter() - start) * 1000:.1f} ms")
    queue = box.queue("bench")
    queue.close()
    takes = []
    while True:
        start = time.perf_counter()
        delivery = await queue.get()
        if delivery is None:
            break
        queue.ack(delivery)
        takes.append((time.perf_counter() - start) * 1000)
    print(f"get+ack ({len(takes)} records): {percentiles(takes)}")
    box.close()


def main() -> None:
    """Parse arguments and run the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to create the outbox")
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            asyncio.run(measure(Path(tmp), args.count))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(measure(Path(tmp), args.count))


if __name__ == "__main__":
    main()
