"""Memory tracing for ``bench/soak.py --trace``: what grows inside a long-running daemon.

The harness puts a ``sitecustomize.py`` (the text below) on the daemon's ``PYTHONPATH``. It
starts ``tracemalloc`` (12 frames) as the interpreter starts and, on every SIGUSR1, dumps a
snapshot and appends one JSON line with the traced total and glibc's ``mallinfo2`` (the C heap:
what SQLite, OpenSSL and PortAudio allocate is there and not in tracemalloc). Comparing the
figures over hours splits RSS growth into Python objects, the C heap and the rest, and the
snapshots name the lines whose allocations grew.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

SITECUSTOMIZE = '''
import ctypes, json, os, signal, time, tracemalloc

tracemalloc.start(12)
_DIR = os.environ["SOAK_TRACE_DIR"]
_count = 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


try:
    _mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    _mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):
    _mallinfo2 = None


def _dump(signum, frame):
    global _count
    _count += 1
    current, peak = tracemalloc.get_traced_memory()
    line = {"n": _count, "time": time.time(), "traced": current, "traced_peak": peak,
            "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory()}
    if _mallinfo2 is not None:
        info = _mallinfo2()
        line.update({"malloc_in_use": info.uordblks, "malloc_free": info.fordblks,
                     "malloc_mmapped": info.hblkhd, "malloc_arena": info.arena})
    tracemalloc.take_snapshot().dump(os.path.join(_DIR, "snap-%03d.pickle" % _count))
    with open(os.path.join(_DIR, "memory.jsonl"), "a") as out:
        out.write(json.dumps(line) + "\\n")


signal.signal(signal.SIGUSR1, _dump)
'''


def prepare(folder: Path) -> dict[str, str]:
    """Write the hook into ``folder``; the environment variables that load it in the daemon."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(folder), "SOAK_TRACE_DIR": str(folder)}


def summarise(folder: Path, top: int = 15) -> dict[str, Any] | None:
    """The memory lines, and what grew between the first snapshot and the last."""
    lines_path = folder / "memory.jsonl"
    if not lines_path.exists():
        return None
    lines = [json.loads(line) for line in lines_path.read_text().splitlines() if line.strip()]
    snaps = sorted(folder.glob("snap-*.pickle"))
    result: dict[str, Any] = {"memory": lines}
    if len(snaps) >= 2:
        first, last = snaps[0], snaps[-1]
        old = tracemalloc.Snapshot.load(str(first))
        new = tracemalloc.Snapshot.load(str(last))
        noise = (tracemalloc.Filter(False, tracemalloc.__file__),)
        old, new = old.filter_traces(noise), new.filter_traces(noise)
        result["compared"] = [first.name, last.name]
        result["grew_by_line"] = [_stat(s) for s in new.compare_to(old, "lineno")[:top]]
        result["grew_by_traceback"] = [
            {**_stat(s), "traceback": [f"{f.filename}:{f.lineno}" for f in s.traceback]}
            for s in new.compare_to(old, "traceback")[:5]]
    return result


def _stat(stat: tracemalloc.StatisticDiff) -> dict[str, Any]:
    frame = stat.traceback[0]
    return {"where": f"{frame.filename}:{frame.lineno}", "size_diff": stat.size_diff,
            "count_diff": stat.count_diff, "size": stat.size}
