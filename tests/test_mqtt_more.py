"""The MQTT sink's availability topic when a connection dies on one side only; its connect
errors, reconnects and flapping connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest

import plugins.mqtt
from daemon.errors import SinkError
from plugins.mqtt import STABLE_S, MqttConfig, MqttSink
from plugins.tcp_probe import PROBE_EVERY_S
from tests.mosquitto import Mosquitto, Subscriber, make_certs
from tests.test_mqtt import LogWatch
from tests.test_outbox import make_turn

HOST = "testhost"
STATUS = "transcribed/testhost/status"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as running:
        yield running


class HalfOpenProxy:
    """A TCP relay to the broker that can drop a connection on the client's side only.

    ``drop_client_side`` closes the sink's end of every relayed connection and keeps the
    broker's end open, as when the network fails on the client's side (an address change,
    a NAT reset): the broker still sees the old connection. ``drop_broker_side`` then closes
    those ends, as the broker's keep-alive timeout finally does: it publishes their last will.
    """

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.port = 0
        self.connections = 0
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._kept: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in [w for pair in self._pairs for w in pair] + self._kept:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def drop_client_side(self) -> None:
        """Close the client's end of every connection; keep the broker's end open."""
        for client, upstream in self._pairs:
            client.transport.abort()
            self._kept.append(upstream)
        self._pairs.clear()

    def drop_broker_side(self) -> None:
        """Close the broker's end of the connections ``drop_client_side`` kept."""
        for upstream in self._kept:
            upstream.transport.abort()
        self._kept.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.broker.address)
        self._pairs.append((writer, up_writer))
        self.connections += 1
        self.connected.set()
        for source, target in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                if target.is_closing():
                    return          # this side was dropped: the bytes go nowhere
                target.write(data)
                await target.drain()


async def payloads(subscriber: Subscriber, *wanted: bytes) -> None:
    """Wait for the next messages on the status topic to be ``wanted``, in order."""
    for expected in wanted:
        message = await subscriber.next(within=10)
        assert message.payload == expected


class TestStaleWill:
    async def test_an_old_connections_will_does_not_leave_the_daemon_offline(
            self, broker: Mosquitto) -> None:
        """The broker publishes a dead connection's last will late (its keep-alive timeout,
        1.5 x keep_alive), when the sink is already connected again: the sink says 'online'
        again. The retained 'offline' stayed, and the daemon looked down while delivering."""
        async with HalfOpenProxy(broker) as proxy, Subscriber(broker, STATUS) as subscriber:
            cfg = MqttConfig.model_validate({"type": "mqtt", "host": "127.0.0.1",
                                             "port": proxy.port, "timeout_s": 2})
            async with MqttSink("bus", cfg, HOST):
                await payloads(subscriber, b"online")
                proxy.drop_client_side()
                await payloads(subscriber, b"online")       # reconnected: a new connection
                proxy.drop_broker_side()
                await payloads(subscriber, b"offline", b"online")
                async with Subscriber(broker, STATUS) as late:
                    retained = await late.next()
                assert (retained.payload, retained.retain) == (b"online", True)
            await payloads(subscriber, b"offline")          # a clean stop still says so
            async with Subscriber(broker, STATUS) as late:
                retained = await late.next()
            assert (retained.payload, retained.retain) == (b"offline", True)

    async def test_a_status_topic_the_acl_lets_write_only_still_works(
            self, tmp_path: Path) -> None:
        """Watching the status topic needs read access; a broker refusing it changes nothing."""
        acl = "topic write transcribed/+/status\ntopic readwrite transcribed/+/turn\n"
        with Mosquitto(tmp_path / "acl", acl=acl) as broker:
            cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                             "port": broker.port, "timeout_s": 2})
            async with Subscriber(broker, "transcribed/+/turn") as turns, \
                    MqttSink("bus", cfg, HOST) as sink:
                await sink.send(make_turn(1))
                message = await turns.next()
            assert json.loads(bytes(message.payload))["id"] == make_turn(1).id


