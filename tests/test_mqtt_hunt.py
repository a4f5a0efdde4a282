"""The MQTT sink against brokers that misbehave: a raw MQTT 5 peer on 127.0.0.1 played by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.dispatch import Dispatcher
from daemon.errors import SinkError
from daemon.outbox import Outbox
from daemon.runner import SinkRunner
from plugins.mqtt import MqttConfig, MqttSink
from plugins.mqtt import transcribed_sink_types as mqtt_types
from tests.loopback_server import LoopbackServer
from tests.test_mqtt import LogWatch, read_packet
from tests.test_outbox import make_turn

HOST = "testhost"
TURNS = "transcribed/testhost/turn"


def _varint(n: int) -> bytes:
    out = b""
    while True:
        n, byte = divmod(n, 128)
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def packet(header: int, body: bytes) -> bytes:
    """An MQTT packet: fixed header byte, remaining length, body."""
    return bytes([header]) + _varint(len(body)) + body


def connack(code: int = 0, properties: bytes = b"") -> bytes:
    """An MQTT 5 CONNACK with ``code`` and raw ``properties``."""
    return packet(0x20, b"\x00" + bytes([code]) + _varint(len(properties)) + properties)


def disconnect(code: int) -> bytes:
    """An MQTT 5 DISCONNECT from the broker with reason ``code``."""
    return packet(0xE0, bytes([code, 0]))


# what the broker does with a PUBLISH: (connection number, topic, payload) -> bytes to answer
Answer = Callable[[int, str, bytes], bytes | None]


class ScriptedBroker(LoopbackServer):
    """MQTT 5 on 127.0.0.1: ``hello(n)`` is what connection ``n`` (from 1) gets after CONNECT
    (None: closed at once); each PUBLISH is answered by ``answer`` (None: a normal PUBACK;
    b"": the connection is closed)."""

    def __init__(self, hello: Callable[[int], bytes | None] = lambda n: connack(),
                 answer: Answer = lambda n, topic, payload: None) -> None:
        super().__init__()
        self.hello, self.answer = hello, answer
        self.connections = 0
        self.published: list[tuple[str, bytes]] = []     # acknowledged with a PUBACK
        self.changed = asyncio.Event()                      # set on each of them
        self.after_subscribe = b""                          # sent after each SUBACK

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            await read_packet(reader)                       # CONNECT
            hello = self.hello(number)
            if hello is None:
                return
            writer.write(hello)
            while True:
                header, body = await read_packet(reader)
                reply = self._reply(number, header, body)
                if not reply:               # b"" from answer: close without a word
                    return
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def _reply(self, number: int, header: int, body: bytes) -> bytes | None:
        kind = header >> 4
        if kind == 3:                                       # PUBLISH (QoS 1)
            end = 2 + int.from_bytes(body[:2])
            topic, mid = body[2:end].decode(), body[end:end + 2]
            payload = body[end + 2 + 1 + body[end + 2]:]    # after the properties
            answer = self.answer(number, topic, payload)
            if answer is not None:
                return answer
            self.published.append((topic, payload))
            self.changed.set()
            return packet(0x40, mid + b"\x00\x00")
        if kind == 8:                                       # SUBSCRIBE: granted QoS 1
            return packet(0x90, body[:2] + b"\x00\x01") + self.after_subscribe
        if kind == 12:                                      # PINGREQ
            return b"\xd0\x00"
        return None                                         # DISCONNECT or unexpected


def mqtt_config(port: int, **extra: Any) -> MqttConfig:
    """A sink config for the scripted broker (no availability topic unless given)."""
    return MqttConfig.model_validate({"type": "mqtt", "host": "127.0.0.1", "port": port,
                                      "timeout_s": 5, "availability_topic": "", **extra})


async def send_until_delivered(sink: MqttSink, within: float) -> None:
    """Retry one turn, as the dispatcher would, until the sink delivers it."""
    async with asyncio.timeout(within):
        while True:
            try:
                await sink.send(make_turn(1))
                return
            except SinkError:
                continue


async def first_event(watch: LogWatch, event: str) -> str:
    """The error of the first ``event`` logged."""
    await watch.until(lambda entries: any(e["event"] == event for e in entries))
    return next(str(e["error"]) for e in watch.entries if e["event"] == event)


def always(hello: bytes) -> Callable[[int], bytes]:
    """The same answer to every CONNECT."""
    return lambda number: hello


class TestConnectionEnds:
    async def test_closed_right_after_connack_is_reconnected(self) -> None:
        """A broker that closes the connection right after accepting it: aiomqtt forgot that
        loss, so the sink stayed 'connected' for ever, every send failing with "not currently
        connected" and never a reconnect. Now it reconnects and delivers."""
        def hello(number: int) -> bytes:
            return connack() + (disconnect(0x98) if number == 1 else b"")

        async with ScriptedBroker(hello) as broker:
            async with MqttSink("bus", mqtt_config(broker.port, timeout_s=1), HOST) as sink:
                await send_until_delivered(sink, within=15)
        assert broker.connections >= 2
        assert [json.loads(p)["id"] for _, p in broker.published] == ["sess:1"]

    async def test_disconnect_during_a_publish_names_the_reason_at_once(self) -> None:
        """A DISCONNECT while a turn waits for its PUBACK fails the send at once with the
        broker's reason; it said "Operation timed out" after the whole timeout_s."""
        def answer(number: int, topic: str, payload: bytes) -> bytes | None:
            return disconnect(0x98) if number == 1 else None

        async with ScriptedBroker(answer=answer) as broker:
            async with MqttSink("bus", mqtt_config(broker.port, timeout_s=30), HOST) as sink:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(SinkError) as info:
                    await sink.send(make_turn(1))
                took = loop.time() - started
                await send_until_delivered(sink, within=15)     # then delivered after all
        assert str(info.value) == (f"mqtt broker 127.0.0.1:{broker.port}: publish to '{TURNS}' "
                                   "failed: the connection ended before the broker acknowledged "
                                   "the publish: the broker sent DISCONNECT: Administrative "
                                   "action (152)")
        assert took < 10

    async def test_packet_too_large_disconnect_dead_letters_only_that_turn(
            self, tmp_path: Path) -> None:
        """A broker that announces no maximum packet size and drops the connection with
        "Packet too large" on one turn: that turn is dead-lettered, the next ones delivered
        (it was retried for ever, every later turn queued behind it)."""
        def answer(number: int, topic: str, payload: bytes) -> bytes | None:
            return disconnect(0x95) if len(payload) > 1000 else None

        big = dataclasses.replace(make_turn(1), transcript="word " * 300)
        outbox = Outbox(tmp_path / "outbox.sqlite3")
        try:
            async with ScriptedBroker(answer=answer) as broker:
                cfg = mqtt_config(broker.port)
                runner = SinkRunner("bus", mqtt_types()[0], cfg, MqttSink("bus", cfg, HOST),
                                    outbox.queue("bus"))
                dispatcher = Dispatcher([runner], dead_letter_dir=tmp_path / "dead")
                async with asyncio.TaskGroup() as group:
                    dispatcher.start(group)
                    for turn in (make_turn(0), big, make_turn(2)):
                        dispatcher.dispatch(turn)
                    async with asyncio.timeout(20):
                        while len(broker.published) < 2:
                            broker.changed.clear()
                            await broker.changed.wait()
                    await dispatcher.close(flush_s=5)
            assert outbox.depth("bus") == 0
        finally:
            outbox.close()
        assert [json.loads(p)["id"] for _, p in broker.published] == ["sess:0", "sess:2"]
        (dead,) = [json.loads(x) for x in (tmp_path / "dead" / "bus.jsonl").read_text()
                   .splitlines()]
        assert dead["record"]["id"] == "sess:1"
        assert dead["error"] == (
            f"mqtt broker 127.0.0.1:{broker.port}: publish to '{TURNS}' failed: the connection "
            "ended before the broker acknowledged the publish: the broker sent DISCONNECT: "
            "Packet too large (149) (the broker announced no maximum packet size; this record "
            "is over it)")


