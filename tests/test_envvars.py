"""Environment variables for a sink whose name in the file has a ``-`` (or capitals)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.plugins import load_plugins
from daemon.validate import validate
from tests.conftest import REPO, TRANSCRIBED


def _config(tmp_path: Path, sink: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[sinks.{sink}]\ntype = "file"\npath = "{tmp_path / "turns.jsonl"}"\n'
                      f'[state]\ndir = "{tmp_path / "state"}"\n')
    return config


def _problems(config: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(str(config), load_plugins(entry_points=False))
    return caught.value.problems


def test_underscore_for_dash_names_the_file_sink(tmp_path: Path) -> None:
    """``TRANSCRIBED_SINKS__MY_LOG__PATH`` with ``[sinks.my-log]``: check-config's one line says
    the variable made a sink ``my_log`` of its own, names the file's sink and the ``-`` form."""
    config = _config(tmp_path, "my-log")
    env = {**os.environ, "TRANSCRIBED_SINKS__MY_LOG__PATH": str(tmp_path / "other.jsonl")}
    result = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 78, result.stderr
    [line] = result.stderr.splitlines()
    assert line == (
        "transcribed: config error: environment TRANSCRIBED_SINKS__MY_LOG__PATH (a new sink "
        "my_log, not the file's [sinks.my-log]: '_' is not read as '-'; set "
        "TRANSCRIBED_SINKS__MY-LOG__<KEY>, a name a shell's export cannot take but env and "
        "systemd's Environment= can): sinks.my_log.type: missing (known types: console, file, "
        "mqtt, webhook)")


def test_the_dash_form_sets_the_file_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """The variable spelled with the ``-`` sets the file's sink (what the hint proposes)."""
    monkeypatch.setenv("TRANSCRIBED_SINKS__MY-LOG__PATH", str(tmp_path / "other.jsonl"))
    _settings, _path, sinks = validate(str(_config(tmp_path, "my-log")),
                                       load_plugins(entry_points=False))
    assert list(sinks) == ["my-log"]
    assert str(sinks["my-log"][1].model_dump()["path"]) == str(tmp_path / "other.jsonl")


