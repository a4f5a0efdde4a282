"""The MQTT sink against a real mosquitto: QoS 1, availability, restarts, auth and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Self

import pytest
import structlog
from standardwebhooks import Webhook
from structlog.testing import LogCapture, capture_logs

from daemon.dispatch import Dispatcher
from daemon.errors import ConfigError, SinkError
from daemon.outbox import Outbox
from daemon.plugins import load_plugins
from daemon.runner import SinkRunner
from daemon.sinktables import validate_sinks
from plugins.mqtt import MqttConfig, MqttSink
from plugins.mqtt import transcribed_sink_types as mqtt_types
from plugins.mqtt_client import publish_size
from plugins.webhook import WebhookConfig, WebhookSink
from plugins.webhook import transcribed_sink_types as webhook_types
from tests.conftest import TRANSCRIBED
from tests.http_receiver import HttpReceiver, Reply
from tests.loopback_server import LoopbackServer
from tests.mosquitto import Mosquitto, Subscriber, make_certs
from tests.test_outbox import ROOT, make_turn
from tests.test_webhook import SECRET, delivered, wait_delivered

HOST = "testhost"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3")
    yield box
    box.close()


def config(broker: Mosquitto, **extra: Any) -> MqttConfig:
    """A validated MQTT config for ``broker`` with short timeouts."""
    table = {"type": "mqtt", "host": broker.host, "port": broker.port, "timeout_s": 2, **extra}
    return MqttConfig.model_validate(table)


def runner(cfg: MqttConfig, outbox: Outbox) -> SinkRunner:
    """A dispatcher runner for an MQTT sink with a durable queue."""
    return SinkRunner("bus", mqtt_types()[0], cfg, MqttSink("bus", cfg, HOST), outbox.queue("bus"))


async def collect_ids(subscriber: Subscriber, seen: list[str], total: int,
                      within: float = 10) -> None:
    """Add distinct record ids to ``seen`` until it holds ``total`` (redeliveries dropped)."""
    async with asyncio.timeout(within):
        while len(seen) < total:
            message = await subscriber.next(within)
            record_id = json.loads(bytes(message.payload))["id"]
            if record_id not in seen:
                seen.append(record_id)


class LogWatch:
    """Captures structlog events like ``capture_logs`` and lets a test await a condition."""

    def __init__(self) -> None:
        self._capture = LogCapture()
        self._changed = asyncio.Event()

    @property
    def entries(self) -> list[MutableMapping[str, Any]]:
        """Every event so far."""
        return self._capture.entries

    def _processor(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        self._changed.set()
        return self._capture(logger, name, event)

    @contextlib.contextmanager
    def active(self) -> Iterator[Self]:
        """Route structlog's events here meanwhile."""
        old = structlog.get_config()["processors"]
        structlog.configure(processors=[self._processor])
        try:
            yield self
        finally:
            structlog.configure(processors=old)

    async def until(self, condition: Callable[[list[MutableMapping[str, Any]]], bool],
                    within: float = 20) -> None:
        """Wait until ``condition(entries)`` holds."""
        async with asyncio.timeout(within):
            while not condition(self.entries):
                self._changed.clear()
                await self._changed.wait()


