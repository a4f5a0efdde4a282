"""Peers that stop answering without closing anything, and a daemon that is itself frozen.

A frozen process is played by ``SIGSTOP`` and woken by ``SIGCONT`` (a laptop's suspend, a
hung broker or receiver): its sockets stay open and the kernel goes on accepting bytes for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from daemon import capture
from daemon.audio import MicrophoneSource
from daemon.capture import CaptureBridge
from daemon.dispatch import Dispatcher
from daemon.outbox import Outbox
from daemon.pcm import PcmFormat
from daemon.plugins import SinkContext
from daemon.queues import MemoryQueue
from daemon.runner import SinkRunner
from plugins.file import FileSink, FileSinkConfig
from plugins.file import transcribed_sink_types as file_types
from plugins.mqtt import MqttConfig, MqttSink
from plugins.mqtt import transcribed_sink_types as mqtt_types
from plugins.webhook import WebhookConfig, WebhookSink
from plugins.webhook import transcribed_sink_types as webhook_types
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI, SessionRecord
from tests.fake_assemblyai_speech import load_speech_references
from tests.mosquitto import Mosquitto, Subscriber
from tests.sink_watch import Watched
from tests.test_lossless import _silence, _write, delivered, samples, words
from tests.test_mqtt import LogWatch
from tests.test_outbox import make_turn
from tests.vmic import VirtualMic

S1 = "espeak-s1.wav"

# A webhook receiver in a process of its own (it is frozen): prints its port, then the
# webhook-id of each request it answers 200.
RECEIVER = """
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

said = threading.Lock()     # a line each: the copies a frozen receiver wakes to run together

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        with said:
            print(self.headers["webhook-id"], flush=True)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process ``pid`` stopped (SIGSTOP) for the block, continued (SIGCONT) after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class TestFrozenBroker:
    async def test_an_unacknowledged_publish_ends_the_connection_not_one_copy_per_retry(
        self, tmp_path: Path
    ) -> None:
        """A broker frozen (shorter than keep-alive) while a turn is published: the PUBACK
        deadline (``timeout_s``) ends that connection, said once, and the turn goes again on
        the next one only. Each retry used to be one more PUBLISH into the frozen connection,
        every copy delivered on waking, and only keep-alive (up to 2 x ``keep_alive``) ended it.
        A file sink beside it is not held up meanwhile."""
        outbox = Outbox(tmp_path / "outbox.sqlite3")
        with Mosquitto(tmp_path / "broker") as broker, LogWatch().active() as logs:
            cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                             "port": broker.port, "timeout_s": 0.5,
                                             "keep_alive": 30})
            sink = Watched(MqttSink("bus", cfg, "testhost"))
            bus = SinkRunner("bus", mqtt_types()[0], cfg, sink, outbox.queue("bus"))
            journal = tmp_path / "turns.jsonl"
            file_cfg = FileSinkConfig(type="file", path=str(journal), fsync=False)
            local = SinkRunner("journal", file_types()[0], file_cfg,
                               FileSink("journal", file_cfg, SinkContext("h", tmp_path)),
                               MemoryQueue())
            dispatcher = Dispatcher([bus, local], dead_letter_dir=tmp_path / "dead")
            ids: list[str] = []
            async with Subscriber(broker, "transcribed/+/turn") as subscriber, \
                    asyncio.TaskGroup() as group:
                dispatcher.start(group)
                dispatcher.dispatch(make_turn(1))
                ids.append(json.loads(bytes((await subscriber.next()).payload))["id"])
                assert broker._proc is not None     # the fixture keeps no public pid
                with frozen(broker._proc.pid):
                    for order in (2, 3, 4):
                        dispatcher.dispatch(make_turn(order))
                    await sink.until_attempts(1 + 3, within=10)     # turn 1, three tries of 2
                    assert len(read_turns(journal)) == 4      # the file sink went on
                dispatcher.dispatch(make_turn(9))               # comes after any late copy
                async with asyncio.timeout(20):
                    while "sess:9" not in ids:
                        ids.append(json.loads(bytes((await subscriber.next(20)).payload))["id"])
                await dispatcher.close(flush_s=5)
        outbox.close()
        assert sorted(set(ids)) == ["sess:1", "sess:2", "sess:3", "sess:4", "sess:9"]
        assert ids.count("sess:2") <= 2, ids        # the first try (read on waking) + the resend
        assert [ids.index(f"sess:{n}") for n in (1, 2, 3, 4, 9)] == sorted(
            ids.index(f"sess:{n}") for n in (1, 2, 3, 4, 9))
        dropped = [e for e in logs.entries if e["event"] == "mqtt.disconnected"]
        assert [e["error"] for e in dropped] == [
            "the broker did not acknowledge a publish within 0.5 s"]
        assert len([e for e in logs.entries if e["event"] == "sink.send_failed"]) == 1


