"""Helpers shared by the benchmarks: machine description, CPU accounting, statistics, results."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TICK = os.sysconf("SC_CLK_TCK")
CHUNK_S = 0.1  # the clients in the cloud benchmark send 100 ms chunks


def machine() -> str:
    """Cores, CPU model, Python version and kernel."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), Python {platform.python_version()}, "
            f"Linux {platform.release()}")


def revision() -> str:
    """The commit measured, with the files under daemon/ and plugins/ that differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon", "plugins"],
                           capture_output=True, text=True, cwd=REPO).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"{head} + uncommitted {', '.join(changed)}" if changed else head


def now() -> str:
    """UTC date and time, to the minute."""
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"


def busy_cpu_s() -> float:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``), 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def task_cpu_s(pid: int) -> float | None:
    """CPU seconds of a live process's threads, in ns (``/proc/<pid>/task/*/schedstat``).

    Finer than ``process_cpu_s`` (10 ms ticks); counts only threads alive now, so use it for
    intervals while a process runs. None once the process is gone.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue                    # the thread ended meanwhile
    except OSError:
        return None
    return total / 1e9


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and n of a sample."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


def save(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


async def mint_token(token_url: str, api_key: str) -> str:
    """A temporary token from the v3 token endpoint (what ``create_temporary_token`` does)."""
    import httpx

    async with httpx.AsyncClient() as http:
        response = await http.get(token_url, headers={"Authorization": api_key},
                                  params={"expires_in_seconds": 60,
                                          "max_session_duration_seconds": 10800})
        response.raise_for_status()
        token: str = response.json()["token"]
        return token


def read_pcm(path: Path) -> bytes:
    """The WAV's frames; it must already be 16 kHz mono 16-bit."""
    import wave

    with wave.open(str(path), "rb") as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (16000, 1, 2):
            raise SystemExit(f"{path}: expected a 16 kHz mono 16-bit WAV")
        return wav.readframes(wav.getnframes())


def client_args(doc: str) -> argparse.Namespace:
    """The command line every client of the cloud benchmark takes (``doc``: its docstring)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--wav", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--api-host", required=True)
    parser.add_argument("--api-key", required=True)
    return parser.parse_args()


def is_final(event: dict[str, Any]) -> bool:
    """A v3 message that is a final, formatted turn (the one the clients write)."""
    return (event.get("type") == "Turn" and bool(event.get("end_of_turn"))
            and bool(event.get("turn_is_formatted")))


def append_synced(out: IO[str], line: str) -> None:
    """Append ``line`` and fsync, as the daemon's file sink does."""
    out.write(line + "\n")
    out.flush()
    os.fsync(out.fileno())
