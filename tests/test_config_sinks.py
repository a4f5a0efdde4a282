"""Sink tables as a user sees them: from the environment, disabled, their headers and secrets."""

from __future__ import annotations

import argparse
import tomllib
import wave
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import commands
from daemon.commands import check_config
from daemon.config import Settings
from daemon.dispatch import Dispatcher
from daemon.logs import SecretMasker
from daemon.outbox import Outbox
from daemon.plugins import load_plugins
from daemon.reload import Reloader, SinkBuilder
from daemon.sinktables import validate_sinks
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
        assert problems(path, capsys) == [f"{path}: sinks.hook.headers: Input should be a "
                                          "valid dictionary"]


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
        wav = tmp_path / "quiet.wav"
        with wave.open(str(wav), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(16000)
            out.writeframes(bytes(2 * 4000))
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

