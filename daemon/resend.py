"""``transcribed resend SINK``: send a sink's dead-lettered turns again, in order.

A dead letter is a turn a sink refused (a 4xx, an ACL) or could not take in time
(``<state dir>/dead-letter/<sink>.jsonl``). Once the cause is fixed, this sends them again
through the sink as configured, the way ``test-sinks`` sends (nothing said on an MQTT
availability topic, no retained turn, a file sink's file not rotated): a turn delivered leaves
the file; one the sink refuses again stays, with its new reason; a sink that cannot be reached
(or does not answer within ``SEND_LIMIT_S``) ends the run, and the turns not tried stay.

The file is renamed aside (``<sink>.jsonl.resending``) before it is read, so the dead letters a
running daemon adds meanwhile go to a new file; what stays is appended back to it. An aside left
by a run that was interrupted is sent first, on the next run.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from daemon.deadletter import append_lines
from daemon.errors import PermanentSinkError
from daemon.events import TurnRecord, json_line
from daemon.plugins import Sink
from daemon.supervise import error_line

SEND_LIMIT_S: Final = 30.0  # one turn not sent within this: the sink is taken as unreachable


@dataclass
class Resent:
    """What a run did: turns sent again, turns kept (and why the first was)."""

    path: Path
    resent: int = 0
    kept: int = 0
    reasons: list[str] = field(default_factory=list)   # why turns were kept, first first

    def line(self, sink: str) -> str:
        """The report: ``hook: 12 resent, 1 kept in …/hook.jsonl (HTTP 400 …)``."""
        if not self.resent and not self.kept:
            return f"{sink}: nothing to resend ({self.path} is missing or empty)"
        kept = f", {self.kept} kept in {self.path} ({self.reasons[0]})" if self.kept else ""
        return f"{sink}: {self.resent} resent{kept}"


def resend(sink: Sink, path: Path) -> Resent:
    """Send the turns of the dead-letter file ``path`` through ``sink`` (module docstring)."""
    result = Resent(path)
    aside = path.with_name(path.name + ".resending")
    if not aside.exists():
        try:
            path.rename(aside)
        except FileNotFoundError:
            return result
    lines = [line for line in aside.read_text("utf-8", "replace").splitlines() if line]
    kept = asyncio.run(_through(sink, lines, result))
    extra = [line for line in aside.read_text("utf-8", "replace").splitlines()[len(lines):]
             if line]           # a daemon's append to the file as it was renamed
    if kept or extra:
        append_lines(path, kept + extra)
    aside.unlink()
    result.kept = len(kept) + len(extra)
    if result.kept and not result.reasons:
        result.reasons.append("added while this ran")
    return result


async def _through(sink: Sink, lines: list[str], result: Resent) -> list[str]:
    """Send ``lines`` through ``sink``; the lines kept (all of them if it cannot start)."""
    kept: list[str] | None = None
    try:
        async with sink:
            kept = await _send_all(sink, lines, result)
    except Exception as exc:  # the sink could not start (or close): what it did not send stays
        result.reasons.append(f"the sink failed: {error_line(exc)}")
    return lines if kept is None else kept


async def _send_all(sink: Sink, lines: list[str], result: Resent) -> list[str]:
    """Send each line's turn in order; the lines kept (refused, or not tried)."""
    kept: list[str] = []
    for index, line in enumerate(lines):
        reason = await _send(sink, line)
        if reason is None:
            result.resent += 1
            continue
        result.reasons.append(reason.removeprefix(_REFUSED))
        kept.append(_with_reason(line, reason))
        if not reason.startswith(_REFUSED):     # unreachable: the rest is not tried
            return kept + lines[index + 1:]
    return kept


_REFUSED: Final = "refused: "


async def _send(sink: Sink, line: str) -> str | None:
    """Send one dead letter's turn; ``None`` once delivered, else why not."""
    record = _record(line)
    if record is None:
        return f"{_REFUSED}not a turn this version can read"
    try:
        async with asyncio.timeout(SEND_LIMIT_S):
            await sink.send(record)
    except PermanentSinkError as exc:
        return f"{_REFUSED}{exc}"
    except TimeoutError:
        return f"no answer within {SEND_LIMIT_S:g} s"
    except Exception as exc:  # a transient failure, or a third-party sink's own exception
        return str(exc) or type(exc).__name__
    return None


def _record(line: str) -> TurnRecord | None:
    """The turn in a dead-letter line (``record``, or an unreadable outbox row's ``body``)."""
    try:
        entry = json.loads(line)
        data = entry.get("record") or json.loads(entry["body"])
        return TurnRecord.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, RecursionError):
        return None


def _with_reason(line: str, reason: str) -> str:
    """The dead letter with the reason of this run (the line as it was if it is no JSON)."""
    try:
        entry: Any = json.loads(line)
    except ValueError:
        return line
    if not isinstance(entry, dict):
        return line
    return json_line({**entry, "error": reason.removeprefix(_REFUSED)})