class TestDelivery:
    async def test_qos1_records_through_dispatcher(
        self, tmp_path: Path, broker: Mosquitto, outbox: Outbox
    ) -> None:
        """Turns reach the templated topic as the record's JSON, at QoS 1, in order."""
        cfg = config(broker, topic="voice/{host}/{session_id}")
        dispatcher = Dispatcher([runner(cfg, outbox)], dead_letter_dir=tmp_path / "dead")
        async with Subscriber(broker, "voice/#") as subscriber, asyncio.TaskGroup() as group:
            dispatcher.start(group)
            for i in range(5):
                dispatcher.dispatch(make_turn(i))
            messages = [await subscriber.next() for _ in range(5)]
            await dispatcher.close(flush_s=5)
        assert [str(m.topic) for m in messages] == ["voice/testhost/sess"] * 5
        assert {m.qos for m in messages} == {1}
        payloads = [json.loads(bytes(m.payload)) for m in messages]
        assert payloads == [make_turn(i).to_dict() for i in range(5)]
        assert outbox.depth("bus") == 0

    async def test_broker_down_at_start_then_up(self, tmp_path: Path) -> None:
        """The sink opens with no broker, send fails transiently, and works once it is up."""
        broker = Mosquitto(tmp_path / "late")
        async with MqttSink("bus", config(broker, timeout_s=0.3), HOST) as sink:
            with pytest.raises(SinkError, match="not connected"):
                await sink.send(make_turn(1))
            with broker:
                async with Subscriber(broker, "transcribed/+/turn") as subscriber:
                    async with asyncio.timeout(10):
                        while True:
                            try:
                                await sink.send(make_turn(2))
                                break
                            except SinkError:
                                continue  # each attempt waits up to timeout_s for the connection
                    message = await subscriber.next()
        assert str(message.topic) == "transcribed/testhost/turn"

    async def test_broker_restart_mid_stream(
        self, tmp_path: Path, broker: Mosquitto, outbox: Outbox
    ) -> None:
        """Every turn is delivered across a broker restart (deduplicated by id)."""
        dispatcher = Dispatcher([runner(config(broker), outbox)], dead_letter_dir=tmp_path / "d")
        async with Subscriber(broker, "transcribed/+/turn") as subscriber, \
                asyncio.TaskGroup() as group:
            dispatcher.start(group)
            for i in range(5):
                dispatcher.dispatch(make_turn(i))
            seen: list[str] = []
            await collect_ids(subscriber, seen, 5)
            await asyncio.to_thread(broker.stop)
            for i in range(5, 15):
                dispatcher.dispatch(make_turn(i))
            await asyncio.to_thread(broker.start)
            await collect_ids(subscriber, seen, 15, within=20)
            await dispatcher.close(flush_s=5)
        assert seen == [f"sess:{i}" for i in range(15)]
        assert outbox.depth("bus") == 0


