"""Turn building for the fake AssemblyAI service: heard words → ``Turn`` messages.

A turn is the run of heard words that belong to one reference utterance. Every received chunk
that completes new words produces one partial ``Turn`` (unformatted, lowercase, no punctuation;
the next word of the utterance is appended as ``word_is_final: false`` once 30 % of it has
arrived). A turn ends when the session has received ``min_turn_silence`` ms of audio after the
utterance's last word, or ``max_turn_silence`` ms after the last heard word (an utterance that
was only partly received), or when a word of another utterance is heard, or on ``ForceEndpoint``
/ ``Terminate``. The end sends an unformatted final and, with ``format_turns``, a formatted final
(the words as written in the transcript) with the same ``turn_order``.

``abandon`` (a scripted fault): that many turns that end mid-session (silence, or a word of
another utterance; not ``ForceEndpoint`` / ``Terminate``) get no final at all; the next turn's
messages follow with the next ``turn_order``, as from a service that abandoned the turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from tests.fake_assemblyai_speech import Hearing, Int16Array, ReferenceIndex

PARTIAL_CONFIDENCE: Final = 0.05
FINAL_CONFIDENCE: Final = 0.9
WORD_CONFIDENCE: Final = 0.95
LANGUAGE_CONFIDENCE: Final = 0.98
_TAIL_FRACTION: Final = 0.3


@dataclass(slots=True)
class TurnSettings:
    """The turn-related session settings (connect-time query params or ``UpdateConfiguration``)."""

    format_turns: bool = False
    min_turn_silence: int = 400
    max_turn_silence: int = 1280
    end_of_turn_confidence_threshold: float = 0.4
    language_detection: bool = False


class TurnBuilder:
    """Turns the audio of one session into the ``Turn`` messages the service would send."""

    def __init__(self, index: ReferenceIndex, settings: TurnSettings) -> None:
        self.index = index
        self.settings = settings
        self.hearing = Hearing(index)
        self.turn_order = 0
        self._words: list[int] = []
        self._utterance = -1
        self._tail_shown = -1
        self.abandon = 0

    def feed(self, samples: Int16Array) -> list[dict[str, Any]]:
        """Take received samples; return the messages they cause, in order."""
        messages: list[dict[str, Any]] = []
        new = self.hearing.feed(samples)
        for word_id in new:
            utterance = self.index.words[word_id].utterance
            if self._words and utterance != self._utterance:
                messages += self._end_mid_session()
            self._utterance = utterance
            self._words.append(word_id)
        tail = self._tail()
        if new or (tail is not None and tail != self._tail_shown):
            messages.append(self._partial(tail))
            self._tail_shown = -1 if tail is None else tail
        if self._turn_is_over():
            messages += self._end_mid_session()
        return messages

    def skip(self, sample_count: int) -> list[dict[str, Any]]:
        """Count audio that cannot be recognised (other rate or encoding) as silence."""
        self.hearing.received_samples += sample_count
        return self._end_mid_session() if self._turn_is_over() else []

    def end_turn(self) -> list[dict[str, Any]]:
        """End the open turn now (if any words were heard): its final message(s)."""
        if not self._words:
            return []
        messages = [self._final(formatted=False)]
        if self.settings.format_turns:
            messages.append(self._final(formatted=True))
        self._next_turn()
        return messages

    def _end_mid_session(self) -> list[dict[str, Any]]:
        """The service ends a turn on its own: its finals, or none while ``abandon`` lasts."""
        if not self.abandon or not self._words:
            return self.end_turn()
        self.abandon -= 1
        self._next_turn()
        return []

    def _next_turn(self) -> None:
        self.turn_order += 1
        self._words = []
        self._utterance = -1
        self._tail_shown = -1

    def _turn_is_over(self) -> bool:
        if not self._words:
            return False
        last_end = max(self.hearing.span_ms(w)[1] for w in self._words)
        silence = self.hearing.received_ms - last_end
        complete = self.index.utterance_words[self._utterance][-1] in self.hearing.heard
        limit = self.settings.min_turn_silence if complete else self.settings.max_turn_silence
        return silence >= limit

    def _word(self, word_id: int, *, formatted: bool, final: bool) -> dict[str, Any]:
        word = self.index.words[word_id]
        start, end = self.hearing.span_ms(word_id)
        return {
            "start": start,
            "end": end,
            "text": word.text if formatted else word.norm,
            "confidence": WORD_CONFIDENCE,
            "word_is_final": final,
        }

    def _tail(self) -> int | None:
        """The next word of the utterance if it is partly (≥ 30 %) but not fully received."""
        if not self._words:
            return None
        following = [w for w in self.index.utterance_words[self._utterance] if w > self._words[-1]]
        if not following or following[0] in self.hearing.heard:
            return None
        return following[0] if self.hearing.coverage(following[0]) >= _TAIL_FRACTION else None

    def _partial(self, tail: int | None) -> dict[str, Any]:
        words = [self._word(w, formatted=False, final=True) for w in self._words]
        pending = [] if tail is None else [self._word(tail, formatted=False, final=False)]
        return {
            "type": "Turn",
            "turn_order": self.turn_order,
            "turn_is_formatted": False,
            "end_of_turn": False,
            "transcript": " ".join(w["text"] for w in words),
            "end_of_turn_confidence": PARTIAL_CONFIDENCE,
            "utterance": "",
            "words": words + pending,
        }

    def _final(self, *, formatted: bool) -> dict[str, Any]:
        words = [self._word(w, formatted=formatted, final=True) for w in self._words]
        transcript = " ".join(w["text"] for w in words)
        message: dict[str, Any] = {
            "type": "Turn",
            "turn_order": self.turn_order,
            "turn_is_formatted": formatted,
            "end_of_turn": True,
            "transcript": transcript,
            "end_of_turn_confidence": FINAL_CONFIDENCE,
            "utterance": transcript,
            "words": words,
        }
        if self.settings.language_detection:
            message["language_code"] = "en"
            message["language_confidence"] = LANGUAGE_CONFIDENCE
        return message
