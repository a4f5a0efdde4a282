"""Built-in MQTT sink: publishes each turn's JSON to a broker (aiomqtt).

The sink owns one connection, kept by a background task started in ``__aenter__``: it connects
(never failing the sink when the broker is down), publishes a retained ``online`` on the
availability topic (last will: retained ``offline``), watches the connection and reconnects with
jittered backoff when the broker goes away. ``send`` waits up to ``timeout_s`` for a connection,
publishes under the same timeout and raises ``SinkError`` on any failure, so the record stays in
the outbox and the dispatcher retries it. A clean shutdown publishes ``offline`` first.

It speaks MQTT 5 (falling back to 3.1.1, once, for a broker that refuses 5) because only MQTT 5
tells the client the broker's Maximum Packet Size (in CONNACK): a record whose PUBLISH would
exceed it is a ``PermanentSinkError`` (dead-lettered) instead of a publish the broker answers by
dropping the connection, again on every retry, with every later turn queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import string
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, cast

import structlog
from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.config import read_secret_file
from daemon.errors import PermanentSinkError, SinkError
from daemon.events import TurnRecord
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl

if TYPE_CHECKING:  # aiomqtt (and paho) load only when an MQTT sink is built
    import aiomqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    class _Client(aiomqtt.Client):
        """What ``_client_class()`` builds at run time."""

        max_packet: int | None

log = structlog.get_logger("plugins.mqtt")

ONLINE: Final = "online"
OFFLINE: Final = "offline"
TOPIC_FIELDS: Final = frozenset({"host", "session_id"})
RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 30.0
_AUTH_REFUSED: Final = frozenset({4, 5, 134, 135})  # CONNACK codes, MQTT 3.1.1 and 5
_UNSUPPORTED_PROTOCOL: Final = 132  # CONNACK code (paho also maps a 3.1.1 broker's 1 to it)
MQTT_MAX_PACKET: Final = 268_435_455 + 5  # the largest packet the protocol can encode at all


def _check_template(value: str, allowed: frozenset[str]) -> str:
    """A topic template may use only ``allowed`` placeholders and no MQTT wildcards."""
    if not value:
        raise ValueError("must not be empty")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"invalid template: {exc}") from None
    unknown = fields - allowed
    if unknown:
        names = ", ".join("{" + n + "}" for n in sorted(allowed))
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (allowed: {names})")
    if "+" in value or "#" in value:
        raise ValueError("must not contain the wildcards + or #")
    return value


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

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return _check_template(value, TOPIC_FIELDS)

    @field_validator("availability_topic")
    @classmethod
    def _availability(cls, value: str) -> str:
        return _check_template(value, frozenset({"host"})) if value else value

    @field_validator("ca_file")
    @classmethod
    def _loadable_ca(cls, value: str, info: ValidationInfo) -> str:
        if value and not info.data.get("tls"):
            raise ValueError("ca_file is set but tls = false")
        if value:
            _tls_context(value)
        return value


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file`` (or the system CAs when empty)."""
    path = str(Path(ca_file).expanduser()) if ca_file else None
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot load CA certificates from {path}: {reason}") from None


