"""What a thread instead of an event loop costs: the minimal client with ``websockets.sync``.

Same job and command line as ``bench/min_client.py`` (and ``bench/sdk_client.py``), but no
asyncio while streaming: the main thread sleeps with ``time.sleep`` and sends each 100 ms chunk
with the synchronous ``websockets`` client, whose own background thread reads the socket; a
second thread takes the messages and appends the final turns with fsync. On this VM a thread
waking from ``time.sleep`` costs a fraction of an asyncio loop pass, and this client shows what
that is worth per audio minute (docs/benchmarks.md, "Where the 0.5 x target stands").

Run:  .venv/bin/python bench/threaded_client.py --wav X.wav --out turns.jsonl \
          --token-url http://127.0.0.1:PORT/v3/token --api-host ws://127.0.0.1:PORT --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import httpx
from websockets.sync.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CHUNK_S, append_synced, client_args, is_final, mint_token, read_pcm


def read_turns(ws: ClientConnection, out_path: Path, written: list[int]) -> None:
    """Write every final formatted turn until ``Termination`` (runs in its own thread)."""
    with out_path.open("a", encoding="utf-8") as out:
        for message in ws:
            event = json.loads(message)
            if event.get("type") == "Termination":
                return
            if is_final(event):
                append_synced(out, str(message))
                written[0] += 1


def stream(args: argparse.Namespace) -> int:
    """One session over the whole file; returns the number of turns written."""
    pcm = read_pcm(args.wav)
    token = asyncio.run(mint_token(args.token_url, args.api_key))
    query = httpx.QueryParams(sample_rate=16000, encoding="pcm_s16le", format_turns="true",
                              token=token)
    written = [0]
    with connect(f"{args.api_host}/v3/ws?{query}", compression=None) as ws:
        ws.recv()                                                   # Begin
        reader = threading.Thread(target=read_turns, args=(ws, args.out, written))
        reader.start()
        start = time.monotonic()
        step = int(16000 * CHUNK_S) * 2
        for index, offset in enumerate(range(0, len(pcm), step)):
            time.sleep(max(0.0, start + (index + 1) * CHUNK_S - time.monotonic()))
            ws.send(pcm[offset : offset + step].ljust(step, b"\0"))
        ws.send(json.dumps({"type": "Terminate"}))
        reader.join()
    return written[0]


def main() -> None:
    args = client_args(__doc__)
    print(f"threaded_client: {stream(args)} turns", file=sys.stderr)


if __name__ == "__main__":
    main()
