"""End to end: the real ``transcribed run`` streaming WAV files to the fake v3 service."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Daemon, cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.vmic import VirtualMic

S1, S2 = "espeak-s1.wav", "espeak-s2.wav"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1, S2)) as server:
        yield server


class TestHappyPath:
    async def test_wav_to_file_sink(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """A WAV file: one formatted record per turn, 100 ms chunks at real time, exit 0."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config))
        assert result.code == 0, result.stderr
        [stopped] = result.events("daemon.stopped")
        assert (stopped["reason"], stopped["turns"]) == ("input ended", 1)
        turns = read_turns(tmp_path / "turns.jsonl")
        assert [t["transcript"] for t in turns] == [TRANSCRIPTS[S1]]
        record = turns[0]
        assert record["id"] == f"{record['session_id']}:{record['turn_order']}"
        assert record["engine"] == "assemblyai" and record["source"] == "file"
        assert record["words"][0]["start_ms"] == 0 and record["started_at"] < record["ended_at"]
        session = fake.sessions[0]
        durations = [f.duration_ms for f in session.frames]
        assert all(d == 100 for d in durations[:-1]) and 50 <= durations[-1] <= 100
        assert session.close_code == 1000 and session.closed_by != "abort"
        assert "Terminate" in "".join(session.texts)
        with wave.open(str(SPEECH_DIR / S1)) as wav:
            pcm = wav.readframes(wav.getnframes())
        audio = bytes(session.audio)                # the file exactly, padded to a whole chunk
        assert audio[: len(pcm)] == pcm and not audio[len(pcm):].strip(b"\0")

    async def test_no_durable_sink_no_sqlite(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """With only local sinks the outbox's SQLite is never loaded (~0.9 MB of peak RSS)."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config),
                                  env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert result.code == 0, result.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "daemon.session" in imported                 # the listing is there
        assert "sqlite3" not in imported and "daemon.outbox" not in imported
        assert read_turns(tmp_path / "turns.jsonl")

    async def test_credentials_stay_private(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """The API key goes only to the token endpoint, never to the socket or any output."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config))
        assert result.code == 0
        assert all(r.headers.get("authorization") == fake.api_key for r in fake.token_requests)
        session = fake.sessions[0]
        assert fake.api_key not in str(session.query) + str(session.headers)
        token = session.query["token"][0]
        for text in (result.stdout, result.stderr):
            assert fake.api_key not in text and token not in text
        params = session.params
        assert params is not None and params.speech_model == "universal-streaming-english"


class TestFailures:
    async def test_rejected_key_exits_77(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """A key the token endpoint rejects: one retry, then exit 77 naming what to fix.

        The service quotes the key back in its error; it still appears nowhere.
        """
        fake.faults.key_revoked = fake.faults.echo_key = True
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=20)
        assert result.code == 77
        assert "assemblyai.api_key" in result.stderr
        assert fake.api_key not in result.stderr + result.stdout
        assert len(fake.token_requests) == 2

    async def test_socket_1008_twice_exits_77(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """Sessions closed 1008 twice: one retry with a fresh token, then exit 77."""
        fake.faults.reject_handshake = [1008, 1008]
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=20)
        assert result.code == 77
        tokens = [s.query["token"][0] for s in fake.sessions]
        assert len(tokens) == 2 and tokens[0] != tokens[1]

    async def test_closed_4001_right_after_begin_twice_exits_77(self, fake: FakeAssemblyAI,
                                                                 tmp_path: Path) -> None:
        """Sessions the service closes as unauthorised right after ``Begin`` (4001): counted
        like a refused handshake, so the second is exit 77 (it reconnected for ever)."""
        fake.faults.error_after_audio_ms(0, code=4001, message="Not Authorized")
        fake.faults.error_after_audio_ms(0, code=4001, message="Not Authorized")
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=20)
        assert result.code == 77, result.stderr
        assert "assemblyai.api_key" in result.stderr and "Not Authorized" in result.stderr
        assert len(fake.sessions) == 2

    async def test_a_bare_1008_right_after_begin_is_not_a_rejected_key(
            self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """Two sessions closed 1008 without a word about credentials, right after ``Begin``:
        the token endpoint had just taken the key, so they are retried, not exit 77."""
        fake.faults.error_after_audio_ms(0, code=1008, message="Policy violation")
        fake.faults.error_after_audio_ms(0, code=1008, message="Policy violation")
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_upgrade_refused_401_twice_exits_77(self, fake: FakeAssemblyAI,
                                                      tmp_path: Path) -> None:
        """The socket's upgrade answered HTTP 401 (not a close 1008: the reference says to
        handle both) twice: one retry with a fresh token, then exit 77 naming what to fix."""
        fake.faults.http_status_on_upgrade = [401, 401]
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=20)
        assert result.code == 77, result.stderr
        assert "assemblyai.api_key" in result.stderr and "HTTP 401" in result.stderr
        assert [status for _headers, status in fake.upgrade_requests] == [401, 401]
        assert len(fake.token_requests) == 2 and not fake.sessions

    @pytest.mark.parametrize(("status", "kind", "retry_in_s"), [
        (503, "transient", None), (429, "rate", 0.2)])
    async def test_upgrade_refused_for_now_is_retried(
            self, fake: FakeAssemblyAI, tmp_path: Path, status: int, kind: str,
            retry_in_s: float | None) -> None:
        """A 503 on the upgrade (a service or proxy overloaded) is transient: the daemon
        reconnects after a backoff and the speech arrives once. A 429 (too many connections)
        waits ``reconnect.max_delay`` (0.2 s in cloud_config), as a rate-limit close does; it
        was retried after the first step of the backoff."""
        fake.faults.http_status_on_upgrade = [status]
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        [retry] = result.events("stream.reconnecting")
        assert retry["kind"] == kind and retry["reason"] == f"handshake answered HTTP {status}"
        if retry_in_s is not None:
            assert retry["retry_in_s"] == retry_in_s
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_the_end_of_input_cuts_a_long_backoff_short(self, fake: FakeAssemblyAI,
                                                            tmp_path: Path) -> None:
        """Connections fail and the backoff grows long (``initial_delay = 60``): when
        the input ends (end of file, as at a stop) the held speech gets one attempt at once,
        instead of waiting past the stop deadline and being lost."""
        fake.faults.reject_handshake = [1011, 1011]     # the first retry is at once
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=30, env={
            "TRANSCRIBED_RECONNECT__INITIAL_DELAY": "60", "TRANSCRIBED_RECONNECT__MAX_DELAY": "60"})
        assert result.code == 0, result.stderr
        [first, second] = result.events("stream.reconnecting")
        assert first["retry_in_s"] == 0 and second["retry_in_s"] >= 30
        [now] = result.events("stream.retrying_now")
        assert now["reason"] == "the input ended" and now["backlog_s"] > 1
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    @pytest.mark.parametrize("began", [False, True])
    async def test_expiry_at_once_is_no_tight_loop(self, fake: FakeAssemblyAI, tmp_path: Path,
                                                   began: bool) -> None:
        """Sessions closed 3008 again and again, before ``Begin`` or just after it: only a
        session that lived (a missed rollover) reconnects at once; these back off. (They were
        retried with no delay at all: a token and a handshake in a tight loop.)"""
        for _ in range(3):
            if began:
                fake.faults.error_after_audio_ms(0, code=3008)
            else:
                fake.faults.reject_handshake.append(3008)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        retries = result.events("stream.reconnecting")
        assert [r["kind"] for r in retries] == ["expired"] * 3
        assert retries[0]["retry_in_s"] == 0 and all(r["retry_in_s"] > 0 for r in retries[1:])
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_settings_rejected_exits_78(self, fake: FakeAssemblyAI,
                                              tmp_path: Path) -> None:
        """A 3006 from the service is a configuration error: exit 78 with its message."""
        fake.faults.error_after_audio_ms(300, code=3006,
                                         message="User Input Validation Error: bad sample_rate")
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=20)
        assert result.code == 78
        assert "bad sample_rate" in result.stderr

    async def test_settings_refused_before_begin_exits_78(self, fake: FakeAssemblyAI,
                                                          tmp_path: Path) -> None:
        """A setting the service refuses at connect time (its limits are its own: this fake
        takes silences up to 60 s) comes back as Error 3006 instead of Begin: exit 78 with the
        service's words, no retry loop."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=20,
                                  env={"TRANSCRIBED_ASSEMBLYAI__MIN_TURN_SILENCE": "70000",
                                       "TRANSCRIBED_ASSEMBLYAI__MAX_TURN_SILENCE": "70000"})
        assert result.code == 78, result.stderr
        assert "Invalid 'min_turn_silence'" in result.stderr
        assert len(fake.sessions) == 1

    async def test_garbage_frame_survived(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """A frame of garbage from the server is logged and the turn still arrives."""
        fake.faults.send_garbage("non_json", after_audio_ms=500)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config))
        assert result.code == 0, result.stderr
        assert result.events("session.bad_frame")
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_drop_mid_turn_loses_nothing(self, fake: FakeAssemblyAI,
                                               tmp_path: Path) -> None:
        """An abrupt TCP drop mid-turn: reconnect, replay, the turn arrives once, whole."""
        fake.faults.drop_after_audio_ms(1500)
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config))
        assert result.code == 0, result.stderr
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]
        assert len(fake.sessions) == 2 and fake.sessions[0].closed_by == "abort"


async def test_sigterm_mid_turn_delivers(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """SIGTERM mid-turn: capture stops, Terminate, the turn so far is delivered, exit 0."""
    config = cloud_config(tmp_path, fake, SPEECH_DIR / S2)
    daemon = await Daemon.start("run", "--config", str(config))
    session = await asyncio.wait_for(fake.wait_for_session(0), 15)
    await asyncio.wait_for(session.wait_for(lambda s: s.audio_ms >= 2500), 15)
    daemon.signal(signal.SIGTERM)
    result = await daemon.finish(15)
    assert result.code == 0, result.stderr
    turns = read_turns(tmp_path / "turns.jsonl")
    assert len(turns) == 1
    heard = turns[0]["transcript"].rstrip(".").split()
    assert 3 <= len(heard) < len(TRANSCRIPTS[S2].split())
    assert TRANSCRIPTS[S2].startswith(" ".join(heard))
    assert "Terminate" in "".join(session.texts)


async def test_termination_without_the_last_final(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """The input ends mid-turn and the service answers ``Terminate`` with ``Termination`` but no
    final for the open turn: the turn is delivered once, from its last partial. (Its words were
    lost without a word said.)"""
    fake.faults.termination_without_finals = True
    wav = tmp_path / "cut.wav"
    with wave.open(str(SPEECH_DIR / S2)) as source, wave.open(str(wav), "wb") as out:
        out.setparams(source.getparams())
        out.writeframes(source.readframes(source.getframerate() * 2))     # mid-sentence
    config = cloud_config(tmp_path, fake, wav)
    result = await run_daemon("run", "--config", str(config), limit_s=30)
    assert result.code == 0, result.stderr
    [turn] = read_turns(tmp_path / "turns.jsonl")
    heard = turn["transcript"].split()
    assert 3 <= len(heard) < len(TRANSCRIPTS[S2].split())
    assert TRANSCRIPTS[S2].lower().startswith(" ".join(heard))
    assert result.events("turn.final_missing") and len(fake.sessions) == 1


async def test_virtual_microphone(fake: FakeAssemblyAI, vmic: VirtualMic, tmp_path: Path) -> None:
    """Speech played into the (virtual) default microphone lands in the JSONL file."""
    config = cloud_config(tmp_path, fake, None)
    daemon = await Daemon.start("run", "--config", str(config), env=vmic.env())
    session = await asyncio.wait_for(fake.wait_for_session(0), 15)
    await asyncio.wait_for(session.wait_begun(), 15)
    await vmic.play(SPEECH_DIR / S1)
    await asyncio.wait_for(session.wait_for(lambda s: bool(s.finals(formatted=True))), 15)
    daemon.signal(signal.SIGTERM)
    result = await daemon.finish(15)
    assert result.code == 0, result.stderr
    assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]
    assert read_turns(tmp_path / "turns.jsonl")[0]["source"] == "microphone"


class TestTimeoutsAndLimits:
    async def test_missing_termination_is_bounded(self, fake: FakeAssemblyAI,
                                                  tmp_path: Path) -> None:
        """A server that never answers Terminate: wait terminate_timeout, deliver, exit 0."""
        fake.faults.no_termination = True
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        config.write_text(config.read_text().replace("terminate_timeout = 5",
                                                     "terminate_timeout = 1"))
        result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        assert result.events("session.termination_timeout")
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_signals_while_the_sinks_flush(self, fake: FakeAssemblyAI,
                                                 tmp_path: Path) -> None:
        """At the end of a file the sinks flush: a SIGHUP then is ignored and a SIGTERM cuts the
        flush short; the file sink's turn (it cannot write: /dev/full) is dead-lettered. Both
        signals killed the process, losing the turn."""
        sinks = '[sinks.journal]\ntype = "file"\npath = "/dev/full"\nfsync = false\n'
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1, sinks=sinks)
        daemon = await Daemon.start("run", "--config", str(config))
        assert daemon.process.stderr is not None
        seen: list[str] = []

        async def line_with(event: str) -> None:
            assert daemon.process.stderr is not None
            while f'"event": "{event}"' not in (line := (await daemon.process.stderr.readline())
                                                .decode()):
                assert line, f"the daemon ended before {event}: {''.join(seen)[-3000:]}"
                seen.append(line)

        async with asyncio.timeout(30):
            await line_with("sinks.flushing")
            daemon.signal(signal.SIGHUP)
            await line_with("reload.ignored")
            daemon.signal(signal.SIGTERM)
            await line_with("daemon.flush_cut_short")
        result = await daemon.finish(15)
        assert result.code == 0, result.stderr
        [entry] = read_turns(tmp_path / "state" / "dead-letter" / "journal.jsonl")
        assert entry["record"]["transcript"] == TRANSCRIPTS[S1]

    async def test_unreachable_service_is_retried_and_the_loss_reported(
            self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """Tokens come, but nothing listens at the streaming URL: connection refused is transient
        (retried at once, then with backoff up to max_delay; the audio held). Stopped before the
        service comes back, the daemon keeps trying for the 12 s engine deadline (README), then
        exits 0 and says how much speech no turn covers, rather than nothing."""
        with socket.socket() as probe:          # a loopback port that nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        daemon = await Daemon.start("run", "--config", str(config), env={
            "TRANSCRIBED_ASSEMBLYAI__STREAMING_URL": f"ws://127.0.0.1:{port}/v3/ws"})
        assert daemon.process.stderr is not None
        retries: list[dict[str, Any]] = []
        async with asyncio.timeout(30):         # until the whole file is held
            while not retries or retries[-1]["backlog_s"] < 3.4:
                line = (await daemon.process.stderr.readline()).decode()
                assert line, "the daemon ended while the service was unreachable"
                if '"event": "stream.reconnecting"' in line:
                    retries.append(json.loads(line))
        daemon.signal(signal.SIGTERM)
        result = await daemon.finish(30)
        assert result.code == 0, result.stderr
        assert {r["kind"] for r in retries} == {"transient"}
        assert retries[0]["reason"] == f"connection refused by 127.0.0.1:{port}"
        assert retries[0]["retry_in_s"] == 0                # the first retry is immediate
        assert all(0 < r["retry_in_s"] <= 0.2 for r in retries[1:])  # max_delay = 0.2
        assert result.events("daemon.shutdown_deadline")
        [lost] = result.events("stream.untranscribed")
        assert 1.0 < lost["held_s"] <= 3.5
        assert not (tmp_path / "turns.jsonl").exists() or not read_turns(tmp_path / "turns.jsonl")

    async def test_slow_termination_is_awaited(self, fake: FakeAssemblyAI,
                                               tmp_path: Path) -> None:
        """Terminate sent while the session is idle: the idle timer of the wait already begun
        (1 s) is not taken for the termination timeout; Termination 2.5 s later is awaited."""
        fake.faults.termination_delay_s = 2.5
        wav = tmp_path / "speech-then-silence.wav"
        with wave.open(str(SPEECH_DIR / S1)) as source, wave.open(str(wav), "wb") as out:
            out.setparams(source.getparams())
            out.writeframes(source.readframes(source.getnframes()))
            out.writeframes(bytes(2 * source.getframerate() * 3))     # 3 s of silence
        config = cloud_config(tmp_path, fake, wav)
        result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        assert not result.events("session.termination_timeout")
        [ended] = result.events("session.ended")
        assert ended["reason"] == "terminated"
        assert fake.sessions[0].closed_by == "server" and fake.sessions[0].close_code == 1000
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]

    async def test_rate_limit_backs_off_long(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """A 3009 (too many sessions) waits at least reconnect.max_delay, then carries on."""
        fake.faults.reject_handshake = [3009]
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        [retry] = result.events("stream.reconnecting")
        assert retry["kind"] == "rate" and retry["retry_in_s"] >= 0.2
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]


async def test_devices_command(vmic: VirtualMic) -> None:
    """`transcribed devices` lists the inputs with index, name, rate, channels and the default."""
    result = await run_daemon("devices", limit_s=30, env=vmic.env())
    assert result.code == 0, result.stderr
    assert "pulse" in result.stdout and "*" in result.stdout
    assert "ALSA" not in result.stderr and "jack" not in result.stderr.lower()
