"""The MQTT sink's topics: templates checked up front, values made safe for a topic."""

from __future__ import annotations

import re
import string
from typing import Final

TOPIC_FIELDS: Final = frozenset({"host", "session_id"})
MAX_TOPIC_BYTES: Final = 65_535
# In a topic MQTT forbids NUL and surrogates; mosquitto drops a client using C0/C1 controls or
# non-characters (U+FDD0-U+FDEF, U+xFFFE, U+xFFFF) too
_BAD_CHARS: Final = "\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_FORBIDDEN: Final = re.compile(f"[{_BAD_CHARS}]")
_UNSAFE: Final = re.compile(f"[+#{_BAD_CHARS}]")


def check_template(value: str, allowed: frozenset[str]) -> str:
    """A topic template may use only ``allowed`` placeholders and no MQTT wildcards."""
    if not value:
        raise ValueError("must not be empty")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"invalid template: {exc}") from None
    unknown = fields - allowed
    if unknown:
        names = ", ".join("{" + n + "}" for n in sorted(allowed))
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (allowed: {names})")
    if "+" in value or "#" in value:
        raise ValueError("must not contain the wildcards + or #")
    if bad := _FORBIDDEN.search(value):
        raise ValueError(f"must not contain the control character or non-character "
                         f"U+{ord(bad[0]):04X}")
    if len(value.encode()) > MAX_TOPIC_BYTES:
        raise ValueError(f"must not be longer than {MAX_TOPIC_BYTES} bytes (UTF-8)")
    return value


def topic_value(value: str) -> str:
    """A host name or session id for a topic: wildcards, forbidden characters made ``_``."""
    return _UNSAFE.sub("_", value)
