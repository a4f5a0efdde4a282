"""Value types in the config file: a TOML value of the wrong type is a problem, not converted.

A new user's file said ``chunk_ms = "100"``, ``transcripts = "no"`` and ``fsync = 0``, and
``check-config`` passed: pydantic's lax mode had turned them into 100, false and false. Values
from the environment are text and stay lax. Also: an unknown key next to a missing ``type``,
``sinks = "file"``, and list positions counted from 1.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.plugins import SinkConfig, SinkType, hookimpl, load_plugins
from daemon.validate import validate
from tests.conftest import REPO, TRANSCRIBED
from tests.example_sink.transcribed_example_sink import ExampleSink

PREFIX = "transcribed: config error: "
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def check_config(path: Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """The real ``transcribed check-config``: its exit status and its problem lines."""
    result = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
                            env={**os.environ, **(env or {})})
    return result.returncode, [line.removeprefix(PREFIX) for line in result.stderr.splitlines()
                               if line.startswith(PREFIX)]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


WRONG_TYPES = f"""\
[audio]
chunk_ms = "100"
[local]
beam_size = true
[log]
transcripts = "no"
[http]
enabled = "off"
[assemblyai]
format_turns = 0
[reconnect]
max_delay = 30
[sinks.j]
type = "file"
path = "{{dir}}/turns.jsonl"
fsync = 0
rotate_bytes = "1000"
[sinks.bus]
type = "mqtt"
host = "127.0.0.1"
port = 1883.0
retain = "false"
qos = true
[sinks.hook]
type = "webhook"
url = "http://127.0.0.1:9/x"
secret = ["{SECRET}"]
timeout_s = 5
"""


class TestWrongTypesInTheFile:
    def test_each_is_one_line_naming_file_key_and_types(self, tmp_path: Path) -> None:
        """Every converted value is named, all in one run; a float key takes an integer
        (``max_delay = 30``, ``timeout_s = 5``), an array a tuple key (``secret``)."""
        path = write(tmp_path / "c.toml", WRONG_TYPES.format(dir=tmp_path))
        status, lines = check_config(path)
        assert status == 78
        assert lines == [f"{path}: {line}" for line in (
            'audio.chunk_ms: expected an integer, found the string "100" '
            "(write it without quotes)",
            "assemblyai.format_turns: expected a boolean, found the integer 0 (write false)",
            "local.beam_size: expected an integer, found the boolean true",
            'log.transcripts: expected a boolean, found the string "no" '
            "(write false, without quotes)",
            'http.enabled: expected a boolean, found the string "off" '
            "(write false, without quotes)",
            'sinks.j.rotate_bytes: expected an integer, found the string "1000" '
            "(write it without quotes)",
            "sinks.j.fsync: expected a boolean, found the integer 0 (write false)",
            "sinks.bus.port: expected an integer, found the float 1883.0 (write 1883)",
            'sinks.bus.retain: expected a boolean, found the string "false" '
            "(write false, without quotes)",
            "sinks.bus.qos: expected 0, 1 or 2, found the boolean true")]

    def test_the_loader_refuses_them_too(self, tmp_path: Path) -> None:
        """``run`` loads with ``load_settings``: the same lines; a bound broken too is named
        too (a value out of range and quoted: both need fixing)."""
        path = write(tmp_path / "c.toml", '[audio]\nstall_seconds = "5"\nchunk_ms = "5"\n')
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [
            f"{path}: audio.chunk_ms: Input should be greater than or equal to 50",
            f'{path}: audio.chunk_ms: expected an integer, found the string "5" (write it '
            "without quotes)",
            f'{path}: audio.stall_seconds: expected a number, found the string "5" (write it '
            "without quotes)"]

    def test_a_type_error_pydantic_had_is_worded_the_same(self, tmp_path: Path) -> None:
        """A number where text belongs was refused already ("Input should be a valid string"):
        now in the same words, never showing the value (it may be a secret)."""
        path = write(tmp_path / "c.toml", "[assemblyai]\napi_key = 98765432123\n"
                     '[audio]\nchunk_ms = "fast"\n')
        status, lines = check_config(path)
        assert status == 78
        assert lines == [f"{path}: audio.chunk_ms: expected an integer, found a string",
                         f"{path}: assemblyai.api_key: expected a string, found an integer "
                         "(put it in quotes)"]
        assert "98765432123" not in "".join(lines) and "fast" not in "".join(lines)

    def test_a_table_or_a_list_of_the_wrong_type_is_worded_the_same(self, tmp_path: Path
                                                                     ) -> None:
        """A section, a sink's table or a list written as something else said pydantic's
        "Input should be a valid dictionary" (or list): the config's own words now."""
        path = write(tmp_path / "c.toml", 'log = 3\n[assemblyai]\nkeyterms = "hello"\n'
                     f'[state]\ndir = "{tmp_path / "state"}"\n'
                     '[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/in"\n'
                     'headers = "X-Team: ops"\n')
        status, lines = check_config(path)
        assert status == 78
        assert lines == [f"{path}: assemblyai.keyterms: expected an array, found a string",
                         f"{path}: log: expected a table, found an integer",
                         f"{path}: sinks.hook.headers: expected a table, found a string"]

    def test_environment_values_stay_lax(self, tmp_path: Path) -> None:
        """Variables are text: ``TRANSCRIBED_AUDIO__CHUNK_MS=200`` is right, and overrides the
        file's quoted value (which is not in force)."""
        path = write(tmp_path / "c.toml", '[audio]\nchunk_ms = "100"\n[sinks.j]\ntype = "file"\n'
                     f'path = "{tmp_path}/t.jsonl"\nfsync = 0\n')
        status, lines = check_config(path, {
            "TRANSCRIBED_AUDIO__CHUNK_MS": "200", "TRANSCRIBED_LOG__TRANSCRIPTS": "no",
            "TRANSCRIBED_SINKS__J__FSYNC": "false", "TRANSCRIBED_HTTP__ENABLED": "off"})
        assert (status, lines) == (0, [])