class TestPacketLimit:
    async def test_oversized_record_is_dead_lettered_and_later_turns_flow(
        self, tmp_path: Path, outbox: Outbox
    ) -> None:
        """A record over the broker's maximum packet size is dead-lettered with one line giving
        its size and the limit; the turns after it are delivered."""
        broker = Mosquitto(tmp_path / "limited")
        broker.conf.write_text(broker.conf.read_text() + "max_packet_size 700\n")
        big = dataclasses.replace(make_turn(1), transcript="word " * 200)
        dispatcher = Dispatcher([runner(config(broker), outbox)],
                                dead_letter_dir=tmp_path / "dead")
        with broker, capture_logs() as logs:
            async with Subscriber(broker, "transcribed/+/turn") as subscriber, \
                    asyncio.TaskGroup() as group:
                dispatcher.start(group)
                for turn in (make_turn(0), big, make_turn(2)):
                    dispatcher.dispatch(turn)
                seen: list[str] = []
                await collect_ids(subscriber, seen, 2)
                await dispatcher.close(flush_s=5)
        assert seen == ["sess:0", "sess:2"]
        (dead,) = [json.loads(x) for x in
                   (tmp_path / "dead" / "bus.jsonl").read_text().splitlines()]
        size = len(big.to_json().encode())
        topic = len("transcribed/testhost/turn")
        assert dead["record"]["id"] == "sess:1"
        assert dead["error"] == (
            f"mqtt broker {broker.host}:{broker.port}: record of {size} bytes is a "
            f"{1 + 2 + 2 + topic + 2 + 1 + size}-byte PUBLISH, over the broker's maximum packet "
            "size of 700 bytes")
        assert not [e for e in logs if e["event"] == "mqtt.disconnected"]
        assert outbox.depth("bus") == 0

    def test_publish_size(self) -> None:
        """The PUBLISH size counts the fixed header, topic, packet id and (MQTT 5) properties."""
        assert publish_size("t", 10, 0, v5=False) == 1 + 1 + 2 + 1 + 10
        assert publish_size("t", 10, 1, v5=True) == 1 + 1 + 2 + 1 + 2 + 1 + 10
        assert publish_size("t", 200, 1, v5=True) == 1 + 2 + 2 + 1 + 2 + 1 + 200

    async def test_client_log_lines_name_the_sink(
        self, broker: Mosquitto, caplog: pytest.LogCaptureFixture
    ) -> None:
        """paho's and aiomqtt's own log lines carry the sink's name and broker."""
        caplog.set_level(logging.DEBUG)
        async with MqttSink("bus", config(broker), HOST) as sink:
            await sink.send(make_turn(1))
        paho = [r for r in caplog.records if r.getMessage().startswith("Sending CONNECT")]
        assert paho
        assert all(getattr(r, "sink", None) == "bus" for r in paho)
        assert all(getattr(r, "broker", None) == f"{broker.host}:{broker.port}" for r in paho)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first header byte, body) of the next packet."""
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return header, await reader.readexactly(length)


class Mqtt311Broker(LoopbackServer):
    """A minimal MQTT 3.1.1-only broker on 127.0.0.1: refuses MQTT 5 as such a broker does
    (CONNACK return code 1, then close), accepts 3.1.1 and acknowledges QoS 1 publishes."""

    def __init__(self) -> None:
        super().__init__()
        self.levels: list[int] = []           # protocol level of each CONNECT
        self.published: list[bytes] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, connect = await read_packet(reader)
            self.levels.append(connect[6])
            if connect[6] != 4:
                writer.write(b"\x20\x02\x00\x01")        # unacceptable protocol version
                await writer.drain()
                return
            writer.write(b"\x20\x02\x00\x00")
            while True:
                header, body = await read_packet(reader)
                if header >> 4 == 3:                         # PUBLISH
                    topic_end = 2 + int.from_bytes(body[:2])
                    qos = (header >> 1) & 3
                    self.published.append(body[topic_end + (2 if qos else 0):])
                    if qos:
                        writer.write(b"\x40\x02" + body[topic_end:topic_end + 2])
                elif header >> 4 == 12:                      # PINGREQ
                    writer.write(b"\xd0\x00")
                elif header >> 4 == 14:                      # DISCONNECT
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


class TestProtocol:
    async def test_falls_back_to_311_when_the_broker_refuses_5(self) -> None:
        """A broker that refuses MQTT 5 gets MQTT 3.1.1, with one log line saying so."""
        async with Mqtt311Broker() as broker:
            cfg = MqttConfig.model_validate({"type": "mqtt", "host": "127.0.0.1",
                                             "port": broker.port, "availability_topic": "",
                                             "timeout_s": 2})
            with capture_logs() as logs:
                async with MqttSink("bus", cfg, HOST) as sink:
                    await sink.send(make_turn(1))
        assert broker.levels == [5, 4]
        assert [json.loads(p)["id"] for p in broker.published] == ["sess:1"]
        fallback = [e for e in logs if e["event"] == "mqtt.protocol_fallback"]
        assert len(fallback) == 1 and fallback[0]["sink"] == "bus"
        assert not [e for e in logs if e["event"] == "mqtt.connect_failed"]


class TestBothSinks:
    async def test_webhook_503s_and_broker_restart(
        self, tmp_path: Path, broker: Mosquitto, outbox: Outbox
    ) -> None:
        """With a webhook answering 503 at first and a broker restart, both get every turn."""
        async with HttpReceiver() as receiver:
            receiver.script(Reply(503), Reply(503), Reply(503))
            hook_cfg = WebhookConfig.model_validate(
                {"type": "webhook", "url": receiver.url, "secret": SECRET}
            )
            hook = SinkRunner("hook", webhook_types()[0], hook_cfg,
                              WebhookSink("hook", hook_cfg), outbox.queue("hook"))
            dispatcher = Dispatcher([runner(config(broker), outbox), hook],
                                    dead_letter_dir=tmp_path / "dead")
            seen: list[str] = []
            async with Subscriber(broker, "transcribed/+/turn") as subscriber, \
                    asyncio.TaskGroup() as group:
                dispatcher.start(group)
                for i in range(5):
                    dispatcher.dispatch(make_turn(i))
                await collect_ids(subscriber, seen, 3)
                await asyncio.to_thread(broker.stop)
                for i in range(5, 10):
                    dispatcher.dispatch(make_turn(i))
                await asyncio.to_thread(broker.start)
                await collect_ids(subscriber, seen, 10, within=20)
                await wait_delivered(receiver, 10)
                await dispatcher.close(flush_s=5)
        expected = [f"sess:{i}" for i in range(10)]
        assert seen == expected
        assert delivered(receiver) == expected
        for request in receiver.received:
            Webhook(SECRET).verify(request.body, request.headers)
        assert outbox.sinks() == {}


class TestAvailability:
    async def test_online_then_offline_on_clean_shutdown(self, broker: Mosquitto) -> None:
        """Connecting publishes a retained 'online'; a clean exit a retained 'offline'."""
        async with Subscriber(broker, "transcribed/testhost/status") as subscriber:
            async with MqttSink("bus", config(broker), HOST):
                online = await subscriber.next()
            offline = await subscriber.next()
        assert (online.payload, offline.payload) == (b"online", b"offline")
        async with Subscriber(broker, "transcribed/testhost/status") as late:
            retained = await late.next()
        assert (retained.payload, retained.retain) == (b"offline", True)

    async def test_last_will_when_killed(self, broker: Mosquitto) -> None:
        """When the daemon is killed, the broker publishes the retained 'offline' last will."""
        async with Subscriber(broker, "transcribed/testhost/status") as subscriber:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD, broker.host, str(broker.port), cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            try:
                online = await subscriber.next(within=15)
            finally:
                os.kill(child.pid, signal.SIGKILL)
                await child.wait()
            will = await subscriber.next()
        assert (online.payload, will.payload) == (b"online", b"offline")


CHILD = """
import asyncio, sys
from plugins.mqtt import MqttConfig, MqttSink

