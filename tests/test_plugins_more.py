"""Third-party plugins that misbehave: what a plugin author's mistake costs the daemon."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from pydantic import BaseModel, field_validator
from structlog.testing import capture_logs

from daemon.dispatch import Dispatcher
from daemon.errors import ConfigError
from daemon.events import PartialTurn, TurnRecord
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl, load_plugins
from daemon.queues import MemoryQueue
from daemon.runner import SinkRunner
from daemon.sinktables import validate_sinks
from tests.conftest import REPO, TRANSCRIBED
from tests.test_sinks_local import record

CONTEXT = SinkContext(host="h", state_dir=Path("/nonexistent"))


def _loaded(type_name: str, factory: Callable[..., Any]) -> tuple[SinkType, SinkConfig]:
    """``factory`` as a third-party plugin's sink type, loaded (and guarded) as the daemon does."""

    class Plugin:
        @hookimpl
        def transcribed_sink_types(self) -> list[SinkType]:
            return [SinkType(type_name, SinkConfig, factory)]

    loaded = load_plugins(entry_points=False, extra=[Plugin()]).sink_types()[type_name]
    return loaded, SinkConfig(type=type_name)


class Unprintable(Exception):
    """An exception whose ``str()`` itself raises (a plugin's broken ``__str__``)."""

    def __str__(self) -> str:
        raise RuntimeError("cannot show myself")


class BadStr:
    """A plugin whose partial hook raises an exception that cannot be shown."""

    @hookimpl
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        raise Unprintable


class Chatty:
    """A plugin whose partial hook raises with a huge, many-line message."""

    @hookimpl
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        raise ValueError("first line\nsecond line\n" + "x" * 100_000)


class Heard:
    """A plugin that records partials."""

    def __init__(self) -> None:
        self.partials: list[PartialTurn] = []

    @hookimpl
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        self.partials.append(partial)


def test_a_hook_error_that_cannot_be_shown_breaks_nothing() -> None:
    """A hook's exception whose ``str()`` raises escaped the guard (the reason was built inside
    the ``except``): the call reached the engine's path and the other plugins went unheard."""
    heard = Heard()
    host = load_plugins(entry_points=False, extra=[heard, BadStr()])
    partial = PartialTurn("s1", 0, "hello", "local")
    with capture_logs() as logs:
        host.turn_partial(partial)
    assert heard.partials == [partial]
    [failed] = [e for e in logs if e["event"] == "plugin.hook_failed"]
    assert failed["error"].startswith("Unprintable: <str() failed: RuntimeError")


def test_a_hook_error_is_one_short_line() -> None:
    """A many-line, 100 kB message was logged whole: the error field is one bounded line."""
    host = load_plugins(entry_points=False, extra=[Chatty()])
    with capture_logs() as logs:
        host.turn_partial(PartialTurn("s1", 0, "hello", "local"))
    [failed] = [e for e in logs if e["event"] == "plugin.hook_failed"]
    assert failed["error"].startswith("ValueError: first line second line xxx")
    assert "\n" not in failed["error"] and len(failed["error"]) < 1000


class BuggyConfig(SinkConfig):
    """A plugin's config model whose validator has a bug (not a ValueError)."""

    path: str

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return value.expand()  # type: ignore[attr-defined,no-any-return]


class BuggyModel:
    """A plugin providing a sink type whose config model raises AttributeError."""

    @hookimpl
    def transcribed_sink_types(self) -> list[SinkType]:
        return [SinkType("buggy", BuggyConfig, lambda *_: None)]  # type: ignore[arg-type]


def test_a_config_model_that_raises_is_a_config_problem() -> None:
    """A plugin's validator that raised anything but ValueError crashed ``check-config`` and
    ``run`` with a traceback; it is one problem line naming the sink, its type and the error."""
    host = load_plugins(entry_points=False, extra=[BuggyModel()])
    with pytest.raises(ConfigError) as caught:
        validate_sinks(host, {"mine": {"type": "buggy", "path": "/tmp/x"}}, env={})
    assert caught.value.problems == [
        "sinks.mine: the config model of sink type 'buggy' failed (a bug in its plugin): "
        "AttributeError: 'str' object has no attribute 'expand'"]


class LeaksCancel:
    """A sink whose send lets a stray ``CancelledError`` out once (a library's inner task was
    cancelled), then delivers."""

    def __init__(self, name: str, config: SinkConfig, context: SinkContext) -> None:
        self.got: list[str] = []
        self.arrived = asyncio.Event()
        self.leaks = 1

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        if self.leaks:
            self.leaks -= 1
            raise asyncio.CancelledError
        self.got.append(record.id)
        self.arrived.set()


