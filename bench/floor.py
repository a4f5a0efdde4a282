"""The CPU floor of any client streaming 100 ms chunks, on this machine: event loop vs threads.

Minimal clients, each for ``--seconds`` of real time, CPU from ``getrusage`` (all threads), the
fake v3 service (``bench/fake_server.py``) in its own process:

1. a bare event loop that wakes every 100 ms and does nothing else;
2. the smallest asyncio streaming client: wake, ``ws.send`` 3.2 KB of PCM, and a reader that
   ``json.loads`` every message, without ``permessage-deflate``;
3. the same with ``permessage-deflate`` (the ``websockets`` default, which the SDK uses);
4. a bare thread that wakes every 100 ms (``time.sleep``) and does nothing else;
5. the smallest threaded client on ``websockets.sync`` (no compression);
6. the smallest threaded client there can be: the ``websockets`` sans-I/O protocol on a blocking
   socket, the sending thread writing each frame, one reader thread parsing every message;
7. a hybrid: an audio thread paces and writes each frame (as a PortAudio callback could), the
   event loop reads and parses every message (sans-I/O protocol, one socket, one lock);
8. the same hybrid doing the daemon's own core work: each chunk counted (``AudioMeter``), kept
   in the ``Ledger`` and the session's ``Timeline``; each message parsed by
   ``daemon.protocol.parse_message`` and fed to the ``TurnAssembler`` (finals built as records).
   What it leaves out (logging, sinks, the reporter, reconnects) only adds;
9. one thread, one wake-up per chunk: each 100 ms tick sends its frame, then reads whatever the
   service sent since (a non-blocking ``recv``): no wake-up for a reply at all;
10. the same doing the daemon's core work (as 8).

``--only 9,10`` runs just those rows (saved as ``floor-only``); ``--split`` times each part of a
row-9/10 tick with ``time.thread_time`` instead (saved as ``floor-split``).

Run:  .venv/bin/python bench/floor.py [--seconds 30] [--only N,M] [--split]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect as connect_sync
from websockets.uri import parse_uri

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cloud import LONG, FakeService, build_wav
from common import busy_cpu_s, machine, now, revision, save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.events import AudioChunk, TurnRecord  # noqa: E402
from daemon.ledger import Ledger, Piece, Timeline  # noqa: E402
from daemon.metrics import AudioMeter  # noqa: E402
from daemon.protocol import Turn, parse_message  # noqa: E402
from daemon.turns import TurnAssembler  # noqa: E402


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


def session_url(fake: FakeService) -> str:
    """A streaming URL with a fresh temporary token."""
    info = fake.info
    reply = httpx.get(info["token_url"], headers={"Authorization": info["api_key"]},
                      params={"expires_in_seconds": 60})
    return (f"{info['streaming_url']}?sample_rate=16000&encoding=pcm_s16le&format_turns=true"
            f"&token={reply.json()['token']}")


def paced_thread(chunks: int, each: Callable[[int], None] | None = None) -> float:
    """Like ``paced`` on a plain thread: ``time.sleep`` to each 100 ms tick."""
    start, before = time.monotonic(), cpu_s()
    for index in range(chunks):
        time.sleep(max(0.0, start + (index + 1) * 0.1 - time.monotonic()))
        if each is not None:
            each(index)
    return (cpu_s() - before) / (chunks / 600)


def threaded_sync(fake: FakeService, pcm: bytes, chunks: int) -> float:
    """The smallest client on ``websockets.sync`` (its own thread reads the socket)."""
    with connect_sync(session_url(fake), compression=None) as ws:
        ws.recv()                                               # Begin

        def read() -> None:
            for message in ws:
                json.loads(message)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        rate = paced_thread(chunks, lambda index: ws.send(pcm[index * 3200 : (index + 1) * 3200]))
    reader.join(5)
    return rate


class _SansIo:
    """One session by the ``websockets`` sans-I/O protocol on a plain socket, for two threads."""

    def __init__(self, fake: FakeService) -> None:
        uri = parse_uri(session_url(fake))
        self.protocol = ClientProtocol(uri)
        self.lock = threading.Lock()               # the protocol is shared by both sides
        self.sock = socket.create_connection((uri.host, uri.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_request()

    def send_request(self) -> None:
        with self.lock:
            self.protocol.send_request(self.protocol.connect())
            self._flush()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def texts(self, data: bytes) -> list[bytes]:
        """Take received bytes (``b""``: end of stream); the text messages they complete."""
        with self.lock:
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            events = self.protocol.events_received()
            self._flush()
        return [bytes(e.data) for e in events if isinstance(e, Frame) and e.opcode is Opcode.TEXT]

    def send(self, pcm: bytes) -> None:
        with self.lock:
            self.protocol.send_binary(pcm)
            self._flush()

    def send_close(self) -> None:
        with self.lock:
            self.protocol.send_close()
            self._flush()


def threaded_sans_io(fake: FakeService, pcm: bytes, chunks: int) -> float:
    """The smallest threaded client: sans-I/O ``websockets`` on a blocking socket."""
    session = _SansIo(fake)
    began = threading.Event()

    def read() -> None:
        while data := session.sock.recv(65536):
            for text in session.texts(data):
                json.loads(text)
                began.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    began.wait(5)
    rate = paced_thread(chunks, lambda index: session.send(pcm[index * 3200 : (index + 1) * 3200]))
    session.send_close()
    reader.join(5)                             # it ends with the service's close
    session.sock.close()
    return rate


class _CoreWork:
    """The daemon's own per-chunk and per-message work, shared by an audio thread and the loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()              # ledger and timeline: written by both sides
        self.ledger = Ledger(16000, 300.0)
        self.timeline = Timeline(16000)
        self.meter = AudioMeter()
        self.finals = 0
        self.assembler = TurnAssembler("bench", self.timeline, format_turns=True, source="file",
                                       host="bench", emit=self._emit, partial=lambda _p: None,
                                       cover=self._cover)
        self._origin = time.time()

    def _emit(self, record: TurnRecord) -> None:
        record.to_json()                          # as every sink gets it
        self.finals += 1

    def _cover(self, position: int) -> None:
        self.ledger.cover(position)               # called under ``lock`` (from ``message``)

    def chunk(self, index: int, pcm: bytes) -> Piece:
        """Count and keep one captured chunk; the piece the session sends."""
        chunk = AudioChunk(pcm, self._origin + index * 0.1)
        self.meter.count(chunk)
        with self.lock:
            piece = Piece(self.ledger.end, pcm, chunk.captured_at)
            self.ledger.append(chunk)
        return piece

    def sent(self, piece: Piece) -> None:
        with self.lock:
            self.timeline.add(piece)

    def message(self, frame: bytes) -> None:
        message = parse_message(frame.decode())
        if isinstance(message, Turn):
            with self.lock:
                self.assembler.handle(message)


