"""Built-in MQTT sink: publishes each turn's JSON to a broker (aiomqtt).

The sink owns one connection, kept by a background task started in ``__aenter__``: it connects
(never failing the sink when the broker is down), publishes a retained ``online`` on the
availability topic (last will: retained ``offline``; an ``offline`` seen there while connected,
an earlier connection's late will, is answered with ``online``), watches the connection and
reconnects with jittered backoff when the broker goes away. ``send`` waits up to ``timeout_s``
for a connection, publishes under the same timeout and raises ``SinkError`` on any failure, so
the record stays in the outbox and the dispatcher retries it. A clean shutdown publishes
``offline`` first (stopped while disconnected, on one short connection of its own); ``ready``
tells the dispatcher when a failed turn's retry can go (a connection made again).

It speaks MQTT 5 (falling back to 3.1.1, once, for a broker that refuses 5) because only MQTT 5
tells the client the broker's Maximum Packet Size (in CONNACK): a record whose PUBLISH would
exceed it is a ``PermanentSinkError`` (dead-lettered) instead of a publish the broker answers by
dropping the connection, again on every retry, with every later turn queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import structlog

from daemon.errors import PermanentSinkError, SinkError
from daemon.events import TurnRecord
from daemon.plugins import SinkContext, SinkType, hookimpl
from plugins.mqtt_client import (
    CLOSED_BEFORE_CONNACK,
    MQTT_MAX_PACKET,
    UNSUPPORTED_PROTOCOL,
    client_class,
    client_logger,
    describe,
    publish_failed,
    publish_size,
    reason_code,
    refusal,
    release,
)
from plugins.mqtt_config import MqttConfig as MqttConfig  # re-exported: the type's table
from plugins.mqtt_config import tls_context
from plugins.mqtt_topics import topic_value
from plugins.tcp_probe import until_it_connects

if TYPE_CHECKING:  # aiomqtt (and paho) load only when an MQTT sink is built
    import aiomqtt

    from plugins.mqtt_client import MqttClient

log = structlog.get_logger("plugins.mqtt")

ONLINE: Final = "online"
OFFLINE: Final = "offline"
RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 30.0
OFFLINE_AT_EXIT_S: Final = 2.0  # a stop while disconnected tries this long to say offline
STABLE_S: Final = 10.0  # a connection up this long resets the reconnect backoff
# connect errors that mean nothing took the TCP connection: the broker is down or restarting
# (not a timeout: aiomqtt words a TCP connect's and a silent broker's alike, and the second
# takes the connection, so its port would be probed back into a tight loop)
NOTHING_TOOK: Final = tuple(f"[Errno {code}]" for code in (
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH))


class MqttSink:
    """Publishes turns to one broker over a connection it keeps alive itself."""

    def __init__(self, name: str, config: MqttConfig, host: str, *, test: bool = False) -> None:
        """A sink for ``config``; ``host`` fills ``{host}`` in the availability topic.

        ``test`` (``test-sinks``): no availability topic, no retained turn, and a ``client_id``
        of its own, so a daemon running with this config is not disturbed.
        """
        self.name = name
        self.config = config
        if test:
            self.config = config.model_copy(update={
                "availability_topic": "", "retain": False,
                "client_id": f"{config.client_id}-test" if config.client_id else ""})
        self.availability = self.config.availability_topic.format(host=topic_value(host))
        self._where = f"{config.host}:{config.port}"
        self._tls = tls_context(config.ca_file) if config.tls else None
        self._client: MqttClient | None = None
        self._v5 = True         # until the broker refuses MQTT 5
        self._logger = client_logger(name, self._where)
        self._connected = asyncio.Event()
        self._connections = 0       # connections made so far
        self._online_said = False   # an ``online`` may be retained at the broker by us
        self._new_connection = asyncio.Event()  # set (and replaced) when one is made
        self._failed_on = 0         # the connection (its number) a send last failed on
        self._sending_on = 0
        self._last_error = "not connected yet"
        self._short_reason: str | None = None   # why the last connection ended early, if so
        self._unlogged = 0          # early ends for that reason since, not logged
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._test = test
        self._tried = asyncio.Event()   # a connect made or failed: test-sinks waits on that

    async def __aenter__(self) -> Self:
        """Start connecting in the background; never fails because the broker is down."""
        self._closing = False       # entered again when the dispatcher restarts its worker
        self._short_reason, self._unlogged = None, 0    # a run of early ends starts afresh
        self._task = asyncio.create_task(self._maintain(), name=f"mqtt:{self.name}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Publish ``offline`` if connected, then disconnect cleanly (no last will)."""
        import aiomqtt

        self._closing = True        # our own 'offline' is not a stale will (_reassert)
        client, said = self._client, False
        if client is not None and self._connected.is_set() and self.availability:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.availability, OFFLINE, qos=1, retain=True,
                                     timeout=self.config.timeout_s)
                said = True
        await self._stop_connecting()
        if self.availability and self._online_said and not said:
            await self._offline_unconnected()

    async def _stop_connecting(self) -> None:
        """End the connection task (and with it the connection, cleanly: no last will)."""
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait([self._task], timeout=self.config.timeout_s)
            if not done:    # aiomqtt waits, unbounded, for the broker to end the connection
                log.warning("mqtt.close_unanswered", sink=self.name, broker=self._where,
                            timeout_s=self.config.timeout_s)
                self._task.cancel()
                await asyncio.wait([self._task])
            self._task = None

    async def _offline_unconnected(self) -> None:
        """Stopped while not connected: one short connection to say ``offline`` (retained).

        The ``online`` an earlier connection left stays retained when the broker went away
        (its last will never fires: the broker itself was gone), so once the broker is back the
        topic said ``online`` for as long as the daemon was stopped. Bounded by
        ``OFFLINE_AT_EXIT_S``; a broker still away is named (the topic may still say online).
        """
        import aiomqtt

        bound = min(self.config.timeout_s, OFFLINE_AT_EXIT_S)
        client, delivered = self._new_client(), False
        client.connect_within(bound)    # paho's TCP connect runs in a thread the bound can't end
        try:
            async with asyncio.timeout(bound), client:
                await client.deliver(self.availability, OFFLINE, qos=1, retain=True,
                                     within=bound)
                delivered = True
        except (aiomqtt.MqttError, TimeoutError) as exc:
            if not delivered:   # else only the disconnect was slow: said
                why = describe(exc) if isinstance(exc, aiomqtt.MqttError) else \
                    f"no answer within {bound:g} s"
                log.warning("mqtt.offline_unsaid", sink=self.name, broker=self._where,
                            error=why, effect=f"{self.availability!r} may say online (retained) "
                            "until the sink connects there again")
                return
        finally:
            release(client)
        log.info("mqtt.offline_said", sink=self.name, broker=self._where,
                 reason="stopped while the connection was down")

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected.is_set()

    async def ready(self) -> None:
        """Return once connected by a connection newer than the one a send last failed on.

        The dispatcher waits on it beside a failed turn's retry backoff: the turn goes as soon
        as the broker takes a connection again, not when a backoff grown during a long outage
        (up to 45 s) runs out.
        """
        while self._connections <= self._failed_on or not self._connected.is_set():
            await self._new_connection.wait()

    async def send(self, record: TurnRecord) -> None:
        """Publish one turn; raise ``SinkError`` when not connected or the publish fails."""
        self._sending_on = self._connections
        try:
            await self._publish(record)
        except Exception:   # any failure: ready() waits for a newer connection
            self._failed_on = self._sending_on
            raise

    async def _publish(self, record: TurnRecord) -> None:
        import aiomqtt

        client = await self._ready_client()
        self._sending_on = self._connections        # the connection this send fails on
        topic = self.config.topic.format(host=topic_value(record.host),
                                         session_id=topic_value(record.session_id))
        payload = record.to_json().encode()
        size = publish_size(topic, len(payload), self.config.qos, v5=self._v5)
        limit = min(client.max_packet or MQTT_MAX_PACKET, MQTT_MAX_PACKET)
        if size > limit:
            raise PermanentSinkError(
                f"mqtt broker {self._where}: record of {len(payload)} bytes is a {size}-byte "
                f"PUBLISH, over the broker's maximum packet size of {limit} bytes"
            )
        try:
            await client.deliver(topic, payload, qos=self.config.qos,
                                 retain=self.config.retain, within=self.config.timeout_s)
        except aiomqtt.MqttError as exc:
            raise publish_failed(f"mqtt broker {self._where}: publish to {topic!r}", exc) \
                from None
        refused = client.refusals.pop(client.last_mid, None)
        if refused is not None:        # MQTT 5 PUBACK/PUBREC with a failure reason code
            raise refusal(f"mqtt broker {self._where}: publish to {topic!r}", refused)

    async def _ready_client(self) -> MqttClient:
        try:
            async with asyncio.timeout(self.config.timeout_s):
                # test-sinks retries nothing: its send fails on the first failed connect
                await (self._tried if self._test else self._connected).wait()
        except TimeoutError:
            raise SinkError(f"mqtt broker {self._where} not connected: {self._last_error}") \
                from None
        if self._client is None:  # lost between the wake-up and now
            raise SinkError(f"mqtt broker {self._where} not connected: {self._last_error}")
        return self._client

    async def _maintain(self) -> None:
        """Connect, announce, watch; on loss reconnect with jittered backoff.

        The backoff restarts only after a connection that stayed up ``STABLE_S``: a broker that
        drops every connection at once (another client took over the same ``client_id``) is not
        reconnected to in a tight loop. Each reason for failing to connect is logged once until
        a connection is made (refused while the broker starts, then refused for the password).
        """
        delay = RECONNECT_INITIAL_S
        said: set[str] = set()     # connect failures logged since the last connection
        while True:
            error, uptime = await self._session()
            if error is None:
                continue                            # protocol fallback: again at once
            reason = error
            if uptime is not None and uptime >= STABLE_S:
                delay = RECONNECT_INITIAL_S
            elif uptime is not None and self.config.client_id:
                error += (f" (closed {uptime:.1f} s after connecting: is another client "
                          f"connected with client_id {self.config.client_id!r}?)")
            self._last_error = error
            self._tried.set()
            wait = delay * (0.5 + random.random())
            if uptime is not None:
                said.clear()
                self._note_end(reason, error, uptime, wait)
            elif error not in said:         # once per reason: a broker up again may refuse us
                said.add(error)
                self._short_reason = None   # a run of early ends is over: connects fail now
                log.warning("mqtt.connect_failed", sink=self.name, broker=self._where,
                            error=error, retry_in_s=round(wait, 2), **self._run_so_far())
            await self._back_off(wait, probe=uptime is None and reason.startswith(NOTHING_TOOK))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _back_off(self, wait: float, *, probe: bool) -> None:
        """Wait ``wait`` s before connecting again; with ``probe``, less if the broker is back.

        ``probe``: nothing took the last connect (the broker down or restarting). The wait then
        ends once the broker's port takes a TCP connection, probed every ``PROBE_EVERY_S``:
        turns queued in a long outage go within seconds of the broker's return, not after a
        backoff grown to 30 s (45 s jittered).
        """
        if not probe:
            await asyncio.sleep(wait)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await until_it_connects(self.config.host, self.config.port,
                                        self.config.timeout_s)

    def _note_end(self, reason: str, error: str, uptime: float, wait: float) -> None:
        """Log a connection's end, once per ``reason`` while connections keep ending early.

        A broker that drops each connection within ``STABLE_S`` (another client with our
        ``client_id``, an ACL that disconnects) logged two lines per connection, every 15-45 s,
        for as long as it lasted. Connections of such a run after the first are counted (and
        logged at debug) and said with the next line: a connection that lasts
        (``mqtt.connected``) or another reason.
        """
        if uptime < STABLE_S and reason == self._short_reason:
            self._unlogged += 1                 # shown at log.level = "debug" only
            log.debug("mqtt.disconnected", sink=self.name, broker=self._where, error=error,
                      retry_in_s=round(wait, 2), repeated=True)
            return
        log.warning("mqtt.disconnected", sink=self.name, broker=self._where, error=error,
                    retry_in_s=round(wait, 2), **self._run_so_far())
        self._short_reason = reason if uptime < STABLE_S else None

    def _run_so_far(self) -> dict[str, int]:
        """``short_connections_not_logged`` (then reset) when some were not logged."""
        unlogged, self._unlogged = self._unlogged, 0
        return {"short_connections_not_logged": unlogged} if unlogged else {}

    def _lasted(self) -> None:
        """A connection made in a run of early ends has lasted ``STABLE_S``: the run is over."""
        self._short_reason = None
        self._say_connected(lasted_s=STABLE_S, **self._run_so_far())

    def _say_connected(self, **more: float) -> None:
        log.info("mqtt.connected", sink=self.name, broker=self._where, tls=self._tls is not None,
                 **more)

    async def _session(self) -> tuple[str | None, float | None]:
        """One connection: (what ended it, how long it was up); (None, None): retry at once."""
        import aiomqtt

        loop = asyncio.get_running_loop()
        client, up_at = self._new_client(), None
        lasted: asyncio.TimerHandle | None = None
        try:
            async with client:
                await self._announce(client)
                up_at = loop.time()
                if self._short_reason is not None:  # in a run of early ends: said if it lasts
                    lasted = loop.call_later(STABLE_S, self._lasted)
                async for message in client.messages:   # ends with MqttError on disconnect
                    await self._reassert(client, message)
            error = "the connection ended"
        except aiomqtt.MqttError as exc:
            if self._v5 and up_at is None and reason_code(exc) == UNSUPPORTED_PROTOCOL:
                self._v5 = False
                log.warning("mqtt.protocol_fallback", sink=self.name, broker=self._where,
                            protocol="3.1.1", note="the broker does not announce its maximum "
                            "packet size under 3.1.1: an oversized record is retried")
                return None, None
            error = describe(client.lost or exc, client.server_reference)
            error = self._hint(error) if up_at is None else error
        except Exception:  # supervision boundary: the connection task must never die
            log.exception("mqtt.connection_crashed", sink=self.name, broker=self._where)
            error = "internal error (see log)"
        finally:
            if lasted is not None:
                lasted.cancel()
            self._connected.clear()
            self._client = None
            release(client)
        return error, None if up_at is None else loop.time() - up_at

    def _hint(self, error: str) -> str:
        """``error`` (of a connect), with a question about ``tls`` where it may be the cause."""
        if error == CLOSED_BEFORE_CONNACK and self._tls is None:
            return f"{error} (is {self._where} a TLS listener? then set tls = true)"
        if self._tls is not None and f"[Errno {errno.ECONNRESET}]" in error:
            return f"{error} (in the TLS handshake: does {self._where} speak TLS? tls = true)"
        return error

    async def _announce(self, client: MqttClient) -> None:
        if self.availability:
            self._online_said = True    # from here it may be retained, even if we hear no ack
            await client.deliver(self.availability, ONLINE, qos=1, retain=True,
                                 within=self.config.timeout_s)
            # watched for a late last will (_reassert); a broker's ACL may refuse it: no error
            await client.subscribe(self.availability, qos=1, timeout=self.config.timeout_s)
        self._client = client
        self._connections += 1
        made, self._new_connection = self._new_connection, asyncio.Event()
        self._connected.set()
        self._tried.set()
        made.set()
        if self._short_reason is None:      # else said once it lasts (_lasted)
            self._say_connected()

    async def _reassert(self, client: MqttClient, message: aiomqtt.Message) -> None:
        """Say ``online`` again when ``offline`` appears while connected and not closing.

        An earlier connection that died on this side only (an address change, a NAT reset) is
        still open at the broker until its keep-alive timeout: its last will (retained
        ``offline``) comes after this connection announced ``online``. A failed publish ends
        nothing: a connection that is really gone ends the message loop by itself.
        """
        import aiomqtt

        if self._closing or message.payload != OFFLINE.encode() \
                or not message.topic.matches(self.availability):
            return
        try:
            await client.deliver(self.availability, ONLINE, qos=1, retain=True,
                                 within=self.config.timeout_s)
        except aiomqtt.MqttError as exc:
            if client.lost is None:     # else the will came as the connection ended: said so
                log.warning("mqtt.online_not_reasserted", sink=self.name, broker=self._where,
                            error=describe(exc))
            return
        log.info("mqtt.online_reasserted", sink=self.name, broker=self._where,
                 reason="an earlier connection's last will said offline")

    def _new_client(self) -> MqttClient:
        import aiomqtt

        cfg = self.config
        will = None
        if self.availability:
            will = aiomqtt.Will(self.availability, OFFLINE, qos=1, retain=True)
        version = aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311
        return client_class()(
            cfg.host, cfg.port, protocol=version, logger=self._logger,
            username=cfg.username or None, password=cfg.password.get_secret_value() or None,
            identifier=cfg.client_id or None, will=will, keepalive=cfg.keep_alive,
            timeout=cfg.timeout_s, tls_context=self._tls,
        )


def _factory(name: str, config: Any, context: SinkContext) -> MqttSink:
    return MqttSink(name, config, context.host, test=context.test)


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``mqtt`` sink type (durable: queued in the outbox)."""
    return [SinkType("mqtt", MqttConfig, _factory, durable=True)]
