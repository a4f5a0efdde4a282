"""The MQTT sink's client: aiomqtt with what the sink needs that it does not give.

* the broker's Maximum Packet Size from CONNACK (MQTT 5), so an oversized record is refused
  before it is sent (aiomqtt drops CONNACK properties: empicano/aiomqtt#362);
* a publish the broker refuses (MQTT 5 PUBACK or PUBREC with a failure reason code, e.g. not
  authorized by its ACL) is an error, not a delivery: aiomqtt ignores the code, and paho
  completes a refused QoS 2 exchange as a success;
* a connection the broker ends right after CONNACK is seen as ended (aiomqtt forgot it and the
  sink stayed "connected" for ever), and a publish waiting for its acknowledgement when the
  connection ends fails at once with the broker's reason (aiomqtt waited out its timeout and
  said only "Operation timed out");
* a publish not acknowledged within its timeout ends the connection (``abandon``): it is sent
  again on the next one, not once more per retry into a connection a frozen broker holds;
* one-line descriptions of connection failures, and paho's log lines naming the sink.

Hooks into aiomqtt and paho internals are version-pinned in ``requirements.lock``; where one is
missing (another version) the client still works, without that hook (``mqtt.hook_unavailable``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final, Self, cast

import structlog

from daemon.errors import PermanentSinkError, SinkError

if TYPE_CHECKING:  # aiomqtt (and paho) load only when an MQTT sink is built
    import aiomqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    class MqttClient(aiomqtt.Client):
        """What ``client_class()`` builds at run time."""

        max_packet: int | None
        refusals: dict[int, ReasonCode]
        last_mid: int
        lost: aiomqtt.MqttCodeError | None
        server_reference: str | None

        async def deliver(self, topic: str, payload: str | bytes, *, qos: int, retain: bool,
                          within: float) -> None:
            """``publish`` (``within``: its timeout), failing as soon as the connection ends."""

        def abandon(self, why: str) -> None:
            """End the connection now, ``why`` being how it ended."""

        def connect_within(self, seconds: float) -> None:
            """Bound the TCP connect (paho's own timeout, in the thread aiomqtt runs it in)."""

log = structlog.get_logger("plugins.mqtt")

_AUTH_REFUSED: Final = frozenset({4, 5, 134, 135})  # CONNACK codes, MQTT 3.1.1 and 5
UNSUPPORTED_PROTOCOL: Final = 132  # CONNACK code (paho also maps a 3.1.1 broker's 1 to it)
MQTT_MAX_PACKET: Final = 268_435_455 + 5  # the largest packet the protocol can encode at all
CLOSED_BEFORE_CONNACK: Final = "the broker closed the connection before accepting it"
_NOT_AUTHORIZED: Final = 135
PACKET_TOO_LARGE: Final = 149
_REFUSED_FOR_GOOD: Final = frozenset({_NOT_AUTHORIZED, 144, PACKET_TOO_LARGE, 153})
_TIMED_OUT: Final = "Operation timed out"   # aiomqtt's words for any timeout
_CONN_LOST: Final = 7     # paho's MQTT_ERR_CONN_LOST
_PROTOCOL_ERROR: Final = 130
_KEEP_ALIVE_TIMEOUT: Final = 141
NOT_MQTT: Final = "the broker answered CONNECT with something that is not valid MQTT"
_RETAIN_HINT: Final = ('set availability_topic = "" (its online and offline are retained) '
                       "and retain = false")
_DISCONNECT_HINTS: Final = {154: _RETAIN_HINT}   # Retain not supported
_MOVED: Final = frozenset({156, 157})  # CONNACK: use another server, server moved
_CONNACK_HINTS: Final = {
    133: "check client_id",
    138: "the broker bans this client (address, username or client_id): ask its administrator",
    154: f"the broker keeps no retained messages: {_RETAIN_HINT}",
    155: 'the broker refuses the QoS 1 last will: set availability_topic = ""',
}


def publish_size(topic: str, payload_len: int, qos: int, *, v5: bool) -> int:
    """Bytes of the PUBLISH packet carrying ``payload_len`` bytes (no properties sent)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + payload_len
    length_bytes = next((n for n in (1, 2, 3) if remaining < 128 ** n), 4)
    return 1 + length_bytes + remaining


@functools.cache
def client_class() -> type[MqttClient]:
    """``aiomqtt.Client`` that keeps the broker's Maximum Packet Size from CONNACK (MQTT 5).

    aiomqtt drops CONNACK properties (empicano/aiomqtt#362), so this overrides its callback,
    keeping the value and calling the original. A connection closed before CONNACK (plain MQTT
    to a TLS listener, a broker at its connection limit) fails the connect at once: aiomqtt
    waited out its timeout and said only "Operation timed out". Defined on first use: aiomqtt
    loads lazily.
    """
    import aiomqtt

    class Ended(aiomqtt.MqttCodeError):
        """How a connection ended: its reason code, and one line saying it."""

        def __str__(self) -> str:
            return str(self.args[0])

    class Client(aiomqtt.Client):
        max_packet: int | None = None
        server_reference: str | None = None     # CONNACK's Server Reference (MQTT 5)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.refusals: dict[int, ReasonCode] = {}   # message id -> failure reason code
            self.last_mid = 0
            self.lost: aiomqtt.MqttCodeError | None = None   # why the connection ended
            _track_refusals(cast("MqttClient", self))

        async def __aenter__(self) -> Self:
            said = _ended(self)     # aiomqtt replaces it, unread, when already done
            try:
                await super().__aenter__()
            except aiomqtt.MqttError as exc:
                if str(exc) != _TIMED_OUT:
                    raise
                raise aiomqtt.MqttError(f"no CONNACK within {self.timeout:g} s: the broker "
                                        "took the connection but did not answer") from None
            ended = _ended(self)
            if self.lost is not None and ended is not None and not ended.done():
                # ended between CONNACK and here: aiomqtt replaced the future that said so
                if said is not None and said.done() and not said.cancelled():
                    said.exception()
                ended.set_exception(self.lost)
            return self

        async def deliver(self, topic: str, payload: str | bytes, *, qos: int, retain: bool,
                          within: float) -> None:
            publish = self.publish(topic, payload, qos=qos, retain=retain, timeout=within)
            ended = _ended(self)
            if ended is None:                   # another aiomqtt: its own timeout and words
                await publish
                return
            await _deliver(cast("MqttClient", self), ended, publish, within)

        def connect_within(self, seconds: float) -> None:
            """Bound the TCP connect, which a cancelled ``__aenter__`` leaves running.

            aiomqtt runs paho's connect in a thread, for paho's ``connect_timeout`` (5 s).
            """
            self._client.connect_timeout = seconds

        def abandon(self, why: str) -> None:
            """End a connection the broker stopped answering on (no PUBACK in time), now.

            MQTT sends a publish again only on a new connection: on this one each retry was
            one more copy, all delivered when a frozen broker woke up, and only keep-alive
            (1.5-2 x ``keep_alive``) ended it. As paho ends one whose PINGRESP is overdue.
            """
            from paho.mqtt.enums import MQTTErrorCode

            paho = self._client
            if self.lost is not None or paho.socket() is None or not _accepted(self._connected):
                return
            try:
                close, ended = paho._sock_close, paho._do_on_disconnect
            except AttributeError as exc:
                _hook_unavailable("a broker that stops acknowledging is left to keep-alive", exc)
                return
            self.lost = Ended(_CONN_LOST, why)
            close()
            ended(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_CONN_LOST)

        def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode,
                        properties: Properties) -> None:
            if reason_code.is_failure:
                self.refusals[mid] = reason_code
            super()._on_publish(client, userdata, mid, reason_code, properties)

        def _on_disconnect(self, client: Any, userdata: Any, flags: Any,
                           reason_code: ReasonCode, properties: Properties | None = None) -> None:
            # while __aenter__ waits for CONNACK (it holds the lock); aiomqtt ignored this.
            # Its internals, read defensively: another aiomqtt just waits out the timeout again
            lock, connected = getattr(self, "_lock", None), getattr(self, "_connected", None)
            by_broker = getattr(flags, "is_disconnect_packet_from_server", False) is True
            if isinstance(lock, asyncio.Lock) and isinstance(connected, asyncio.Future) \
                    and lock.locked() and not connected.done():
                garbled = not by_broker and reason_code == _PROTOCOL_ERROR
                connected.set_exception(aiomqtt.MqttError(
                    NOT_MQTT if garbled else CLOSED_BEFORE_CONNACK))
            elif self.lost is None and _accepted(connected):
                self.lost = Ended(reason_code, ending(reason_code, by_broker=by_broker))
            super()._on_disconnect(client, userdata, flags, reason_code, properties)

        def _on_connect(self, client: Any, userdata: Any, flags: Any,
                        reason_code: ReasonCode, properties: Properties | None = None) -> None:
            value = getattr(properties, "MaximumPacketSize", None)
            self.max_packet = value if isinstance(value, int) and value > 0 else None
            reference = getattr(properties, "ServerReference", None)
            self.server_reference = reference if isinstance(reference, str) else None
            super()._on_connect(client, userdata, flags, reason_code, properties)

    return cast("type[MqttClient]", Client)


async def _deliver(client: MqttClient, ended: asyncio.Future[None],
                   publish: Coroutine[Any, Any, None], within: float) -> None:
    """Await ``publish``; if the connection ends first, fail at once with the broker's reason."""
    import aiomqtt

    task = asyncio.ensure_future(publish)
    try:
        await asyncio.wait((task, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if not task.cancelled() and (task.exception() is None or client.lost is None):
        if str(task.exception()) == _TIMED_OUT:
            unanswered = f"the broker did not acknowledge a publish within {within:g} s"
            client.abandon(unanswered)
            raise aiomqtt.MqttError(f"the broker did not acknowledge the publish within "
                                    f"{within:g} s") from None
        return task.result()    # published, or failed by itself (its own error)
    reason = client.lost or aiomqtt.MqttCodeError(_CONN_LOST)
    if not task.cancelled():    # refused at once (no connection): not this record's doing
        raise aiomqtt.MqttError(f"the connection had ended: {reason}") from None
    raise aiomqtt.MqttError(f"the connection ended before the broker acknowledged the "
                            f"publish: {reason}") from reason


def _accepted(connected: object) -> bool:
    """Whether aiomqtt's ``_connected`` future says the broker accepted the connection."""
    return isinstance(connected, asyncio.Future) and connected.done() \
        and not connected.cancelled() and connected.exception() is None


def ending(reason: ReasonCode, *, by_broker: bool) -> str:
    """One line on how a connection that was up ended (paho's ``on_disconnect`` reason)."""
    code = int(reason.value)
    if by_broker:
        hint = _DISCONNECT_HINTS.get(code)
        return f"the broker sent DISCONNECT: {reason} ({code})" + (f": {hint}" if hint else "")
    if code == _PROTOCOL_ERROR:
        return "the broker sent something that is not valid MQTT (protocol error)"
    if code == _KEEP_ALIVE_TIMEOUT:
        return "the broker stopped answering (no PINGRESP within keep_alive)"
    return "the connection was closed without a DISCONNECT (the broker stopped, or the network)"


def _track_refusals(client: MqttClient) -> None:
    """Note each publish's message id, and the failure reason of a PUBREC (QoS 2).

    paho tells ``on_publish`` a PUBACK's reason code but ignores a PUBREC's (and completes the
    exchange as a success), so the QoS 2 refusal is read from the packet here.
    """
    try:
        from paho.mqtt._packet import decode_pubrec

        paho = client._client
        paho_publish, handle_pubrec = paho.publish, paho._handle_pubrec
        paho._in_packet  # noqa: B018  (read on every PUBREC: must exist)
    except (ImportError, AttributeError) as exc:
        _hook_unavailable("a publish the broker refuses is taken for delivered", exc)
        return

    def publish(*args: Any, **kwargs: Any) -> Any:
        info = paho_publish(*args, **kwargs)
        client.last_mid = info.mid
        client.refusals.pop(info.mid, None)     # a stale one from a reused message id
        return info

    def on_pubrec() -> Any:
        packet = paho._in_packet
        try:
            pubrec = decode_pubrec(packet["command"], packet["packet"], paho.protocol)
        except Exception:  # never break paho's packet loop: paho reports a malformed packet
            return handle_pubrec()
        if pubrec.reason.is_failure:
            client.refusals[pubrec.mid] = pubrec.reason
        return handle_pubrec()

    paho.publish = publish  # type: ignore[method-assign]
    paho._handle_pubrec = on_pubrec  # type: ignore[method-assign]


def release(client: MqttClient) -> None:
    """After a connection ended: free what aiomqtt keeps of it.

    The socket of an attempt whose CONNACK never came (aiomqtt keeps it: a descriptor per
    attempt until paho's keep-alive check), and a drop while announcing (already reported:
    asyncio would print "Future exception was never retrieved").
    """
    paho = client._client
    sock_close = getattr(paho, "_sock_close", None)
    if sock_close is not None and paho.socket() is not None:
        sock_close()
    for name in ("_disconnected", "_connected"):    # _connected: closed after a timed-out CONNECT
        lost = getattr(client, name, None)
        if isinstance(lost, asyncio.Future) and lost.done() and not lost.cancelled():
            lost.exception()


def _ended(client: object) -> asyncio.Future[None] | None:
    """The future that ends with the connection (aiomqtt's), or None: another aiomqtt, said once."""
    ended = getattr(client, "_disconnected", None)
    if isinstance(ended, asyncio.Future):
        return ended
    _hook_unavailable("a connection ending is noticed only by the next publish or its timeout",
                      AttributeError("aiomqtt.Client has no _disconnected future"))
    return None


_UNAVAILABLE: set[str] = set()     # effects already reported


def _hook_unavailable(effect: str, exc: Exception) -> None:
    """Once: this aiomqtt/paho lacks an internal the client hooks into (not the locked one)."""
    if effect not in _UNAVAILABLE:
        _UNAVAILABLE.add(effect)
        log.warning("mqtt.hook_unavailable", error=f"{type(exc).__name__}: {exc}", effect=effect)


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


def client_logger(sink: str, broker: str) -> logging.Logger:
    """The stdlib logger given to aiomqtt (and by it to paho): its lines name the sink.

    Without it paho logs ``failed to receive on socket: …`` to the shared ``mqtt`` logger, a line
    that says neither which sink nor which broker.
    """
    logger = logging.getLogger(f"plugins.mqtt.{sink}")
    for old in [f for f in logger.filters if isinstance(f, _NameTheSink)]:
        logger.removeFilter(old)   # a sink rebuilt on reload: one filter, the current broker
    logger.addFilter(_NameTheSink(sink, broker))
    return logger


def reason_code(exc: aiomqtt.MqttError) -> object:
    """The numeric MQTT return/reason code of ``exc``, if it has one."""
    import aiomqtt

    return getattr(exc.rc, "value", exc.rc) if isinstance(exc, aiomqtt.MqttCodeError) else None


def refusal(what: str, reason: ReasonCode) -> SinkError:
    """The error for a publish the broker refused: permanent unless retrying may help."""
    code = int(reason.value)
    if code not in _REFUSED_FOR_GOOD:       # quota exceeded, unspecified, implementation ...
        return SinkError(f"{what} refused by the broker: {reason} ({code}); retrying")
    hint = ": check the broker's ACL for this user and topic" if code == _NOT_AUTHORIZED else ""
    return PermanentSinkError(f"{what} refused by the broker: {reason} ({code}){hint}")


def publish_failed(what: str, exc: aiomqtt.MqttError) -> SinkError:
    """The error for a failed publish (``deliver``'s).

    Permanent when the broker ended the connection while it waited for its acknowledgement,
    saying "Packet too large": a broker that did not announce its maximum packet size would
    drop the connection again on every retry, with every later turn queued behind it.
    """
    import aiomqtt

    cause = exc.__cause__
    if isinstance(cause, aiomqtt.MqttError) and reason_code(cause) == PACKET_TOO_LARGE:
        return PermanentSinkError(f"{what} failed: {exc} (the broker announced no maximum "
                                  "packet size; this record is over it)")
    return SinkError(f"{what} failed: {exc}")


def describe(exc: aiomqtt.MqttError, reference: str | None = None) -> str:
    """One line about a connection failure; a refused CONNECT says so, with what to change.

    ``reference``: the Server Reference of the refusing CONNACK (MQTT 5), if any.
    """
    from aiomqtt.exceptions import MqttConnectError

    text = str(exc) or type(exc).__name__
    cause = exc.__cause__       # "Disconnected during message iteration" hides the reason
    if cause is not None and str(cause) not in text:
        text = f"{text}: {cause}"
    if not isinstance(exc, MqttConnectError):
        return text
    code = reason_code(exc)
    if code in _AUTH_REFUSED:
        return f"broker refused the connection ({text}): check username and password"
    if code in _MOVED:
        hint = f"it names {reference!r}: set host and port" if reference else "it names no other"
        return f"broker refused the connection ({text}): {hint}"
    hint = _CONNACK_HINTS.get(code)  # type: ignore[call-overload]
    return f"broker refused the connection ({text})" + (f": {hint}" if hint else "")
