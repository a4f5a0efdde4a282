"""Cloud path side by side: ``transcribed run`` vs the official SDK's asyncio client.

A third client, ``bench/min_client.py`` (the smallest asyncio client that does the job), shows
the floor both sit on. All three stream the same WAV at real time in 100 ms chunks to the same
fake v3 service (running in its own process, ``bench/fake_server.py``, so its CPU is not
counted) and append every final turn to a JSONL file with fsync. Each run is a separate
process; its CPU time (user + system) and peak RSS come from ``wait4`` rusage. Runs alternate
daemon, SDK, minimal, daemon, SDK, minimal, for a long WAV (≥ 60 s) and a short one (the long
one's first sentence group). Per repetition:

* steady CPU per audio minute = (CPU long - CPU short) / (audio long - audio short) x 60,
* start-up CPU = CPU short - steady rate x audio short (the intercept),
* in-run steady CPU (a cross-check with less noise: no start-up or shut-down in it): the
  harness samples the child's thread CPU (``schedstat``, ns) every 0.2 s; the rate between
  5 s after the first audio frame and 2 s before the end of the audio, long runs only,
* start-up wall = process spawn → first audio frame at the fake,
* config loaded → first frame (daemon: its ``config.loaded`` log line's timestamp).

"Other load" is the CPU the rest of the machine used meanwhile (``/proc/stat`` busy time minus
the measured process and the fake), in cores.

Run:  .venv/bin/python bench/cloud.py [--reps 3]   (about 3.7 min per repetition)
      add ``--daemon-tree DIR --name NAME`` to measure the daemon from another source tree (a
      patched copy: it runs with ``PYTHONPATH=DIR``), results in ``bench/results/NAME.json``;
      ``--clients daemon,sdk,minimal,threaded`` picks the clients (``threaded``:
      ``bench/threaded_client.py``, the minimal client on threads instead of an event loop) and
      ``--long-only`` skips the short runs (then only the in-run steady CPU is computed);
      ``--clients base,daemon --base-tree DIR`` alternates the daemon from ``DIR`` (say
      ``git archive REV | tar -x -C DIR``) with this tree's: before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    busy_cpu_s,
    machine,
    now,
    process_cpu_s,
    revision,
    save,
    spread,
    task_cpu_s,
)

SPEECH = REPO / "tests" / "data" / "speech"
RATE = 16000
LONG = ["beckett.wav", "espeak-five-sentences.wav", "espeak-s1.wav", "espeak-s2.wav",
        "espeak-s3.wav", "espeak-s4.wav", "espeak-s5.wav"]
SHORT = LONG[:1]
PAUSE_S = 1.0
PY = str(REPO / ".venv" / "bin" / "python")
SAMPLE_S = 0.2          # in-run CPU sampling period
WINDOW_SKIP_S = 5.0     # the in-run window starts this long after the first audio frame…
WINDOW_END_S = 2.0      # …and ends this long before the audio does
TRANSCRIBED = str(REPO / ".venv" / "bin" / "transcribed")
CLIENTS = ("daemon", "sdk", "minimal")
DAEMONS = ("daemon", "base")  # "base": the daemon from --base-tree (a before/after comparison)
SCRIPTS = {"sdk": "sdk_client.py", "minimal": "min_client.py", "threaded": "threaded_client.py"}


def build_wav(names: list[str], path: Path) -> float:
    """Concatenate test speech with 1 s pauses into ``path``; returns its length in seconds."""
    parts = []
    for name in names:
        with wave.open(str(SPEECH / name)) as wav:
            parts.append(np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"))
        parts.append(np.zeros(int(PAUSE_S * RATE), dtype="<i2"))
    pcm = np.concatenate(parts)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm.tobytes())
    return len(pcm) / RATE


class FakeService:
    """``bench/fake_server.py`` as a child process."""

    def __init__(self, work: Path) -> None:
        self.events = work / "fake-events.jsonl"
        self.process = subprocess.Popen(
            [PY, str(REPO / "bench" / "fake_server.py"), "--events", str(self.events)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        assert self.process.stdout is not None
        self.info: dict[str, Any] = json.loads(self.process.stdout.readline())
        self.seen = 0

    def next_session(self, limit_s: float = 30.0) -> dict[str, Any]:
        """The summary of the next session to close (waits for the fake to write it)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            lines = self.events.read_text().splitlines() if self.events.exists() else []
            if len(lines) > self.seen:
                self.seen += 1
                summary: dict[str, Any] = json.loads(lines[self.seen - 1])
                return summary
            time.sleep(0.05)
        raise SystemExit("the fake service recorded no session")

    def close(self) -> None:
        """Stop the fake (closing its stdin ends it)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


def daemon_config(work: Path, fake: FakeService, wav: Path, out: Path,
                  chunk_ms: int | None = None) -> Path:
    """A config: file source, the fake, one fsyncing file sink, no live view."""
    info = fake.info
    chunk = f"chunk_ms = {chunk_ms}" if chunk_ms else ""
    text = f"""
