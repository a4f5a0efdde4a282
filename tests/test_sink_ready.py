"""A failed turn's retry goes when its sink says it is ready again, not when the backoff ends.

After a long outage a retry backoff has grown to 30 s (45 s with jitter); the MQTT sink's
``ready()`` returns when its broker takes a connection again, the webhook sink's when a server
listens at its port again (after a send nothing took), and the dispatcher then retries at once
(never sooner than ``EARLY_RETRY_MIN_S`` after the failure). Real dispatcher, outbox, mosquitto,
HTTP server and sinks; the long backoff is played by a ``Retry-After`` that a wrapper of the
test's own puts on the first failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from structlog.testing import capture_logs

from daemon.dispatch import Dispatcher
from daemon.errors import SinkError
from daemon.events import TurnRecord
from daemon.outbox import Outbox
from daemon.plugins import SinkConfig, SinkType
from daemon.queues import MemoryQueue
from daemon.runner import EARLY_RETRY_MIN_S, SinkRunner
from plugins.mqtt import MqttConfig, MqttSink
from plugins.mqtt import transcribed_sink_types as mqtt_types
from plugins.webhook import WebhookConfig, WebhookSink
from plugins.webhook import transcribed_sink_types as webhook_types
from tests.http_receiver import HttpReceiver, Reply
from tests.mosquitto import Mosquitto, Subscriber, free_port
from tests.sink_watch import Watched
from tests.test_outbox import make_turn

LONG_WAIT_S = 60.0  # the backoff a retry would sit out without ready(): past every timeout here


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker made but not started: each test starts it when it wants it up."""
    made = Mosquitto(tmp_path / "broker")
    yield made
    made.stop()


class LongBackoff(Watched):
    """A real sink whose first failure asks for a minute's wait (a grown backoff)."""

    async def ready(self) -> None:
        await self.sink.ready()

    async def send(self, record: TurnRecord) -> None:
        try:
            await self.sink.send(record)
        except SinkError as exc:
            if self.failed.is_set():
                raise
            self.failed.set()
            raise SinkError(str(exc), retry_after=LONG_WAIT_S) from None


async def test_the_first_turn_after_a_broker_outage_goes_when_the_sink_reconnects(
    tmp_path: Path, broker: Mosquitto,
) -> None:
    """The broker is down when the turn comes; its retry would wait a minute. Started again,
    the broker gets the turn within seconds of the sink's reconnection (retained, so a
    subscriber that comes after it still sees it)."""
    cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host, "port": broker.port,
                                     "timeout_s": 0.5, "availability_topic": "", "retain": True})
    box = Outbox(tmp_path / "outbox.sqlite3")
    sink = LongBackoff(MqttSink("bus", cfg, "testhost"))
    runner = SinkRunner("bus", mqtt_types()[0], cfg, sink, box.queue("bus"))
    dispatcher = Dispatcher([runner], dead_letter_dir=tmp_path / "dead-letter")
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(1))
            async with asyncio.timeout(10):
                await sink.failed.wait()        # not connected within timeout_s: failed
            broker.start()
            async with Subscriber(broker, "transcribed/#") as subscriber:
                message = await subscriber.next(within=15)
            assert json.loads(bytes(message.payload))["id"] == "sess:1"
            await dispatcher.close(flush_s=5)
    box.close()
    events = [e["event"] for e in logs]
    assert events.index("mqtt.connected") < events.index("sink.recovered")


async def test_a_turn_for_a_webhook_that_was_down_goes_when_it_is_back(tmp_path: Path) -> None:
    """Nothing listens at the webhook's port when the turn comes; its retry would wait a
    minute. A server started there gets the turn within seconds (the sink probes the port)."""
    port = free_port()
    cfg = WebhookConfig.model_validate({"type": "webhook", "timeout_s": 2,
                                        "url": f"http://127.0.0.1:{port}/hook"})
    box = Outbox(tmp_path / "outbox.sqlite3")
    sink = LongBackoff(WebhookSink("hook", cfg))
    dispatcher = Dispatcher([SinkRunner("hook", webhook_types()[0], cfg, sink,
                                        box.queue("hook"))],
                            dead_letter_dir=tmp_path / "dead-letter")
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(make_turn(1))
        async with asyncio.timeout(10):
            await sink.failed.wait()            # connection refused
        async with HttpReceiver(port=port) as receiver:
            request = await receiver.next(within=10)
            await dispatcher.close(flush_s=5)
    box.close()
    assert request.headers["webhook-id"] == "sess:1"


