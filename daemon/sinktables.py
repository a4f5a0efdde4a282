"""The ``[sinks]`` tables: each validated by its sink type's own model, at start-up and reload.

A table's key is the sink's (instance) name; its ``type`` picks the model from the plugins. Every
problem is one line naming ``sinks.<name>.<key>``, and all are reported at once. Disabled sinks
(``enabled = false``) are validated too (``check-config`` shows them); what runs is
``enabled_sinks``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Final

from pydantic import ValidationError

from daemon.envvars import (
    CONTAINER_ERRORS,
    json_error,
    json_problem,
    key_variables,
    takes_json,
    variable_key,
)
from daemon.errors import ConfigError
from daemon.plugins import PluginHost, SinkConfig, SinkType
from daemon.problems import (
    PLAIN_KEY,
    Problem,
    did_you_mean,
    key_text,
    located,
    model_keys,
    validation_lines,
)
from daemon.supervise import error_line
from daemon.tomltypes import Loc, type_problems

SINK_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]*")
LOOK_AT_PATHS: Final = "look_at_paths"
"""A key of the validation context tables from a configuration are validated with: set, a
model may look at the paths it names (a file sink's ``path`` that is a folder) and refuse what
can never work; it never creates anything. A model built in code (a test's) is not given it."""

ValidatedSinks = dict[str, tuple[SinkType, SinkConfig]]   # sink name -> its type and config


def validate_sinks(host: PluginHost, tables: Mapping[str, Mapping[str, Any]],
                   env: Mapping[str, str] | None = None) -> ValidatedSinks:
    """Validate every sink table with its type's model. Problems name ``sinks.<name>.<key>``.

    Returns every sink, disabled ones included. ``env`` (default ``os.environ``) tells which
    keys the environment set: a list or table there must be JSON text.

    Raises:
        ConfigError: every problem (``sink_problems``), one line each.
    """
    result, problems = sink_problems(host, tables, env)
    if problems:
        raise ConfigError([line for line, _keys in problems])
    return result


def sink_problems(host: PluginHost, tables: Mapping[str, Mapping[str, Any]],
                  env: Mapping[str, str] | None = None) -> tuple[ValidatedSinks, list[Problem]]:
    """The sinks that validate, and the problems of the others with the keys each check read.

    A key unknown to the sink's type was found by comparing it with ``type``: its problem
    reads both (``sinks.<name>.path: unknown key for type 'console'``, where the environment
    changed the file's ``type``, names the variable too).
    """
    env = os.environ if env is None else env
    known = host.sink_types()
    keys = [key for key in map(variable_key, env)
            if key is not None and len(key) == 3 and key[0] == "sinks"]
    problems: list[Problem] = []
    result: ValidatedSinks = {}
    for name, table in tables.items():
        if not SINK_NAME.fullmatch(name):
            problems.append((f"sinks.{key_text(name)}: a sink name is lower-case letters, "
                             "digits, '_' or '-' (environment overrides are matched in lower "
                             "case)", ()))
        elif not isinstance(table, Mapping):
            problems.append((f"sinks.{name}: must be a table", ()))
        elif not isinstance(table.get("type"), str) or table["type"] not in known:
            problems.append((_type_problem(host, name, table.get("type")), ()))
            problems += _stray_keys(known, name, table)
        else:
            from_env = {k[2] for k in keys if k[1] == name}
            checked = _validated(known[table["type"]], name, table, from_env, env)
            if isinstance(checked, list):
                problems += checked
            else:
                result[name] = (known[table["type"]], checked)
    return result, problems


def _type_problem(host: PluginHost, name: str, type_name: Any) -> str:
    """The line for a sink whose ``type`` is missing, not text or no known type."""
    known = host.sink_types()
    choices = ", ".join(sorted(known))
    got = ("missing" if type_name is None else f"unknown type {type_name[:60]!r}"
           if isinstance(type_name, str) else "must be text (a type name)")
    broken = "".join(f"; plugin {plugin} {why}" for plugin, why in host.failed.items())
    return f"sinks.{name}.type: {got} (known types: {choices}){broken}"


def _validated(sink_type: SinkType, name: str, table: Mapping[str, Any],
               from_env: AbstractSet[str], env: Mapping[str, str]
               ) -> SinkConfig | list[Problem]:
    """The table validated by its type's model, or its problems.

    A value of the wrong TOML type that the model's (lax) validation converted is a problem
    too (``fsync = 0``), unless the environment set it (its values are text).
    """
    values, unparsed = _json_values(sink_type, table, from_env)
    model, context = sink_type.config_model, {LOOK_AT_PATHS: True}

    def set_by_env(loc: Loc) -> bool:
        return bool(key_variables(["sinks", name, *map(str, loc)], env))

    try:
        config = model.model_validate(values, context=context)
    except ValidationError as exc:
        # text from the environment that was not JSON, where the model wanted a list or
        # table (a webhook's ``secret`` also takes plain text): say how to write it
        wrong = {key: problem for key, problem in unparsed.items()
                 if any(e["loc"][:1] == (key,) and e["type"] in CONTAINER_ERRORS
                        for e in exc.errors())}
        unknown = [str(e["loc"][0]) for e in exc.errors()
                   if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
        lines = [f"sinks.{name}.{key}: {problem}" for key, problem in wrong.items()]
        lines += validation_lines(exc, prefix=f"sinks.{name}", skip={*wrong, *unknown},
                                  toml=lambda loc: not set_by_env(loc))
        typed = type_problems(model, values, lax=exc.errors(), skip=set_by_env,
                              context=context)
        lines += [located(f"sinks.{name}", loc, message) for loc, message in typed.items()
                  if str(loc[0]) not in {*wrong, *unknown}]
        return [(line, ()) for line in lines] \
            + [_unknown_key(name, key, sink_type, env) for key in unknown]
    except ConfigError as exc:
        return [(f"sinks.{name}.{p}", ()) for p in exc.problems]
    except Exception as exc:  # supervision boundary: a plugin's validator has a bug
        return [(f"sinks.{name}: the config model of sink type {sink_type.name!r} failed "
                 f"(a bug in its plugin): {error_line(exc)}", ())]
    typed = type_problems(model, values, skip=set_by_env, context=context)
    return [(located(f"sinks.{name}", loc, message), ()) for loc, message in typed.items()] \
        or config


def _unknown_key(name: str, key: str, sink_type: SinkType, env: Mapping[str, str]) -> Problem:
    """A key the sink's type does not have: found by comparing it with ``type``, both read.

    Where the environment set either, the type is named: the file may show another. A key
    close to one the type has gets a "did you mean" (``fsnyc``: ``'fsync'``).
    """
    read = (f"sinks.{name}.{key}", f"sinks.{name}.type")
    if not PLAIN_KEY.fullmatch(key):        # not a dotted key part: the line's own origin
        return f"sinks.{name}.{key_text(key)}: unknown key", ()
    mean = did_you_mean(key, model_keys(sink_type.config_model))
    if any(key_variables(dotted.split("."), env) for dotted in read):
        return f"sinks.{name}.{key}: unknown key for type {sink_type.name!r}{mean}", read
    return f"sinks.{name}.{key}: unknown key{mean}", read


def _stray_keys(known: Mapping[str, SinkType], name: str, table: Mapping[str, Any]
                ) -> list[Problem]:
    """Keys no sink type has, in a table without a (known) type: ``typ = "file"`` is named.

    Which keys a table may have depends on its type; a key none of the types has is wrong
    whatever the type is to be (none when a type takes any key).
    """
    models = [sink_type.config_model for sink_type in known.values()]
    if any(model.model_config.get("extra") != "forbid" for model in models):
        return []
    keys = set(model_keys(SinkConfig)).union(*map(model_keys, models))
    return [(f"sinks.{name}.{key_text(key)}: unknown key{did_you_mean(str(key), keys)}", ())
            for key in table if key not in keys]


def enabled_sinks(sinks: ValidatedSinks) -> ValidatedSinks:
    """The sinks that run: those with ``enabled = true``."""
    return {name: sink for name, sink in sinks.items() if sink[1].enabled}


def none_enabled(sinks: ValidatedSinks) -> list[str]:
    """The disabled sinks' names when sinks are configured but none is enabled, else ``[]``.

    Turns then go nowhere (the console sink stands in only when no sink is configured at all).
    """
    return [] if enabled_sinks(sinks) else sorted(sinks)


def _json_values(sink_type: SinkType, table: Mapping[str, Any], from_env: AbstractSet[str]
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """The table with JSON text read for keys that take a table or a list, and what failed.

    Environment overrides are text (``TRANSCRIBED_SINKS__HOOK__HEADERS='{"X-Team": "ops"}'``):
    written as JSON, as for the other sections' lists and tables. Such a key (in ``from_env``)
    that does not parse is left as text (the model may take text too) and its problem returned
    by key, for when the model does not.
    """
    fields = sink_type.config_model.model_fields
    values = dict(table)
    unparsed: dict[str, str] = {}
    for key, value in table.items():
        field = fields.get(key)
        if field is None or not isinstance(value, str) or not takes_json(field.annotation):
            continue
        if value.lstrip()[:1] not in ("{", "["):    # not JSON ("12345" stays a text secret)
            if key in from_env:
                unparsed[key] = json_problem(json_error(value), field.annotation)
            continue
        try:
            values[key] = json.loads(value)
        except (ValueError, RecursionError) as exc:
            if key in from_env:
                unparsed[key] = json_problem(exc, field.annotation)
    return values, unparsed
