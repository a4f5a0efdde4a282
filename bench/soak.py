"""A long run: the daemon on the virtual microphone for hours, with every sink, rollovers and drops.

Run:  .venv/bin/python bench/soak.py --minutes 120      (then bench/report.py renders it)

What runs, all on 127.0.0.1: a private PulseAudio whose default source is the virtual microphone
(``tests/vmic.py``), fed the benchmark WAV (all of ``tests/data/speech/``, 1 s pauses) over and
over at real time; the fake v3 service (``tests/fake_assemblyai.py``) with sessions capped at
``--session-s`` (so the daemon rolls over every few minutes) that also drops the live connection
every ``--drop-every-s`` (so it reconnects and replays); mosquitto with a QoS 1 subscriber; an
HTTP receiver for the webhook; and ``transcribed tail --json`` on the live view. The daemon is
``transcribed run`` with a file sink (fsync), an MQTT sink and a webhook sink, JSON logs at info.

Every ``--sample-s`` the harness reads the daemon's ``/proc`` (RSS, peak RSS, open file
descriptors, threads, CPU) and counts what each sink has delivered. At the end it stops the
daemon with SIGTERM and checks the exit code and that every sink got the same turns, once each.
Results: ``bench/results/soak.json`` (every sample, log events by name, the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import soak_trace  # noqa: E402
from cloud import LONG, build_wav  # noqa: E402
from common import busy_cpu_s, machine, now, process_cpu_s, revision, save  # noqa: E402

from tests.daemon_proc import fake_engine_tables  # noqa: E402
from tests.fake_assemblyai import FakeAssemblyAI, load_speech_references  # noqa: E402
from tests.http_receiver import HttpReceiver  # noqa: E402
from tests.mosquitto import Mosquitto, Subscriber, free_port  # noqa: E402
from tests.vmic import VirtualMic  # noqa: E402

SPEECH = REPO / "tests" / "data" / "speech"
TRANSCRIBED = str(REPO / ".venv" / "bin" / "transcribed")
TOPIC = "soak/turn"


def daemon_config(work: Path, fake: FakeAssemblyAI, broker: Mosquitto, hook_url: str,
                  http_port: int, session_s: int) -> Path:
    """Microphone → the fake (capped sessions) → file, MQTT and webhook sinks; live view on."""
    text = f"""
[audio]
source = "microphone"
{fake_engine_tables(fake, f"max_session_seconds = {session_s}")}
[log]
format = "json"
level = "info"

[http]
listen = "127.0.0.1:{http_port}"

[state]
dir = "{work / "state"}"

[sinks.journal]
type = "file"
path = "{work / "turns.jsonl"}"
fsync = true

[sinks.bus]
type = "mqtt"
host = "127.0.0.1"
port = {broker.port}
topic = "{TOPIC}"
qos = 1

[sinks.hook]
type = "webhook"
url = "{hook_url}/hook"
secret = "whsec_c29hay10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5"
"""
    path = work / "soak.toml"
    path.write_text(text)
    return path


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM (kB), threads and open file descriptors of a live process."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "hwm_kb": int(fields["VmHWM"].split()[0]),
            "anon_kb": int(fields["RssAnon"].split()[0]),
            "file_kb": int(fields["RssFile"].split()[0]),
            "threads": int(fields["Threads"]), "fds": fds}


def file_ids(path: Path) -> list[str]:
    """Turn ids in the file sink's JSONL."""
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def slope_mb_per_h(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, kB) points, in MB per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600 / 1024


