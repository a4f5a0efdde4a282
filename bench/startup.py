"""Start-up: ``transcribed --version`` wall time (hyperfine when installed, else repeated runs).

For comparison it also times ``python -c "import assemblyai.streaming.v3"`` (what the SDK
script pays before it can do anything). Config load -> first audio frame is measured by
``bench/cloud.py`` (from the daemon's ``config.loaded`` log line to the fake's first frame).

Run:  .venv/bin/python bench/startup.py [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, busy_cpu_s, machine, now, percentile, revision, save

COMMANDS = {
    "transcribed --version": f"{REPO}/.venv/bin/transcribed --version",
    "python -c 'import assemblyai.streaming.v3' (SDK import)":
        f"{REPO}/.venv/bin/python -c 'import assemblyai.streaming.v3'",
    "python -c 'pass' (interpreter alone)": f"{REPO}/.venv/bin/python -c 'pass'",
}


def hyperfine(command: str, runs: int) -> list[float]:
    """Wall times in seconds measured by hyperfine (3 warm-up runs, no shell)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(["hyperfine", "--warmup", "3", "--runs", str(runs), "-N", "--style",
                        "none", "--export-json", out.name, command],
                       check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        data: dict[str, Any] = json.loads(Path(out.name).read_text())
    times: list[float] = data["results"][0]["times"]
    return times


def repeated(command: str, runs: int) -> list[float]:
    """Wall times in seconds of ``runs`` runs after 3 warm-ups (no hyperfine)."""
    argv = ["sh", "-c", command]
    times = []
    for index in range(runs + 3):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        if index >= 3:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    tool = "hyperfine" if shutil.which("hyperfine") else "subprocess"
    measure = hyperfine if tool == "hyperfine" else repeated
    results: dict[str, Any] = {}
    started = now()
    for label, command in COMMANDS.items():
        busy, wall = busy_cpu_s(), time.monotonic()
        times = measure(command, args.runs)
        results[label] = {
            "command": command.replace(f"{REPO}/", ""), "n": len(times),
            "median_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000,
            "p90_ms": percentile(times, 0.9) * 1000, "max_ms": max(times) * 1000,
            "machine_busy_cores": (busy_cpu_s() - busy) / (time.monotonic() - wall),
        }
    print(save("startup", {"date": started, "machine": machine(), "revision": revision(),
                           "tool": tool,
                           "command": f".venv/bin/python bench/startup.py --runs {args.runs}",
                           "results": results}))


if __name__ == "__main__":
    main()