class _StrictKinds(SinkConfig):
    """A third-party sink type's model, with types strict mode refuses for other reasons."""

    count: int = 1
    ratio: float = 0.5
    loud: bool = False
    where: Path = Path("/tmp")
    names: tuple[str, ...] = ()
    code: SecretStr = SecretStr("")


class _Plugin:
    @hookimpl
    def transcribed_sink_types(self) -> list[SinkType]:
        return [SinkType("strictkinds", _StrictKinds, ExampleSink)]


def test_a_third_party_sink_type_gets_the_same_check(tmp_path: Path) -> None:
    """From the type's own model: a Path, a tuple or a secret written right is no problem."""
    plugins = load_plugins(entry_points=False, extra=[_Plugin()])
    good = '[sinks.t]\ntype = "strictkinds"\nratio = 1\nwhere = "/var"\nnames = ["a"]\ncode = "x"\n'
    validate(str(write(tmp_path / "good.toml", good)), plugins)
    bad = write(tmp_path / "bad.toml", good + 'count = "3"\nloud = 1\n')
    with pytest.raises(ConfigError) as info:
        validate(str(bad), plugins)
    assert info.value.problems == [
        f'{bad}: sinks.t.count: expected an integer, found the string "3" (write it without '
        "quotes)",
        f"{bad}: sinks.t.loud: expected a boolean, found the integer 1 (write true)"]


class TestUnknownKeys:
    def test_a_stray_key_next_to_a_missing_type_is_named(self, tmp_path: Path) -> None:
        """``typ = "file"`` was never named: only ``type: missing``."""
        path = write(tmp_path / "c.toml", f'[sinks.journal]\ntyp = "file"\n'
                     f'path = "{tmp_path}/t.jsonl"\n')
        status, lines = check_config(path)
        assert status == 78
        assert lines == [
            f"{path}: sinks.journal.type: missing (known types: console, file, mqtt, webhook)",
            f"{path}: sinks.journal.typ: unknown key (did you mean 'type'?)"]

    def test_a_close_key_is_suggested(self, tmp_path: Path) -> None:
        path = write(tmp_path / "c.toml", '[audio]\nsorce = "file"\n[sinks.j]\ntype = "file"\n'
                     f'path = "{tmp_path}/t.jsonl"\nfsnyc = false\n')
        status, lines = check_config(path)
        assert status == 78
        assert lines == [f"{path}: audio.sorce: unknown key (did you mean 'source'?)",
                         f"{path}: sinks.j.fsnyc: unknown key (did you mean 'fsync'?)"]

    def test_sinks_that_are_not_tables(self, tmp_path: Path) -> None:
        path = write(tmp_path / "c.toml", 'sinks = "file"\n')
        assert check_config(path) == (78, [
            f"{path}: sinks: expected tables [sinks.<name>], one per sink, found a string"])


def test_list_positions_count_from_one(tmp_path: Path) -> None:
    """``secret #3 must start with 'whsec_'`` (the webhook's own count) and pydantic's
    ``secret.1`` (from 0) for the second: now one way, from 1."""
    path = write(tmp_path / "c.toml", '[assemblyai]\nkeyterms = ["a", 5]\n[sinks.hook]\n'
                 f'type = "webhook"\nurl = "http://127.0.0.1:9/x"\nsecret = ["{SECRET}", 5]\n')
    status, lines = check_config(path)
    assert status == 78
    assert lines == [
        f"{path}: assemblyai.keyterms: item #2: expected a string, found an integer "
        "(put it in quotes)",
        f"{path}: sinks.hook.secret: item #2: expected a string, found an integer "
        "(put it in quotes)"]


def test_a_table_with_number_keys_is_not_refused() -> None:
    """A third-party sink's ``dict[int, str]`` (channel -> label): TOML writes every table key
    as a string, which lax validation converts; the strict check called each key a string
    where an integer belongs ("write it without quotes"), which no config can do."""
    from pydantic import BaseModel

    from daemon.tomltypes import type_problems

    class Labels(BaseModel):
        labels: dict[int, str] = {}

    assert type_problems(Labels, {"labels": {"1": "left", "2": "right"}}) == {}
    assert type_problems(Labels, {"labels": {"1": 2}}) == {
        ("labels", "1"): "expected a string, found an integer (put it in quotes)"}


def test_a_webhook_secret_or_header_of_the_wrong_type_is_named_never_shown(tmp_path: Path
                                                                           ) -> None:
    """``secret = 1234567`` said "expected an array" (a string is what most write), and a
    header's value of the wrong type "found a value"; neither value may be shown."""
    path = write(tmp_path / "c.toml", f'[state]\ndir = "{tmp_path / "state"}"\n'
                 '[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/in"\n'
                 'secret = 1234567\nheaders = {Authorization = 7654321}\n')
    status, lines = check_config(path)
    assert status == 78
    assert lines == [
        f"{path}: sinks.hook.secret: expected a string (whsec_…) or an array of them, found "
        "an integer",
        f"{path}: sinks.hook.headers.Authorization: expected a string, found an integer (put "
        "it in quotes)"]
    assert "1234567" not in "".join(lines) and "7654321" not in "".join(lines)
