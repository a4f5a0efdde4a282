"""Who set a key: ``TRANSCRIBED_<SECTION>__<KEY>`` variables, and the lines that blame them.

Every problem line starts with where its key was set: ``<file>: `` or, for the environment,
``environment <VARIABLE>[, <VARIABLE>…]: `` (one format for all; variables that made a sink of
their own instead of setting the file's of a like name say so before the colon). A problem of a
whole sink table (its type's model checks keys together) whose keys both set names both:
``<file>, environment <VARIABLE>[, …]: ``; so does a cross-key problem (``audio.path: required
when audio.source = 'file'``), from every key its check read (``keys_origin``). Lists and
tables set from the environment are JSON text; one that does not parse says so, with an example.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import UnionType
from typing import Annotated, Any, Final, Union, get_args, get_origin

from pydantic import BaseModel

ENV_PREFIX: Final = "TRANSCRIBED_"


def environment(names: Collection[str], note: str = "") -> str:
    """The origin prefix of a line about the keys these variables set (``note``: why, in ``()``)."""
    return f"environment {', '.join(names)}{f' ({note})' if note else ''}: "


def variable_key(name: str) -> list[str] | None:
    """The key path an environment variable sets, ``None`` for one that is not a setting.

    ``TRANSCRIBED_SINKS__HOOK__URL`` → ``["sinks", "hook", "url"]``.
    """
    if not name.upper().startswith(ENV_PREFIX) or name.upper() == "TRANSCRIBED_CONFIG":
        return None
    return name[len(ENV_PREFIX):].lower().split("__")


def problem_origin(line: str, where: str, env: Mapping[str, str],
                   file_sinks: AbstractSet[str] | None = None) -> str:
    """Who set the key a problem line names: the environment variable that set it, else ``where``.

    The key's own variable, or one that set a table holding it (``TRANSCRIBED_AUDIO='{...}'``),
    or those that set keys below a key (which made it a table).
    A problem of a sink's whole table (``sinks.<name>: …``, no single key) names ``where`` and
    the variables that set keys inside it: both set what its model checks together.
    With ``file_sinks`` (the sink names the file has): a sink the file does not have exists
    only because of the environment, so the variables that set its keys are named, and why
    they missed the file's sink of a like name (``lookalike_sink``).
    """
    named = line.split(":", 1)[0].split(" ", 1)[0].split(".")
    parts = [part.upper() for part in named]
    names = {variable.upper(): variable for variable in env}    # named as they were set
    if setters := key_variables(named, env):
        return environment(setters)
    if file_sinks is not None and len(parts) > 1 and parts[0] == "SINKS" \
            and named[1] not in file_sinks and (setters := _setting_keys_in(named[:2], env)):
        return environment(setters, lookalike_sink(named[1], names, file_sinks))
    if len(named) == 2 and parts[0] == "SINKS" and (inside := _setting_keys_in(named, env)):
        return f"{where.removesuffix(': ')}, {environment(inside)}" if where \
            else environment(inside)
    return where


def key_variables(key: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The variables that set ``key`` (a key path), named as they were set; ``[]`` if none did.

    The key's own variable, or one that set a table holding it (``TRANSCRIBED_AUDIO='{...}'``),
    or those that set keys below a key (``…__API_KEY__X`` made it a table, not text).
    """
    parts = [part.upper() for part in key]
    names = {variable.upper(): variable for variable in env}
    for end in range(len(parts), 0, -1):
        name = ENV_PREFIX + "__".join(parts[:end])
        if name in names:
            return [names[name]]
    if len(parts) == (3 if parts[0] == "SINKS" else 2):
        return sorted(variable for name, variable in names.items()
                      if name.startswith(f"{ENV_PREFIX}{'__'.join(parts)}__"))
    return []


def keys_origin(keys: Sequence[str], where: str, env: Mapping[str, str],
                file_table: Mapping[str, Any]) -> str:
    """Who set the keys a cross-key problem read (dotted, the line's own key among them).

    The variables that set any of them, and ``where`` if the file set one the environment did
    not override (``file_table``: the file's TOML), in the one format: ``<file>: ``,
    ``environment <VARIABLE>[, …]: `` or ``<file>, environment <VARIABLE>[, …]: ``. A key
    nobody set is a default, which has no origin: when no key was set, ``where`` as before.
    """
    setters = {key: key_variables(key.split("."), env) for key in keys}
    variables = sorted({variable for found in setters.values() for variable in found})
    in_file = any(not found and _in_table(file_table, key.split("."))
                  for key, found in setters.items())
    if not variables:
        return where
    if in_file and where:
        return f"{where.removesuffix(': ')}, {environment(variables)}"
    return environment(variables)


def _in_table(table: Mapping[str, Any], key: Sequence[str]) -> bool:
    """Whether the TOML ``table`` sets the key path ``key``."""
    for part in key:
        if not isinstance(table, Mapping) or part not in table:
            return False
        table = table[part]
    return True