def test_a_sink_of_its_own_on_purpose_gets_no_hint(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables that set ``type`` too make a sink of their own: no word about the file's."""
    monkeypatch.setenv("TRANSCRIBED_SINKS__MY_LOG__TYPE", "webhook")  # and no url
    [line] = _problems(_config(tmp_path, "my-log"))
    assert line.startswith("environment TRANSCRIBED_SINKS__MY_LOG__TYPE: sinks.my_log.url: ")
    assert "my-log" not in line


def test_capitals_in_the_file_sink_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[sinks.MyLog]`` and ``TRANSCRIBED_SINKS__MYLOG__PATH``: the file's name is refused, and
    the sink ``mylog`` the variable made is blamed on it, not on the file, saying why."""
    monkeypatch.setenv("TRANSCRIBED_SINKS__MYLOG__PATH", str(tmp_path / "other.jsonl"))
    config = _config(tmp_path, "MyLog")
    named, made = _problems(config)
    assert named.startswith(f"{config}: sinks.MyLog: a sink name is lower-case")
    assert made == ("environment TRANSCRIBED_SINKS__MYLOG__PATH (a new sink mylog, not the "
                    "file's [sinks.MyLog]: variable names are read in lower case): sinks.mylog."
                    "type: missing (known types: console, file, mqtt, webhook)")


def test_dash_for_underscore_names_the_file_sink(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The other way round: ``TRANSCRIBED_SINKS__MY-LOG__PATH`` with ``[sinks.my_log]``."""
    monkeypatch.setenv("TRANSCRIBED_SINKS__MY-LOG__PATH", str(tmp_path / "other.jsonl"))
    assert _problems(_config(tmp_path, "my_log")) == [
        "environment TRANSCRIBED_SINKS__MY-LOG__PATH (a new sink my-log, not the file's "
        "[sinks.my_log]: '-' is not read as '_'; set TRANSCRIBED_SINKS__MY_LOG__<KEY>): "
        "sinks.my-log.type: missing (known types: console, file, mqtt, webhook)"]


def _mqtt_config(tmp_path: Path) -> Path:
    """An MQTT sink like config/example.toml's ``[sinks.bus]``: no username, no password."""
    config = tmp_path / "config.toml"
    config.write_text('[sinks.bus]\ntype = "mqtt"\nhost = "127.0.0.1"\nusername = ""\n'
                      f'password = ""\n[state]\ndir = "{tmp_path / "state"}"\n')
    return config


def test_a_whole_table_problem_names_the_file_and_the_variables(tmp_path: Path) -> None:
    """``sinks.bus: a password needs a username`` is about the table, whose password came from
    the environment and the rest from the file: check-config's one line names both, never the
    password itself."""
    config = _mqtt_config(tmp_path)
    env = {**os.environ, "TRANSCRIBED_SINKS__BUS__PASSWORD": "hunter2-not-shown"}
    result = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 78, result.stderr
    [line] = result.stderr.splitlines()
    assert line == (f"transcribed: config error: {config}, environment "
                    "TRANSCRIBED_SINKS__BUS__PASSWORD: sinks.bus: a password needs a username")
    assert "hunter2" not in result.stdout + result.stderr


def test_every_variable_inside_the_table_is_named(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's model read its keys together: each variable that set one is named, sorted,
    as it was set; one for another sink is not."""
    monkeypatch.setenv("TRANSCRIBED_SINKS__BUS__PASSWORD", "dummy")
    monkeypatch.setenv("TRANSCRIBED_SINKS__BUS__PORT", "1884")
    monkeypatch.setenv("TRANSCRIBED_SINKS__BUSY__PATH", str(tmp_path / "x.jsonl"))
    config = _mqtt_config(tmp_path)
    problems = _problems(config)
    assert (f"{config}, environment TRANSCRIBED_SINKS__BUS__PASSWORD, "
            "TRANSCRIBED_SINKS__BUS__PORT: sinks.bus: a password needs a username") in problems


def test_a_secret_and_its_file_from_both_origins(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A webhook's ``secret_file`` in the file and ``secret`` from the environment: the
    ``not both`` problem is the table's, and names both origins."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("whsec_" + "A" * 44 + "\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/x"\n'
                      f'secret_file = "{secret_file}"\n[state]\ndir = "{tmp_path / "state"}"\n')
    monkeypatch.setenv("TRANSCRIBED_SINKS__HOOK__SECRET", "whsec_" + "B" * 44)
    assert _problems(config) == [f"{config}, environment TRANSCRIBED_SINKS__HOOK__SECRET: "
                                 "sinks.hook: set either secret or secret_file, not both"]


def test_a_whole_table_problem_of_the_file_alone_names_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable sets a key inside the table: the file alone is named, as before."""
    monkeypatch.setenv("TRANSCRIBED_SINKS__OTHER__TYPE", "console")
    config = _mqtt_config(tmp_path)
    config.write_text(config.read_text().replace('password = ""', 'password = "dummy"'))
    assert _problems(config) == [f"{config}: sinks.bus: a password needs a username"]


def test_a_table_only_the_environment_sets_names_only_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink the file does not have: its table's problem is the environment's alone."""
    for key, value in {"TYPE": "mqtt", "HOST": "127.0.0.1", "PASSWORD": "dummy"}.items():
        monkeypatch.setenv(f"TRANSCRIBED_SINKS__BUS__{key}", value)
    config = _config(tmp_path, "journal")
    assert _problems(config) == [
        "environment TRANSCRIBED_SINKS__BUS__HOST, TRANSCRIBED_SINKS__BUS__PASSWORD, "
        "TRANSCRIBED_SINKS__BUS__TYPE: sinks.bus: a password needs a username"]


def _check_config(config: Path, **variables: str) -> list[str]:
    """check-config's problem lines (without the ``transcribed: config error: `` prefix)."""
    env = {**os.environ, **variables}
    result = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 78, result.stderr
    return [line.removeprefix("transcribed: config error: ")
            for line in result.stderr.splitlines()]


def _state_config(tmp_path: Path, text: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'{text}[state]\ndir = "{tmp_path / "state"}"\n')
    return config


def test_a_source_from_the_environment_is_blamed_for_a_missing_path(tmp_path: Path) -> None:
    """The file sets neither ``audio.source`` nor ``audio.path``: the path is wanted because of
    ``TRANSCRIBED_AUDIO__SOURCE``, so that variable is named and the file is not."""
    config = _state_config(tmp_path)
    assert "environment TRANSCRIBED_AUDIO__SOURCE: audio.path: required when audio.source = "\
        "'file'" in _check_config(config, TRANSCRIBED_AUDIO__SOURCE="file")


def test_a_path_in_the_file_and_a_source_from_the_environment_name_both(tmp_path: Path
                                                                          ) -> None:
    """The file's ``audio.path`` is not used with the environment's source: both are named."""
    config = _state_config(tmp_path, f'[audio]\npath = "{tmp_path / "a.wav"}"\n')
    assert f"{config}, environment TRANSCRIBED_AUDIO__SOURCE: audio.path: only used when " \
        "audio.source = 'file'" in _check_config(config, TRANSCRIBED_AUDIO__SOURCE="microphone")


def test_delays_from_the_file_and_the_environment_name_both(tmp_path: Path) -> None:
    """``reconnect.initial_delay`` from the file, ``max_delay`` from the environment (the
    deciding key): both are named; with both from the file, only the file, as before."""
    config = _state_config(tmp_path, "[reconnect]\ninitial_delay = 30\n")
    line = "reconnect.initial_delay: must not exceed reconnect.max_delay"
    assert f"{config}, environment TRANSCRIBED_RECONNECT__MAX_DELAY: {line}" \
        in _check_config(config, TRANSCRIBED_RECONNECT__MAX_DELAY="5")
    config.write_text(config.read_text().replace("initial_delay = 30", "initial_delay = 30\n"
                                                 "max_delay = 5"))
    assert f"{config}: {line}" in _check_config(config)


def test_delays_from_the_environment_alone_name_only_the_environment(tmp_path: Path) -> None:
    """Neither delay is in the file: the file is not blamed; each variable is named, sorted."""
    config = _state_config(tmp_path)
    assert ("environment TRANSCRIBED_RECONNECT__INITIAL_DELAY, TRANSCRIBED_RECONNECT__MAX_DELAY: "
            "reconnect.initial_delay: must not exceed reconnect.max_delay") in _check_config(
        config, TRANSCRIBED_RECONNECT__INITIAL_DELAY="30", TRANSCRIBED_RECONNECT__MAX_DELAY="5")
    assert ("environment TRANSCRIBED_RECONNECT__INITIAL_DELAY: reconnect.initial_delay: must not "
            "exceed reconnect.max_delay") in _check_config(
        config, TRANSCRIBED_RECONNECT__INITIAL_DELAY="1000")
