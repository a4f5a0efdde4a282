"""The peer in the cloud benchmark: the official ``assemblyai`` SDK's asyncio client doing our job.

Streams a 16 kHz mono 16-bit WAV at real time in 100 ms chunks (chunk ``i`` is sent when it
would have been captured, ``(i + 1) x 100 ms`` after the start, as the daemon's file source
does) with ``AsyncStreamingClient``, and appends every final formatted turn to a JSONL file with
``fsync``, then sends ``Terminate`` and waits for ``Termination``. The session settings are the
daemon's defaults (model, ``format_turns``, turn thresholds). Written the way the SDK's docs
show it: a ``Turn`` handler, ``connect``, ``stream``, ``disconnect(terminate=True)``.

The SDK cannot mint a token from a ``ws://`` host (its token client always uses ``https://``),
so the token is minted here with ``httpx`` against ``--token-url``, as the daemon does.

Run:  .venv/bin/python bench/sdk_client.py --wav X.wav --out turns.jsonl \
          --token-url http://127.0.0.1:PORT/v3/token --api-host ws://127.0.0.1:PORT --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import IO

from assemblyai.streaming.v3 import (
    AsyncStreamingClient,
    StreamingClientOptions,
    StreamingError,
    StreamingEvents,
    StreamingParameters,
    TurnEvent,
)
from common import CHUNK_S, append_synced, client_args, mint_token, read_pcm


async def stream(args: argparse.Namespace) -> int:
    """Run one session over the whole file; returns the number of turns written."""
    pcm = read_pcm(args.wav)
    token = await mint_token(args.token_url, args.api_key)
    out: IO[str] = args.out.open("a", encoding="utf-8")
    written = 0

    def on_turn(_client: AsyncStreamingClient, event: TurnEvent) -> None:
        nonlocal written
        if event.end_of_turn and event.turn_is_formatted:
            append_synced(out, event.model_dump_json())
            written += 1

    def on_error(_client: AsyncStreamingClient, error: StreamingError) -> None:
        print(f"sdk_client: streaming error: {error}", file=sys.stderr)

    client = AsyncStreamingClient(StreamingClientOptions(api_host=args.api_host, token=token))
    client.on(StreamingEvents.Turn, on_turn)
    client.on(StreamingEvents.Error, on_error)
    await client.connect(StreamingParameters(
        sample_rate=16000, encoding="pcm_s16le", speech_model="universal-streaming-english",
        format_turns=True, end_of_turn_confidence_threshold=0.4, min_turn_silence=400,
        max_turn_silence=1280,
    ))
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = int(16000 * CHUNK_S) * 2
    for index, offset in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, start + (index + 1) * CHUNK_S - loop.time()))
        await client.stream(pcm[offset : offset + step].ljust(step, b"\0"))
    await client.disconnect(terminate=True)
    out.close()
    return written


def main() -> None:
    written = asyncio.run(stream(client_args(__doc__)))
    print(f"sdk_client: {written} turns", file=sys.stderr)


if __name__ == "__main__":
    main()
