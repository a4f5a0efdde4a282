"""What the service's heartbeats cost the daemon: CPU of whole runs with and without them.

Run:  .venv/bin/python bench/heartbeat_cost.py --reps 8

Each run is ``transcribed run`` streaming the five-sentence test WAV (24.7 s, real time) to the
fake v3 service (in this process) with one file sink; the fake sends a ``Heartbeat`` every
``RATE`` seconds, or none (``none``: a service that ignores ``session_heartbeat``). Rates
alternate within each repetition; CPU is the child's (``RUSAGE_CHILDREN``). Prints one line per
run, then the median per rate and the paired differences against ``none``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon_proc import fake_engine_tables  # noqa: E402
from tests.fake_assemblyai import SPEECH_DIR, FakeAssemblyAI  # noqa: E402
from tests.fake_assemblyai_speech import load_speech_references  # noqa: E402

WAV = "espeak-five-sentences.wav"


async def one_run(rate: float | None, work: Path) -> tuple[float, int]:
    """CPU seconds of one daemon run, and the heartbeats the fake sent it."""
    refs = load_speech_references(SPEECH_DIR, WAV)
    async with FakeAssemblyAI(refs, heartbeat_s=rate) as fake:
        config = work / "config.toml"
        config.write_text(f"""
[audio]
source = "file"
path = "{SPEECH_DIR / WAV}"
{fake_engine_tables(fake)}
[http]
enabled = false
[log]
format = "json"
[state]
dir = "{work / "state"}"
[sinks.journal]
type = "file"
path = "{work / "turns.jsonl"}"
""")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = await asyncio.create_subprocess_exec(
            str(REPO / ".venv/bin/transcribed"), "run", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await process.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        beats = sum(len(session.messages("Heartbeat")) for session in fake.sessions)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu, beats


async def main(reps: int, rates: list[float | None]) -> None:
    results: dict[float | None, list[float]] = {rate: [] for rate in rates}
    with tempfile.TemporaryDirectory() as folder:
        for rep in range(reps):
            order = rates if rep % 2 == 0 else list(reversed(rates))
            for rate in order:
                cpu, beats = await one_run(rate, Path(folder))
                results[rate].append(cpu)
                print(f"rep {rep} heartbeat every {rate} s: {cpu:.3f} s CPU, {beats} heartbeats",
                      flush=True)
    for rate, cpus in results.items():
        print(f"heartbeat every {rate} s: median {statistics.median(cpus):.3f} s "
              f"({min(cpus):.3f}-{max(cpus):.3f})")
        if rate is not None and None in results:
            diffs = sorted(round(a - b, 3) for a, b in zip(cpus, results[None], strict=True))
            print(f"  minus none, paired: median {statistics.median(diffs):+.3f} s {diffs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--rates", default="none,5",
                        help="comma-separated heartbeat periods in seconds, 'none' for none")
    args = parser.parse_args()
    chosen = [None if r == "none" else float(r) for r in args.rates.split(",")]
    asyncio.run(main(args.reps, chosen))