async def hybrid(fake: FakeService, pcm: bytes, chunks: int, *, work: bool) -> float:
    """An audio thread sends, the event loop reads (``add_reader``); optionally our core work."""
    loop = asyncio.get_running_loop()
    session = _SansIo(fake)
    core = _CoreWork() if work else None
    while not session.texts(session.sock.recv(65536)):     # handshake and Begin, blocking
        pass

    def readable() -> None:
        data = session.sock.recv(65536)
        for text in session.texts(data):
            if core is None:
                json.loads(text)
            else:
                core.message(text)
        if not data:
            loop.remove_reader(session.sock.fileno())

    def send(index: int) -> None:
        frame = pcm[index * 3200 : (index + 1) * 3200]
        piece = core.chunk(index, frame) if core is not None else None
        session.send(frame)
        if core is not None and piece is not None:
            core.sent(piece)

    loop.add_reader(session.sock.fileno(), readable)
    before = cpu_s()
    await asyncio.to_thread(paced_thread, chunks, send)
    rate = (cpu_s() - before) / (chunks / 600)
    loop.remove_reader(session.sock.fileno())
    session.send_close()
    session.sock.close()
    return rate


class _Phases:
    """Thread CPU per phase of a tick (``time.thread_time``), to see where a wake-up's CPU goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = 0.0

    def start(self) -> None:
        self._mark = time.thread_time()

    def end(self, phase: str) -> None:
        now_ = time.thread_time()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now_ - self._mark
        self._mark = now_


class _Untimed(_Phases):
    """No timing: the rows' own figures carry no clock reads (each one a system call)."""

    def start(self) -> None:
        return None

    def end(self, phase: str) -> None:
        return None


