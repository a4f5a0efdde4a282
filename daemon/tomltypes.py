"""Value types in the config file: a TOML value of the wrong type is a problem, not converted.

pydantic's lax mode turns ``"100"`` into 100, ``"no"`` and ``0`` into false and ``true`` into 1.
That is right for environment variables (always text) and wrong for a TOML file, where every
value has a type of its own: a quoted number is a mistake its writer wants to hear of.
``type_problems`` validates a table again in pydantic's strict mode (any model, a third-party
sink type's too) and keeps the errors that say a scalar has the wrong type; ``type_message``
words such an error, for these and for pydantic's own errors about values from the file. A
float key takes a TOML integer (``max_delay = 30``). A value is shown only where it cannot be
a secret: where a number or a boolean was wanted, and it is one or reads as one.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from types import NoneType, UnionType
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]
"""Where a value is in a table: keys, and list positions counted from 0 (as pydantic's)."""

EXPECTED: Final[dict[str, str]] = {
    "int_type": "integer", "int_parsing": "integer", "int_from_float": "integer",
    "int_parsing_size": "integer", "float_type": "float", "float_parsing": "float",
    "bool_type": "boolean", "bool_parsing": "boolean", "string_type": "string",
}
"""pydantic's error types that say a scalar has the wrong type, and the TOML type wanted."""

WANTED: Final[dict[str, str]] = {
    **EXPECTED, "dict_type": "table", "model_type": "table", "list_type": "array",
    "tuple_type": "array"}
"""Those, and the error types that say a table or a list was wanted (a file's value of the
wrong type is worded as TOML's whatever pydantic validated it as)."""

_BOUNDS: Final = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
    "too_short", "too_long", "string_too_short", "string_too_long"})
_ARTICLE: Final = {"integer": "an", "array": "an"}
_WANTED: Final = {"float": "a number"}
_NUMERIC: Final = frozenset({"integer", "float", "boolean"})    # a value there is no secret
_LAX: Final[dict[str, TypeAdapter[Any]]] = {
    "integer": TypeAdapter(int), "float": TypeAdapter(float), "boolean": TypeAdapter(bool)}
_SHOWN_MAX: Final = 30


def toml_kind(value: Any) -> str:
    """The TOML type of a value as tomllib reads it (``"value"`` for anything else)."""
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
        ((list, tuple), "array"), (Mapping, "table"), (datetime.datetime, "date-time"),
        (datetime.date, "date"), (datetime.time, "time"))
    return next((kind for types, kind in kinds if isinstance(value, types)), "value")


def _a(kind: str) -> str:
    return f"{_ARTICLE.get(kind, 'a')} {kind}"


def type_name(value: Any) -> str:
    """``an integer``, ``a table``: a value's TOML type, with its article (never the value)."""
    return _a(toml_kind(value))


def _lax(kind: str, value: Any) -> Any:
    """``value`` as lax validation reads it for ``kind`` (``None`` when it does not)."""
    adapter = _LAX.get(kind)
    if adapter is None:
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def found_text(value: Any, kinds: Collection[str] = ()) -> str:
    """``the string "100"`` where the value may be shown (see the module), else ``a string``."""
    kind = toml_kind(value)
    readable = kind in _NUMERIC or (kind == "string" and any(
        _lax(wanted, value) is not None for wanted in kinds))
    if kinds and set(kinds) <= _NUMERIC and readable and len(_shown(value)) <= _SHOWN_MAX:
        return f"the {kind} {_shown(value)}"
    return _a(kind)


def _hint(kinds: Collection[str], value: Any) -> str:
    """How to write it, where that is plain: `` (write it without quotes)``, or ``""``."""
    kind = toml_kind(value)
    if "string" in kinds and kind in ("integer", "float", "boolean", "date-time", "date", "time"):
        return " (put it in quotes)"
    if len(kinds) != 1:
        return ""
    (wanted,) = kinds
    read = _lax(wanted, value)
    if read is None or kind in ("array", "table"):
        return ""
    if wanted == "boolean":
        word = "true" if read else "false"
        return f" (write {word}, without quotes)" if kind == "string" else f" (write {word})"
    if kind == "string":
        return " (write it without quotes)"
    return f" (write {read})" if kind == "float" and wanted == "integer" else ""


