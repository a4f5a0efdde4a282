"""Turn assembly: exactly one record per turn, formatted when asked, with wall-clock times."""

from __future__ import annotations

from daemon.events import PartialTurn, TurnRecord
from daemon.ledger import Ledger, Piece, Timeline
from daemon.protocol import Turn, WireWord
from daemon.turns import TurnAssembler


def turn(order: int, text: str, *, eot: bool, fmt: bool, start: int = 1000) -> Turn:
    words = tuple(WireWord(w, start + i * 300, start + i * 300 + 250, 0.9, True)
                  for i, w in enumerate(text.split()))
    return Turn(order, eot, fmt, text, 0.9 if eot else 0.1, words, None)


class Harness:
    def __init__(self, *, format_turns: bool = True, wait: float = 3.0) -> None:
        self.records: list[TurnRecord] = []
        self.partials: list[PartialTurn] = []
        self.covered: list[int] = []
        self.timeline = Timeline(16000)
        # 10 s of audio sent, captured from wall time 1000.0 on, in two pieces with a gap.
        self.timeline.add(Piece(0, bytes(2 * 16000 * 5), 1000.0))
        self.timeline.add(Piece(16000 * 7, bytes(2 * 16000 * 5), 1007.0))
        self.assembler = TurnAssembler(
            "s1", self.timeline, format_turns=format_turns, source="file", host="h",
            emit=self.records.append, partial=self.partials.append,
            cover=self.covered.append, format_wait_s=wait,
        )


class TestExactlyOnce:
    def test_formatted_final_wins(self) -> None:
        """Partial, unformatted final, formatted final: one record, the formatted text."""
        h = Harness()
        h.assembler.handle(turn(0, "hello there", eot=False, fmt=False))
        h.assembler.handle(turn(0, "hello there", eot=True, fmt=False))
        assert h.records == []
        h.assembler.handle(turn(0, "Hello there.", eot=True, fmt=True))
        h.assembler.handle(turn(0, "Hello there.", eot=True, fmt=True))
        assert [r.transcript for r in h.records] == ["Hello there."]
        assert [p.transcript for p in h.partials] == ["hello there"]

    def test_unformatted_when_not_formatting(self) -> None:
        """Without format_turns the first end_of_turn is the record."""
        h = Harness(format_turns=False)
        h.assembler.handle(turn(0, "hello there", eot=True, fmt=False))
        h.assembler.handle(turn(0, "Hello there.", eot=True, fmt=True))
        assert [r.transcript for r in h.records] == ["hello there"]

    def test_next_turn_releases_held_final(self) -> None:
        """If the formatted final never comes, the next turn releases the unformatted one."""
        h = Harness()
        h.assembler.handle(turn(0, "one two", eot=True, fmt=False))
        h.assembler.handle(turn(1, "three", eot=False, fmt=False, start=4000))
        assert [r.transcript for r in h.records] == ["one two"]

    def test_flush_and_expiry(self) -> None:
        """A held final is emitted when the session ends, or after the wait."""
        h = Harness()
        h.assembler.handle(turn(0, "one", eot=True, fmt=False))
        h.assembler.flush()
        h2 = Harness(wait=0.0)
        h2.assembler.handle(turn(0, "one", eot=True, fmt=False))
        h2.assembler.expire()
        assert len(h.records) == len(h2.records) == 1


class TestTimes:
    def test_wall_clock_across_gap(self) -> None:
        """Word times map through the timeline, across the gap between pieces."""
        h = Harness(format_turns=False)
        # words at session ms 4900..5450: the second word starts after the 5 s piece boundary
        h.assembler.handle(turn(0, "a b", eot=True, fmt=False, start=4900))
        record = h.records[0]
        assert record.started_at.timestamp() == 1004.9
        assert abs(record.ended_at.timestamp() - 1007.45) < 1e-6
        assert [w.start_ms for w in record.words] == [0, 2300]
        assert record.id == "s1:0" and record.engine == "assemblyai"

    def test_cover_reported(self) -> None:
        """Finals cover audio up to their last word; partials up to 300 ms before the first."""
        h = Harness(format_turns=False)
        h.assembler.handle(turn(0, "a b", eot=False, fmt=False, start=2000))
        h.assembler.handle(turn(0, "a b", eot=True, fmt=False, start=2000))
        assert h.covered == [16000 * 1700 // 1000, 16000 * 2550 // 1000]


class TestLedger:
    def test_cover_trims_and_backlog_drops(self) -> None:
        """Covering trims at sample precision; overflow drops the oldest and counts it."""
        from daemon.events import AudioChunk

        ledger = Ledger(16000, backlog_seconds=0.5)
        for i in range(4):
            ledger.append(AudioChunk(bytes([i]) * 3200, 100.0 + i * 0.1))
        ledger.cover(1650)
        assert ledger.head == 1650
        piece = ledger.read(0, 10_000)
        assert piece is not None and piece.start == 1650 and piece.samples == 1600 - 50
        assert abs(piece.captured_at - (100.1 + 50 / 16000)) < 1e-9
        for i in range(4, 8):
            ledger.append(AudioChunk(bytes(3200), 100.0 + i * 0.1))
        assert ledger.seconds_held() <= 0.5
        assert ledger.dropped_samples > 0


class TestCatchUpSplit:
    @staticmethod
    def ledger(pattern: str) -> Ledger:
        """One 100 ms chunk per character: '#' speech (a loud square wave), '.' silence."""
        from daemon.events import AudioChunk

        loud = (b"\x00\x40" + b"\x00\xc0") * 800
        ledger = Ledger(16000, backlog_seconds=60)
        for i, c in enumerate(pattern):
            ledger.append(AudioChunk(loud if c == "#" else bytes(3200), 100.0 + i * 0.1))
        return ledger

    def test_newest_flanked_silence(self) -> None:
        """The split is the newest silent chunk with silence on both sides, not too near head."""
        from daemon.catchup import find_split

        ledger = self.ledger("#" * 12 + "...." + "#" * 10 + "." + "#" * 10 + "..." + "##")
        assert find_split(ledger, 200.0) == 1600 * 38      # the middle chunk of the last '...'
        assert find_split(self.ledger("#" * 40), 200.0) is None
        assert find_split(self.ledger("..." + "#" * 40), 200.0) is None   # within 1 s of head
        single = self.ledger("#" * 20 + "." + "#" * 5)
        assert find_split(single, 200.0) == 1600 * 20 + 800

    def test_finish_covers_split_then_live_turns(self) -> None:
        """Ending a catch-up covers up to the split, then the live session's noted cover."""
        from daemon.catchup import CatchUp

        ledger = self.ledger("#" * 50)
        catch_up = CatchUp(split=16000 * 3, head=0, end=16000 * 5, sample_rate=16000)
        catch_up.cover_live(16000 * 4)
        catch_up.cover_live(16000 * 2)                      # an older cover changes nothing
        assert catch_up.live_start() == 16000 * 4 and ledger.head == 0
        assert catch_up.finish(ledger) == [] and ledger.head == 16000 * 4
