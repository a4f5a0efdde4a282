"""The command implementations behind ``cli.py``: each returns an exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import shlex
import socket
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import Settings, find_config, load_settings
from daemon.errors import EX_CONFIG, EX_FAILURE, EX_OK, ConfigError, DaemonError
from daemon.events import EngineName, TurnRecord, Word
from daemon.masking import MASK, masked_dict, secret_values
from daemon.notify import last_status

if TYPE_CHECKING:
    from daemon.logs import SecretMasker
    from daemon.plugins import PluginHost, SinkContext
    from daemon.sinktables import ValidatedSinks

log = structlog.get_logger("daemon.cli")


def _validated(args: argparse.Namespace, plugins: PluginHost | None = None
               ) -> tuple[Settings, Path | None, ValidatedSinks]:
    from daemon.plugins import load_plugins
    from daemon.validate import validate

    return validate(getattr(args, "config", None), plugins or load_plugins())


def _config_failed(exc: ConfigError, mask: Callable[[str], str] = str) -> int:
    from daemon import logs

    lines = (mask(problem) for problem in exc.problems)  # one each, whatever a value held
    logs.say("\n".join(f"transcribed: config error: {x if x.isprintable() else repr(x)[1:-1]}"
                       for x in lines))             # one write: a stalled stderr waits once
    return EX_CONFIG


def _find_daemon_error(exc: BaseException) -> DaemonError | None:
    if isinstance(exc, DaemonError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_daemon_error(inner)
            if found is not None:
                return found
    return None


def run(args: argparse.Namespace) -> int:
    """``transcribed run``.

    Ctrl-C while it starts, before ``app.run`` handles SIGINT itself, is asyncio.run's: it
    cancels ``app.run`` and raises KeyboardInterrupt, which goes on to ``cli.main`` (one line,
    exit 130) instead of reading as a clean stop (exit 0).
    """
    from daemon import logs
    from daemon.plugins import load_plugins

    _stacks_on_abort()
    plugins = load_plugins()
    try:
        settings, path, sinks = _validated(args, plugins)
    except ConfigError as exc:
        return _last_status(_config_failed(exc), [f"config error: {p}" for p in exc.problems])
    masker = logs.configure(
        level=settings.log.level,
        fmt=settings.log.format,
        transcripts=settings.log.transcripts,
        secrets=secret_values(settings, settings.sinks),   # app.run adds the validated sinks'
    )
    logs.write_in_background()      # a stalled or broken stderr never stalls the daemon
    try:
        return _run_logged(args, settings, path, masker, plugins, sinks)
    finally:
        logs.close()                # what is still queued, within a bound


def _run_logged(args: argparse.Namespace, settings: Settings, path: Path | None,
                masker: SecretMasker, plugins: PluginHost, sinks: ValidatedSinks) -> int:
    from daemon import app, logs
    from daemon.secretmodes import exposed_files

    log.info("config.loaded", path=str(path) if path else "built-in defaults")
    for exposed in exposed_files(settings, path, sinks):
        log.warning("config.secret_readable", file=str(exposed.file), mode=exposed.mode,
                    holds=exposed.keys, fix=exposed.fix)
    for plugin, why in plugins.failed.items():      # one no sink uses would go unnoticed
        log.warning("plugin.unavailable", plugin=plugin, error=why)
    try:
        return _run_daemon(app.run(settings, masker, plugins, sinks=sinks,
                                   loader=lambda: _validated(args, plugins)))
    except BaseException as exc:  # the outermost boundary: classify and pick the exit code
        error = _find_daemon_error(exc)
        if isinstance(error, ConfigError):
            for problem in error.problems:
                log.error("config.invalid", problem=problem)
            return _last_status(_config_failed(error, masker.mask),   # a server may echo what
                                [f"config error: {masker.mask(p)}" for p in error.problems])
        if error is not None:
            log.error(
                "daemon.failed",
                error=str(error),
                kind=type(error).__name__,
                exit_code=error.exit_code,
            )
            logs.say(f"transcribed: {masker.mask(str(error))}")
            return _last_status(error.exit_code, [masker.mask(str(error))])
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C app.run did not handle (starting):
            raise                               # cli.main says so, exit 130
        log.exception("daemon.crashed")
        cause = _first_leaf(exc)
        return _last_status(EX_FAILURE, [f"crashed: {type(cause).__name__}: "
                                         f"{masker.mask(str(cause))}"])


def _run_daemon(daemon: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(daemon)``: its exit code, also when Ctrl-C comes after it returned.

    A Ctrl-C before the daemon handles SIGINT is KeyboardInterrupt out of asyncio.run (exit
    130). Once the sinks are flushed, ``shutdown.stopped_signals`` makes one exit 0 at once
    (asyncio.run may still wait for threads then); should one still come out as
    KeyboardInterrupt after the daemon returned, the clean stop's code stands.
    """
    ended: list[int] = []

    async def main() -> None:
        ended.append(await daemon)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        if not ended:
            raise
    return ended[0]


