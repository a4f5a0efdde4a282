"""Dead-letter files: where a turn that cannot be delivered (or queued) is kept.

One JSON line per turn, in ``<state dir>/dead-letter/<sink>.jsonl``.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import structlog

from daemon.events import json_line
from daemon.fdio import append_whole

log = structlog.get_logger("daemon.dispatch")

FOLDER: Final = "dead-letter"           # in the state directory


def dead_letter_file(folder: Path, sink: str) -> Path:
    """The dead-letter file of ``sink`` in ``folder`` (``<state dir>/dead-letter``)."""
    return folder / f"{sink}.jsonl"


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole JSON lines to a dead-letter file (0600 in a 0700 folder: transcripts).

    Raises:
        OSError: the folder or file cannot be made or written (nothing half-written stays).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        with suppress(OSError):         # transcripts: private, like the outbox, also
            path.parent.chmod(0o700)    # what an older version left 0644 / 0755
            os.fchmod(fd, 0o600)
        # the last place a turn can be kept: no character may stop it (backslashreplace)
        data = "".join(f"{line}\n" for line in lines)
        append_whole(fd, data.encode("utf-8", "backslashreplace"))
    finally:
        os.close(fd)


def append_dead_letter(path: Path, entry: dict[str, Any]) -> bool:
    """One JSON line at the end of a dead-letter file (0600 in a 0700 folder: transcripts).

    Never raises: a failure is logged (``sink.dead_letter_failed``) naming the file and the
    record's id (when ``entry`` holds a record), and False returned.
    """
    try:
        append_lines(path, [json_line(entry)])
    except OSError as exc:
        record = entry.get("record")
        named = {"record_id": record["id"]} if isinstance(record, dict) and "id" in record else {}
        log.error("sink.dead_letter_failed", path=str(path), error=exc.strerror, **named)
        return False
    return True