class TestConnectErrors:
    async def test_a_new_reason_for_failing_to_connect_is_logged(self, tmp_path: Path) -> None:
        """Started before the broker (at boot), then refused by it: both reasons are logged,
        once each. Only 'Connection refused' was: a wrong password stayed unsaid until a turn
        came to send (the send's error), and the broker looked down."""
        broker = Mosquitto(tmp_path / "late", users={"daemon": "s3cret-pw"})
        cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                         "port": broker.port, "timeout_s": 2,
                                         "username": "daemon", "password": "wr0ng-pw"})
        watch = LogWatch()

        def failures(entries: list[MutableMapping[str, Any]]) -> list[str]:
            return [str(e["error"]) for e in entries if e["event"] == "mqtt.connect_failed"]

        with watch.active():
            async with MqttSink("bus", cfg, HOST):
                await watch.until(lambda entries: len(failures(entries)) == 1)
                with broker:
                    await watch.until(lambda entries: any(
                        "check username and password" in error for error in failures(entries)))
        errors = failures(watch.entries)
        assert "Connection refused" in errors[0]
        assert len(errors) == len(set(errors)) == 2
        assert "wr0ng-pw" not in repr(watch.entries)

    # paho-mqtt 2.2 does not close its SSLSocket when the handshake fails (test_mqtt.py)
    @pytest.mark.filterwarnings(
        "ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning"
    )
    async def test_tls_set_wrong_either_way_says_so(self, tmp_path: Path) -> None:
        """Plain MQTT to a TLS listener said 'Operation timed out' (after timeout_s, every
        attempt: aiomqtt ignores a connection closed before CONNACK); TLS to a plain one said
        only 'Connection reset by peer'. Both now point at the setting."""
        certs = make_certs(tmp_path / "certs")
        with Mosquitto(tmp_path / "tls", certs=certs) as secure, \
                Mosquitto(tmp_path / "plain") as plain:
            errors = [await first_connect_error({"port": secure.port}),
                      await first_connect_error({"port": plain.port, "tls": True,
                                                 "ca_file": str(certs.ca)})]
        assert errors[0].startswith("the broker closed the connection before accepting it")
        assert f"is 127.0.0.1:{secure.port} a TLS listener? then set tls = true" in errors[0]
        assert "Connection reset by peer" in errors[1]
        assert f"does 127.0.0.1:{plain.port} speak TLS? tls = true" in errors[1]


async def first_connect_error(table: dict[str, Any]) -> str:
    """The error of the sink's first ``mqtt.connect_failed`` with ``table``'s settings."""
    cfg = MqttConfig.model_validate({"type": "mqtt", "host": "127.0.0.1", "timeout_s": 2,
                                     **table})
    watch = LogWatch()
    with watch.active():
        async with MqttSink("bus", cfg, HOST):
            await watch.until(lambda entries: any(
                e["event"] == "mqtt.connect_failed" for e in entries))
    return next(str(e["error"]) for e in watch.entries if e["event"] == "mqtt.connect_failed")


class TestStatusAtStop:
    async def test_a_stop_while_reconnecting_replaces_the_retained_online(
            self, broker: Mosquitto) -> None:
        """The broker went away (keeping the retained 'online': its will never fired) and is
        back before the sink reconnects; the daemon stops then. The stop makes one short
        connection to say 'offline': the status said 'online' for as long as it was stopped."""
        watch = LogWatch()
        cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                         "port": broker.port, "timeout_s": 2})
        with watch.active():
            async with MqttSink("bus", cfg, HOST):
                await watch.until(lambda logs: any(e["event"] == "mqtt.connected" for e in logs))
                broker.stop()               # persistence keeps the retained 'online'
                await watch.until(lambda logs: any(e["event"] == "mqtt.disconnected"
                                                   for e in logs))
                broker.start()              # blocks the loop: the sink cannot reconnect first
        assert [e["event"] for e in watch.entries][-1] == "mqtt.offline_said"
        async with Subscriber(broker, STATUS) as late:
            retained = await late.next()
        assert (retained.payload, retained.retain) == (b"offline", True)

    async def test_a_stop_while_the_broker_is_away_says_the_status_may_be_stale(
            self, broker: Mosquitto) -> None:
        """Stopped while the broker is still away: nothing can be said there; the log names
        the topic that may still say 'online'."""
        watch = LogWatch()
        cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                         "port": broker.port, "timeout_s": 2})
        with watch.active():
            async with asyncio.timeout(10):
                async with MqttSink("bus", cfg, HOST):
                    await watch.until(lambda logs: any(e["event"] == "mqtt.connected"
                                                       for e in logs))
                    broker.stop()
        [unsaid] = [e for e in watch.entries if e["event"] == "mqtt.offline_unsaid"]
        assert unsaid["effect"] == (f"{STATUS!r} may say online (retained) until the sink "
                                    "connects there again")
        assert "refused" in unsaid["error"].lower()

    async def test_a_sink_that_never_connected_says_nothing_at_stop(
            self, broker: Mosquitto) -> None:
        """No 'online' was ever published by it: no connection is tried at the stop."""
        broker.stop()
        watch = LogWatch()
        cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                         "port": broker.port, "timeout_s": 2})
        with watch.active():
            async with MqttSink("bus", cfg, HOST):
                await watch.until(lambda logs: any(e["event"] == "mqtt.connect_failed"
                                                   for e in logs))
        assert not [e for e in watch.entries if e["event"].startswith("mqtt.offline_")]