def one_thread(fake: FakeService, pcm: bytes, chunks: int, *, work: bool,
               phases: _Phases | None = None) -> float:
    """One thread, one wake-up per chunk: send the chunk, then read what has arrived meanwhile.

    The socket is never waited on: each 100 ms tick sends its frame and takes the service's
    replies to earlier frames with a non-blocking ``recv`` (they wait up to one tick).
    ``phases``: also time each part of a tick (the timing itself adds a little).
    """
    session = _SansIo(fake)
    core = _CoreWork() if work else None
    clock = phases if phases is not None else _Untimed()
    while not session.texts(session.sock.recv(65536)):     # handshake and Begin, blocking
        pass
    session.sock.setblocking(False)

    def tick(index: int) -> None:
        clock.start()
        frame = pcm[index * 3200 : (index + 1) * 3200]
        piece = core.chunk(index, frame) if core is not None else None
        clock.end("ledger, timeline, meter")
        session.protocol.send_binary(frame)                 # as ``_SansIo.send``, in two parts
        outgoing = session.protocol.data_to_send()
        clock.end("frame (websockets: header, mask)")
        for data in outgoing:
            session.sock.sendall(data)
        clock.end("send (syscall)")
        if core is not None and piece is not None:
            core.sent(piece)
        clock.end("ledger, timeline, meter")
        while True:
            try:
                data = session.sock.recv(65536)
            except BlockingIOError:
                clock.end("receive (syscalls, websockets)")
                return
            texts = session.texts(data)
            clock.end("receive (syscalls, websockets)")
            for text in texts:
                if core is None:
                    json.loads(text)
                else:
                    core.message(text)
            clock.end("parse (+ turn assembly)")
            if not data:
                return

    rate = paced_thread(chunks, tick)
    session.sock.setblocking(True)
    session.send_close()
    session.sock.close()
    return rate


def split(fake: FakeService, pcm: bytes, chunks: int) -> dict[str, dict[str, float]]:
    """Where a one-thread tick's CPU goes, without and with the core work (s per audio min)."""
    result: dict[str, dict[str, float]] = {}
    for work in (False, True):
        phases = _Phases()
        total = one_thread(fake, pcm, chunks, work=work, phases=phases)
        shares = {name: seconds / (chunks / 600) for name, seconds in phases.seconds.items()}
        shares["the rest: the wake-up itself, pacing"] = total - sum(shares.values())
        result["with core work" if work else "without"] = {"total": total, **shares}
    return result


async def streaming(fake: FakeService, pcm: bytes, chunks: int,
                    compression: Literal["deflate"] | None) -> float:
    """The smallest asyncio streaming client; CPU s per audio minute."""
    url = session_url(fake)
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
    parser.add_argument("--only", default="", help="comma-separated row numbers (1-10) to run")
    parser.add_argument("--split", action="store_true",
                        help="instead: where a one-thread tick's CPU goes, phase by phase")
    args = parser.parse_args()
    chunks = int(args.seconds * 10)
    started = now()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        work = Path(tmp)
        build_wav(LONG, work / "long.wav")
        with wave.open(str(work / "long.wav")) as wav:
            pcm = wav.readframes(wav.getnframes())
        fake = FakeService(work)
        busy, wall = busy_cpu_s(), time.monotonic()
        try:
            rows: list[tuple[str, Callable[[], float]]] = [
                ("bare loop, 10 wakes/s", lambda: asyncio.run(paced(chunks))),
                ("minimal client, no compression",
                 lambda: asyncio.run(streaming(fake, pcm, chunks, None))),
                ("minimal client, permessage-deflate",
                 lambda: asyncio.run(streaming(fake, pcm, chunks, "deflate"))),
                ("bare thread, 10 wakes/s", lambda: paced_thread(chunks)),
                ("threaded client, websockets.sync", lambda: threaded_sync(fake, pcm, chunks)),
                ("threaded client, sans-I/O", lambda: threaded_sans_io(fake, pcm, chunks)),
                ("hybrid: audio thread sends, event loop reads",
                 lambda: asyncio.run(hybrid(fake, pcm, chunks, work=False))),
                ("hybrid + the daemon's ledger, timeline, parsing and turn assembly",
                 lambda: asyncio.run(hybrid(fake, pcm, chunks, work=True))),
                ("one thread, one wake-up per chunk: send, then read what has arrived",
                 lambda: one_thread(fake, pcm, chunks, work=False)),
                ("one thread, one wake-up per chunk + the daemon's core work",
                 lambda: one_thread(fake, pcm, chunks, work=True)),
            ]
            only = {int(n) for n in args.only.split(",") if n.strip()}
            result: dict[str, Any] = (
                split(fake, pcm, chunks) if args.split else
                {name: run() for number, (name, run) in enumerate(rows, 1)
                 if not only or number in only})
        finally:
            fake.close()
    name = "floor-split" if args.split else "floor-only" if args.only else "floor"
    print(save(name, {"date": started, "machine": machine(), "revision": revision(),
                      "seconds": args.seconds,
                      "machine_busy_cores": (busy_cpu_s() - busy) / (time.monotonic() - wall),
                      "command": f".venv/bin/python bench/floor.py --seconds {args.seconds:g}"
                                 + (f" --only {args.only}" if args.only else "")
                                 + (" --split" if args.split else ""),
                      "cpu_s_per_audio_min": result}))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