class TestAcknowledgements:
    async def test_a_puback_that_never_comes_is_named(self) -> None:
        """A broker that takes the PUBLISH and never acknowledges it (or acknowledges another
        packet id): the send said only "Operation timed out"."""
        def answer(number: int, topic: str, payload: bytes) -> bytes:
            return packet(0x40, b"\x7f\x7f\x00\x00")     # a PUBACK for another packet id

        async with ScriptedBroker(answer=answer) as broker:
            async with MqttSink("bus", mqtt_config(broker.port, timeout_s=0.5), HOST) as sink:
                with pytest.raises(SinkError) as info:
                    await sink.send(make_turn(1))
        assert str(info.value) == (f"mqtt broker 127.0.0.1:{broker.port}: publish to '{TURNS}' "
                                   "failed: the broker did not acknowledge the publish within "
                                   "0.5 s")


class TestConnectErrors:
    async def test_a_broker_that_never_answers_connect_is_named(self) -> None:
        """A broker taking the TCP connection and never sending CONNACK: the line said only
        "Operation timed out" (as for any timeout)."""
        async with ScriptedBroker(hello=lambda n: b"") as broker:
            watch = LogWatch()
            with watch.active():
                async with MqttSink("bus", mqtt_config(broker.port, timeout_s=0.5), HOST):
                    error = await first_event(watch, "mqtt.connect_failed")
        assert error == "no CONNACK within 0.5 s: the broker took the connection but did not answer"

    async def test_retained_status_refused_names_the_reason(self) -> None:
        """A broker without retained messages (CONNACK Retain Available 0) drops the connection
        on the retained 'online': the line said "Operation timed out", every attempt."""
        def answer(number: int, topic: str, payload: bytes) -> bytes | None:
            return disconnect(0x9A) if topic.endswith("/status") else None

        async with ScriptedBroker(lambda n: connack(0, b"\x25\x00"), answer) as broker:
            cfg = mqtt_config(broker.port, availability_topic="transcribed/{host}/status")
            watch = LogWatch()
            with watch.active():
                async with MqttSink("bus", cfg, HOST):
                    error = await first_event(watch, "mqtt.connect_failed")
        assert error == ('the broker sent DISCONNECT: Retain not supported (154): set '
                         'availability_topic = "" (its online and offline are retained) and '
                         'retain = false')

    async def test_refusals_say_refused_and_what_to_change(self) -> None:
        """A CONNACK refusal other than the password's said only "[code:138] Banned"; a broker
        naming another server (Server Reference) had that name dropped; bytes that are not MQTT
        were "closed the connection before accepting it (is it a TLS listener?)"."""
        reference = b"\x1c\x00\x0fother.host:1883"
        errors = []
        for hello in (connack(0x8A), connack(0x9C, reference), connack(0x89),
                      b"\xff\xff\xff\xff\xff not MQTT"):
            async with ScriptedBroker(always(hello)) as broker:
                watch = LogWatch()
                with watch.active():
                    async with MqttSink("bus", mqtt_config(broker.port), HOST):
                        errors.append(await first_event(watch, "mqtt.connect_failed"))
        assert errors == [
            "broker refused the connection ([code:138] Banned): the broker bans this client "
            "(address, username or client_id): ask its administrator",
            "broker refused the connection ([code:156] Use another server): it names "
            "'other.host:1883': set host and port",
            "broker refused the connection ([code:137] Server busy)",
            "the broker answered CONNECT with something that is not valid MQTT",
        ]


