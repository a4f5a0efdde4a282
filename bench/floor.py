"""The CPU floor of any asyncio client streaming 100 ms chunks, on this machine.

Three minimal clients, each for ``--seconds`` of real time, CPU from ``getrusage``:

1. a bare event loop that wakes every 100 ms and does nothing else;
2. the smallest streaming client: wake, ``ws.send`` 3.2 KB of PCM to the fake v3 service
   (``bench/fake_server.py``, its own process), and a reader that ``json.loads`` every message,
   without ``permessage-deflate``;
3. the same with ``permessage-deflate`` (the ``websockets`` default, which the SDK uses).

Run:  .venv/bin/python bench/floor.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any, Literal

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cloud import LONG, FakeService, build_wav
from common import machine, now, save


def cpu_s() -> float:
    """This process's user + system CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def paced(chunks: int, each: Any = None) -> float:
    """Wake every 100 ms for ``chunks`` chunks (calling ``each(i)``); CPU s per audio minute."""
    loop = asyncio.get_running_loop()
    start, before = loop.time(), cpu_s()
    for index in range(chunks):
        await asyncio.sleep(max(0.0, start + (index + 1) * 0.1 - loop.time()))
        if each is not None:
            await each(index)
    return (cpu_s() - before) / (chunks / 600)


async def streaming(fake: FakeService, pcm: bytes, chunks: int,
                    compression: Literal["deflate"] | None) -> float:
    """The smallest streaming client; CPU s per audio minute."""
    info = fake.info
    async with httpx.AsyncClient() as http:
        reply = await http.get(info["token_url"], headers={"Authorization": info["api_key"]},
                               params={"expires_in_seconds": 60})
    url = (f"{info['streaming_url']}?sample_rate=16000&encoding=pcm_s16le&format_turns=true"
           f"&token={reply.json()['token']}")
    async with connect(url, compression=compression) as ws:
        await ws.recv()

        async def read() -> None:
            async for message in ws:
                json.loads(message)

        reader = asyncio.create_task(read())

        async def send(index: int) -> None:
            await ws.send(pcm[index * 3200 : (index + 1) * 3200])

        rate = await paced(chunks, send)
        reader.cancel()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    chunks = int(args.seconds * 10)
    started = now()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        work = Path(tmp)
        build_wav(LONG, work / "long.wav")
        with wave.open(str(work / "long.wav")) as wav:
            pcm = wav.readframes(wav.getnframes())
        fake = FakeService(work)
        try:
            result = {
                "bare loop, 10 wakes/s": asyncio.run(paced(chunks)),
                "minimal client, no compression": asyncio.run(
                    streaming(fake, pcm, chunks, None)),
                "minimal client, permessage-deflate": asyncio.run(
                    streaming(fake, pcm, chunks, "deflate")),
            }
        finally:
            fake.close()
    print(save("floor", {"date": started, "machine": machine(), "seconds": args.seconds,
                         "command": f".venv/bin/python bench/floor.py --seconds {args.seconds:g}",
                         "cpu_s_per_audio_min": result}))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
