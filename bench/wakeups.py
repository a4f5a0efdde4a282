"""Event-loop passes per audio chunk: a client under ``strace``, its main thread's wake-ups counted.

On this VM each wake-up of a process costs far more CPU than the Python it runs (see
docs/benchmarks.md, "Profile and fixes"), so the number of event-loop passes per 100 ms chunk is
what the steady CPU follows. This runs one client (``daemon``, ``sdk`` or ``minimal``, as in
``bench/cloud.py``) on the first three test files (41 s) against the bench's fake v3 service,
traces the main thread's ``epoll_wait`` calls, keeps the middle 70 % of the run (steady state),
and splits it into *cycles*: a blocking wait (a timer or a socket wakes the loop) followed by
the non-blocking passes the loop makes before it blocks again. Cycles are grouped by what they
did: sent an audio frame (``send``), read a service message (``recv``), both, or neither.

Run:  .venv/bin/python bench/wakeups.py --client daemon   (needs strace; about 45 s)
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cloud import LONG, FakeService, build_wav, command
from common import REPO

TRACED = "epoll_wait,futex,sendto,recvfrom,getrandom,read,write"
BINARY = re.compile(r'^\d+, "\\(202|302)')   # a binary frame (0x82; 0xC2 when deflated)
TEXT = re.compile(r'^\d+, "\\(201|301)')     # a text frame from the service
CALL = re.compile(r"(\w+)\((.*)\)\s+=\s+(-?\w+)")


@dataclass
class Cycle:
    """One blocking wake-up of the loop and what followed it before the next."""

    passes: int = 0                     # non-blocking epoll_wait calls
    sent: bool = False
    received: bool = False
    other: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def kind(self) -> str:
        return "+".join(k for k, on in (("send", self.sent), ("recv", self.received)) if on) \
            or "none"


def main_thread_calls(lines: list[str]) -> list[str]:
    """The main thread's syscalls, ``<unfinished ...>``/``resumed`` pairs joined."""
    pid = collections.Counter(line.split()[0] for line in lines if "epoll_wait" in line)
    main = pid.most_common(1)[0][0]
    calls, pending = [], {}
    for line in lines:
        if not line.startswith(main + " "):
            continue
        body = line.split(None, 1)[1]
        if "<unfinished" in body:
            pending[body.split("(")[0]] = body.split("<unfinished")[0]
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)", body)
        if resumed:
            body = pending.pop(resumed.group(1), resumed.group(1) + "(") + resumed.group(2)
        calls.append(body)
    return calls


def cycles(calls: list[str]) -> list[Cycle]:
    """Split steady-state calls (the middle 70 %) into wake-up cycles."""
    steady = calls[int(len(calls) * 0.15): int(len(calls) * 0.85)]
    found: list[Cycle] = []
    current: Cycle | None = None
    for call in steady:
        match = CALL.match(call)
        if match is None:
            continue
        name, args, _ = match.groups()
        if name == "epoll_wait":
            if args.rsplit(",", 1)[-1].strip() != "0":      # a blocking wait: a new cycle
                if current is not None:
                    found.append(current)
                current = Cycle()
            elif current is not None:
                current.passes += 1
        elif current is not None:
            if name == "sendto" and BINARY.search(args):
                current.sent = True
            elif name == "recvfrom" and TEXT.search(args):
                current.received = True
            else:
                current.other[name] += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", default="daemon", choices=("daemon", "sdk", "minimal"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-wakeups-") as tmp:
        work = Path(tmp)
        audio_s = build_wav(LONG[:3], work / "audio.wav")
        fake = FakeService(work)
        try:
            trace = work / "trace"
            argv = command(args.client, work, fake, work / "audio.wav", work / "out.jsonl")
            subprocess.run(["strace", "-f", "-o", str(trace), "-e", f"trace={TRACED}", *argv],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                           check=True)
            found = cycles(main_thread_calls(trace.read_text().splitlines()))
        finally:
            fake.close()
    chunks = len([c for c in found if c.sent])
    print(f"{args.client}: {audio_s:.1f} s of audio; steady state: {len(found)} wake-ups, "
          f"{chunks} frames sent")
    groups: dict[str, list[Cycle]] = collections.defaultdict(list)
    for cycle in found:
        groups[cycle.kind].append(cycle)
    print("| cycle | count | non-blocking passes per cycle | other calls per cycle |")
    print("| --- | --- | --- | --- |")
    for kind, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        other: collections.Counter[str] = collections.Counter()
        for cycle in members:
            other.update(cycle.other)
        extra = ", ".join(f"{name} {count / len(members):.2f}"
                          for name, count in sorted(other.items()))
        print(f"| {kind} | {len(members)} | "
              f"{sum(c.passes for c in members) / len(members):.2f} | {extra or '-'} |")
    total = sum(c.passes for c in found) + len(found)
    print(f"epoll_wait calls per frame sent: {total / max(1, chunks):.2f}")


if __name__ == "__main__":
    main()
