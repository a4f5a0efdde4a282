"""Serve the fake AssemblyAI v3 service in its own process, so its CPU is not the client's.

Run:  .venv/bin/python bench/fake_server.py --events EVENTS.jsonl

Prints one JSON line on stdout once listening: ``{"token_url", "streaming_url", "api_host",
"api_key", "pid"}``, then serves until SIGTERM/SIGINT or stdin closes. Every session, once
closed, is appended to ``EVENTS`` as one JSON line: ``index``, ``first_frame_wall`` (Unix time
the first audio frame arrived), ``frames``, ``audio_ms``, ``finals`` (formatted end-of-turn
messages sent), ``close_code``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fake_assemblyai import FakeAssemblyAI, SessionRecord  # noqa: E402
from tests.fake_assemblyai_speech import load_speech_references  # noqa: E402

SPEECH = REPO / "tests" / "data" / "speech"


def session_summary(session: SessionRecord, wall_offset: float) -> dict[str, Any]:
    """What the bench needs to know about one finished session."""
    first = None
    if session.began_at is not None and session.frames:
        first = wall_offset + session.began_at + session.frames[0].at_s
    finals = sum(1 for m in session.sent
                 if isinstance(m, dict) and m.get("type") == "Turn" and m.get("end_of_turn")
                 and m.get("turn_is_formatted"))
    return {"index": session.index, "first_frame_wall": first, "frames": len(session.frames),
            "audio_ms": round(session.audio_ms), "finals": finals,
            "close_code": session.close_code}


async def record_sessions(fake: FakeAssemblyAI, events: Path, wall_offset: float) -> None:
    """Append each session's summary to ``events`` once it has closed."""
    index = 0
    while True:
        session = await fake.wait_for_session(index)
        await session.wait_closed()
        with events.open("a", encoding="utf-8") as out:
            out.write(json.dumps(session_summary(session, wall_offset)) + "\n")
        index += 1


async def serve(events: Path) -> None:
    """Serve until a signal arrives or stdin closes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(0, 4096) else None)
    async with FakeAssemblyAI(load_speech_references(SPEECH)) as fake:
        wall_offset = time.time() - loop.time()
        recorder = asyncio.create_task(record_sessions(fake, events, wall_offset))
        print(json.dumps({"token_url": fake.token_url, "streaming_url": fake.streaming_url,
                          "api_host": f"ws://127.0.0.1:{fake.port}", "api_key": fake.api_key,
                          "pid": os.getpid()}), flush=True)
        await stop.wait()
        recorder.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=Path, required=True, help="session summaries (JSONL)")
    args = parser.parse_args()
    asyncio.run(serve(args.events))


if __name__ == "__main__":
    main()
