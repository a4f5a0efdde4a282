"""The ``[sinks]`` tables: each validated by its sink type's own model, at start-up and reload.

A table's key is the sink's (instance) name; its ``type`` picks the model from the plugins. Every
problem is one line naming ``sinks.<name>.<key>``, and all are reported at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import suppress
from types import UnionType
from typing import Annotated, Any, Final, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from daemon.config import validation_lines
from daemon.errors import ConfigError
from daemon.plugins import PluginHost, SinkConfig, SinkType

SINK_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]*")

ValidatedSinks = dict[str, tuple[SinkType, SinkConfig]]   # sink name -> its type and config


def validate_sinks(host: PluginHost, tables: Mapping[str, Mapping[str, Any]]) -> ValidatedSinks:
    """Validate every sink table with its type's model. Problems name ``sinks.<name>.<key>``."""
    known = host.sink_types()
    problems: list[str] = []
    result: ValidatedSinks = {}
    for name, table in tables.items():
        if not SINK_NAME.fullmatch(name):
            problems.append(f"sinks.{name}: a sink name is lower-case letters, digits, '_' or '-' "
                            "(environment overrides are matched in lower case)")
            continue
        if not isinstance(table, Mapping):
            problems.append(f"sinks.{name}: must be a table")
            continue
        type_name = table.get("type")
        if not isinstance(type_name, str) or type_name not in known:
            choices = ", ".join(sorted(known))
            got = "missing" if type_name is None else f"unknown type {type_name!r}"
            problems.append(f"sinks.{name}.type: {got} (known types: {choices})")
            continue
        sink_type = known[type_name]
        try:
            config = sink_type.config_model.model_validate(_json_values(sink_type, table))
        except ValidationError as exc:
            problems.extend(validation_lines(exc, prefix=f"sinks.{name}"))
            continue
        except ConfigError as exc:
            problems.extend(f"sinks.{name}.{p}" for p in exc.problems)
            continue
        if config.enabled:
            result[name] = (sink_type, config)
    if problems:
        raise ConfigError(problems)
    return result


def _json_values(sink_type: SinkType, table: Mapping[str, Any]) -> dict[str, Any]:
    """The table with JSON text read for keys that take a table or a list.

    Environment overrides are text (``TRANSCRIBED_SINKS__HOOK__HEADERS='{"X-Team": "ops"}'``):
    written as JSON, as for the other sections' lists and tables.
    """
    fields = sink_type.config_model.model_fields
    values = dict(table)
    for key, value in table.items():
        field = fields.get(key)
        if field is None or not isinstance(value, str) or value.lstrip()[:1] not in ("{", "["):
            continue
        if _takes_json(field.annotation):
            with suppress(ValueError, RecursionError):
                values[key] = json.loads(value)
    return values


def _takes_json(annotation: Any) -> bool:
    """A table, a list or a model (also inside ``X | None`` or ``Annotated``), not text."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType, Annotated):
        members = get_args(annotation)[:1] if origin is Annotated else get_args(annotation)
        return any(_takes_json(member) for member in members)
    target = origin or annotation
    return isinstance(target, type) and not issubclass(target, str | bytes) \
        and issubclass(target, Mapping | Sequence | AbstractSet | BaseModel)