async def main() -> None:
    cfg = MqttConfig(type="mqtt", host=sys.argv[1], port=int(sys.argv[2]))
    async with MqttSink("bus", cfg, "testhost"):
        await asyncio.Event().wait()

asyncio.run(main())
"""


class TestSecurity:
    async def test_password_auth(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Right credentials deliver; a wrong password is a clear error that never shows it."""
        caplog.set_level(logging.DEBUG)
        with Mosquitto(tmp_path / "auth", users={"daemon": "s3cret-pw"}) as broker:
            good = config(broker, username="daemon", password="s3cret-pw")
            async with Subscriber(broker, "transcribed/+/turn", username="daemon",
                                  password="s3cret-pw") as subscriber:
                async with MqttSink("bus", good, HOST) as sink:
                    await sink.send(make_turn(1))
                assert (await subscriber.next()).payload
            bad = config(broker, username="daemon", password="wr0ng-pw", timeout_s=0.5)
            with capture_logs() as logs:
                async with MqttSink("bus", bad, HOST) as sink:
                    with pytest.raises(SinkError) as info:
                        await sink.send(make_turn(2))
        message = str(info.value)
        assert "check username and password" in message
        text = message + repr(logs) + caplog.text
        assert "wr0ng-pw" not in text
        assert "s3cret-pw" not in text
        assert [e["event"] for e in logs].count("mqtt.connect_failed") == 1

    def test_test_sinks_keeps_stdout_for_results(self, tmp_path: Path) -> None:
        """``test-sinks``: one result line per sink on stdout; logs on stderr, password masked."""
        with Mosquitto(tmp_path / "auth", users={"daemon": "s3cret-pw"}) as broker:
            path = tmp_path / "c.toml"
            path.write_text(f'[log]\nlevel = "debug"\n[sinks.bus]\ntype = "mqtt"\n'
                            f'host = "127.0.0.1"\nport = {broker.port}\nusername = "daemon"\n'
                            f'password = "wr0ng-pw"\ntimeout_s = 1\n'
                            f'[state]\ndir = "{tmp_path / "state"}"\n')
            result = subprocess.run([*TRANSCRIBED, "test-sinks", "--config", str(path)],
                                    capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        (line,) = result.stdout.splitlines()
        assert line.startswith("bus (mqtt): FAILED: ") and "check username and password" in line
        assert "mqtt.connect_failed" in result.stderr
        assert "wr0ng-pw" not in result.stdout + result.stderr

    async def test_tls_with_generated_ca(self, tmp_path: Path) -> None:
        """TLS delivers when the broker's certificate is signed by the configured CA file."""
        certs = await asyncio.to_thread(make_certs, tmp_path / "certs")
        with Mosquitto(tmp_path / "tls", certs=certs) as broker:
            context = ssl.create_default_context(cafile=str(certs.ca))
            cfg = config(broker, tls=True, ca_file=str(certs.ca))
            async with Subscriber(broker, "transcribed/+/turn", tls_context=context) as sub:
                async with MqttSink("bus", cfg, HOST) as sink:
                    await sink.send(make_turn(1))
                message = await sub.next()
        assert json.loads(bytes(message.payload))["id"] == "sess:1"

    # paho-mqtt 2.2 does not close its SSLSocket when the handshake fails (_ssl_wrap_socket);
    # the garbage collector does, with a ResourceWarning that is not ours to fix.
    @pytest.mark.filterwarnings(
        "ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning"
    )
    async def test_tls_unknown_ca_is_refused(self, tmp_path: Path) -> None:
        """Without the right CA the certificate check fails with a clear, transient error."""
        certs = await asyncio.to_thread(make_certs, tmp_path / "certs")
        with Mosquitto(tmp_path / "tls", certs=certs) as broker:
            async with MqttSink("bus", config(broker, tls=True, timeout_s=0.5), HOST) as sink:
                with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED"):
                    await sink.send(make_turn(2))


class TestConfig:
    @pytest.mark.parametrize(
        ("table", "expected"),
        [
            ({"topic": "t/{user}"}, "sinks.bus.topic: unknown placeholder {user}"),
            ({"topic": "t/#"}, "must not contain the wildcards"),
            ({"availability_topic": "s/{session_id}"}, "unknown placeholder {session_id}"),
            ({"qos": 3}, "sinks.bus.qos: Input should be 0, 1 or 2"),
            ({"password": "pw"}, "a password needs a username"),
            ({"ca_file": "/nonexistent/ca.pem", "tls": True},
             "sinks.bus.ca_file: cannot load CA certificates from /nonexistent"),
            ({"ca_file": "/etc/hostname"}, "ca_file is set but tls = false"),
            ({"username": "u", "password": "pw", "password_file": "/x"}, "not both"),
            ({"port": 0}, "sinks.bus.port: Input should be greater than or equal to 1"),
        ],
    )
    def test_bad_tables_give_one_clear_line(self, table: dict[str, Any], expected: str) -> None:
        """Each bad key gives a one-line error naming it, without echoing the password."""
        host = load_plugins(entry_points=False)
        with pytest.raises(ConfigError) as info:
            validate_sinks(host, {"bus": {"type": "mqtt", "host": "localhost", **table}})
        assert expected in str(info.value)
        assert "pw" not in str(info.value).replace("password", "")

    @pytest.mark.parametrize("kind", ["fifo", "folder"])
    def test_ca_file_not_a_regular_file(self, tmp_path: Path, kind: str) -> None:
        """A FIFO (or a folder) as ``ca_file`` is named at once: reading a FIFO hung for ever."""
        ca = tmp_path / "ca.pem"
        if kind == "fifo":
            os.mkfifo(ca)
        else:
            ca.mkdir()
        with pytest.raises(ConfigError, match=f"sinks.bus.ca_file: cannot load CA certificates "
                                              f"from {ca}: not a regular file"):
            validate_sinks(load_plugins(entry_points=False),
                           {"bus": {"type": "mqtt", "host": "h", "tls": True, "ca_file": str(ca)}})

    def test_password_file(self, tmp_path: Path) -> None:
        """The password can come from a file."""
        secret = tmp_path / "pw"
        secret.write_text("from-file\n")
        cfg = MqttConfig.model_validate(
            {"type": "mqtt", "host": "h", "username": "u", "password_file": str(secret)}
        )
        assert cfg.password.get_secret_value() == "from-file"


class TestRefusals:
    @pytest.mark.parametrize("qos", [1, 2])
    async def test_publish_the_acl_refuses_is_dead_lettered(
        self, tmp_path: Path, outbox: Outbox, qos: int
    ) -> None:
        """A PUBACK/PUBREC saying "Not authorized" (MQTT 5) is not a delivery: the record is
        dead-lettered with the reason, not deleted as if the broker had taken it."""
        acl = "topic readwrite transcribed/+/status\ntopic read transcribed/+/turn\n"
        with Mosquitto(tmp_path / "acl", acl=acl) as broker:
            dispatcher = Dispatcher([runner(config(broker, qos=qos), outbox)],
                                    dead_letter_dir=tmp_path / "dead")
            async with asyncio.TaskGroup() as group:
                dispatcher.start(group)
                dispatcher.dispatch(make_turn(1))
                await dispatcher.close(flush_s=10)
        lines = (tmp_path / "dead" / "bus.jsonl").read_text().splitlines()
        (dead,) = [json.loads(x) for x in lines]
        assert dead["record"]["id"] == "sess:1"
        assert dead["error"] == (
            f"mqtt broker {broker.host}:{broker.port}: publish to 'transcribed/testhost/turn' "
            "refused by the broker: Not authorized (135): check the broker's ACL for this user "
            "and topic")
        assert outbox.depth("bus") == 0


class TestTopics:
    @pytest.mark.parametrize("value", ["t/\x00", "t/a\x1fb", "t/\x7f", "t/\x85", "t/\uffff"])
    def test_characters_brokers_refuse_are_config_errors(self, value: str) -> None:
        """NUL, controls and non-characters make mosquitto drop the client: refused up front."""
        host = load_plugins(entry_points=False)
        with pytest.raises(ConfigError, match=r"sinks\.bus\.topic: .*control character"):
            validate_sinks(host, {"bus": {"type": "mqtt", "host": "localhost", "topic": value}})

    async def test_odd_host_name_is_made_safe(self, broker: Mosquitto) -> None:
        """A host name with MQTT wildcards or control characters still connects and delivers:
        those characters become ``_`` in the topics (they made the broker refuse the will)."""
        odd = "we+ird#h\x01st"
        async with Subscriber(broker, "transcribed/#") as subscriber:
            async with MqttSink("bus", config(broker), odd) as sink:
                online = await subscriber.next()
                await sink.send(dataclasses.replace(make_turn(1), host=odd))
                turn = await subscriber.next()
        assert (str(online.topic), online.payload) == ("transcribed/we_ird_h_st/status", b"online")
        assert str(turn.topic) == "transcribed/we_ird_h_st/turn"


class SilentBroker(LoopbackServer):
    """Accepts TCP connections on 127.0.0.1 and never answers; counts those the client closed."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = 0
        self.closed_by_client = 0
        self.changed = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.changed.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()                  # returns at EOF: the client closed it
        self.closed_by_client += 1
        self.changed.set()
        writer.close()


class TestReconnects:
    async def test_no_socket_kept_per_unanswered_connect(self) -> None:
        """A broker that accepts TCP but never sends CONNACK: each timed-out attempt closes its
        socket (it stayed open until paho's keep-alive check, a file descriptor per attempt)."""
        async with SilentBroker() as silent:
            cfg = MqttConfig.model_validate({"type": "mqtt", "host": "127.0.0.1",
                                             "port": silent.port, "timeout_s": 0.2})
            async with MqttSink("bus", cfg, HOST):
                async with asyncio.timeout(20):
                    while silent.closed_by_client < 3:
                        silent.changed.clear()
                        await silent.changed.wait()
            assert silent.accepted - silent.closed_by_client <= 1

    async def test_client_id_taken_over_backs_off_and_says_why(self, broker: Mosquitto) -> None:
        """Two daemons with one client_id take the connection from each other: the reconnects
        back off (they were ~10 a second each, a warning each) and the error names the cause."""
        cfg = config(broker, client_id="shared-id")
        watch = LogWatch()

        def drops(entries: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
            return [e for e in entries if e["event"] == "mqtt.disconnected" and e["sink"] == "a"]

        with watch.active():
            async with MqttSink("a", cfg, HOST), MqttSink("b", cfg, HOST):
                await watch.until(lambda entries: len(drops(entries)) >= 5)
        fifth = drops(watch.entries)[4]
        assert fifth["retry_in_s"] >= 0.8                 # 0.1 s doubled four times, jittered
        assert "is another client connected with client_id 'shared-id'?" in fifth["error"]