class TestEndings:
    async def test_a_drop_and_a_disconnect_say_which(self) -> None:
        """A connection that ended said "[code:128] Unspecified error" whether the broker sent
        DISCONNECT or the socket was just closed; now each says which, with the reason."""
        def hello(number: int) -> bytes:
            return connack() + (disconnect(0x8E) if number == 1 else b"")

        def answer(number: int, topic: str, payload: bytes) -> bytes | None:
            return b"" if number == 2 else None     # nothing: the connection is closed

        async with ScriptedBroker(hello, answer) as broker:
            cfg = mqtt_config(broker.port, availability_topic="transcribed/{host}/status")
            watch = LogWatch()
            with watch.active():
                async with MqttSink("bus", cfg, HOST):
                    await watch.until(lambda entries: len(drops(entries)) >= 2)
        assert drops(watch.entries)[:2] == [
            "the broker sent DISCONNECT: Session taken over (142)",
            "the connection was closed without a DISCONNECT (the broker stopped, or the "
            "network)",
        ]


def drops(entries: list[Any]) -> list[str]:
    """The errors of the sink's disconnections and failed connects, in order."""
    return [str(e["error"]) for e in entries
            if e["event"] in ("mqtt.disconnected", "mqtt.connect_failed")]


def retained(topic: str, payload: bytes) -> bytes:
    """A retained QoS 0 PUBLISH from the broker (MQTT 5, no properties)."""
    return packet(0x31, len(topic).to_bytes(2) + topic.encode() + b"\x00" + payload)


class TestStatusOnStop:
    async def test_a_broker_stopping_gives_one_line_not_two(self) -> None:
        """A broker that stops publishes the sink's last will ('offline') and closes: the sink
        tried to say 'online' into the closing connection and logged that it could not
        (mqtt.online_not_reasserted, "[code:4] The client is not currently connected.: [code:128]
        Unspecified error") besides mqtt.disconnected, on every broker restart."""
        status = "transcribed/testhost/status"
        closing = retained(status, b"offline") + disconnect(0x8B)      # Server shutting down

        async with ScriptedBroker() as broker:
            broker.after_subscribe = closing
            cfg = mqtt_config(broker.port, availability_topic="transcribed/{host}/status")
            watch = LogWatch()
            with watch.active():
                async with MqttSink("bus", cfg, HOST):
                    async with asyncio.timeout(20):
                        while broker.connections < 3:   # two connections ended (the third
                            broker.changed.clear()      # says online)
                            await broker.changed.wait()
        events = [e["event"] for e in watch.entries if e["log_level"] == "warning"]
        assert events == ["mqtt.disconnected"]      # the second, ended alike, is only counted
        assert drops(watch.entries)[0] == "the broker sent DISCONNECT: Server shutting down (139)"

    async def test_an_online_sent_without_its_ack_is_replaced_at_stop(self) -> None:
        """The first connection ends after the broker got 'online' but before it acknowledged
        it (retained there all the same); stopped then, the sink connects once more to say
        'offline'. It counted only connections whose 'online' was acknowledged, and left
        'online' standing."""
        def first_online_unacked(number: int, topic: str, payload: bytes) -> bytes | None:
            return b"" if number == 1 else None     # connection 1: closed, no PUBACK

        async with ScriptedBroker(answer=first_online_unacked) as broker:
            cfg = mqtt_config(broker.port, availability_topic="transcribed/{host}/status",
                              timeout_s=2)
            watch = LogWatch()
            with watch.active():
                async with MqttSink("bus", cfg, HOST):
                    await watch.until(lambda entries: len(drops(entries)) >= 1)
        assert broker.published[-1:] == [("transcribed/testhost/status", b"offline")]
        assert [e["event"] for e in watch.entries][-1] == "mqtt.offline_said"