class TestFlapping:
    async def test_connections_the_broker_keeps_ending_are_logged_once(
            self, broker: Mosquitto) -> None:
        """Another client keeps taking our ``client_id``: each of our connections ends at
        once. The first end is logged, the next ones of the run only counted; a connection
        that lasts says so, with the count (two lines per connection, for as long as it went
        on, every 15-45 s, before)."""
        watch = LogWatch()
        with watch.active():
            async with MqttSink("bus", _desk(broker), HOST) as sink:
                await _taken_over(broker, sink, times=4)
                await watch.until(lambda logs: len(_events(logs, "mqtt.connected")) == 2,
                                  within=STABLE_S + 5)
        first, lasted = _events(watch.entries, "mqtt.connected")
        assert "short_connections_not_logged" not in first
        assert lasted["short_connections_not_logged"] == 3
        assert lasted["lasted_s"] == STABLE_S
        [ended] = _events(watch.entries, "mqtt.disconnected")
        assert "is another client connected with client_id 'desk'?" in ended["error"]


    async def test_a_run_of_early_ends_is_over_when_connects_fail(
            self, broker: Mosquitto) -> None:
        """Early ends, then the broker goes away: the count is said, and the connection made
        when it is back is logged at once, not only if it lasts (the log said 'connect_failed'
        and then nothing while the sink was connected)."""
        watch = LogWatch()
        with watch.active():
            async with MqttSink("bus", _desk(broker), HOST) as sink:
                await _taken_over(broker, sink, times=3)
                broker.stop()
                await watch.until(lambda logs: bool(_events(logs, "mqtt.connect_failed")))
                broker.start()
                await _on_a_new_connection(sink)
        shown = [e["event"] for e in watch.entries if e["log_level"] != "debug"]
        assert shown[-2:] == ["mqtt.connect_failed", "mqtt.connected"]
        counted = sum(e.get("short_connections_not_logged", 0) for e in watch.entries)
        assert counted in (2, 3)    # 3: the stop's end alike (closed without a DISCONNECT)


class TestBrokerBack:
    """A backoff grown in a long outage (here the first wait: 15-45 s) does not hold the
    reconnect once the broker is back, unless the broker itself refused the connection."""

    @pytest.fixture(autouse=True)
    def _long_backoff(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(plugins.mqtt, "RECONNECT_INITIAL_S", 30.0)

    async def test_a_broker_back_is_connected_to_within_a_probe(self, tmp_path: Path) -> None:
        """Refused (the broker down), then the broker starts: the sink is connected within
        seconds, not when its 15-45 s wait runs out (the first turn after a long outage
        waited up to 45 s for it)."""
        broker = Mosquitto(tmp_path / "late")
        cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host,
                                         "port": broker.port, "availability_topic": ""})
        watch = LogWatch()
        with watch.active():
            async with MqttSink("bus", cfg, HOST) as sink:
                await watch.until(lambda logs: bool(_events(logs, "mqtt.connect_failed")))
                with broker:
                    async with asyncio.timeout(PROBE_EVERY_S + 3):
                        await sink.ready()
        [failed] = _events(watch.entries, "mqtt.connect_failed")
        assert "Connection refused" in failed["error"] and failed["retry_in_s"] >= 15

    async def test_a_broker_that_refuses_us_is_not_probed(self, tmp_path: Path) -> None:
        """A wrong password: the broker takes the TCP connection, so a probe would always
        succeed; the sink waits out its backoff instead of reconnecting in a tight loop."""
        with Mosquitto(tmp_path / "strict", users={"daemon": "s3cret-pw"}) as broker:
            async with HalfOpenProxy(broker) as proxy:
                cfg = MqttConfig.model_validate({
                    "type": "mqtt", "host": "127.0.0.1", "port": proxy.port,
                    "username": "daemon", "password": "wr0ng-pw", "availability_topic": ""})
                watch = LogWatch()
                with watch.active():
                    async with MqttSink("bus", cfg, HOST):
                        await watch.until(lambda logs: bool(_events(logs, "mqtt.connect_failed")))
                        proxy.connected.clear()
                        with pytest.raises(TimeoutError):
                            async with asyncio.timeout(PROBE_EVERY_S + 1):
                                await proxy.connected.wait()
                assert proxy.connections == 1


def _desk(broker: Mosquitto) -> MqttConfig:
    """A sink with ``client_id`` "desk" and no availability topic."""
    return MqttConfig.model_validate({"type": "mqtt", "host": broker.host, "port": broker.port,
                                      "timeout_s": 2, "client_id": "desk",
                                      "availability_topic": ""})


async def _taken_over(broker: Mosquitto, sink: MqttSink, times: int) -> None:
    """Once ``sink`` is connected, another client takes its id ``times`` times, each time
    after the sink has connected again."""
    async with asyncio.timeout(10):
        await sink.ready()
    for _ in range(times):
        async with aiomqtt.Client(broker.host, broker.port, identifier="desk"):
            pass                            # takes the id over: the sink is off
        await _on_a_new_connection(sink)


async def _on_a_new_connection(sink: MqttSink) -> None:
    """Wait until ``sink`` is connected again after its connection was taken over.

    A send fails on the connection taken over (then ``ready()`` waits for the next one), or
    goes through on the next one, made already.
    """
    async with asyncio.timeout(10):
        try:
            await sink.send(make_turn(1))
        except SinkError:
            await sink.ready()


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """``name``'s lines above debug: what a log at the default level shows."""
    return [e for e in logs if e["event"] == name and e["log_level"] != "debug"]