[audio]
source = "file"
path = "{wav}"
{chunk}

[transcriber]
engine = "assemblyai"

[assemblyai]
api_key = "{info["api_key"]}"
streaming_url = "{info["streaming_url"]}"
token_url = "{info["token_url"]}"

[log]
format = "json"
level = "info"

[http]
enabled = false

[state]
dir = "{work / "state"}"

[sinks.journal]
type = "file"
path = "{out}"
fsync = true
"""
    path = work / "daemon.toml"
    path.write_text(text)
    return path


def command(kind: str, work: Path, fake: FakeService, wav: Path, out: Path,
            chunk_ms: int | None = None) -> list[str]:
    """The measured client's command line (``chunk_ms``: the daemon's, default 100)."""
    if kind in DAEMONS:
        return [TRANSCRIBED, "run", "--config",
                str(daemon_config(work, fake, wav, out, chunk_ms))]
    info = fake.info
    return [PY, str(REPO / "bench" / SCRIPTS[kind]), "--wav", str(wav), "--out", str(out),
            "--token-url", info["token_url"], "--api-host", info["api_host"],
            "--api-key", info["api_key"]]


def config_loaded_at(log: Path) -> float | None:
    """Unix time of the daemon's ``config.loaded`` log line."""
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "config.loaded":
            return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


class Samples:
    """A child's CPU over time (wall clock, thread CPU seconds), and its exit status and rusage."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []
        self.status = 0
        self.usage: Any = None

    def cpu_at(self, when: float) -> float | None:
        """The CPU used by ``when``, interpolated between the two samples around it."""
        for (t0, c0), (t1, c1) in zip(self.points, self.points[1:], strict=False):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c0
        return None

    def rate_per_min(self, start: float, end: float) -> float | None:
        """CPU seconds per minute between two wall-clock times (None outside the samples)."""
        a, b = self.cpu_at(start), self.cpu_at(end)
        return None if a is None or b is None or end <= start else (b - a) / (end - start) * 60


def sample_until_exit(pid: int) -> Samples:
    """Sample ``pid``'s thread CPU every ``SAMPLE_S`` until it exits; reap it."""
    samples = Samples()
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            samples.status, samples.usage = status, usage
            return samples
        cpu = task_cpu_s(pid)
        if cpu is not None:
            samples.points.append((time.time(), cpu))
        time.sleep(SAMPLE_S)


