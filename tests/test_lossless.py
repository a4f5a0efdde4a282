"""Lossless sessions: every spoken word reaches the sink exactly once, in order, whatever fails.

Each test runs the real ``transcribed run`` on test speech against the fake v3 service, arms one
or more faults, and compares the delivered words with the reference transcript word by word.
"""

from __future__ import annotations

import re
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import Finished, cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references

S1, S2, FIVE = "espeak-s1.wav", "espeak-s2.wav", "espeak-five-sentences.wav"


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def delivered(tmp_path: Path) -> list[str]:
    return [w for t in read_turns(tmp_path / "turns.jsonl") for w in words(t["transcript"])]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    refs = load_speech_references(SPEECH_DIR, FIVE, S1, S2)
    async with FakeAssemblyAI(refs, allow_short_sessions=True) as server:
        yield server


async def stream(fake: FakeAssemblyAI, tmp_path: Path, name: str, extra: str = "") -> Finished:
    config = cloud_config(tmp_path, fake, SPEECH_DIR / name, extra=extra)
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    return result


def no_rate_or_expiry_closes(fake: FakeAssemblyAI) -> None:
    assert all(s.close_code not in (3007, 3008) for s in fake.sessions), \
        [(s.close_code, s.close_reason) for s in fake.sessions]


class TestSingleFaults:
    async def test_error_3005_mid_turn(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """An Error 3005 mid-turn: the next session replays the turn; every word once."""
        fake.faults.error_after_audio_ms(2000, code=3005)
        await stream(fake, tmp_path, S2)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S2])
        assert fake.sessions[0].close_code == 3005
        no_rate_or_expiry_closes(fake)

    async def test_token_endpoint_failing_for_a_while(self, fake: FakeAssemblyAI,
                                                      tmp_path: Path) -> None:
        """Token requests failing (500, 429) delay the start; the backlog is replayed whole."""
        fake.faults.token_status = [500, 429, 500]
        result = await stream(fake, tmp_path, S1)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        assert [r.status for r in fake.token_requests[:4]] == [500, 429, 500, 200]
        assert len(result.events("stream.token_failed")) == 3
        no_rate_or_expiry_closes(fake)

    async def test_1011_at_handshake(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """A 1011 before Begin (twice) is transient: back off, reconnect, lose nothing."""
        fake.faults.reject_handshake = [1011, 1011]
        result = await stream(fake, tmp_path, S1)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S1])
        assert {e["kind"] for e in result.events("stream.reconnecting")} == {"transient"}

    async def test_back_to_back_drops(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """Two abrupt drops in a row, the second during the replay of the first's backlog."""
        fake.faults.drop_after_audio_ms(2500)
        fake.faults.drop_after_audio_ms(800)
        await stream(fake, tmp_path, S2)
        assert delivered(tmp_path) == words(TRANSCRIPTS[S2])
        assert [s.closed_by for s in fake.sessions[:2]] == ["abort", "abort"]
        no_rate_or_expiry_closes(fake)

    async def test_outage_longer_than_backlog(self, fake: FakeAssemblyAI,
                                              tmp_path: Path) -> None:
        """Beyond backlog_seconds the oldest audio is dropped, and the loss is reported exactly."""
        fake.faults.token_status = [429, 429]          # each answer asks for Retry-After: 1 s
        extra = "[reconnect]\nbacklog_seconds = 1.0\n"
        config_text = cloud_config(tmp_path, fake, SPEECH_DIR / S2).read_text()
        config = tmp_path / "config.toml"
        config.write_text(config_text.replace("[reconnect]\n", extra))
        result = await run_daemon("run", "--config", str(config), limit_s=60)
        assert result.code == 0, result.stderr[-3000:]
        [loss] = result.events("stream.backlog_dropped")
        got, expected = delivered(tmp_path), words(TRANSCRIPTS[S2])
        assert got and got == expected[len(expected) - len(got):]      # the newest words survive
        with wave.open(str(SPEECH_DIR / S2)) as wav:
            pcm = wav.readframes(wav.getnframes())
        first = bytes(fake.sessions[0].audio[:3200])
        offset_samples = pcm.find(first) // 2
        # the first audio sent is exactly where the dropped audio ends (or, if the replay
        # skipped leading silence, at most the hangover-bounded silence later)
        assert 0 <= offset_samples - loss["lost_samples"] <= 16000 * 0.35


async def test_three_failures_and_12_second_sessions(fake: FakeAssemblyAI,
                                                     tmp_path: Path) -> None:
    """Done-when of issue 3: three mid-turn failures of different kinds and 12-second sessions."""
    fake.faults.drop_after_audio_ms(2000)
    fake.faults.error_after_audio_ms(2500, code=3005)
    fake.faults.error_after_audio_ms(3000, code=1011, message="Internal error")
    extra_assemblyai = 'max_session_seconds = 12\n'
    config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE)
    config.write_text(config.read_text().replace("[assemblyai]\n",
                                                 "[assemblyai]\n" + extra_assemblyai))
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == words(TRANSCRIPTS[FIVE])
    no_rate_or_expiry_closes(fake)
    assert result.events("stream.rolled_over"), "12-second sessions must roll over"
    codes = [s.close_code for s in fake.sessions]
    assert 3005 in codes and 1011 in codes and fake.sessions[0].closed_by == "abort"
    ids = [t["id"] for t in read_turns(tmp_path / "turns.jsonl")]
    assert len(ids) == len(set(ids))
    times = [(t["started_at"], t["ended_at"]) for t in read_turns(tmp_path / "turns.jsonl")]
    assert times == sorted(times) and all(a < b for a, b in times)


async def test_rollover_without_faults(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """Sessions capped at 12 s roll over make-before-break at turn boundaries: no 3008."""
    config = cloud_config(tmp_path, fake, SPEECH_DIR / FIVE)
    config.write_text(config.read_text().replace("[assemblyai]\n",
                                                 "[assemblyai]\nmax_session_seconds = 12\n"))
    result = await run_daemon("run", "--config", str(config), limit_s=90)
    assert result.code == 0, result.stderr[-3000:]
    assert delivered(tmp_path) == words(TRANSCRIPTS[FIVE])
    no_rate_or_expiry_closes(fake)
    switches = result.events("session.switched")
    assert len(switches) >= 2 and all(s["at_boundary"] for s in switches)
    assert all(r.params.get("max_session_duration_seconds") == ["12"]
               for r in fake.token_requests)