def type_message(kinds: Collection[str], value: Any, wanted: str = "") -> str:
    """``expected an integer, found the string "100" (write it without quotes)``.

    ``kinds``: the TOML types the key takes; ``wanted``: what to say it takes, if not them.
    """
    ordered = sorted(kinds)
    wanted = wanted or " or ".join(_WANTED.get(kind, _a(kind)) for kind in ordered)
    return f"expected {wanted}, found {found_text(value, ordered)}{_hint(ordered, value)}"


def value_loc(table: Mapping[str, Any], loc: Sequence[str | int]) -> Loc:
    """The part of an error's ``loc`` that is in ``table`` (a union member's tag is not)."""
    node: Any = table
    found: list[str | int] = []
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        found.append(part)
    return tuple(found)


def type_problems(model: type[BaseModel], table: Mapping[str, Any], *,
                  lax: Sequence[ErrorDetails] = (), at: Loc = (),
                  skip: Callable[[Loc], bool] | None = None,
                  context: dict[str, Any] | None = None) -> dict[Loc, str]:
    """The values of ``table`` whose TOML type is wrong for ``model``, by where they are.

    ``lax``: the errors of the lax validation, of which those at ``at`` (the table's place in
    what it validated) are the table's: a value they name is theirs (``nan``: not a finite
    number), unless only for a bound (``chunk_ms = "5"``: both lines);
    ``skip``: where a value did not come from the file (the environment's is text).
    """
    covered = {value_loc(table, error["loc"][len(at):]) for error in lax
               if error["type"] not in _BOUNDS and tuple(error["loc"][:len(at)]) == at}
    groups: dict[Loc, list[ErrorDetails]] = {}
    for error in _strict_errors(model, table, context):
        if "[key]" in error["loc"]:     # a table's key: always a string in TOML, never wrong
            continue
        groups.setdefault(value_loc(table, error["loc"]), []).append(error)
    problems: dict[Loc, str] = {}
    for loc, errors in groups.items():
        kinds = {EXPECTED.get(error["type"], "") for error in errors}
        value = errors[0].get("input")
        taken = kinds | ({"integer"} if "float" in kinds else set())
        if loc and "" not in kinds and loc not in covered and not (skip and skip(loc)) \
                and toml_kind(value) not in taken:
            problems[loc] = type_message(kinds, value)
    failed = {loc[:1] for loc in (*groups, *covered)}
    for key, message in _literal_problems(model, table).items():
        if (key,) not in failed and not (skip and skip((key,))):
            problems[(key,)] = message
    return problems


def _strict_errors(model: type[BaseModel], table: Mapping[str, Any],
                   context: dict[str, Any] | None) -> list[ErrorDetails]:
    try:
        model.model_validate(table, strict=True, context=context)
    except ValidationError as exc:
        return exc.errors(include_url=False)
    except Exception:   # a plugin's validator has a bug: the lax validation names it
        return []
    return []


def _literal_problems(model: type[BaseModel], table: Mapping[str, Any]) -> dict[str, str]:
    """``qos = true`` for ``Literal[0, 1, 2]``: equal to 1, which even strict mode takes."""
    problems = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        choices = _literal_choices(field.annotation)
        if key not in table or not choices:
            continue
        value = table[key]
        kinds = {toml_kind(choice) for choice in choices}
        if toml_kind(value) not in kinds and any(value == choice for choice in choices):
            wanted = ", ".join(_shown(choice) for choice in choices[:-1])
            wanted = f"{wanted} or {_shown(choices[-1])}" if wanted else _shown(choices[-1])
            problems[key] = type_message(kinds, value, wanted=wanted)
    return problems


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The values of ``Literal[…]`` (also inside ``X | None`` or ``Annotated``), else ``()``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)
    if origin is Annotated:
        return _literal_choices(get_args(annotation)[0])
    if origin in (Union, UnionType):
        members = [member for member in get_args(annotation) if member is not NoneType]
        return _literal_choices(members[0]) if len(members) == 1 else ()
    return ()