def _stacks_on_abort() -> None:
    """Every thread's stack to stderr (the journal) on SIGABRT and fatal signals, then die.

    SIGABRT is how systemd ends a daemon whose watchdog pings stopped; a blocked event loop
    logs nothing itself, and without this the journal said only "Aborted".
    """
    with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):  # no stderr
        faulthandler.enable(file=sys.stderr, all_threads=True)


def _first_leaf(exc: BaseException) -> BaseException:
    """The first exception an exception group (a task group's) holds, however deep."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _last_status(code: int, lines: list[str]) -> int:
    """Tell systemd why ``run`` ends with ``code`` (its last ``STATUS=``); returns ``code``.

    systemd keeps a dead unit's last status line: without this one ``systemctl status`` read
    "stopping (input ended)" after the key was rejected, and nothing after a config error.
    """
    more = len(lines) - 1
    extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    last_status(f"failed (exit {code}): {lines[0] if lines else 'no reason given'}{extra}")
    return code


def check_config(args: argparse.Namespace) -> int:
    """``transcribed check-config``: validate everything, print the effective config masked.

    Disabled sinks are shown too (``enabled = false``), masked as the others are.
    """
    import tomli_w

    from daemon.secretmodes import exposed_files
    from daemon.sinktables import none_enabled

    try:
        settings, path, validated = _validated(args)
    except ConfigError as exc:
        return _config_failed(exc)
    if (problem := _ambiguous_device(settings, path)) is not None:
        return _config_failed(ConfigError([problem]))
    sinks = {name: config.model_dump(mode="python") for name, (_t, config) in validated.items()}
    data = masked_dict(settings, sinks)
    print(
        f"# transcribed {settings.engine_name()} engine; config: "
        f"{path if path else 'built-in defaults'}"
    )
    if none_enabled(validated):
        print("# no sink is enabled: turns are delivered to no sink")
    for exposed in exposed_files(settings, path, validated):
        print(f"transcribed: warning: {exposed.line()}", file=sys.stderr)
    print(tomli_w.dumps(_tomlable(data)), end="")
    return EX_OK


def _ambiguous_device(settings: Settings, path: Path | None) -> str | None:
    """An ``audio.device`` name that fits several of the devices listed now, as one problem.

    ``run`` refuses such a name (78), so ``check-config`` does too. Only a name, and only
    against what is listed now (within 5 s; a listing that fails says nothing): a device not
    listed is one ``run`` waits for, and an index may name another device once one is
    plugged in.
    """
    spec = settings.audio.device.strip()
    if settings.audio.source != "microphone" or not spec or spec.isdecimal():
        return None
    from daemon.devices import AmbiguousDevice, list_devices, resolve_device
    from daemon.envvars import problem_origin
    from daemon.problems import path_text

    try:
        resolve_device(list_devices(limit_s=5.0), spec)
    except AmbiguousDevice as exc:
        line = f"audio.device: {exc}"
        return problem_origin(line, f"{path_text(path)}: " if path else "", os.environ) + line
    except Exception:   # no PortAudio, or it fails: run says so itself; this checks the config
        pass
    return None


def _tomlable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tomlable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_tomlable(v) for v in value]
    if isinstance(value, str | bool | int | float | datetime):
        return value
    return str(value)             # a Path, a plugin's HttpUrl or Enum: what TOML can show


def devices(_args: argparse.Namespace) -> int:
    """``transcribed devices``: list audio inputs."""
    from daemon.audio import format_devices, list_devices

    try:
        found = list_devices()
    except DaemonError as exc:
        print(f"transcribed: {exc}", file=sys.stderr)
        return EX_FAILURE
    print(format_devices(found))
    return EX_OK


def test_sinks(args: argparse.Namespace) -> int:
    """``transcribed test-sinks``: one synthetic turn through every enabled sink, reported per sink.

    A disabled sink is reported as skipped; sinks configured but none enabled: one line saying
    so, exit 1 (nothing was tested). The sinks' own log lines show only at ``log.level =
    "debug"`` (errors always): their connects and retries are the daemon's, the report says
    each sink's outcome.
    """
    from daemon.sinktables import enabled_sinks, none_enabled

    try:
        settings, _path, validated = _validated(args)
    except ConfigError as exc:
        return _config_failed(exc)
    masker = _sink_logs(settings, validated)
    if disabled := none_enabled(validated):
        print(f"transcribed test-sinks: no sink is enabled ({', '.join(disabled)}: "
              "enabled = false)", file=sys.stderr)
        return EX_FAILURE
    context = _sink_context(settings)
    record = synthetic_turn(context.host, settings.engine_name())
    failures = 0
    enabled = enabled_sinks(validated)
    for name, (sink_type, config) in validated.items():
        if name not in enabled:
            print(f"{name} ({sink_type.name}): skipped (enabled = false)")
            continue
        sink = sink_type.factory(name, config, context)
        error = asyncio.run(_try_send(sink, record))
        failures += error is not None
        outcome = "delivered" if error is None else "FAILED: " + masker.mask(error)  # as logs are
        print(f"{name} ({sink_type.name}): {outcome}")
    return EX_OK if failures == 0 else EX_FAILURE


def resend(args: argparse.Namespace) -> int:
    """``transcribed resend SINK``: the sink's dead-lettered turns, sent again (daemon.resend).

    Exit 0 when none is left in the file, 1 when some are kept (or the sink is not configured).
    """
    from daemon.deadletter import FOLDER, dead_letter_file
    from daemon.resend import resend as resend_file

    try:
        settings, _path, validated = _validated(args)
    except ConfigError as exc:
        return _config_failed(exc)
    masker = _sink_logs(settings, validated)
    if args.sink not in validated:
        named = ", ".join(sorted(validated)) or "none"
        print(f"transcribed resend: no sink named {args.sink!r} in the config (its sinks: "
              f"{named})", file=sys.stderr)
        return EX_FAILURE
    sink_type, config = validated[args.sink]
    sink = sink_type.factory(args.sink, config, _sink_context(settings))
    path = dead_letter_file(settings.state_path() / FOLDER, args.sink)
    result = resend_file(sink, path)
    print(masker.mask(result.line(args.sink)))
    return EX_FAILURE if result.kept else EX_OK


def _sink_logs(settings: Settings, validated: ValidatedSinks) -> SecretMasker:
    """Logs for a command that drives sinks itself (test-sinks, resend).

    On stderr, masked, errors only unless ``log.level = "debug"``: its report says each sink's
    outcome.
    """
    from daemon import logs

    level = "debug" if settings.log.level == "debug" else "error"
    return logs.configure(level=level, fmt=settings.log.format,
                          secrets=secret_values(settings,
                                                {n: c for n, (_t, c) in validated.items()}))


def _sink_context(settings: Settings) -> SinkContext:
    """The context of a sink a command builds beside a running daemon: test mode.

    Nothing is said on an availability topic, nothing retained, no file rotated.
    """
    from daemon.plugins import SinkContext

    return SinkContext(host=socket.gethostname(), state_dir=settings.state_path(), test=True)


async def _try_send(sink: Any, record: TurnRecord, limit_s: float = 15.0) -> str | None:
    try:
        async with asyncio.timeout(limit_s):
            async with sink:
                await sink.send(record)
    except TimeoutError:
        return f"no answer within {limit_s:g} s"
    except Exception as exc:  # report any sink failure as a line, never a traceback
        return str(exc).replace(MASK, "***") or type(exc).__name__
    return None


def synthetic_turn(host: str, engine: EngineName = "local") -> TurnRecord:
    """The record ``test-sinks`` sends: clearly marked as a test, from the configured engine."""
    now = datetime.now(UTC)
    text = "This is a test turn from transcribed."
    words = tuple(Word(w, i * 300, i * 300 + 250, 1.0) for i, w in enumerate(text.split()))
    return TurnRecord(
        session_id=f"test-{uuid.uuid4()}",
        turn_order=0,
        transcript=text,
        started_at=now - timedelta(seconds=2),
        ended_at=now,
        end_of_turn_confidence=1.0,
        words=words,
        language_code="en",
        engine=engine,
        source="test",
        host=host,
    )


def install_service(args: argparse.Namespace) -> int:
    """``transcribed install-service``: write the unit and an example config, print next steps."""
    from daemon import service

    root = Path(args.root) if args.root else None
    target = service.plan(system=args.system, root=root)
    try:
        for line in service.install(target):
            print(line)
    except OSError as exc:
        print(f"transcribed: cannot write {exc.filename}: {exc.strerror}"
              f"{_root_hint(exc, args.system)}", file=sys.stderr)
        return EX_FAILURE
    for warning in target.warnings:
        print(f"transcribed: warning: {warning}", file=sys.stderr)
    print("\nNow run:")
    for command in target.commands:
        print(f"  {command}")
    return EX_OK


def _root_hint(exc: OSError, system: bool) -> str:
    """How to run it as root, when that is what was missing (sudo resets PATH: the full path)."""
    if not system or not isinstance(exc, PermissionError) or os.geteuid() == 0:
        return ""
    from daemon.service import current_executable

    return f" (run it as root: sudo {shlex.quote(current_executable())} install-service --system)"


def tail(args: argparse.Namespace) -> int:
    """``transcribed tail``: follow the running daemon's live feed (``[http]`` from the config)."""
    from daemon.envvars import problem_origin
    from daemon.problems import path_text
    from daemon.tail import tail_main
    from daemon.web import check_http, feed_url

    try:
        path = find_config(args.config)
        http = load_settings(path).http
        where = f"{path_text(path)}: " if path else ""
        problems = [problem_origin(line, where, os.environ) + line for line in check_http(http)]
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        return _config_failed(exc)
    if not http.enabled:
        print("transcribed tail: the live view is off (http.enabled = false)", file=sys.stderr)
        return EX_FAILURE
    return tail_main(feed_url(http.listen), http.token.get_secret_value(), args.json, args.retry)
