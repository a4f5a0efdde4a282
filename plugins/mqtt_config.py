"""The MQTT sink's table (``type = "mqtt"``): its keys, their checks and the TLS context.

``tls_context`` is used by the sink too; a CA bundle renewed at the same ``ca_file`` path makes
the validated config differ (its digest), so a reload rebuilds the sink.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.credentials import read_secret_file
from daemon.plugins import SinkConfig
from plugins.mqtt_topics import TOPIC_FIELDS, check_template


class MqttConfig(SinkConfig):
    """``type = "mqtt"``: publish each turn to a broker."""

    model_config = ConfigDict(hide_input_in_errors=True)

    host: str = Field(min_length=1, description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535)
    topic: str = Field(default="transcribed/{host}/turn", description="{host}, {session_id}")
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    client_id: str = Field(default="", description="'' = generated")
    username: str = ""
    password: SecretStr = SecretStr("")
    password_file: str = Field(default="", description="file holding the password")
    tls: bool = False
    ca_file: str = Field(default="", description="CA bundle for tls; '' = system CAs")
    keep_alive: int = Field(default=60, ge=5, le=65535)
    availability_topic: str = Field(
        default="transcribed/{host}/status", description="'' disables; placeholder {host}"
    )
    timeout_s: float = Field(default=10.0, gt=0, description="connect and publish timeout")
    # SHA-256 of ca_file's contents: a CA renewed at the same path makes the config differ, so a
    # reload rebuilds the sink (pydantic's == compares private attributes; model_dump omits them)
    _ca_digest: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _password_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("password_file"):
            return data
        if data.get("password"):
            raise ValueError("set either password or password_file, not both")
        return {**data, "password": read_secret_file(str(data["password_file"]), "password_file")}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.password.get_secret_value() and not self.username:
            raise ValueError("a password needs a username")
        return self

    @model_validator(mode="after")
    def _remember_ca(self) -> Self:
        if self.tls and self.ca_file:       # loadable: _loadable_ca passed
            self._ca_digest = _ca_digest(self.ca_file)
        return self

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return check_template(value, TOPIC_FIELDS)

    @field_validator("availability_topic")
    @classmethod
    def _availability(cls, value: str) -> str:
        return check_template(value, frozenset({"host"})) if value else value

    @field_validator("ca_file")
    @classmethod
    def _loadable_ca(cls, value: str, info: ValidationInfo) -> str:
        if value and not info.data.get("tls"):
            raise ValueError("ca_file is set but tls = false")
        if value:
            tls_context(value)
        return value


def tls_context(ca_file: str) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file`` (or the system CAs when empty)."""
    path = str(Path(ca_file).expanduser()) if ca_file else None
    if path is not None and Path(path).exists() and not Path(path).is_file():
        # a FIFO would hang OpenSSL's read (check-config, run and every reload) for ever
        raise ValueError(f"cannot load CA certificates from {path}: not a regular file")
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise _unloadable(path, exc) from None


def _ca_digest(ca_file: str) -> str:
    """SHA-256 (hex) of the bytes of ``ca_file``, which ``tls_context`` loaded a moment ago."""
    path = Path(ca_file).expanduser()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:              # gone or unreadable since: the message tls_context gives
        raise _unloadable(str(path), exc) from None


def _unloadable(path: str | None, exc: OSError | ssl.SSLError) -> ValueError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ValueError(f"cannot load CA certificates from {path}: {reason}")