class Soak:
    """The harness: starts everything, samples, stops, summarises."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.samples: list[dict[str, Any]] = []
        self.mqtt_ids: list[str] = []
        self.tail_restarts = 0
        self.drops = 0
        self.plays = 0
        self.revision = revision()              # the code the daemon runs: at its start
        self.started = now()
        self._mqtt_arrived = asyncio.Event()

    async def run(self) -> dict[str, Any]:
        args, work = self.args, self.work
        wav = work / "speech.wav"
        loop_s = build_wav(LONG, wav)
        with wave.open(str(wav)) as source:
            pcm = source.readframes(source.getnframes())
        refs = load_speech_references(SPEECH)
        with VirtualMic.running(work / "vmic") as mic, Mosquitto(work / "mqtt") as broker:
            async with FakeAssemblyAI(refs) as fake, HttpReceiver() as receiver, \
                    Subscriber(broker, TOPIC) as subscriber:
                config = daemon_config(work, fake, broker, receiver.url, free_port(),
                                       args.session_s)
                log_path = work / "daemon.log"
                env = mic.env()
                if args.trace:
                    env.update(soak_trace.prepare(work / "trace"))
                with log_path.open("wb") as log_file:
                    daemon = await asyncio.create_subprocess_exec(
                        TRANSCRIBED, "run", "--config", str(config), env=env,
                        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                        stderr=log_file)
                    started = time.monotonic()
                    busy0 = busy_cpu_s()
                    tasks = [asyncio.create_task(self._feed(mic, pcm)),
                             asyncio.create_task(self._collect(subscriber)),
                             asyncio.create_task(self._tail(config, fake)),
                             asyncio.create_task(self._drop(fake)),
                             asyncio.create_task(self._sample(daemon.pid, started, receiver))]
                    ended = asyncio.create_task(daemon.wait())
                    await asyncio.wait([ended], timeout=args.minutes * 60)
                    early_exit = ended.done()
                    final = proc_status(daemon.pid)
                    cpu_s = process_cpu_s(daemon.pid)
                    if not early_exit:
                        daemon.send_signal(signal.SIGTERM)
                    code = await asyncio.wait_for(ended, 60)
                    elapsed = time.monotonic() - started
                    busy = (busy_cpu_s() - busy0) / elapsed
                    await self._settle(receiver)
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                sessions = len(fake.sessions)
                audio_s = sum(s.audio_ms for s in fake.sessions) / 1000
        return self._summary(code, early_exit, elapsed, busy, cpu_s, final, loop_s, sessions,
                             audio_s, log_path, receiver)

    async def _feed(self, mic: VirtualMic, pcm: bytes) -> None:
        """Play the speech into the microphone, again and again."""
        while True:
            await mic.play_pcm(pcm)
            self.plays += 1

    async def _collect(self, subscriber: Subscriber) -> None:
        while True:
            message = await subscriber.messages.get()
            self.mqtt_ids.append(json.loads(bytes(message.payload))["id"])
            self._mqtt_arrived.set()

    async def _tail(self, config: Path, fake: FakeAssemblyAI) -> None:
        """``transcribed tail --json`` on the live view for the whole run (restarted if it ends)."""
        await fake.wait_for_session(0)
        with (self.work / "tail.jsonl").open("ab") as out:
            while True:
                process = await asyncio.create_subprocess_exec(
                    TRANSCRIBED, "tail", "--json", "--config", str(config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.DEVNULL)
                try:
                    await process.wait()
                finally:
                    if process.returncode is None:
                        process.terminate()
                        await process.wait()
                self.tail_restarts += 1
                await asyncio.sleep(1)          # the live view restarts with the daemon only

    async def _drop(self, fake: FakeAssemblyAI) -> None:
        """Drop the live session's TCP connection every ``--drop-every-s``."""
        if self.args.drop_every_s <= 0:
            return
        while True:
            await asyncio.sleep(self.args.drop_every_s)
            live = [s for s in fake.sessions if s.began_at is not None and not s.closed]
            if live:
                live[-1].abort()
                self.drops += 1

    async def _sample(self, pid: int, started: float, receiver: HttpReceiver) -> None:
        traced_at = time.monotonic()            # the first dump after --trace-every-s
        while True:
            status = proc_status(pid)
            if status is None:
                return
            if self.args.trace and time.monotonic() - traced_at >= self.args.trace_every_s:
                traced_at = time.monotonic()
                os.kill(pid, signal.SIGUSR1)    # after the reading: the dump allocates
            self.samples.append({
                "t_s": round(time.monotonic() - started, 1), **status,
                "cpu_s": round(process_cpu_s(pid), 2),
                "file": len(file_ids(self.work / "turns.jsonl")),
                "mqtt": len(self.mqtt_ids), "webhook": len(receiver.received),
            })
            await asyncio.sleep(self.args.sample_s)

    async def _settle(self, receiver: HttpReceiver) -> None:
        """After the daemon stopped: give MQTT deliveries in flight a moment to arrive."""
        want = len(file_ids(self.work / "turns.jsonl"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while len(self.mqtt_ids) < want:
                    self._mqtt_arrived.clear()
                    await self._mqtt_arrived.wait()

    def _summary(self, code: int, early_exit: bool, elapsed: float, busy: float, cpu_s: float,
                 final: dict[str, int] | None, loop_s: float, sessions: int, audio_s: float,
                 log_path: Path, receiver: HttpReceiver) -> dict[str, Any]:
        events: Counter[str] = Counter()
        levels: Counter[str] = Counter()
        problems: list[dict[str, Any]] = []
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                events["(not json)"] += 1
                continue
            events[str(entry.get("event"))] += 1
            levels[str(entry.get("level"))] += 1
            if entry.get("level") in ("warning", "error", "critical"):
                problems.append(entry)
        file_list = file_ids(self.work / "turns.jsonl")
        hook_list = [json.loads(r.body)["data"]["id"] for r in receiver.received
                     if r.status == 200]
        tail_ids = [e["id"] for e in map(json.loads, (self.work / "tail.jsonl").read_text()
                                         .splitlines()) if e.get("type") == "turn"] \
            if (self.work / "tail.jsonl").exists() else []
        warm = [s for s in self.samples if s["t_s"] >= 600] or self.samples
        half = self.samples[len(self.samples) // 2:]
        rss = [s["rss_kb"] for s in self.samples]
        return {
            "machine": machine(), "date": self.started, "finished": now(),
            "revision": self.revision,
            "command": f".venv/bin/python bench/soak.py --minutes {self.args.minutes:g} "
                       f"--session-s {self.args.session_s} --drop-every-s "
                       f"{self.args.drop_every_s:g}",
            "minutes": self.args.minutes, "session_s": self.args.session_s,
            "drop_every_s": self.args.drop_every_s, "sample_s": self.args.sample_s,
            "elapsed_s": round(elapsed, 1),
            "machine_busy_cores": round(busy, 2), "exit_code": code, "exited_early": early_exit,
            "speech_loop_s": round(loop_s, 1), "plays": self.plays, "drops": self.drops,
            "sessions": sessions, "audio_at_service_s": round(audio_s, 1),
            "cpu_s": round(cpu_s, 2),
            "cpu_s_per_audio_min": round(cpu_s / (elapsed / 60), 3) if elapsed else None,
            "rss_mb": {"first": rss[0] / 1024 if rss else None,
                       "after_10_min": warm[0]["rss_kb"] / 1024 if warm else None,
                       "last": final["rss_kb"] / 1024 if final else None,
                       "max": max(rss) / 1024 if rss else None,
                       "peak_hwm": final["hwm_kb"] / 1024 if final else None},
            "rss_slope_second_half_mb_per_h": slope_mb_per_h(
                [(s["t_s"], s["rss_kb"]) for s in half]),
            "fds": {"min": min(s["fds"] for s in warm), "max": max(s["fds"] for s in warm)}
            if warm else None,
            "threads": {"min": min(s["threads"] for s in warm),
                        "max": max(s["threads"] for s in warm)} if warm else None,
            "turns": {"file": len(file_list), "mqtt": len(self.mqtt_ids),
                      "webhook": len(hook_list), "tail": len(tail_ids)},
            "duplicates": {"file": len(file_list) - len(set(file_list)),
                           "mqtt": len(self.mqtt_ids) - len(set(self.mqtt_ids)),
                           "webhook": len(hook_list) - len(set(hook_list))},
            "same_turns_everywhere": set(file_list) == set(self.mqtt_ids) == set(hook_list),
            "tail_restarts": self.tail_restarts,
            "log_levels": dict(levels), "log_events": dict(events.most_common()),
            "problems": problems[:50],
            "trace": soak_trace.summarise(self.work / "trace") if self.args.trace else None,
            "samples": self.samples,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=120, help="how long to run")
    parser.add_argument("--session-s", type=int, default=300,
                        help="session cap asked for: the daemon rolls over before it")
    parser.add_argument("--drop-every-s", type=float, default=900,
                        help="drop the live connection this often (0: never)")
    parser.add_argument("--sample-s", type=float, default=30, help="sampling period")
    parser.add_argument("--work", type=Path, help="keep the run's files here (default: temp)")
    parser.add_argument("--name", default="soak", help="results file: bench/results/NAME.json")
    parser.add_argument("--trace", action="store_true",
                        help="trace the daemon's memory (tracemalloc, malloc statistics): "
                             "diagnosis only, it slows the daemon and adds to its RSS")
    parser.add_argument("--trace-every-s", type=float, default=600,
                        help="with --trace: dump a snapshot this often")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(Soak(args, work).run())
    out = save(args.name, result)
    brief = {k: v for k, v in result.items() if k not in ("samples", "log_events", "problems")}
    print(json.dumps(brief, indent=1))
    print(out)


if __name__ == "__main__":
    main()