def _setting_keys_in(table: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The variables that set keys inside ``table`` (a key path), named as they were set.

    Matched as the variables are read, in lower case: ``TRANSCRIBED_SINKS__MYLOG__PATH`` sets
    nothing in ``[sinks.MyLog]``.
    """
    depth = len(table)
    return sorted(name for name in env if (key := variable_key(name)) is not None
                  and len(key) > depth and key[:depth] == list(table))


def lookalike_sink(sink: str, variables: Collection[str], file_sinks: AbstractSet[str]) -> str:
    """Why variables made ``sink`` of their own when the file has one that differs by ``-``/case.

    ``TRANSCRIBED_SINKS__MY_LOG__PATH`` makes a sink ``my_log`` (with no type) instead of
    setting the file's ``[sinks.my-log]``: ``_`` is not read as ``-``, and a shell's ``export``
    cannot name ``TRANSCRIBED_SINKS__MY-LOG__PATH``. ``""`` when no file sink is alike, or
    ``variables`` (upper-case names) set the sink's ``type``: a sink of its own on purpose.
    """
    if f"{ENV_PREFIX}SINKS__{sink.upper()}__TYPE" in variables:
        return ""
    alike = sorted(name for name in file_sinks
                   if name != sink and _unified(name) == _unified(sink))
    if not alike:
        return ""
    tables = " or ".join(f"[sinks.{name}]" for name in alike)
    if all(name.lower() == sink.lower() for name in alike):
        return f"a new sink {sink}, not the file's {tables}: variable names are read in lower case"
    wanted = " or ".join(f"{ENV_PREFIX}SINKS__{name.upper()}__<KEY>" for name in alike)
    dashed = any("-" in name for name in alike)
    why = ("'-' and '_' differ" if dashed and "-" in sink
           else "'_' is not read as '-'" if dashed else "'-' is not read as '_'")
    shell = ", a name a shell's export cannot take but env and systemd's Environment= can"
    return f"a new sink {sink}, not the file's {tables}: {why}; set {wanted}" \
        + (shell if dashed else "")


def _unified(sink: str) -> str:
    """A sink name with case and ``-``/``_`` left out of account."""
    return sink.lower().replace("-", "_")


def unknown_variables(env: Mapping[str, str], sections: Collection[str]) -> list[str]:
    """``TRANSCRIBED_*`` variables that name no section, one line each.

    ``TRANSCRIBED_ASSEMBLYAI_API_KEY`` (one underscore) would otherwise be ignored without a word.
    """
    known = ", ".join(sorted(sections))
    return [f"{environment([name])}unknown setting (TRANSCRIBED_<SECTION>__<KEY>, sections: "
            f"{known})"
            for name in sorted(env)
            if (key := variable_key(name)) is not None and key[0] not in sections]


def unparsable_line(field: str | None, cause: BaseException | None, env: Mapping[str, str],
                    model: type[BaseModel]) -> str:
    """One line naming the variable whose list or table value (under ``field``) is not JSON.

    The variables under ``field`` whose key takes a list or table and whose value does not
    parse are named with their key; if none can be singled out, all of them with ``field``.
    """
    keys = {name: key for name in sorted(env) if (key := variable_key(name)) is not None
            and (field is None or key[0] == field)}
    culprits = [name for name, key in keys.items()
                if takes_json(key_annotation(model, key)) and json_error(env[name]) is not None]
    if len(culprits) == 1:
        (name,) = culprits
        annotation = key_annotation(model, keys[name])
        return f"{environment([name])}{'.'.join(keys[name])}: {json_problem(cause, annotation)}"
    names = culprits or list(keys) or [f"{ENV_PREFIX}{(field or '').upper()}*"]
    return f"{environment(names)}{field or '?'}: {json_problem(cause, None)}"


def json_problem(cause: BaseException | None, annotation: Any) -> str:
    """``cannot parse the value (…)`` and how to write it; never the value itself."""
    example = '{"key": "value"}' if _takes_table(annotation) else '["a", "b"]'
    reason = f" ({cause})" if cause is not None else ""
    return f"cannot parse the value{reason}; lists and tables are written as JSON, e.g. '{example}'"


CONTAINER_ERRORS: Final = {"dict_type": dict, "model_type": dict, "model_attributes_type": dict,
                            "list_type": list, "tuple_type": list, "set_type": list}


def unparsed_container(error_type: str, loc: Sequence[str | int], value: Any,
                       env: Mapping[str, str]) -> str | None:
    """The problem of a list or table that is text from its own variable and not JSON.

    (``TRANSCRIBED_SINKS__NOTES='{...'``: the settings source leaves such text as it is.)
    """
    kind = CONTAINER_ERRORS.get(error_type)
    name = ENV_PREFIX + "__".join(str(part) for part in loc).upper()
    values = {variable.upper(): text for variable, text in env.items()}
    if kind is None or not isinstance(value, str) or values.get(name) != value:
        return None
    error = json_error(value)
    return None if error is None else json_problem(error, kind)


def json_error(text: str) -> ValueError | None:
    """Why ``text`` is not JSON (``None`` if it is)."""
    try:
        json.loads(text)
    except ValueError as exc:
        return exc
    except RecursionError:
        return ValueError("nested too deeply")
    return None


def key_annotation(model: type[BaseModel], key: Sequence[str]) -> Any:
    """The type a key path takes in ``model`` (``None`` when it names no key)."""
    annotation: Any = model
    for part in key:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (dict, Mapping) and len(get_args(annotation)) == 2:
            annotation = get_args(annotation)[1]
        else:
            return None
    return annotation


def _members(annotation: Any) -> tuple[Any, ...] | None:
    """The members of ``X | Y`` or the type of ``Annotated[X, …]``; ``None`` for other types."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return get_args(annotation)
    if origin is Annotated:
        return get_args(annotation)[:1]
    return None


def takes_json(annotation: Any) -> bool:
    """A table, a list or a model (also inside ``X | None`` or ``Annotated``), not text."""
    members = _members(annotation)
    if members is not None:
        return any(takes_json(member) for member in members)
    target = get_origin(annotation) or annotation
    return isinstance(target, type) and not issubclass(target, str | bytes) \
        and issubclass(target, Mapping | Sequence | AbstractSet | BaseModel)


def _takes_table(annotation: Any) -> bool:
    members = _members(annotation)
    if members is not None:
        return any(_takes_table(member) for member in members)
    target = get_origin(annotation) or annotation
    return isinstance(target, type) and issubclass(target, Mapping | BaseModel)
