"""Problem lines: a pydantic validation error as ``dotted.key: message`` lines, one per problem.

Shared by the config's sections (:mod:`daemon.config`) and the sink tables
(:mod:`daemon.sinktables`). A line never echoes the value it is about (it may be a secret) and
never spans two lines.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from os import PathLike
from typing import Final

from pydantic import ValidationError

from daemon.envvars import unparsed_container

PLAIN_KEY: Final = re.compile(r"[^\s.:'\"]+")
"""A key part a problem line shows as it is: no space, dot, colon or quote (nor empty)."""

Problem = tuple[str, tuple[str, ...]]
"""A problem line and the dotted keys its check read (``()``: only the key the line names); the
keys say who the line names as having set them (``daemon.envvars.keys_origin``)."""


def key_text(part: str | int) -> str:
    """A key as a problem line names it: escaped and quoted unless it reads as one key part.

    A quoted TOML key may hold a line break (or a terminal escape): a problem stays one line.
    ``[sinks."a.b"]`` is ``sinks.'a.b'``, not the key ``b`` of a sink ``a``; ``[sinks.""]``
    is ``sinks.''``, and a space or colon does not end the key where a reader (or
    ``daemon.envvars.problem_origin``) looks for its end.
    """
    text = str(part)
    return text if text.isprintable() and PLAIN_KEY.fullmatch(text) else repr(text)


def path_text(path: str | PathLike[str]) -> str:
    """A path as a problem line names it: escaped and quoted if it has a control character.

    A file name may hold a line break or a terminal escape: a problem stays one line, and
    nothing reaches the terminal that it would act on.
    """
    text = str(path)
    return text if text.isprintable() else repr(text)


def validation_lines(exc: ValidationError, prefix: str = "", *, skip: Collection[str] = (),
                     sections: Collection[str] = (), env: Mapping[str, str] | None = None
                     ) -> list[str]:
    """Turn a pydantic error into ``dotted.key: message`` lines, never echoing input values.

    ``skip``: keys whose problems are reported otherwise. ``sections``: the top level's keys
    (a table there that is none of them is an unknown section). ``env``: the environment the
    values came from (a list or table there that is not JSON says so).
    """
    lines = []
    for error in exc.errors(include_url=False):   # the input is looked at, never shown
        if error["loc"] and str(error["loc"][0]) in skip:
            continue
        loc = ".".join(key_text(part) for part in error["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
            if sections and len(error["loc"]) == 1:
                known = ", ".join(sorted(sections))
                message = (f"unknown section (the sections are {known})"
                           if isinstance(error.get("input"), dict)
                           else f"unknown key (the top level has only the sections {known})")
        elif env is not None and (unparsed := unparsed_container(
                error["type"], error["loc"], error.get("input"), env)) is not None:
            message = unparsed
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] in ("value_error", "assertion_error"):
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        elif error["type"] == "model_type":    # not "… or instance of AudioConfig": a class
            message = message.split(" or instance of ", 1)[0]
        lines.append(f"{key}: {message}")
    return lines
