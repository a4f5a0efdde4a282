"""Secrets out of sight: the config as printed by ``check-config``, and the values to mask in logs.

Secret keys (``api_key``, ``secret``, ``password``, ``token``), header values, the parts of a
sink ``url`` that may be credentials (user info, path and query: webhook URLs are often bearer
secrets), and the user info and query of the service's URLs (``assemblyai.streaming_url``,
``token_url``: they may carry credentials too) are replaced by ``MASK``; ``secret_values`` lists
the same strings for the log masker (``daemon.logs``; a user name it masks only in a URL). A
list of secrets (a webhook's, during rotation) is shown in the form the example config
documents: one string, ``MASK`` for each, space-separated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from daemon.config import Settings

MASK: Final = "********"


def masked_dict(settings: Settings, sinks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The effective config as plain data with every secret replaced by ``MASK``."""
    data = settings.model_dump(mode="python")
    data["sinks"] = {name: dict(table) for name, table in sinks.items()}
    masked: dict[str, Any] = _mask(data)
    return masked


_SECRET_KEYS: Final = frozenset({"api_key", "secret", "password", "token"})
_SERVICE_URL_KEYS: Final = frozenset({"streaming_url", "token_url"})
# Headers whose values the log masker learns (check-config masks every value): learning them
# all would mask "ops" or "application/json" in every line that has the word.
_CREDENTIAL_HEADER: Final = re.compile(r"(?i)auth|token|key|secret|signature|cookie|pass|session")


def url_secrets(url: str) -> list[str]:
    """The parts of a sink's URL that may be credentials: user info, and path with query.

    Webhook URLs (Slack, Discord, Zapier …) are often bearer secrets in their path.
    """
    try:
        parts = urlsplit(url)
    except ValueError:                  # unparsable (a third-party sink's own url key): all of it
        return [url] if url else []
    found = [part for part in (parts.username, parts.password) if part]
    rest = url.split(parts.netloc, 1)[-1] if parts.netloc else ""
    if rest.strip("/"):
        found.append(rest)
    return found


def url_log_secrets(url: str) -> list[str]:
    """What the log masker learns of a sink's URL: its password, and host + path + query.

    The path is learnt only as written in a URL, after its host: a bare path such as ``/hook``
    would mask every log line that has it (a dead-letter file named after its sink,
    ``/tmp/hook…``). A URL's user info is masked wherever it is written (``daemon.logs``), so
    the user name is not learnt either.
    """
    try:
        parts = urlsplit(url)
    except ValueError:                  # unparsable (a third-party sink's own url key): all of it
        return [url] if url else []
    found = [parts.password] if parts.password else []
    rest = url.split(parts.netloc, 1)[-1] if parts.netloc else ""
    if rest.strip("/"):
        found.append(parts.netloc.rpartition("@")[2] + rest)
    return found


def _masked_url(url: str) -> str:
    """``scheme://host:port/********`` when the URL carries anything that may be a secret."""
    if not url_secrets(url):
        return url
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:                  # unparsable, or a port that is not a number
        return MASK
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{port}/{MASK}"


def service_url_secrets(url: str) -> list[str]:
    """The parts of a service URL that may be credentials: the password and the query.

    Its path is the API's, and its user name no secret alone: neither is learnt by the log
    masker (a user name such as "token" would mask that word in every line); the masker hides
    a URL's whole user info wherever it is written (``daemon.logs``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:                  # refused by validation; all of it, to be safe
        return [url] if url else []
    return [part for part in (parts.password, parts.query, parts.fragment) if part]


def _masked_service_url(url: str) -> str:
    """``scheme://********@host/path?********``: the path shown, user info and query masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    user = f"{MASK}@" if "@" in parts.netloc else ""
    query = f"?{MASK}" if parts.query else ""
    fragment = f"#{MASK}" if parts.fragment else ""
    return f"{parts.scheme}://{user}{parts.netloc.rpartition('@')[2]}{parts.path}{query}{fragment}"


def _url_text(key: str, value: Any) -> str | None:
    """A sink's ``url`` value as text: a str, or a plugin's pydantic ``HttpUrl``."""
    if key != "url" or value is None or isinstance(value, dict | list | tuple):
        return None
    return str(value)


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    url = _url_text(key, value)
    if url is not None:
        return _masked_url(url)
    if key in _SERVICE_URL_KEYS and isinstance(value, str):
        return _masked_service_url(value)
    if key == "headers" and isinstance(value, dict):
        return {k: MASK for k in value}       # header values are often credentials
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if key == "secret":                   # several: space-separated, as documented
            return " ".join(MASK for _ in value)
        return [_mask(v) for v in value]
    if key in _SECRET_KEYS and value:
        return MASK
    return value


def secret_values(settings: Settings, sinks: Mapping[str, Any]) -> list[str]:
    """Every secret string in the config, for the log masker."""
    cloud = settings.assemblyai
    found = [cloud.api_key.get_secret_value(), settings.http.token.get_secret_value(),
             *service_url_secrets(cloud.streaming_url), *service_url_secrets(cloud.token_url)]
    return [s for s in found + table_secrets(dict(sinks)) if s]


def table_secrets(table: Mapping[str, Any]) -> list[str]:
    """The secret strings in a table of values (sink configs, or a key's value in one)."""
    found: list[str] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), name)
        elif key == "headers" and isinstance(value, dict):   # the values of credential headers
            for name, v in value.items():
                if _CREDENTIAL_HEADER.search(str(name)):
                    walk(v, "secret")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and key in _SECRET_KEYS:
            found.append(value)
        elif (url := _url_text(key, value)) is not None:
            found.extend(url_log_secrets(url))

    walk(dict(table))
    return [s for s in found if s]