class TestFrozenReceiver:
    async def test_a_frozen_webhook_receiver_bounds_each_try_and_keeps_the_order(
        self, tmp_path: Path
    ) -> None:
        """A receiver frozen with requests in flight: each try ends after ``timeout_s``, the
        outage is logged once, later turns wait behind the head one, and after waking every
        turn arrives in order. The tries its kernel took while it was frozen are answered on
        waking: copies with the same ``webhook-id`` (at least once; receivers deduplicate)."""
        receiver = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RECEIVER, stdout=asyncio.subprocess.PIPE)
        assert receiver.stdout is not None
        outbox = Outbox(tmp_path / "outbox.sqlite3")
        try:
            async with asyncio.timeout(10):
                port = int(await receiver.stdout.readline())
            cfg = WebhookConfig.model_validate({"type": "webhook", "timeout_s": 0.3,
                                                "url": f"http://127.0.0.1:{port}/hook"})
            sink = Watched(WebhookSink("hook", cfg))
            hook = SinkRunner("hook", webhook_types()[0], cfg, sink, outbox.queue("hook"))
            dispatcher = Dispatcher([hook], dead_letter_dir=tmp_path / "dead")
            ids: list[str] = []
            with LogWatch().active() as logs:
                async with asyncio.TaskGroup() as group, asyncio.timeout(20):
                    dispatcher.start(group)
                    dispatcher.dispatch(make_turn(1))
                    ids.append((await receiver.stdout.readline()).decode().strip())
                    with frozen(receiver.pid):
                        for order in (2, 3):
                            dispatcher.dispatch(make_turn(order))
                        await sink.until_attempts(1 + 3, within=10)
                    dispatcher.dispatch(make_turn(9))
                    while "sess:9" not in ids:
                        ids.append((await receiver.stdout.readline()).decode().strip())
                    await dispatcher.close(flush_s=2)
        finally:
            outbox.close()
            receiver.kill()
            await receiver.wait()
        assert list(dict.fromkeys(ids)) == ["sess:1", "sess:2", "sess:3", "sess:9"]
        failed = [e for e in logs.entries if e["event"] == "sink.send_failed"]
        assert [e["error"] for e in failed] == [
            f"webhook http://127.0.0.1:{port} timed out after 0.3 s"]
        assert len([e for e in logs.entries if e["event"] == "sink.recovered"]) == 1


def heartbeats(session: SessionRecord) -> int:
    """``Heartbeat`` messages the fake has sent in ``session`` (one a second of its time)."""
    return len(session.messages("Heartbeat"))


class TestFrozenService:
    async def test_a_frozen_service_is_noticed_and_its_speech_replayed(
        self, tmp_path: Path
    ) -> None:
        """The service stops mid-session, socket open, as a frozen process does: it reads
        nothing more (the audio, pings and close pile up unanswered) and sends nothing, not
        even heartbeats. Noticed after three heartbeat periods and a second, the session is
        closed within its close timeout and what it was sent is replayed: every word once."""
        wav = tmp_path / "s1.wav"
        _write(wav, samples(SPEECH_DIR / S1) + _silence(7.0))   # noticed before it ends
        async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1), heartbeat_s=1.0) \
                as fake:
            fake.faults.freeze_after_audio_ms(2500)   # mid-sentence, after two heartbeats
            result = await run_daemon("run", "--config", str(cloud_config(tmp_path, fake, wav)),
                                      limit_s=40)
        assert result.code == 0, result.stderr[-3000:]
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        [noticed] = result.events("session.service_silent")
        assert 4 < noticed["silent_s"] < 8                      # the limit: 3 x 1 s + 1 s
        first = fake.sessions[0]
        assert first.closed and first.closed_by == "client"
        assert [s.close_code for s in fake.sessions[1:]] == [1000] * (len(fake.sessions) - 1)


