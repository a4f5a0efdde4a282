"""Problem lines: a pydantic validation error as ``dotted.key: message`` lines, one per problem.

Shared by the config's sections (:mod:`daemon.config`) and the sink tables
(:mod:`daemon.sinktables`). A line never echoes the value it is about (it may be a secret) and
never spans two lines.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from os import PathLike
from typing import Any, Final

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from daemon.envvars import key_annotation, unparsed_container
from daemon.tomltypes import WANTED, Loc, found_text, type_message

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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'source'?)`` when a choice is close to ``word`` (a typo), else ``""``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def model_keys(model: type[BaseModel]) -> set[str]:
    """The keys a model's table takes (its fields, by alias where one is set)."""
    return {field.alias or name for name, field in model.model_fields.items()}


def located(prefix: str, loc: Sequence[str | int], message: str) -> str:
    """``prefix.key: message``; list positions read ``item #2`` (counted from 1, as people do).

    ``assemblyai.keyterms: item #2: expected a string, found an integer``, as a sink's own
    check says ``sinks.hook.secret: secret #2 must start with 'whsec_'``.
    """
    first = next((at for at, part in enumerate(loc) if isinstance(part, int)), len(loc))
    keys = ".".join(key_text(part) for part in loc[:first])
    key = f"{prefix}.{keys}" if prefix and keys else (prefix or keys)
    items = ", ".join(f"item #{part + 1}" if isinstance(part, int) else f"key {key_text(part)}"
                      for part in loc[first:])
    return f"{key}: {items}: {message}" if items else f"{key}: {message}"


def validation_lines(exc: ValidationError, prefix: str = "", *, skip: Collection[str] = (),
                     sections: Collection[str] = (), env: Mapping[str, str] | None = None,
                     model: type[BaseModel] | None = None,
                     toml: Callable[[Loc], bool] | None = None) -> list[str]:
    """Turn a pydantic error into ``dotted.key: message`` lines, never echoing input values.

    ``skip``: keys whose problems are reported otherwise. ``sections``: the top level's keys
    (a table there that is none of them is an unknown section). ``env``: the environment the
    values came from (a list or table there that is not JSON says so). ``model``: the model
    validated (an unknown key close to one of its keys gets a "did you mean"). ``toml``:
    whether the value at a ``loc`` came from the TOML file (its wrong type is named as TOML's:
    ``expected an integer, found a string``; the environment's values are all text).
    """
    lines = []
    for error in exc.errors(include_url=False):   # the input is looked at, never shown
        if error["loc"] and str(error["loc"][0]) in skip:
            continue
        message = _message(error, sections, env, model, toml)
        lines.append(located(prefix, error["loc"], message))
    return lines


def _message(error: ErrorDetails, sections: Collection[str], env: Mapping[str, str] | None,
             model: type[BaseModel] | None, toml: Callable[[Loc], bool] | None) -> str:
    """The text of one pydantic error's line, after its key."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    message = error["msg"]
    if kind == "extra_forbidden":
        message = f"unknown key{_suggestion(loc, model)}"
        if sections and len(loc) == 1:
            known = ", ".join(sorted(sections))
            mean = did_you_mean(str(loc[0]), sections).strip(" ()")
            message = (f"unknown section ({f'{mean} ' if mean else ''}the sections are {known})"
                       if isinstance(value, dict)
                       else f"unknown key (the top level has only the sections {known})")
    elif env is not None and (unparsed := unparsed_container(kind, loc, value, env)) is not None:
        message = unparsed
    elif kind == "dict_type" and sections and loc == ("sinks",):
        message = f"expected tables [sinks.<name>], one per sink, found {found_text(value)}"
    elif kind in WANTED and toml is not None and toml(tuple(loc)):
        message = type_message({WANTED[kind]}, value)
    elif kind == "missing":
        message = "required key is missing"
    elif kind in ("value_error", "assertion_error"):
        message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind == "model_type":    # not "… or instance of AudioConfig": a class
        message = message.split(" or instance of ", 1)[0]
    return message


def _suggestion(loc: Sequence[str | int], model: type[BaseModel] | None) -> str:
    """A "did you mean" for an unknown key, from the keys of the table it is in."""
    parent: Any = key_annotation(model, [str(part) for part in loc[:-1]]) if model else None
    if not loc or not isinstance(parent, type) or not issubclass(parent, BaseModel):
        return ""
    return did_you_mean(str(loc[-1]), model_keys(parent))
