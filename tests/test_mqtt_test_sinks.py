"""``test-sinks`` beside a running daemon: an MQTT test turn leaves nothing behind.

It published a retained test turn (every later subscriber got "This is a test turn"), said
``online`` then ``offline`` on the availability topic (a watcher saw the daemon go offline), and
with a configured ``client_id`` took over the running daemon's connection (the broker drops a
client whose id connects again).
"""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

from daemon.events import TurnRecord
from plugins.mqtt import MqttConfig, MqttSink
from tests.conftest import REPO, TRANSCRIBED
from tests.mosquitto import Mosquitto, Subscriber

TURNS = "transcribed/+/turn"
STATUS = "transcribed/+/status"


async def _test_sinks(config: Path) -> int:
    process = await asyncio.create_subprocess_exec(
        *TRANSCRIBED, "test-sinks", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(30):
        return await process.wait()


async def _until(subscriber: Subscriber, marker: bytes) -> list[aiomqtt.Message]:
    """What ``subscriber`` got up to ``marker`` (published after what is looked at)."""
    seen = []
    while (message := await subscriber.next(within=10)).payload != marker:
        seen.append(message)
    return seen


async def _mark(broker: Mosquitto, topic: str, marker: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="marker") as client:
        await client.publish(topic, marker, qos=1)


async def test_test_sinks_leaves_no_retained_turn_and_no_offline(tmp_path: Path) -> None:
    """A daemon's sink (retain on, its own client_id) connected; test-sinks with the same
    config: the test turn arrives, nothing is said on the status topic, the daemon's connection
    stays up, and the turn topic's retained message is the daemon's, not the test turn."""
    host = socket.gethostname()
    with Mosquitto(tmp_path / "broker") as broker:
        table = {"type": "mqtt", "host": broker.host, "port": broker.port, "timeout_s": 5,
                 "retain": True, "client_id": "workstation-1"}
        config = tmp_path / "c.toml"
        config.write_text("[sinks.bus]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                     for k, v in table.items())
                          + f'[state]\ndir = "{tmp_path / "state"}"\n')
        running = MqttSink("bus", MqttConfig.model_validate(table), host)  # the daemon's
        async with Subscriber(broker, STATUS) as status, running:
            while (await status.next(within=10)).payload != b"online":
                pass                                        # the daemon's sink is connected
            async with Subscriber(broker, TURNS) as turns:
                assert await _test_sinks(config) == 0
                test_turn = await turns.next(within=10)
            await _mark(broker, f"transcribed/{host}/status", b"marker")
            during = await _until(status, b"marker")
            assert running.connected
            await running.send(_turn())                     # and it still delivers
        async with Subscriber(broker, TURNS) as later:
            await _mark(broker, f"transcribed/{host}/turn", b"marker")
            retained = await _until(later, b"marker")
    assert json.loads(bytes(test_turn.payload))["source"] == "test"
    assert [m.payload for m in during] == [], "test-sinks said something on the status topic"
    assert [json.loads(bytes(m.payload))["source"] for m in retained] == ["microphone"]


def _turn() -> TurnRecord:
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    return TurnRecord("s", 1, "Real.", now, now, 0.9, (), None, "assemblyai", "microphone", "h")