async def test_a_webhook_that_answered_is_left_to_its_backoff(tmp_path: Path) -> None:
    """A server that answers 503 with ``Retry-After: 60`` is up: its wait is not cut short
    (the probe is for a server nothing answered for)."""
    async with HttpReceiver() as receiver:
        receiver.script(Reply(503, {"retry-after": "60"}))
        cfg = WebhookConfig.model_validate({"type": "webhook", "timeout_s": 2,
                                            "url": f"{receiver.url}/hook"})
        box = Outbox(tmp_path / "outbox.sqlite3")
        dispatcher = Dispatcher([SinkRunner("hook", webhook_types()[0], cfg,
                                            WebhookSink("hook", cfg), box.queue("hook"))],
                                dead_letter_dir=tmp_path / "dead-letter")
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(1))
            assert (await receiver.next(within=10)).status == 503
            with pytest.raises(TimeoutError):   # not again within 2 floors of the early retry
                await receiver.next(within=2 * EARLY_RETRY_MIN_S + 1)
            await dispatcher.close(flush_s=0.1)
        box.close()


async def test_ready_returns_only_for_a_connection_newer_than_the_failed_send(
    broker: Mosquitto,
) -> None:
    """Down: a send fails and ``ready()`` waits; up: it returns. Connected with nothing failed
    since, it returns at once; a send failed on a connection waits for the next one."""
    cfg = MqttConfig.model_validate({"type": "mqtt", "host": broker.host, "port": broker.port,
                                     "timeout_s": 0.5, "availability_topic": ""})
    async with MqttSink("bus", cfg, "testhost") as sink:
        with pytest.raises(SinkError, match="not connected"):
            await sink.send(make_turn(1))
        waiting = asyncio.ensure_future(sink.ready())
        await asyncio.wait([waiting], timeout=0.5)   # a reconnect attempt or two, refused
        assert not waiting.done()
        broker.start()
        async with asyncio.timeout(15):
            await waiting
        assert sink.connected
        async with asyncio.timeout(1):
            await sink.ready()                      # nothing failed on this connection
        broker.stop()
        with pytest.raises(SinkError):
            await _send_until_it_fails(sink)
        waiting = asyncio.ensure_future(sink.ready())
        await asyncio.wait([waiting], timeout=0.5)
        assert not waiting.done()
        broker.start()
        async with asyncio.timeout(15):
            await waiting


async def _send_until_it_fails(sink: MqttSink) -> None:
    """Send turns until one fails (the sink sees the broker gone), for at most 15 s."""
    async with asyncio.timeout(15):
        while True:
            await sink.send(make_turn(2))


class Flaky:
    """A third-party sink: fails ``failures`` times asking for a minute's wait; ``ready`` is
    the test's."""

    def __init__(self, ready: object, failures: int = 1) -> None:
        self.ready = ready
        self.failures = failures
        self.attempts: list[float] = []
        self.delivered = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise SinkError("the far end is away", retry_after=LONG_WAIT_S)
        self.delivered.set()


def _runner(sink: Flaky) -> SinkRunner:
    return SinkRunner("own", SinkType("own", SinkConfig, lambda *_: sink),
                      SinkConfig(type="own"), sink, MemoryQueue())


async def _delivered(sink: Flaky, tmp_path: Path, within: float) -> bool:
    """Whether one turn dispatched to ``sink`` is delivered within ``within`` seconds."""
    dispatcher = Dispatcher([_runner(sink)], dead_letter_dir=tmp_path / "dead-letter")
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(make_turn(1))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await sink.delivered.wait()
        await dispatcher.close(flush_s=0.1)
    return sink.delivered.is_set()


async def test_a_ready_that_returns_at_once_still_waits_the_floor(tmp_path: Path) -> None:
    """A ``ready()`` that is always ready (the sink is up, the far end still failing) makes no
    tight loop: the retry comes ``EARLY_RETRY_MIN_S`` after the failure, the next early one
    twice that after the next failure, ..., not at once (nor at 1 s for ever)."""
    async def always() -> None:
        return None

    sink = Flaky(always, failures=2)
    assert await _delivered(sink, tmp_path, within=10)
    first, second, third = sink.attempts
    assert second - first >= EARLY_RETRY_MIN_S * 0.99
    assert third - second >= 2 * EARLY_RETRY_MIN_S * 0.99


async def test_a_ready_that_raises_or_is_not_async_leaves_the_backoff_alone(
    tmp_path: Path,
) -> None:
    """A third-party ``ready`` that fails is logged and the retry waits its backoff out; a
    ``ready`` that is not a coroutine function (a flag, a plain method) is not called."""
    async def broken() -> None:
        raise RuntimeError("lost its socket")

    sink = Flaky(broken)
    with capture_logs() as logs:
        assert not await _delivered(sink, tmp_path / "a", within=2 * EARLY_RETRY_MIN_S + 1)
    [said] = [e for e in logs if e["event"] == "sink.ready_failed"]
    assert said["error"] == "lost its socket"
    plain = Flaky(lambda: None)
    assert not await _delivered(plain, tmp_path / "b", within=2 * EARLY_RETRY_MIN_S + 1)
    assert len(plain.attempts) == 1
