"""Sink tables as a user sees them: from the environment, disabled, their headers and secrets."""

from __future__ import annotations

import argparse
import asyncio
import tomllib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import commands
from daemon.commands import check_config
from daemon.config import Settings
from daemon.dispatch import Dispatcher
from daemon.errors import ConfigError
from daemon.logs import SecretMasker
from daemon.outbox import Outbox
from daemon.plugins import SinkConfig, load_plugins
from daemon.reload import Reloader, SinkBuilder
from daemon.sinktables import validate_sinks
from tests.audio_samples import write_pcm16
from tests.daemon_proc import cloud_config, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI
from tests.test_outbox import make_turn

KNOWN_TYPES = "(known types: console, file, mqtt, webhook)"
SECRETS = ("whsec_c2VjcmV0LW9uZQ==", "whsec_c2VjcmV0LXR3bw==")   # secret-one, secret-two
HOOK = '[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/h"\n'
DISABLED = ('[sinks.screen]\ntype = "console"\nenabled = false\n'
            '[sinks.notes]\ntype = "webhook"\nenabled = false\n'
            'url = "https://hooks.example/T0/path-secret-9"\n'
            f'secret = "{SECRETS[0]}"\nheaders = {{ Authorization = "Bearer hdr-secret-8" }}\n')


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems(path: Path | None, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """check-config's problem lines (it must exit 78), without the common prefix."""
    assert check_config(argparse.Namespace(config=str(path) if path else None)) == 78
    return [line.removeprefix("transcribed: config error: ")
            for line in capsys.readouterr().err.splitlines()]


def printed(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """check-config's output for a valid ``path``."""
    assert check_config(argparse.Namespace(config=str(path))) == 0
    return capsys.readouterr().out


class TestFromTheEnvironment:
    def test_a_variable_is_named_as_it_was_set(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Names are matched in any case, and quoted as written (not upper-cased)."""
        path = write(tmp_path / "live.toml", HOOK)
        monkeypatch.setenv("transcribed_sinks__hook__timeout_s", "soon")
        (line,) = problems(path, capsys)
        assert line.startswith("environment transcribed_sinks__hook__timeout_s: "
                               "sinks.hook.timeout_s: ")

    def test_a_sink_only_the_environment_makes_is_blamed_on_it(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A sink the file does not have exists because of its variables: they are named, not
        the file (with no file at all, they are named too)."""
        path = write(tmp_path / "live.toml", HOOK)
        monkeypatch.setenv("TRANSCRIBED_SINKS__NOTES__HEADERS", "{bad")
        assert problems(path, capsys) == [
            f"environment TRANSCRIBED_SINKS__NOTES__HEADERS: sinks.notes.type: missing "
            f"{KNOWN_TYPES}"]
        monkeypatch.setenv("TRANSCRIBED_SINKS__NOTES__TYPE", "webhook")
        monkeypatch.setenv("TRANSCRIBED_SINKS__NOTES__TIMEOUT_S", "5")
        assert problems(None, capsys) == [
            "environment TRANSCRIBED_SINKS__NOTES__HEADERS: sinks.notes.headers: cannot parse "
            "the value (Expecting property name enclosed in double quotes: line 1 column 2 "
            "(char 1)); lists and tables are written as JSON, e.g. '{\"key\": \"value\"}'",
            "environment TRANSCRIBED_SINKS__NOTES__HEADERS, TRANSCRIBED_SINKS__NOTES__TIMEOUT_S, "
            "TRANSCRIBED_SINKS__NOTES__TYPE: sinks.notes.url: required key is missing"]

    @pytest.mark.parametrize(("variable", "value", "cause"), [
        ("TRANSCRIBED_SINKS__HOOK__HEADERS", "{bad",
         "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("TRANSCRIBED_SINKS__HOOK__HEADERS", "X-Team: ops", "Expecting value: line 1 column 1 "
                                                            "(char 0)"),
        ("TRANSCRIBED_SINKS__EXTRA", "{bad",
         "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ])
    def test_a_table_that_is_not_json_says_how_to_write_it(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch, variable: str, value: str, cause: str) -> None:
        """A sink's table (or a whole sink) from the environment that is not JSON gets the hint
        the other sections' lists and tables get, once, never showing the value."""
        path = write(tmp_path / "live.toml", HOOK)
        monkeypatch.setenv(variable, value)
        key = ".".join(variable.removeprefix("TRANSCRIBED_").lower().split("__"))
        assert problems(path, capsys) == [
            f"environment {variable}: {key}: cannot parse the value ({cause}); lists and tables "
            "are written as JSON, e.g. '{\"key\": \"value\"}'"]

    @pytest.mark.parametrize("value", [SECRETS[0], " ".join(SECRETS), "12345"])
    def test_a_secret_from_the_environment_is_text(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        """A webhook secret (or two, space-separated) set from the environment is taken as the
        text it is, not refused as JSON that does not parse (it was, exit 78)."""
        path = write(tmp_path / "live.toml", HOOK)
        monkeypatch.setenv("TRANSCRIBED_SINKS__HOOK__SECRET", value)
        if value == "12345":            # taken as text: refused as a secret, not read as JSON
            assert problems(path, capsys)[0].startswith(
                "environment TRANSCRIBED_SINKS__HOOK__SECRET: sinks.hook.secret: ")
            return
        shown = tomllib.loads(printed(path, capsys))["sinks"]["hook"]["secret"]
        assert shown == " ".join("********" for _ in value.split())

    def test_a_secret_list_that_is_not_json_says_how_to_write_it(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A secret list from the environment with broken JSON gets the JSON hint (it was told
        "must start with 'whsec_'"), never showing the value."""
        path = write(tmp_path / "live.toml", HOOK)
        monkeypatch.setenv("TRANSCRIBED_SINKS__HOOK__SECRET", f'["{SECRETS[0]}"')
        end = len(SECRETS[0]) + 3           # where the closing bracket is missing
        (line,) = problems(path, capsys)
        assert line == (
            "environment TRANSCRIBED_SINKS__HOOK__SECRET: sinks.hook.secret: cannot parse the "
            f"value (Expecting ',' delimiter: line 1 column {end + 1} (char {end})); lists and "
            "tables are written as JSON, e.g. '[\"a\", \"b\"]'")
        assert SECRETS[0] not in line

    def test_text_from_the_file_is_not_taken_for_json(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The JSON hint is for the environment: a table written as text in the file is not."""
        path = write(tmp_path / "c.toml", HOOK + 'headers = "X-Team: ops"\n')
        assert problems(path, capsys) == [f"{path}: sinks.hook.headers: expected a table, "
                                          "found a string"]


class TestDisabled:
    def test_check_config_shows_disabled_sinks_masked(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Disabled sinks are printed, marked enabled = false, their secrets masked."""
        out = printed(write(tmp_path / "c.toml", DISABLED), capsys)
        assert out.splitlines()[1] == "# no sink is enabled: turns are delivered to no sink"
        sinks = tomllib.loads(out)["sinks"]
        assert sinks["screen"] == {"type": "console", "enabled": False, "format": "text"}
        assert sinks["notes"]["enabled"] is False
        assert sinks["notes"]["url"] == "https://hooks.example/********"
        assert sinks["notes"]["secret"] == "********"
        assert sinks["notes"]["headers"] == {"Authorization": "********"}
        for secret in ("path-secret-9", "hdr-secret-8", SECRETS[0]):
            assert secret not in out

    def test_test_sinks_says_none_is_enabled(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """test-sinks with every sink disabled: one line naming them, exit 1 (it tested none)."""
        path = write(tmp_path / "c.toml", DISABLED)
        assert commands.test_sinks(argparse.Namespace(config=str(path))) == 1
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == (
            "", "transcribed test-sinks: no sink is enabled (notes, screen: enabled = false)\n")

    async def test_run_warns_once_that_turns_go_nowhere(self, tmp_path: Path) -> None:
        """run with every sink disabled: one sinks.none_enabled warning naming them. A disabled
        network sink's queued records are kept for it, not called orphaned."""
        outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
        outbox.queue("notes").put(make_turn(0))
        outbox.close()
        wav = write_pcm16(tmp_path / "quiet.wav", bytes(2 * 4000))
        async with FakeAssemblyAI() as fake:
            config = cloud_config(tmp_path, fake, wav, sinks=DISABLED)
            result = await run_daemon("run", "--config", str(config), limit_s=30)
        assert result.code == 0, result.stderr
        (warning,) = result.events("sinks.none_enabled")
        assert warning["disabled"] == ["notes", "screen"] and warning["level"] == "warning"
        assert not result.events("outbox.orphaned")
        for secret in ("path-secret-9", "hdr-secret-8", SECRETS[0]):
            assert secret not in result.stderr + result.stdout

    async def test_reload_to_every_sink_disabled_warns(self, tmp_path: Path) -> None:
        """A reload that disables the last enabled sink is applied, and says turns go nowhere."""
        plugins = load_plugins(entry_points=False)
        running = {"screen": {"type": "console"}}
        disabled = {"screen": {"type": "console", "enabled": False}}
        builder = SinkBuilder("h", tmp_path)
        (name, (sink_type, sink_config)), = validate_sinks(plugins, running).items()
        dispatcher = Dispatcher([builder.build(name, sink_type, sink_config)],
                                dead_letter_dir=tmp_path)
        reloader = Reloader(lambda: (Settings(sinks=disabled), None,
                                     validate_sinks(plugins, disabled)),
                            Settings(sinks=running), dispatcher=dispatcher, sinks=builder,
                            masker=SecretMasker())
        with capture_logs() as logs:
            assert await reloader.reload() == "applied"
        assert dispatcher.runners == {}
        [warning] = [e for e in logs if e["event"] == "sinks.none_enabled"]
        assert warning["disabled"] == ["screen"] and warning["log_level"] == "warning"


class TestWebhookTable:
    def test_every_bad_header_is_named(self, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        """Two bad header names, a header the sink sets and a bad value: a line each, no value."""
        path = write(tmp_path / "c.toml", HOOK + 'headers = { "X Team" = "ops", "X Desk" = "a", '
                     '"Content-Type" = "text/plain", "X-Key" = "tok3n\\n", "X-Ok" = "fine" }\n')
        lines = problems(path, capsys)
        assert lines == [
            f"{path}: sinks.hook.headers: 'X Team' is not a valid header name (letters, digits "
            "and !#$%&'*+-.^_`|~ only)",
            f"{path}: sinks.hook.headers: 'X Desk' is not a valid header name (letters, digits "
            "and !#$%&'*+-.^_`|~ only)",
            f"{path}: sinks.hook.headers: header 'Content-Type' is set by the sink and cannot be "
            "overridden",
            f"{path}: sinks.hook.headers.X-Key: header value must be printable ASCII (no line "
            "breaks, control characters or non-ASCII letters)"]
        assert "tok3n" not in "".join(lines)

    @pytest.mark.parametrize(("written", "shown"), [
        (f"[\"{SECRETS[0]}\", \"{SECRETS[1]}\"]", "******** ********"),
        (f"\"{SECRETS[0]} {SECRETS[1]}\"", "******** ********"),
        (f"\"{SECRETS[0]}\"", "********"),
        ("\"\"", ""),
    ])
    def test_secrets_are_shown_as_documented(self, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             written: str, shown: str) -> None:
        """A webhook's secrets, as a list or space-separated, are printed the documented way:
        one string, a mask per secret."""
        out = printed(write(tmp_path / "c.toml", HOOK + f"secret = {written}\n"), capsys)
        assert tomllib.loads(out)["sinks"]["hook"]["secret"] == shown
        assert "# no sink is enabled" not in out
        assert not any(secret in out for secret in SECRETS)



def plugin_package(site: Path, module: str, source: str) -> Path:
    """A third-party plugin installed in ``site`` under the ``transcribed.sinks`` entry point."""
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[transcribed.sinks]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(
        "from daemon.plugins import SinkConfig, SinkType, hookimpl\n" + source)
    return site


class TestThirdPartyPlugins:
    def test_a_plugin_that_cannot_be_imported_is_named_not_a_traceback(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A broken package stopped every command with its traceback; now the sink that wants
        its type is a config error naming the plugin and why."""
        monkeypatch.syspath_prepend(str(plugin_package(
            tmp_path, "tp_import_fails", "raise RuntimeError('no module foo')\n")))
        with pytest.raises(ConfigError) as caught:
            validate_sinks(load_plugins(), {"mine": {"type": "tp_import_fails"}}, env={})
        assert caught.value.problems == [
            f"sinks.mine.type: unknown type 'tp_import_fails' {KNOWN_TYPES}; plugin "
            "tp_import_fails (entry point tp_import_fails) cannot be loaded: "
            "RuntimeError: no module foo"]

    def test_a_hook_that_raises_is_named(self, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.syspath_prepend(str(plugin_package(tmp_path, "tp_hook_fails", (
            "@hookimpl\ndef transcribed_sink_types():\n    raise KeyError('oops')\n"))))
        host = load_plugins()
        assert {"file", "console"} <= set(host.sink_types())    # the others still work
        with pytest.raises(ConfigError, match="plugin tp_hook_fails failed: "
                           "transcribed_sink_types raised KeyError: 'oops'"):
            validate_sinks(host, {"mine": {"type": "x"}}, env={})

    def test_a_type_name_clash_names_both_plugins(self, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.syspath_prepend(str(plugin_package(tmp_path, "tp_clash", (
            "@hookimpl\ndef transcribed_sink_types():\n"
            "    return [SinkType('file', SinkConfig, object)]\n"))))
        with pytest.raises(ConfigError, match=r"sink type 'file' is provided by two plugins, "
                           r"plugins\.file and tp_clash: uninstall one"):
            load_plugins().sink_types()

    async def test_a_factory_that_raises_is_a_sink_that_fails_to_start(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """It crashed the daemon (exit 1, a restart loop); now its worker is restarted with
        backoff like any sink that cannot start, each start building it again."""
        out = tmp_path / "out.txt"
        monkeypatch.syspath_prepend(str(plugin_package(tmp_path, "tp_factory", f"""
import tests.example_sink.transcribed_example_sink as example
calls = []
def factory(name, config, context):
    calls.append(name)
    if len(calls) <= 2:   # when built, and at its first start
        raise OSError("device busy")
    return example.ExampleSink(name, example.ExampleConfig(type="x", path={str(out)!r}), context)
@hookimpl
def transcribed_sink_types():
    return [SinkType("tp_factory", SinkConfig, factory)]
""")))
        sink_type = load_plugins().sink_types()["tp_factory"]
        config = SinkConfig(type="tp_factory")
        built = SinkBuilder("h", tmp_path / "state").build("mine", sink_type, config)
        dispatcher = Dispatcher([built], dead_letter_dir=tmp_path / "dead")
        async with asyncio.TaskGroup() as group:
            dispatcher.start(group)
            dispatcher.dispatch(make_turn(0))
            await dispatcher.close(10)
        assert out.read_text().splitlines() == [f"{make_turn(0).id} {make_turn(0).transcript}"]
        assert built.stats.last_error == ("sink 'mine' (type 'tp_factory') cannot be built: "
                                          "OSError: device busy")
