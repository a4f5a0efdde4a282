"""A turn the service abandons mid-session (a newer turn begins, the older never got a final).

Its words were silently lost: it is delivered once, from its last partial, before the newer
turn's record, with the warning ``turn.final_missing`` (``reason="a newer turn began"``), and
its audio is covered as a final's would be.
"""

from __future__ import annotations

import re
import wave
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.daemon_proc import cloud_config, read_turns, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.test_turns import Harness, turn

S1, S2 = "espeak-s1.wav", "espeak-s2.wav"


def missing(logs: list[MutableMapping[str, Any]]) -> list[tuple[int, str]]:
    return [(e["turn_order"], e["reason"]) for e in logs if e["event"] == "turn.final_missing"]


class TestAbandonedTurn:
    def test_newer_partial_delivers_the_abandoned_turn_once(self) -> None:
        """Turn 0 gets partials only, then turn 1 begins: 0 is delivered from its last partial,
        before 1's record, once; a late final (either kind) or partial of 0 adds nothing."""
        h = Harness()
        with capture_logs() as logs:
            h.assembler.handle(turn(0, "one", eot=False, fmt=False))
            h.assembler.handle(turn(0, "one two", eot=False, fmt=False))
            assert h.assembler.open_turn == 0
            h.assembler.handle(turn(1, "three", eot=False, fmt=False, start=4000))
            assert [r.transcript for r in h.records] == ["one two"]
            assert h.records[0].id == "s1:0" and h.assembler.open_turn == 1
            for late in (turn(0, "one two", eot=True, fmt=False),
                         turn(0, "One two.", eot=True, fmt=True),
                         turn(0, "one two x", eot=False, fmt=False)):
                h.assembler.handle(late)
            assert h.assembler.open_turn == 1
            h.assembler.handle(turn(1, "three", eot=True, fmt=False, start=4000))
            h.assembler.handle(turn(1, "Three.", eot=True, fmt=True, start=4000))
            h.assembler.finish_open()
            h.assembler.flush()
        assert [r.transcript for r in h.records] == ["one two", "Three."]
        assert missing(logs) == [(0, "a newer turn began")]
        assert h.assembler.emitted == 2 and h.assembler.open_turn is None

    def test_newer_final_delivers_it_first(self) -> None:
        """Without format_turns, the newer turn's final arrives straight away: the abandoned
        turn's record still comes first."""
        h = Harness(format_turns=False)
        h.assembler.handle(turn(3, "alpha beta", eot=False, fmt=False))
        h.assembler.handle(turn(4, "gamma", eot=True, fmt=False, start=4000))
        assert [(r.turn_order, r.transcript) for r in h.records] == [(3, "alpha beta"),
                                                                      (4, "gamma")]
        assert h.assembler.open_turn is None

    def test_its_audio_is_covered_to_its_last_word(self) -> None:
        """The abandoned turn covers up to the end of its last word, as a final does."""
        h = Harness(format_turns=False)
        h.assembler.handle(turn(0, "a b", eot=False, fmt=False, start=2000))
        h.assembler.handle(turn(1, "c", eot=False, fmt=False, start=4000))
        assert h.covered == [16000 * 1700 // 1000, 16000 * 2550 // 1000, 16000 * 3700 // 1000]

    def test_a_newer_partial_without_words_ends_it_too(self) -> None:
        """A newer turn's first partial may carry no words: the older one is over all the same
        (and no longer counts as open, which would block a rollover at a turn boundary)."""
        h = Harness()
        h.assembler.handle(turn(0, "one", eot=False, fmt=False))
        h.assembler.handle(turn(1, "", eot=False, fmt=False))
        assert [r.transcript for r in h.records] == ["one"]
        assert h.assembler.open_turn is None

    def test_partials_without_words_are_not_a_turn(self) -> None:
        """A turn whose partials never had words is nothing to deliver."""
        h = Harness()
        with capture_logs() as logs:
            h.assembler.handle(turn(0, "", eot=False, fmt=False))
            h.assembler.handle(turn(1, "two", eot=False, fmt=False))
        assert h.records == [] and missing(logs) == []


class TestWithFinals:
    def test_a_held_final_is_not_abandoned(self) -> None:
        """Turn 0's unformatted final waits for the formatted one; turn 1 begins: the held
        final is the record (not the partial), once, with no warning."""
        h = Harness()
        with capture_logs() as logs:
            h.assembler.handle(turn(0, "one two", eot=False, fmt=False))
            h.assembler.handle(turn(0, "one two", eot=True, fmt=False))
            h.assembler.handle(turn(1, "three", eot=False, fmt=False, start=4000))
            h.assembler.handle(turn(0, "One two.", eot=True, fmt=True))
        assert [r.transcript for r in h.records] == ["one two"]
        assert missing(logs) == []

    def test_a_held_and_an_abandoned_turn_go_out_in_turn_order(self) -> None:
        """Turn 1 is held for its formatted final, a late partial reopens turn 0 (never seen
        before), then turn 2 begins: 0 (from its partial) is delivered before 1 (held)."""
        h = Harness()
        h.assembler.handle(turn(1, "b", eot=True, fmt=False, start=3000))
        h.assembler.handle(turn(0, "a", eot=False, fmt=False))
        h.assembler.handle(turn(2, "c", eot=False, fmt=False, start=5000))
        assert [(r.turn_order, r.transcript) for r in h.records] == [(0, "a"), (1, "b")]

    def test_a_formatted_final_ends_the_turn_for_good(self) -> None:
        """A turn that got its final is not abandoned when the next begins: one record."""
        h = Harness()
        with capture_logs() as logs:
            h.assembler.handle(turn(0, "one", eot=False, fmt=False))
            h.assembler.handle(turn(0, "one", eot=True, fmt=False))
            h.assembler.handle(turn(0, "One.", eot=True, fmt=True))
            h.assembler.handle(turn(1, "two", eot=False, fmt=False, start=4000))
            h.assembler.finish_open()
        assert [r.transcript for r in h.records] == ["One.", "two"]
        assert missing(logs) == [(1, "the session ended")]


class TestSealed:
    def test_a_sealed_session_does_not_deliver_its_open_turn(self) -> None:
        """After a rollover the next session redoes the open turn from the ledger: a newer turn
        in the sealed session does not deliver it (that would be a second record of it)."""
        h = Harness()
        h.assembler.handle(turn(0, "zero", eot=True, fmt=True))
        h.assembler.handle(turn(1, "one", eot=False, fmt=False, start=3000))
        h.assembler.seal()
        h.assembler.handle(turn(1, "one more", eot=False, fmt=False, start=3000))
        h.assembler.handle(turn(2, "two", eot=False, fmt=False, start=5000))
        h.assembler.handle(turn(2, "two", eot=True, fmt=True, start=5000))
        h.assembler.finish_open()
        assert [r.transcript for r in h.records] == ["zero"]
        assert h.assembler.open_turn is None


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1, S2)) as server:
        yield server


async def test_end_to_end(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """The fake abandons its first turn (partials, then the next turn's messages, no final):
    the daemon writes it from its last partial, then the next turn, once each, one session."""
    fake.faults.abandon_turns = 1
    wav = tmp_path / "two-turns.wav"
    with wave.open(str(wav), "wb") as out:
        for name in (S1, S2):
            with wave.open(str(SPEECH_DIR / name)) as source:
                if name == S1:
                    out.setparams(source.getparams())
                out.writeframes(source.readframes(source.getnframes()))
                out.writeframes(bytes(2 * source.getframerate()))         # 1 s of silence
    config = cloud_config(tmp_path, fake, wav)
    result = await run_daemon("run", "--config", str(config), limit_s=30)
    assert result.code == 0, result.stderr
    turns = read_turns(tmp_path / "turns.jsonl")
    assert [(t["turn_order"], t["transcript"]) for t in turns] == [
        (0, " ".join(re.sub(r"[^\w' ]+", "", TRANSCRIPTS[S1].lower()).split())),
        (1, TRANSCRIPTS[S2]),
    ]
    [event] = result.events("turn.final_missing")
    assert event["turn_order"] == 0 and event["reason"] == "a newer turn began"
    assert len(fake.sessions) == 1