class TestFrozenDaemon:
    async def test_a_frozen_daemon_is_not_a_stalled_microphone(
        self, vmic: VirtualMic, tmp_path: Path
    ) -> None:
        """The daemon stopped for three times ``audio.stall_seconds`` on the microphone: on
        waking, the stall timer fired before the audio the sound server had kept came in, so a
        working device was called "stalled or gone" (``audio.device_lost``) and reopened, the
        kept audio thrown away and the gap logged as a device recovery."""
        async with FakeAssemblyAI(load_speech_references(SPEECH_DIR), heartbeat_s=1.0) as fake:
            config = cloud_config(tmp_path, fake, None)
            config.write_text(config.read_text().replace(
                'source = "microphone"', 'source = "microphone"\nstall_seconds = 1'))
            daemon = await Daemon.start("run", "--config", str(config), env=vmic.env())
            try:
                session = await asyncio.wait_for(fake.wait_for_session(0), 15)
                async with asyncio.timeout(15):
                    await session.wait_for(lambda s: s.audio_ms >= 500)
                    beats = heartbeats(session)
                    with frozen(daemon.process.pid):     # three of the fake's seconds
                        await session.wait_for(lambda s: heartbeats(s) >= beats + 3)
                    woke_ms = session.audio_ms
                    await session.wait_for(lambda s: s.audio_ms >= woke_ms + 1500)
                daemon.signal(signal.SIGTERM)
                result = await daemon.finish(15)
            finally:
                await daemon.kill_if_running()
        assert result.code == 0, result.stderr[-3000:]
        said = [e["event"] for e in result.logs() if str(e.get("event")).startswith("audio.")]
        assert said == ["audio.device_opened"]      # PortAudio kept the 3 s: nothing was lost

    async def test_a_burst_of_dropped_chunks_is_logged_whole_when_the_interval_is_up(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On waking, a sound server hands over what it kept in one burst, more than the
        queue holds: the oldest chunks are dropped. The first drop was logged at once and the
        rest of the burst only with the next drop after the interval, or at exit: for days, the
        log said one chunk was lost."""
        monkeypatch.setattr(capture, "_DROP_LOG_INTERVAL", 0.2)
        bridge = CaptureBridge(asyncio.get_running_loop(), PcmFormat(16000, 1, 2),
                               sample_rate=16000, chunk_ms=100, queue_chunks=2)
        with LogWatch().active() as logs:
            for _ in range(6):                          # PortAudio's callback: 100 ms each
                bridge.on_audio(bytes(3200), 1600, {}, 0)

            def dropped(entries: list[Any]) -> list[int]:
                return [e["dropped"] for e in entries if e["event"] == "audio.chunks_dropped"]

            await logs.until(lambda entries: sum(dropped(entries)) == 4, within=5)
        assert dropped(logs.entries) == [1, 3]
        bridge.finish()

    async def test_a_daemon_frozen_longer_than_the_old_queue_loses_no_audio_nor_its_times(
        self, vmic: VirtualMic, tmp_path: Path
    ) -> None:
        """The daemon stopped for 11 s while a sentence is spoken into the microphone, right at
        the start. The sound server keeps it all and hands it over at once on waking. The
        capture queue held 50 chunks (5 s at 100 ms): the oldest 6 s, the sentence with them,
        were dropped (``audio.chunks_dropped``). And PortAudio's ADC time is not believed that
        old, so the burst was stamped as it arrived, squeezed into the moment of waking: an
        ``audio.gap`` of the whole freeze was logged and the turn's ``started_at`` was the
        wake-up, not when it was said."""
        loop = asyncio.get_running_loop()
        async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1), heartbeat_s=1.0) as fake:
            daemon = await Daemon.start("run", "--config", str(cloud_config(tmp_path, fake, None)),
                                        env=vmic.env())
            try:
                session = await asyncio.wait_for(fake.wait_for_session(0), 15)
                async with asyncio.timeout(15):
                    await session.wait_for(lambda s: s.audio_ms >= 500)
                with frozen(daemon.process.pid):
                    spoken = time.time()
                    await asyncio.wait_for(vmic.play_pcm(samples(SPEECH_DIR / S1)
                                                         + _silence(8.0)), 30)
                with contextlib.suppress(TimeoutError):     # a sentence lost fails below
                    async with asyncio.timeout(10):
                        await session.wait_for(lambda _: finals(fake) > 0)
                daemon.signal(signal.SIGTERM)
                assert session.began_at is not None
                wall_s = loop.time() - session.began_at
                result = await daemon.finish(20)
            finally:
                await daemon.kill_if_running()
            received_s = sum(s.audio_ms for s in fake.sessions) / 1000
        assert result.code == 0, result.stderr[-3000:]
        assert result.events("audio.chunks_dropped") == []
        skipped_s = sum(e["silence_skipped_s"] for e in result.events("session.ended"))
        assert received_s + skipped_s > wall_s - 1.0, (received_s, skipped_s, wall_s)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        [turn] = read_turns(tmp_path / "turns.jsonl")
        started = datetime.fromisoformat(turn["started_at"]).timestamp()
        assert spoken < started < spoken + 1.5, f"said at {spoken:.2f}, stamped {started:.2f}"
        assert result.events("audio.gap") == []

    async def test_buffers_without_a_usable_adc_time_are_stamped_by_their_samples(self) -> None:
        """On waking, the audio the sound server kept arrives at once, most of it with an ADC
        time too old to be believed (10 s or more) and each such buffer was stamped as it
        arrived, all within a millisecond of each other. A burst's buffers are stamped by the
        samples counted since the last buffer PortAudio timed: one buffer apart, as they were
        recorded; an ADC time within the burst (a sound server that dropped some of what it
        kept gives one too young) does not override the count. An overflow PortAudio flags
        ends the count: that buffer is stamped as it arrived."""
        bridge = CaptureBridge(asyncio.get_running_loop(), PcmFormat(16000, 1, 2),
                               sample_rate=16000, chunk_ms=100, queue_chunks=100)

        def buffer(age: float | None, status: int = 0) -> None:
            times = {} if age is None else {"current_time": 500.0,
                                            "input_buffer_adc_time": 500.0 - age}
            bridge.on_audio(bytes(3200), 1600, times, status)

        timed = time.time() - 9.0
        buffer(9.0)                             # the last buffer PortAudio timed: the anchor
        for age in (12.0, 8.0, None, -1.0, 10.0):       # a burst; not believed, or none
            buffer(age)
        arrived = time.time()
        buffer(None, status=2)                  # paInputOverflow
        stamps = [await stamp_of_next(bridge) for _ in range(7)]
        bridge.finish()
        steps = [round(b - a, 3) for a, b in itertools.pairwise(stamps)]
        assert steps[:5] == [0.1] * 5, steps
        assert stamps[0] == pytest.approx(timed, abs=0.05)
        assert stamps[-1] == pytest.approx(arrived - 0.1, abs=0.05)  # as it arrived

    def test_a_count_no_sound_server_could_hold_is_not_believed(self) -> None:
        """Buffers without an ADC time are counted from the last one PortAudio timed, but not
        from one so old that no sound server holds that much (a resume after a suspend whose
        loss PortAudio did not flag): such a buffer is stamped as it arrived, not hours early."""
        now = [1000.0]
        clock = capture._StreamClock(16000, clock=lambda: now[0])
        timed = {"current_time": 50.0, "input_buffer_adc_time": 49.9}
        assert clock.stamp(timed, 1600, False) == pytest.approx(999.9)    # the anchor
        now[0] += 0.1
        assert clock.stamp({}, 1600, False) == pytest.approx(1000.0)      # counted
        now[0] += capture.HELD_MAX_S + 60
        late = clock.stamp({}, 1600, False)
        assert late == pytest.approx(now[0] - 0.1)                       # as it arrived

    async def test_the_capture_queue_holds_seconds_not_chunks(self, vmic: VirtualMic) -> None:
        """The queue held 50 chunks whatever ``chunk_ms`` was: 2.5 s at 50 ms. The event loop
        blocked for 4 s (the fault itself: a callback that does not return), what PortAudio
        captured meanwhile is queued at once when it runs again: none of it is dropped and the
        chunks are 50 ms apart throughout."""
        with vmic.activated():
            async with MicrophoneSource(chunk_ms=50, recover=False) as mic:
                chunks = mic.chunks()
                stamps = [(await anext(chunks)).captured_at for _ in range(3)][1:]  # settled
                time.sleep(4.0)   # noqa: ASYNC251 -- the loop blocked is the fault under test
                woke = time.time()
                async with asyncio.timeout(5):
                    while stamps[-1] < woke:
                        stamps.append((await anext(chunks)).captured_at)
                mic.stop()
                async for _ in chunks:          # what is left, up to the end
                    pass
        assert mic.dropped_chunks == 0
        steps = [b - a for a, b in itertools.pairwise(stamps)]
        assert len(stamps) > 4 / 0.05
        assert max(abs(step - 0.05) for step in steps) < 0.03, steps


async def stamp_of_next(bridge: CaptureBridge) -> float:
    """``captured_at`` of the next chunk ``bridge`` queues."""
    chunk = await bridge.get(5)
    assert chunk is not None
    return chunk.captured_at


def finals(fake: FakeAssemblyAI) -> int:
    """End-of-turn messages the fake has sent, all sessions."""
    return sum(len(s.finals()) for s in fake.sessions)