class MqttSink:
    """Publishes turns to one broker over a connection it keeps alive itself."""

    def __init__(self, name: str, config: MqttConfig, host: str) -> None:
        self.name = name
        self.config = config
        self.availability = config.availability_topic.format(host=host)
        self._where = f"{config.host}:{config.port}"
        self._tls = _tls_context(config.ca_file) if config.tls else None
        self._client: _Client | None = None
        self._v5 = True         # until the broker refuses MQTT 5
        self._logger = _client_logger(name, self._where)
        self._connected = asyncio.Event()
        self._last_error = "not connected yet"
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        """Start connecting in the background; never fails because the broker is down."""
        self._task = asyncio.create_task(self._maintain(), name=f"mqtt:{self.name}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Publish ``offline`` if connected, then disconnect cleanly (no last will)."""
        import aiomqtt

        client = self._client
        if client is not None and self._connected.is_set() and self.availability:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.availability, OFFLINE, qos=1, retain=True,
                                     timeout=self.config.timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected.is_set()

    async def send(self, record: TurnRecord) -> None:
        """Publish one turn; raise ``SinkError`` when not connected or the publish fails."""
        import aiomqtt

        client = await self._ready_client()
        topic = self.config.topic.format(host=record.host, session_id=record.session_id)
        payload = record.to_json().encode()
        size = publish_size(topic, len(payload), self.config.qos, v5=self._v5)
        limit = min(client.max_packet or MQTT_MAX_PACKET, MQTT_MAX_PACKET)
        if size > limit:
            raise PermanentSinkError(
                f"mqtt broker {self._where}: record of {len(payload)} bytes is a {size}-byte "
                f"PUBLISH, over the broker's maximum packet size of {limit} bytes"
            )
        try:
            await client.publish(topic, payload, qos=self.config.qos,
                                 retain=self.config.retain, timeout=self.config.timeout_s)
        except aiomqtt.MqttError as exc:
            raise SinkError(f"mqtt broker {self._where}: publish to {topic!r} failed: {exc}") \
                from None

    async def _ready_client(self) -> _Client:
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._connected.wait()
        except TimeoutError:
            raise SinkError(f"mqtt broker {self._where} not connected: {self._last_error}") \
                from None
        if self._client is None:  # lost between the wake-up and now
            raise SinkError(f"mqtt broker {self._where} not connected: {self._last_error}")
        return self._client

    async def _maintain(self) -> None:
        """Connect, announce, watch; on loss reconnect with backoff (reset on success)."""
        import aiomqtt

        delay = RECONNECT_INITIAL_S
        failing = False
        while True:
            try:
                async with self._new_client() as client:
                    await self._announce(client)
                    failing, delay = False, RECONNECT_INITIAL_S
                    async for _ in client.messages:  # ends with MqttError on disconnect
                        pass
            except aiomqtt.MqttError as exc:
                if self._v5 and _code(exc) == _UNSUPPORTED_PROTOCOL:
                    self._v5 = False
                    log.warning("mqtt.protocol_fallback", sink=self.name, broker=self._where,
                                protocol="3.1.1", note="the broker does not announce its maximum "
                                "packet size under 3.1.1: an oversized record is retried")
                    continue
                self._last_error = _describe(exc)
                was_connected = self._connected.is_set()
                if was_connected or not failing:
                    log.warning("mqtt.disconnected" if was_connected else "mqtt.connect_failed",
                                sink=self.name, broker=self._where, error=self._last_error)
                failing = True
            except Exception:  # supervision boundary: the connection task must never die
                log.exception("mqtt.connection_crashed", sink=self.name, broker=self._where)
                self._last_error = "internal error (see log)"
                failing = True
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _announce(self, client: _Client) -> None:
        if self.availability:
            await client.publish(self.availability, ONLINE, qos=1, retain=True,
                                 timeout=self.config.timeout_s)
        self._client = client
        self._connected.set()
        log.info("mqtt.connected", sink=self.name, broker=self._where, tls=self._tls is not None)

    def _new_client(self) -> _Client:
        import aiomqtt

        cfg = self.config
        will = None
        if self.availability:
            will = aiomqtt.Will(self.availability, OFFLINE, qos=1, retain=True)
        version = aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311
        return _client_class()(
            cfg.host, cfg.port,
            protocol=version,
            logger=self._logger,
            username=cfg.username or None,
            password=cfg.password.get_secret_value() or None,
            identifier=cfg.client_id or None,
            will=will,
            keepalive=cfg.keep_alive,
            timeout=cfg.timeout_s,
            tls_context=self._tls,
        )


def publish_size(topic: str, payload_len: int, qos: int, *, v5: bool) -> int:
    """Bytes of the PUBLISH packet carrying ``payload_len`` bytes (no properties sent)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + payload_len
    length_bytes = next((n for n in (1, 2, 3) if remaining < 128 ** n), 4)
    return 1 + length_bytes + remaining


@functools.cache
def _client_class() -> type[_Client]:
    """``aiomqtt.Client`` that keeps the broker's Maximum Packet Size from CONNACK (MQTT 5).

    aiomqtt drops CONNACK properties (empicano/aiomqtt#362), so this overrides its callback,
    keeping the value and calling the original. Defined on first use: aiomqtt loads lazily.
    """
    import aiomqtt

    class Client(aiomqtt.Client):
        max_packet: int | None = None

        def _on_connect(self, client: Any, userdata: Any, flags: Any,
                        reason_code: ReasonCode, properties: Properties | None = None) -> None:
            value = getattr(properties, "MaximumPacketSize", None)
            self.max_packet = value if isinstance(value, int) and value > 0 else None
            super()._on_connect(client, userdata, flags, reason_code, properties)

    return cast("type[_Client]", Client)


class _NameTheSink(logging.Filter):
    """Adds ``sink`` and ``broker`` to paho's and aiomqtt's own log records."""

    def __init__(self, sink: str, broker: str) -> None:
        super().__init__()
        self.sink = sink
        self.broker = broker

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag the record (the structlog bridge turns record attributes into fields)."""
        record.sink = self.sink
        record.broker = self.broker
        return True


def _client_logger(sink: str, broker: str) -> logging.Logger:
    """The stdlib logger given to aiomqtt (and by it to paho): its lines name the sink.

    Without it paho logs ``failed to receive on socket: …`` to the shared ``mqtt`` logger, a line
    that says neither which sink nor which broker.
    """
    logger = logging.getLogger(f"plugins.mqtt.{sink}")
    for old in [f for f in logger.filters if isinstance(f, _NameTheSink)]:
        logger.removeFilter(old)   # a sink rebuilt on reload: one filter, the current broker
    logger.addFilter(_NameTheSink(sink, broker))
    return logger


def _code(exc: aiomqtt.MqttError) -> object:
    """The numeric MQTT return/reason code of ``exc``, if it has one."""
    import aiomqtt

    return getattr(exc.rc, "value", exc.rc) if isinstance(exc, aiomqtt.MqttCodeError) else None


def _describe(exc: aiomqtt.MqttError) -> str:
    """One line about a connection failure, with a hint when credentials were refused."""
    text = str(exc) or type(exc).__name__
    if exc.__cause__ is not None:  # "Disconnected during message iteration" hides the reason
        text = f"{text}: {exc.__cause__}"
    code = _code(exc)
    if code in _AUTH_REFUSED:
        return f"broker refused the connection ({text}): check username and password"
    return text


def _factory(name: str, config: Any, context: SinkContext) -> MqttSink:
    return MqttSink(name, config, context.host)


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``mqtt`` sink type (durable: queued in the outbox)."""
    return [SinkType("mqtt", MqttConfig, _factory, durable=True)]
