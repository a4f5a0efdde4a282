"""Two daemon trees streaming *at the same time* to one fake: a before/after with the host shared.

``bench/cloud.py`` alternates runs, so a change smaller than the host's drift between runs
(up to ~15 % here) cannot be seen. This starts the daemon from ``--base-tree`` and the daemon
from this tree together on the same 61.5 s WAV and fake (``bench/fake_server.py``), waits for
both, and compares each process's whole CPU (user + system, ``wait4``) pair by pair; the order
of the two spawns alternates. Start-up is the same code in both unless the change touches it.

Run:  git archive REV | tar -x -C /tmp/base && ln -s "$PWD/.venv" /tmp/base/.venv
      .venv/bin/python bench/together.py --base-tree /tmp/base --pairs 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cloud import LONG, FakeService, build_wav, command
from common import REPO, machine, now, revision, save


def run_pair(fake: FakeService, wav: Path, work: Path, base_tree: Path,
             base_first: bool) -> dict[str, float]:
    """Start both daemons, wait for both; CPU seconds of each."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for kind in (("base", "daemon") if base_first else ("daemon", "base")):
        out = work / kind
        out.mkdir(exist_ok=True)
        argv = command("daemon", out, fake, wav, out / "turns.jsonl")
        env = {**os.environ, "PYTHONPATH": str(base_tree)} if kind == "base" else None
        with (out / "daemon.log").open("w") as log:
            processes[kind] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log,
                                               cwd=REPO, env=env)
    cpu = {}
    for kind, process in processes.items():
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{kind} failed; see {work / kind / 'daemon.log'}")
        cpu[kind] = usage.ru_utime + usage.ru_stime
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-tree", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--name", default="together", help="bench/results/NAME.json")
    args = parser.parse_args()
    started = now()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="bench-together-") as tmp:
        work = Path(tmp)
        audio_s = build_wav(LONG, work / "long.wav")
        fake = FakeService(work)
        try:
            for index in range(args.pairs):
                pair = run_pair(fake, work / "long.wav", work, args.base_tree, index % 2 == 0)
                pairs.append(pair)
                print(index, {k: round(v, 3) for k, v in pair.items()}, flush=True)
        finally:
            fake.close()
    diffs = [p["daemon"] - p["base"] for p in pairs]
    result = {
        "date": started, "machine": machine(), "revision": revision(),
        "base_tree": str(args.base_tree), "audio_s": audio_s, "pairs": pairs,
        "median_cpu_s": {k: statistics.median(p[k] for p in pairs) for k in ("base", "daemon")},
        "median_difference_cpu_s": statistics.median(diffs),
        "command": f".venv/bin/python bench/together.py --base-tree {args.base_tree} "
                   f"--pairs {args.pairs}",
    }
    print(save(args.name, result))
    print(f"median difference (this tree - base): {statistics.median(diffs):+.3f} s CPU per "
          f"{audio_s:.1f} s run; differences {sorted(round(d, 3) for d in diffs)}")


if __name__ == "__main__":
    main()