def run_once(kind: str, wav: Path, audio_s: float, fake: FakeService, work: Path,
             tree: Path | None = None, chunk_ms: int | None = None) -> dict[str, Any]:
    """One measured run of ``kind`` (one of ``CLIENTS``) over ``wav``."""
    out = work / f"{kind}-turns.jsonl"
    out.unlink(missing_ok=True)
    log = work / f"{kind}.log"
    argv = command(kind, work, fake, wav, out, chunk_ms if kind == "daemon" else None)
    fake_cpu, busy = process_cpu_s(fake.info["pid"]), busy_cpu_s()
    with log.open("w") as err:
        spawned, started = time.time(), time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(tree)} if tree and kind in DAEMONS else None
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                   env=env)
        samples = sample_until_exit(process.pid)
        status, usage = samples.status, samples.usage
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{kind} run failed (exit {code}); see {log}")
    ours = usage.ru_utime + usage.ru_stime
    session = fake.next_session()
    others = busy_cpu_s() - busy - ours - (process_cpu_s(fake.info["pid"]) - fake_cpu)
    turns = len(out.read_text().splitlines()) if out.exists() else 0
    first = session["first_frame_wall"]
    loaded = config_loaded_at(log) if kind in DAEMONS else None
    window = samples.rate_per_min(first + WINDOW_SKIP_S, first + audio_s - WINDOW_END_S) \
        if first and audio_s > 4 * WINDOW_SKIP_S else None
    return {
        "kind": kind, "audio_s": audio_s, "window_cpu_s_per_min": window, "cpu_s": ours,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall,
        "spawn_to_first_frame_s": first - spawned if first else None,
        "config_to_first_frame_s": first - loaded if first and loaded else None,
        "turns_written": turns, "finals_sent": session["finals"],
        "other_cores": max(0.0, others / wall),
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    return spread(values) if values else None


def summarise(runs: list[dict[str, Any]], short_s: float, long_s: float,
              clients: list[str]) -> dict[str, Any]:
    """Per client: steady CPU/min, start-up CPU and wall, peak RSS, with spreads."""
    out: dict[str, Any] = {}
    for kind in clients:
        longs = [r for r in runs if r["kind"] == kind and r["audio_s"] == long_s]
        shorts = [r for r in runs if r["kind"] == kind and r["audio_s"] == short_s]
        rates = [(a["cpu_s"] - b["cpu_s"]) / (long_s - short_s) * 60
                 for a, b in zip(longs, shorts, strict=True)] if shorts else []
        startup = [b["cpu_s"] - rate * short_s / 60 for b, rate in zip(shorts, rates, strict=True)]
        everything = longs + shorts
        windows = [r["window_cpu_s_per_min"] for r in longs if r.get("window_cpu_s_per_min")]
        out[kind] = {
            "steady_cpu_s_per_audio_min": _spread(rates),
            "window_cpu_s_per_min": _spread(windows),
            "startup_cpu_s": _spread(startup),
            "cpu_long_s": _spread([r["cpu_s"] for r in longs]),
            "cpu_short_s": _spread([r["cpu_s"] for r in shorts]),
            "spawn_to_first_frame_s": _spread([r["spawn_to_first_frame_s"] for r in everything]),
            "peak_rss_mb": _spread([r["peak_rss_mb"] for r in longs]),
            "turns_written_long": _spread([r["turns_written"] for r in longs]),
            "finals_sent_long": _spread([r["finals_sent"] for r in longs]),
        }
        if kind == "daemon":
            out[kind]["config_to_first_frame_s"] = _spread(
                [r["config_to_first_frame_s"] for r in everything])
    out["other_cores"] = spread([r["other_cores"] for r in runs])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the A B C block")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="comma-separated, from "
                             f"{', '.join((*CLIENTS, 'threaded', 'base'))}")
    parser.add_argument("--base-tree", type=Path,
                        help="client 'base': the daemon from this source tree (e.g. an older "
                             "commit's `git archive`), to compare before and after")
    parser.add_argument("--long-only", action="store_true",
                        help="skip the short runs (in-run steady CPU only)")
    parser.add_argument("--daemon-tree", type=Path, help="run the daemon from this source tree")
    parser.add_argument("--daemon-chunk-ms", type=int,
                        help="client 'daemon''s audio.chunk_ms (default 100, as the other "
                             "clients; 'base' keeps 100: one block compares both)")
    parser.add_argument("--name", default="cloud", help="results file bench/results/NAME.json")
    args = parser.parse_args()
    clients = args.clients.split(",")
    unknown = sorted(set(clients) - {*DAEMONS, *SCRIPTS})
    if unknown:
        parser.error(f"--clients: unknown {', '.join(unknown)}")
    if "base" in clients and args.base_tree is None:
        parser.error("--clients base needs --base-tree")
    with tempfile.TemporaryDirectory(prefix="bench-cloud-") as tmp:
        work = Path(tmp)
        long_s = build_wav(LONG, work / "long.wav")
        short_s = build_wav(SHORT, work / "short.wav")
        fake = FakeService(work)
        runs: list[dict[str, Any]] = []
        started = now()
        try:
            for rep in range(args.reps):
                lengths = [(work / "long.wav", long_s)]
                if not args.long_only:
                    lengths.append((work / "short.wav", short_s))
                for wav, audio_s in lengths:
                    for kind in clients:
                        tree = args.base_tree if kind == "base" else args.daemon_tree
                        run = run_once(kind, wav, audio_s, fake, work, tree,
                                       args.daemon_chunk_ms)
                        run["rep"] = rep
                        runs.append(run)
                        print(json.dumps(run), file=sys.stderr, flush=True)
        finally:
            fake.close()
    result = {"date": started, "finished": now(), "machine": machine(),
              "revision": revision()
              + (f", daemon from {args.daemon_tree}" if args.daemon_tree else "")
              + (f", base from {args.base_tree}" if "base" in clients else ""),
              "command": " ".join([".venv/bin/python bench/cloud.py", *sys.argv[1:]]),
              "long_audio_s": long_s, "short_audio_s": short_s,
              "summary": summarise(runs, short_s, long_s, clients), "runs": runs}
    print(save(args.name, result))


if __name__ == "__main__":
    main()