class OddError(BaseException):
    """A plugin's own BaseException subclass (not an Exception)."""


class RaisesBase(LeaksCancel):
    """A sink whose send raises a BaseException subclass once, then delivers."""

    async def send(self, record: TurnRecord) -> None:
        if self.leaks:
            self.leaks -= 1
            raise OddError("odd")
        await super().send(record)


@pytest.mark.parametrize("sink_class", [LeaksCancel, RaisesBase])
async def test_a_send_raising_a_base_exception_is_a_failure_not_the_end(
        tmp_path: Path, sink_class: type[LeaksCancel]) -> None:
    """A stray ``CancelledError`` out of a plugin's ``send`` ended its worker silently (the
    sink never delivered again and its queue was lost at exit); a ``BaseException`` subclass
    ended the whole daemon. Both are a failed send now: retried, then delivered."""

    sink_type, config = _loaded("leaky", sink_class)
    sink = sink_type.factory("s", config, CONTEXT)
    dispatcher = Dispatcher([SinkRunner("s", sink_type, config, sink, MemoryQueue())],
                            dead_letter_dir=tmp_path)
    inner = getattr(sink, "inner", sink)
    assert isinstance(inner, LeaksCancel)
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(record(0))
            dispatcher.dispatch(record(1))
            async with asyncio.timeout(10):
                while len(inner.got) < 2:
                    await inner.arrived.wait()
                    inner.arrived.clear()
            await dispatcher.close(10)
    assert inner.got == ["s:0", "s:1"]
    assert not (tmp_path / "s.jsonl").exists()
    [failed] = [e for e in logs if e["event"] == "sink.send_failed"]
    assert sink_class.__name__ in failed["error"] or "OddError" in failed["error"] \
        or "CancelledError" in failed["error"], failed
    assert json.dumps(failed["error"])


class Exits:
    """A plugin whose session hook calls ``sys.exit()`` (a BaseException, not an Exception)."""

    @hookimpl
    def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        raise SystemExit("plugin gave up")


def test_a_hook_raising_system_exit_is_contained() -> None:
    """``SystemExit`` out of a notification hook passed the guard and ended the engine (and
    with it the daemon); it is logged like any failing hook, the other plugins still hear."""
    heard = Heard()
    host = load_plugins(entry_points=False, extra=[heard, Exits()])
    with capture_logs() as logs:
        host.turn_partial(PartialTurn("s1", 0, "hello", "local"))
    assert len(heard.partials) == 1
    assert [e["error"] for e in logs if e["event"] == "plugin.hook_failed"] == [
        "SystemExit: plugin gave up"]


def _installed(site: Path, modules: dict[str, str]) -> dict[str, str]:
    """A package installed in ``site`` with one ``transcribed.sinks`` entry point per module;
    the environment that finds it."""
    dist = site / "tp_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[transcribed.sinks]\n" + "".join(f"{name} = {name}\n" for name in modules))
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


def test_a_plugin_exiting_at_import_or_implementing_no_hook_is_named(tmp_path: Path) -> None:
    """A plugin calling ``sys.exit()`` at import (a dependency missing) ended every command with
    its message and status 1 (``run`` too: a restart loop). One whose hooks carry another
    project's marker provided nothing, unsaid: its type was "unknown". Both are named now."""
    env = _installed(tmp_path / "site", {
        "tp_exits": 'import sys\nsys.exit("tp_exits needs libfoo")\n',
        "tp_nohooks": 'import pluggy\nhookimpl = pluggy.HookimplMarker("transcribe")\n\n\n'
                      '@hookimpl\ndef transcribed_sink_types():\n    return []\n'})
    config = tmp_path / "c.toml"
    config.write_text('[sinks.mine]\ntype = "nohooks"\n')
    done = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    assert done.stderr.splitlines() == [
        f"transcribed: config error: {config}: sinks.mine.type: unknown type 'nohooks' "
        "(known types: console, file, mqtt, webhook); plugin tp_exits (entry point tp_exits) "
        "cannot be loaded: SystemExit: tp_exits needs libfoo; plugin tp_nohooks (entry point "
        "tp_nohooks) provides nothing: it implements no transcribed hook (mark its functions "
        "with daemon.plugins.hookimpl)"]


class PlainConfig(BaseModel):
    """A config model written as a plain pydantic model (not a ``SinkConfig``)."""

    url: str


class PlainModel:
    """A plugin whose sink type's config model is not a ``SinkConfig``."""

    @hookimpl
    def transcribed_sink_types(self) -> list[SinkType]:
        return [SinkType("plain", PlainConfig, LeaksCancel)]  # type: ignore[arg-type]


