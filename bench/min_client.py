"""The floor in the cloud benchmark: the smallest asyncio client that does the job.

Same job and command line as ``bench/sdk_client.py``: mint a token with ``httpx``, stream a
16 kHz mono 16-bit WAV at real time in 100 ms chunks (chunk ``i`` sent ``(i + 1) x 100 ms``
after the start) over one ``websockets`` connection without ``permessage-deflate``, append
every final formatted turn to a JSONL file with ``fsync``, then ``Terminate`` and wait for
``Termination``. No reconnects, no ledger, no validation, no logging, no sinks: whatever a real
client does beyond this costs more. Its steady CPU is the floor any Python asyncio client
sending 10 frames a second pays on the machine, and the daemon and the SDK are compared to it.

Run:  .venv/bin/python bench/min_client.py --wav X.wav --out turns.jsonl \
          --token-url http://127.0.0.1:PORT/v3/token --api-host ws://127.0.0.1:PORT --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CHUNK_S, append_synced, client_args, is_final, mint_token, read_pcm


async def read_turns(ws: ClientConnection, out_path: Path) -> int:
    """Write every final formatted turn until ``Termination``; returns how many."""
    written = 0
    with out_path.open("a", encoding="utf-8") as out:
        async for message in ws:
            event = json.loads(message)
            if event.get("type") == "Termination":
                break
            if is_final(event):
                append_synced(out, str(message))
                written += 1
    return written


async def stream(args: argparse.Namespace) -> int:
    """One session over the whole file; returns the number of turns written."""
    pcm = read_pcm(args.wav)
    token = await mint_token(args.token_url, args.api_key)
    query = httpx.QueryParams(sample_rate=16000, encoding="pcm_s16le", format_turns="true",
                              token=token)
    async with connect(f"{args.api_host}/v3/ws?{query}", compression=None) as ws:
        await ws.recv()                                             # Begin
        reader = asyncio.create_task(read_turns(ws, args.out))
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = int(16000 * CHUNK_S) * 2
        for index, offset in enumerate(range(0, len(pcm), step)):
            await asyncio.sleep(max(0.0, start + (index + 1) * CHUNK_S - loop.time()))
            await ws.send(pcm[offset : offset + step].ljust(step, b"\0"))
        await ws.send(json.dumps({"type": "Terminate"}))
        return await reader


def main() -> None:
    args = client_args(__doc__)
    written = asyncio.run(stream(args))
    print(f"min_client: {written} turns", file=sys.stderr)


if __name__ == "__main__":
    main()
