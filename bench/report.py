"""Render ``bench/results/*.json`` into ``docs/benchmarks.md``.

Replaces (or adds, before ``## Local engine``) the sections this suite owns, and keeps the index
at the top. Sections written by other benchmarks (``## Local engine``, ``## Lossless sessions``)
and hand-written ones (``## Profile and fixes``) are left as they are.

Run:  .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS

DOCS = REPO / "docs" / "benchmarks.md"
CLOUD = "## Cloud path: transcribed vs the official SDK"
SINKS = "## Turn → sink latency"
STARTUP = "## Start-up"
FLOOR = "## The floor: event loop vs threads"
SOAK = "## Long run"
INDEX = """\
All figures come from `bench/run_all.sh` (one command: runs every benchmark below and rewrites
the generated sections of this file; about 15 minutes). Each section names its machine, command
and date, and how busy the rest of the machine was (it is shared with other sessions' test
suites, so expect some spread).

- [Cloud path: transcribed vs the official SDK](#cloud-path-transcribed-vs-the-official-sdk)
- [Turn → sink latency](#turn--sink-latency)
- [Start-up](#start-up)
- [The floor: event loop vs threads](#the-floor-event-loop-vs-threads)
- [Long run](#long-run) (`bench/soak.py`, not part of `run_all.sh`: it takes hours)
- [Profile and fixes](#profile-and-fixes)
- [Lossless sessions](#lossless-sessions) (`bench/lossless.py`)
- [Local engine](#local-engine) (`bench/local_engine.py`)
"""


def load(name: str) -> dict[str, Any] | None:
    """A result file, if that benchmark has been run."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdict(value: float, limit: float) -> str:
    """``pass``, or ``missed: N x the limit``."""
    if value <= limit:
        return "pass"
    return f"**missed**: {value / limit:.2f} x the limit"


def rng(stats: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    """``median (min-max)``."""
    return (f"{stats['median'] * scale:{fmt}} ({stats['min'] * scale:{fmt}}-"
            f"{stats['max'] * scale:{fmt}})")


def _cells(stats: list[dict[str, Any]], key: str, fmt: str, unit: str,
           scale: float = 1.0) -> str:
    """One table row's client cells: ``median (min-max) unit`` per client, ``-`` if absent."""
    return " | ".join(f"{rng(c[key], fmt, scale)} {unit}" if c.get(key) else "-"
                      for c in stats)


def cloud_section(data: dict[str, Any]) -> str:
    s = data["summary"]
    d, k = s["daemon"], s["sdk"]
    m = s.get("minimal")
    clients = [d, k] + ([m] if m else [])
    d_rate = d["steady_cpu_s_per_audio_min"]["median"]
    k_rate = k["steady_cpu_s_per_audio_min"]["median"]
    d_win, k_win = (d.get("window_cpu_s_per_min") or {}), (k.get("window_cpu_s_per_min") or {})
    d_rss, k_rss = d["peak_rss_mb"]["median"], k["peak_rss_mb"]["median"]
    reps = d["cpu_long_s"]["n"]
    head = "| measure | transcribed | SDK |" + (" minimal client |" if m else "") + " target | |"
    rule = "| --- | --- | --- |" + (" --- |" if m else "") + " --- | --- |"
    gap = " |" if m else ""

    def row(label: str, key: str, fmt: str, unit: str, target: str = "", mark: str = "",
            scale: float = 1.0) -> str:
        return f"| {label} | {_cells(clients, key, fmt, unit, scale)} | {target} | {mark} |"

    def ratio(label: str, ours: float, peer: float, target: str, mark: str) -> str:
        return f"| {label} | {ours / peer:.2f} | |{gap} {target} | {mark} |"

    lines = [
        CLOUD, "",
        f"Machine: {data['machine']}. Date: {data['date']} - {data['finished']}. "
        f"Code: {data.get('revision', '?')}.",
        f"Command: `{data['command']}`. Other load on the machine while measuring: "
        f"{rng(s['other_cores'], '.2f')} cores (median, min-max over the runs).", "",
        f"Same job for every client: a {data['long_audio_s']:.1f} s WAV (all of "
        "`tests/data/speech/`, 1 s pauses between files) streamed at real time in 100 ms chunks "
        "to the fake v3 service (`bench/fake_server.py`, its own process), every final turn "
        "appended to a JSONL file with fsync, then `Terminate` → `Termination`. "
        "**transcribed**: `transcribed run` (file source, `assemblyai` engine, one `file` sink "
        "with `fsync = true`, live view off, JSON logs at info). **SDK**: "
        "`bench/sdk_client.py`, `assemblyai` 1.8.2 `AsyncStreamingClient` with the same session "
        "settings. **minimal client**: `bench/min_client.py`, the smallest asyncio client that "
        "does the job (one `websockets` connection without compression, `json.loads` per "
        "message, no reconnects, validation, logging or sinks): the floor any Python asyncio "
        "client sending 10 frames a second pays here. Each run is its own process; CPU (user + "
        "system) and peak RSS come from `wait4` rusage. Runs alternate transcribed, SDK, "
        f"minimal, transcribed, ...; {reps} repetitions of a long run and a short run "
        f"({data['short_audio_s']:.1f} s: the first file). Steady CPU per audio minute = (CPU "
        "long - CPU short) / (audio long - audio short) x 60 (the issue's method); start-up "
        "CPU = CPU short - steady rate x audio short. In-run steady CPU is a cross-check with "
        "far less noise: the harness samples the process's thread CPU (`schedstat`, ns) every "
        "0.2 s and takes the rate from 5 s after the first audio frame to 2 s before the end "
        "of the audio (long runs), so no start-up or shut-down is in it. Figures are median "
        "(min-max).", "",
        head, rule,
        row("steady CPU per audio minute (long - short)", "steady_cpu_s_per_audio_min", ".3f",
            "s", "≤ 0.6 s", verdict(d_rate, 0.6)),
        ratio("steady CPU, transcribed / SDK (long - short)", d_rate, k_rate, "≤ 0.5",
              verdict(d_rate / k_rate, 0.5)),
    ]
    if d_win and k_win:
        lines += [
            row("steady CPU per audio minute (in-run)", "window_cpu_s_per_min", ".3f", "s",
                "≤ 0.6 s", verdict(d_win["median"], 0.6)),
            ratio("steady CPU, transcribed / SDK (in-run)", d_win["median"], k_win["median"],
                  "≤ 0.5", verdict(d_win["median"] / k_win["median"], 0.5)),
        ]
        m_win = (m or {}).get("window_cpu_s_per_min")
        if m_win:
            lines.append(ratio("steady CPU, minimal client / SDK (in-run): the floor",
                               m_win["median"], k_win["median"], "", ""))
    lines += [
        row("start-up CPU (intercept)", "startup_cpu_s", ".2f", "s"),
        row("start-up wall: spawn → first audio frame at the service",
            "spawn_to_first_frame_s", ".0f", "ms", scale=1000),
        row("config loaded → first audio frame at the service", "config_to_first_frame_s",
            ".0f", "ms", scale=1000),
        row("peak RSS (long run)", "peak_rss_mb", ".1f", "MB", "≤ SDK", verdict(d_rss, k_rss)),
        row("CPU, whole long run", "cpu_long_s", ".2f", "s"),
        row("CPU, whole short run", "cpu_short_s", ".2f", "s"),
        "| turns written (long run) / finals the service sent | " + " | ".join(
            f"{c['turns_written_long']['median']:.0f} / {c['finals_sent_long']['median']:.0f}"
            for c in clients) + " | equal | |", "",
        "The fake recognises each reference sentence once per session, so the five single "
        "sentences repeated at the end of the WAV give no new turns: 9 turns for every client.",
        "",
        "Every run (`bench/results/cloud.json` has all fields):", "",
        "| rep | client | audio | CPU | in-run steady CPU | peak RSS | spawn → first frame "
        "| other load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"daemon": "transcribed", "sdk": "SDK", "minimal": "minimal client"}
    for run in data["runs"]:
        window = run.get("window_cpu_s_per_min")
        lines.append(f"| {run['rep'] + 1} | {names[run['kind']]} | {run['audio_s']:.1f} s | "
                     f"{run['cpu_s']:.2f} s | "
                     f"{f'{window:.3f} s/min' if window else '-'} | "
                     f"{run['peak_rss_mb']:.1f} MB | "
                     f"{run['spawn_to_first_frame_s'] * 1000:.0f} ms | "
                     f"{run['other_cores']:.2f} cores |")
    return "\n".join(lines) + "\n"


def sinks_section(data: dict[str, Any]) -> str:
    lines = [
        SINKS, "",
        f"Machine: {data['machine']}. Date: {data['date']}. Code: {data.get('revision', '?')}. "
        f"Command: `{data['command']}`.", "",
        "What is measured: in one process, the daemon's real `Dispatcher`, queues (in memory "
        "for `file`; the SQLite outbox for `mqtt` and `webhook`, built by `SinkBuilder` as the "
        "daemon builds them) and built-in sinks, against a real mosquitto on 127.0.0.1 and an "
        "HTTP receiver in another process (answers 204, keep-alive). The clock starts when the "
        "session has read the turn's final `Turn` frame (its text, as `websockets` hands it "
        "over; the unformatted final came just before it) and stops when the dispatcher's worker "
        "acknowledges the delivery to the queue, i.e. `send` has returned: line written and "
        "fsynced (file), PUBACK received (MQTT QoS 1), 2xx received (webhook). In between, what "
        "the daemon does with a frame: the real `parse_message`, the session's `TurnAssembler` "
        "(its `Timeline` gives the words wall-clock times; the final covers the turn's audio in "
        "a real `Ledger`), the daemon's `Listener` (logs `turn.completed` as JSON, to a file "
        "here, and calls `Dispatcher.dispatch`), for the durable sinks the outbox insert "
        "(`synchronous=FULL`), and the sink. Turns go one at a time (next one "
        f"{data['gap_ms']:.0f} ms after the previous acknowledgement), {data['turns']} per "
        "sink after 20 warm-up turns, each after 4 s of audio in 100 ms chunks; the record is a "
        "12-word turn (~1 KB of JSON). The column 'from dispatch' starts the clock at "
        "`Dispatcher.dispatch(record)` instead, as this table did until 2026-11-26.", "",
        "| sink | p50 | p90 | p99 | max | from dispatch, p99 | + outbox delete, p99 | "
        "target p99 | | machine busy (incl. this) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in data["sinks"].items():
        limit = 5.0 if name.startswith("file") else 20.0
        lines.append(
            f"| {name} | {r['p50_ms']:.2f} ms | {r['p90_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
            f"{r['max_ms']:.1f} ms | {_dispatch_p99(r)} | {r['removed_p99_ms']:.2f} ms | "
            f"≤ {limit:.0f} ms | "
            f"{verdict(r['p99_ms'], limit)} | {r['machine_busy_cores']:.2f} cores |")
    return "\n".join(lines) + "\n"


def _dispatch_p99(result: dict[str, Any]) -> str:
    """The p99 from ``Dispatcher.dispatch``; results before it was measured have none."""
    value = result.get("dispatch_p99_ms")
    return "-" if value is None else f"{value:.2f} ms"


def startup_section(data: dict[str, Any], cloud: dict[str, Any] | None) -> str:
    lines = [
        STARTUP, "",
        f"Machine: {data['machine']}. Date: {data['date']}. Code: {data.get('revision', '?')}. "
        f"Command: `{data['command']}` "
        f"(timed with {data['tool']}; 3 warm-up runs, page cache warm).", "",
        "| command | median | min | p90 | max | target | | machine busy (incl. this) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in data["results"].items():
        target, result = ("≤ 150 ms", verdict(r["median_ms"], 150.0)) \
            if label.startswith("transcribed") else ("", "")
        lines.append(f"| `{r['command']}` | {r['median_ms']:.1f} ms | {r['min_ms']:.1f} ms | "
                     f"{r['p90_ms']:.1f} ms | {r['max_ms']:.1f} ms | {target} | {result} | "
                     f"{r['machine_busy_cores']:.2f} cores |")
    if cloud is not None:
        d = cloud["summary"]["daemon"]
        lines += ["", "Config loaded → first audio chunk received by the service (from the "
                  "daemon's `config.loaded` log timestamp to the fake's first binary frame, "
                  "same clock, all cloud runs above): "
                  f"{rng(d['config_to_first_frame_s'], '.0f', 1000)} ms; the first 100 ms of "
                  "that is the chunk itself being 'captured' (the file source paces like a "
                  "microphone). Process spawn → first frame: "
                  f"{rng(d['spawn_to_first_frame_s'], '.0f', 1000)} ms (SDK script: "
                  f"{rng(cloud['summary']['sdk']['spawn_to_first_frame_s'], '.0f', 1000)} ms)."]
    return "\n".join(lines) + "\n"


def floor_section(data: dict[str, Any], cloud: dict[str, Any] | None) -> str:
    sdk = cloud["summary"]["sdk"].get("window_cpu_s_per_min") if cloud else None
    lines = [
        FLOOR, "",
        f"Machine: {data['machine']}. Date: {data['date']}. Code: {data.get('revision', '?')}. "
        f"Command: `{data['command']}`. Machine busy (this, the fake and everything else): "
        f"{data.get('machine_busy_cores', float('nan')):.2f} cores.", "",
        "The cheapest possible client of each kind, in one process for "
        f"{data['seconds']:g} s of real time each, one after another, streaming 100 ms "
        "chunks of the same WAV to the fake v3 service in its own process (CPU of all the "
        "process's threads, `getrusage`, while streaming only). Each row is a lower bound for "
        "a daemon built that way, before any work of its own (ledger, reconnects, turn "
        "assembly, sinks, logging): compare it with the steady CPU target of 0.5 x the SDK. "
        "The rows '+ the daemon's ... work' are the exception: the hybrid (an audio thread "
        "sends, the event loop reads) and the one-thread client (one wake-up per chunk: it "
        "sends, then reads what has arrived without waiting) doing the daemon's own core work, "
        "the real `AudioMeter`, `Ledger`, `Timeline`, `parse_message` and `TurnAssembler`, "
        "still without logging, sinks or reconnects. "
        "The SDK's figure is the in-run median of the cloud table above (another block of "
        "runs: figures move by up to ~15 % between blocks here).", "",
        "| client | CPU per audio minute | / SDK (in-run, cloud table) |",
        "| --- | --- | --- |",
    ]
    for label, value in data["cpu_s_per_audio_min"].items():
        share = f"{value / sdk['median']:.2f}" if sdk else "-"
        lines.append(f"| {label} | {value:.3f} s | {share} |")
    return "\n".join(lines) + "\n"


def soak_section(data: dict[str, Any]) -> str:
    """The long run: stability over hours (memory, descriptors, delivery), not speed."""
    rss, turns, dups = data["rss_mb"], data["turns"], data["duplicates"]
    slope = data["rss_slope_second_half_mb_per_h"]
    problems = Counter(f"{p.get('level')} `{p.get('event')}`" for p in data["problems"])
    lines = [
        SOAK, "",
        f"Machine: {data['machine']}. Date: {data['date']} - {data.get('finished', '?')}. "
        f"Code: {data.get('revision', '?')}. "
        f"Command: `{data['command']}`. Machine busy (everything, this run included): "
        f"{data['machine_busy_cores']:.2f} cores.", "",
        "The daemon as a user runs it, for hours: `transcribed run` on the *microphone* (a "
        "private PulseAudio whose default source is the virtual microphone of `tests/vmic.py`, "
        f"fed the {data['speech_loop_s']:g} s benchmark WAV over and over at real time), "
        "streaming to the fake v3 service with sessions capped at "
        f"{data['session_s']} s (so it rolls over every few minutes), which also drops the live "
        f"connection every {data['drop_every_s']:g} s (so it reconnects and replays from the "
        "ledger); a file sink (fsync), an MQTT sink (mosquitto, a QoS 1 subscriber counting) and "
        "a webhook sink (an HTTP receiver), the live view on with `transcribed tail --json` "
        f"following it, JSON logs at info. Every {data.get('sample_s', 30):g} s the harness "
        "reads the daemon's `/proc`; at the end it stops the daemon with SIGTERM. Raw "
        "samples: `bench/results/soak.json`. Its RSS is above the cloud table's (one file sink, a "
        "WAV) because it carries more: PortAudio with the ALSA plugins it loads to list devices, "
        "the MQTT and webhook clients, the outbox and the live view.", "",
        "| measure | result |",
        "| --- | --- |",
        f"| run | {data['elapsed_s'] / 60:.1f} min, exit code {data['exit_code']}"
        f"{' (exited early)' if data['exited_early'] else ''} |",
        f"| sessions opened (rollovers + reconnects) / connections dropped by the service | "
        f"{data['sessions']} / {data['drops']} |",
        f"| audio received by the service | {data['audio_at_service_s'] / 60:.1f} min |",
        f"| turns delivered: file / MQTT / webhook / live view | {turns['file']} / "
        f"{turns['mqtt']} / {turns['webhook']} / {turns['tail']} |",
        f"| duplicates: file / MQTT / webhook | {dups['file']} / {dups['mqtt']} / "
        f"{dups['webhook']} |",
        f"| the same turns in every sink | {'yes' if data['same_turns_everywhere'] else 'no'} |",
        f"| RSS after 10 min / at the end / highest sample | {rss['after_10_min']:.1f} / "
        f"{rss['last']:.1f} / {rss['max']:.1f} MB |",
        "| RSS trend over the second half (least squares) | "
        + (f"{slope:+.2f} MB per hour |" if slope is not None else "- |"),
        f"| open file descriptors, threads (min-max after 10 min) | {data['fds']['min']}-"
        f"{data['fds']['max']}, {data['threads']['min']}-{data['threads']['max']} |",
        f"| CPU, whole run (capture, three sinks, live view, start-up) | {data['cpu_s']:.1f} s "
        f"({data['cpu_s_per_audio_min']:.3f} s per minute) |",
        "| log lines by level | " + ", ".join(f"{k} {v}" for k, v in
                                              sorted(data["log_levels"].items())) + " |",
        "| warnings and errors | " + (", ".join(f"{k} x {v}" for k, v in problems.items())
                                      or "none") + " |",
        "", "Every 10 minutes:", "",
        "| minute | RSS | fds | threads | CPU so far | turns (file) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    step = 600.0
    mark = 0.0
    for sample in data["samples"]:
        if sample["t_s"] >= mark:
            lines.append(f"| {sample['t_s'] / 60:.0f} | {sample['rss_kb'] / 1024:.1f} MB | "
                         f"{sample['fds']} | {sample['threads']} | {sample['cpu_s']:.1f} s | "
                         f"{sample['file']} |")
            mark += step
    return "\n".join(lines) + "\n"


def put_section(text: str, heading: str, body: str) -> str:
    """Replace the section under ``heading`` or insert it before ``## Local engine``."""
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: body + "\n", text, count=1)
    anchor = re.search(r"^## (Profile and fixes|Local engine|Lossless sessions)", text, re.M)
    if anchor is None:
        return text.rstrip("\n") + "\n\n" + body
    return text[: anchor.start()] + body + "\n" + text[anchor.start():]


def put_index(text: str) -> str:
    """The title and the index, before the first section."""
    first = re.search(r"^## ", text, re.M)
    rest = text[first.start():] if first else ""
    return "# Benchmarks\n\n" + INDEX + "\n" + rest


def main() -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    cloud, sinks, startup = load("cloud"), load("sinks"), load("startup")
    if cloud is not None:
        text = put_section(text, CLOUD, cloud_section(cloud))
    if sinks is not None:
        text = put_section(text, SINKS, sinks_section(sinks))
    if startup is not None:
        text = put_section(text, STARTUP, startup_section(startup, cloud))
    floor = load("floor")
    if floor is not None:
        text = put_section(text, FLOOR, floor_section(floor, cloud))
    soak = load("soak")
    if soak is not None:
        text = put_section(text, SOAK, soak_section(soak))
    DOCS.write_text(put_index(text).rstrip("\n") + "\n")
    print(DOCS)


if __name__ == "__main__":
    main()
