"""What a session sends next: the ledger read in whole chunks, and which audio is silence.

Owns the sender's reading of the ledger (``next_piece``: whole chunks, merged or padded up to
the shortest frame the service takes, never at or beyond a replay session's ``stop``) and the
silence tests it decides on (``SILENCE_RMS``): ``silent_around`` (no speech within the
hangover of a piece: skippable while catching up) and ``silent_boundary`` (a rollover point).
"""

from __future__ import annotations

from typing import Final

from daemon.ledger import Ledger, Piece, rms

SILENCE_RMS: Final = 200.0          # below this a chunk counts as silence (about -44 dBFS)
HANGOVER_MS: Final = 300            # audio kept around speech when skipping silence


def read_until(ledger: Ledger, position: int, samples: int, stop: int | None) -> Piece | None:
    """Up to ``samples`` of the ledger at ``position``, never at or beyond ``stop``."""
    piece = ledger.read(position, samples)
    if piece is None or stop is None:
        return piece
    if piece.start >= stop:
        return None
    keep = min(piece.samples, stop - piece.start)
    return piece if keep == piece.samples else Piece(piece.start, piece.pcm[: 2 * keep],
                                                     piece.captured_at)


def next_piece(ledger: Ledger, position: int, *, chunk: int, minimum: int, stop: int | None,
               merged: int = 0) -> Piece | None:
    """The next piece to send: whole chunks, never under ``minimum`` (merged, up to ``merged``).

    Short with no audio after it yet, it is returned short (the caller waits: a pad would
    skip as much of the next chunk); padded only where no more comes (end of input, stop).
    """
    piece = read_until(ledger, position, chunk, stop)
    if piece is None:
        return None
    while piece.samples < minimum:
        more = read_until(ledger, piece.end, (merged or chunk) - piece.samples, stop)
        if more is None and not ledger.eof and piece.end != stop:
            return piece
        if more is None or more.start != piece.end or more.samples == 0:
            pad = bytes(2 * (minimum - piece.samples))
            return Piece(piece.start, piece.pcm + pad, piece.captured_at)
        piece = Piece(piece.start, piece.pcm + more.pcm, piece.captured_at)
    return piece


def silent_around(ledger: Ledger, piece: Piece) -> bool:
    """No speech within ``HANGOVER_MS`` before or after ``piece`` (the audio after it is held)."""
    span = ledger.sample_rate * HANGOVER_MS // 1000
    stop = piece.end + span
    position = max(ledger.head, piece.start - span)
    while position < stop:
        part = ledger.read(position, stop - position)
        if part is None:
            break
        if rms(part.pcm) >= SILENCE_RMS:
            return False
        position = part.end
    return position >= stop


def silent_boundary(ledger: Ledger, piece: Piece) -> bool:
    """``piece`` and the audio just before it (as long, as far as still held) are silent."""
    last = ledger.read(max(ledger.head, piece.start - piece.samples), piece.samples)
    return rms(piece.pcm) < SILENCE_RMS and (last is None or rms(last.pcm) < SILENCE_RMS)
