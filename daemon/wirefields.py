"""Reading the fields of a server frame (a parsed JSON object) for ``daemon.protocol``.

Field readers: a value of the wrong type makes the frame malformed (``ProtocolError``, the
caller logs it), so ``null`` never becomes the text "None" nor ``"false"`` a true flag. A
confidence or a figure we only report is repaired instead (it must not cost the turn or the
end of the session): not a finite number, 0.0; a confidence beyond 0..1, the nearest end. The
readers that take ``repairs`` note each repair there, for the frame's one warning line.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

MESSAGE_CHARS: Final = 500              # an Error or Warning text beyond this is cut
CONFIDENCE_SLACK: Final = 1e-6          # a confidence this far outside 0..1 is a rounding slip
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def words(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A Turn's ``words``: missing or ``null`` is none."""
    words = data.get("words") or []
    if not isinstance(words, list) or not all(isinstance(w, dict) for w in words):
        raise TypeError("words is not a list of objects")
    return words


def message(data: dict[str, Any], key: str) -> str:
    """An Error or Warning text, whatever its type, as text any UTF-8 output can carry.

    It is logged, shown to live viewers and may end the daemon's exit message: one line of
    ``MESSAGE_CHARS`` at most (the close reason it stands for is 123 bytes).
    """
    value = data.get(key)
    text = "" if value is None else utf8(value if isinstance(value, str) else str(value))
    if len(text) > MESSAGE_CHARS:
        text = f"{text[:MESSAGE_CHARS]}… ({len(text)} characters)"
    return text


def code(data: dict[str, Any], key: str, text_key: str, repairs: list[str],
         codes: range = range(1000, 5000)) -> int | None:
    """An Error's close code (1000..4999) or a Warning's code, maybe as a numeric string; None.

    An Error's code stands for the close code that follows and replaces it: ``true`` (it was
    read as 1, so a 3006 became a retry loop) or ``-1`` is read as none (repaired), so the close
    code decides, while the text (which classifying the close may need) is kept.
    """
    value = data.get(key)
    if value is None:
        return None
    number = value.strip() if isinstance(value, str) else value
    if isinstance(number, str) and number.isdecimal():
        number = int(number)
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, int) and not isinstance(number, bool) and number in codes:
        return number
    what = "a close code" if codes.start == 1000 else "an integer"
    repairs.append(f"{key} {shown(value)} is not {what}: read as none")
    return None


def text(data: dict[str, Any], key: str) -> str:
    """A string field, missing or ``null`` read as empty."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key} is {type(value).__name__}, not a string")
    return utf8(value)


def utf8(text: str) -> str:
    """Lone surrogates (valid JSON escapes that no UTF-8 file or request can carry) as U+FFFD.

    One U+FFFD each (``json`` has already paired the valid ones).
    """
    return _SURROGATE.sub("\ufffd", text)


def integer(data: dict[str, Any], key: str) -> int:
    """An integer (a float with no fraction counts); anything else makes the frame malformed."""
    value = data[key]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} is {shown(value)}, not an integer")
    return value


def count(data: dict[str, Any], key: str) -> int:
    """A non-negative figure the daemon relies on, rounded (``45000.5`` is not a bad frame)."""
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise TypeError(f"{key} is {shown(value)}, not a count")
    return round(value)


def flag(data: dict[str, Any], key: str, default: bool) -> bool:
    """A JSON boolean; missing or ``null`` is ``default``."""
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{key} is {shown(value)}, not true or false")
    return value


def finite(data: dict[str, Any], key: str) -> float:
    """A number we only report (a confidence, a heartbeat's figures): anything else is 0.0."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:                   # an integer of 400 digits
        return 0.0
    return number if math.isfinite(number) else 0.0


def figure(data: dict[str, Any], key: str, repairs: list[str]) -> float:
    """A duration: missing or ``null`` is 0.0; one that is no finite number >= 0 is 0.0, noted."""
    value = data.get(key)
    if value is None:
        return 0.0
    number = finite(data, key)
    if number < 0 or number != value:
        repairs.append(f"{key} {shown(value)} is not a number >= 0: read as 0")
        return 0.0
    return number


def confidence(data: dict[str, Any], key: str, repairs: list[str], where: str = "") -> float:
    """A confidence, 0..1: missing or ``null`` is 0.0; beyond the range, the nearest end."""
    value = data.get(key)
    if value is None:
        return 0.0
    if isinstance(value, int) and not isinstance(value, bool):
        read = float(min(1, max(0, value)))     # exact, for an integer of 400 digits too
    else:                                       # an infinite one says nothing: 0.0
        read = min(1.0, max(0.0, finite(data, key)))
    if read != value and not _rounding(value, read):
        field = f"{where}.{key}" if where else key
        repairs.append(f"{field} {shown(value)} is not a confidence: read as {read:g}")
    return read


def _rounding(value: object, read: float) -> bool:
    """A float a hair outside 0..1 (``1.0000001``): a rounding slip, clamped without a word."""
    return isinstance(value, float) and abs(value - read) <= CONFIDENCE_SLACK


def shown(value: object) -> str:
    """A value as a log line shows it: its ``repr``, at most 30 characters."""
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:29]}…"


def preview(frame: str | bytes, limit: int = 80) -> str:
    """The start of a frame that cannot be read, for its log line."""
    text = frame if isinstance(frame, str) else frame[:limit].decode("utf-8", "replace")
    return repr(text[:limit])