def test_a_config_model_that_is_not_a_sink_config_is_named() -> None:
    """A plain pydantic model validated, then every command crashed with a traceback (``'C'
    object has no attribute 'enabled'``); the plugin is left out, and the sink asking for its
    type says why."""
    host = load_plugins(entry_points=False, extra=[PlainModel()])
    with pytest.raises(ConfigError) as caught:
        validate_sinks(host, {"p": {"type": "plain", "url": "http://x"}}, env={})
    [problem] = caught.value.problems
    assert problem.startswith("sinks.p.type: unknown type 'plain' (known types: ")
    assert problem.endswith("failed: sink type 'plain': its config_model (PlainConfig) must be "
                            "a subclass of daemon.plugins.SinkConfig")


class SyncSend(LeaksCancel):
    """A sink whose ``send`` is a plain ``def`` by mistake."""

    def send(self, record: TurnRecord) -> None:  # type: ignore[override]
        self.got.append(record.id)


async def test_a_plain_send_is_run_once_after_a_factory_failed(tmp_path: Path) -> None:
    """A sink whose factory failed first (built again at the next start) and whose ``send`` is
    a plain ``def``: awaiting its None was retried, writing the record again and again until
    exit. It is dead-lettered once, as for a sink built at once."""
    built: list[SyncSend] = []

    def factory(name: str, config: SinkConfig, context: SinkContext) -> SyncSend:
        if not built:
            built.append(SyncSend(name, config, context))
            raise OSError("first build fails")
        return built[0]

    sink_type, config = _loaded("syncsend", factory)
    dispatcher = Dispatcher([SinkRunner("s", sink_type, config,
                                        sink_type.factory("s", config, CONTEXT), MemoryQueue())],
                            dead_letter_dir=tmp_path)
    async with asyncio.TaskGroup() as group:
        dispatcher.start(group)
        dispatcher.dispatch(record(0))
        await dispatcher.close(3)
    assert built[0].got == ["s:0"]
    dead = json.loads((tmp_path / "s.jsonl").read_text())
    assert "send() returned NoneType, not an awaitable" in dead["error"]


class UnprintableOnce(LeaksCancel):
    """A sink whose send fails once with an exception that cannot be shown, then delivers."""

    async def send(self, record: TurnRecord) -> None:
        if self.leaks:
            self.leaks -= 1
            raise Unprintable
        self.got.append(record.id)
        self.arrived.set()


async def test_a_send_error_that_cannot_be_shown_is_retried(tmp_path: Path) -> None:
    """A plugin's exception whose ``str()`` raises broke the dispatcher's own error handling
    (its reason is built in the ``except``): the worker crashed (``sink.crashed``, the str()
    failure's traceback, naming neither the plugin's exception nor a send failure)."""

    sink_type, config = _loaded("unprintable", UnprintableOnce)
    sink = sink_type.factory("s", config, CONTEXT)
    inner = getattr(sink, "inner", sink)
    assert isinstance(inner, UnprintableOnce)
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            dispatcher = Dispatcher([SinkRunner("s", sink_type, config, sink, MemoryQueue())],
                                    dead_letter_dir=tmp_path)
            dispatcher.start(group)
            dispatcher.dispatch(record(0))
            async with asyncio.timeout(10):
                await inner.arrived.wait()
            await dispatcher.close(10)
    assert inner.got == ["s:0"]
    [failed] = [e for e in logs if e["event"] == "sink.send_failed"]
    assert "Unprintable: <str() failed: RuntimeError>" in failed["error"]


class AsyncHook:
    """A plugin whose partial hook is ``async def`` by mistake."""

    def __init__(self) -> None:
        self.ran = False

    @hookimpl
    async def transcribed_turn_partial(self, partial: PartialTurn) -> None:
        self.ran = True


def test_an_async_notification_hook_is_named_not_silently_skipped() -> None:
    """An ``async def`` hook returned a coroutine nobody awaited: it never ran, and the only
    trace was Python's "never awaited" RuntimeWarning. It is logged as a failing hook."""
    plugin = AsyncHook()
    host = load_plugins(entry_points=False, extra=[plugin])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with capture_logs() as logs:
            host.turn_partial(PartialTurn("s1", 0, "hello", "local"))
            gc.collect()
    assert not plugin.ran
    assert [e["error"] for e in logs if e["event"] == "plugin.hook_failed"] == [
        "it is 'async def': a notification hook must be a plain function (start a task for "
        "async work)"]
