"""Configuration: lookup, precedence, secrets, and errors that name the key."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import pytest
from pydantic import BaseModel, HttpUrl

from daemon.commands import check_config
from daemon.config import find_config, load_settings
from daemon.envvars import takes_json
from daemon.errors import ConfigError
from daemon.logs import SecretMasker
from daemon.masking import masked_dict, secret_values
from daemon.plugins import load_plugins
from daemon.sinktables import validate_sinks
from daemon.validate import validate
from tests.conftest import REPO, TRANSCRIBED


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestLookup:
    def test_defaults_without_any_file(self) -> None:
        """With no config anywhere: microphone, engine auto (local without a key), console sink."""
        assert find_config(None) is None
        settings = load_settings(None)
        assert settings.audio.source == "microphone"
        assert settings.engine_name() == "local"
        assert settings.effective_sinks() == {"console": {"type": "console"}}

    def test_lookup_order(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """$TRANSCRIBED_CONFIG beats $XDG_CONFIG_HOME/transcribed/config.toml."""
        xdg = write(Path(os.environ["XDG_CONFIG_HOME"]) / "transcribed" / "config.toml", "")
        assert find_config(None) == xdg
        named = write(tmp_path / "named.toml", "")
        monkeypatch.setenv("TRANSCRIBED_CONFIG", str(named))
        assert find_config(None) == named
        assert find_config(str(xdg)) == xdg

    def test_missing_named_file(self, tmp_path: Path) -> None:
        """A config file named explicitly must exist."""
        with pytest.raises(ConfigError, match="config file not found"):
            find_config(str(tmp_path / "nope.toml"))

    def test_a_folder_or_broken_link_at_a_lookup_path(self, tmp_path: Path) -> None:
        """``~/.config/transcribed/config.toml`` as a folder, or a link to a file that is gone
        (a dotfiles checkout elsewhere): an error, never the built-in defaults in its place."""
        xdg = Path(os.environ["XDG_CONFIG_HOME"]) / "transcribed" / "config.toml"
        xdg.parent.mkdir(parents=True)
        xdg.symlink_to(tmp_path / "gone.toml")
        result = subprocess.run([*TRANSCRIBED, "check-config"], capture_output=True, text=True,
                                cwd=REPO, timeout=60, check=False)
        assert (result.returncode, result.stdout, result.stderr) == (
            78, "", f"transcribed: config error: {xdg}: a link to a missing file\n")
        xdg.unlink()
        xdg.mkdir()
        with pytest.raises(ConfigError, match=f"^{xdg}: not a regular file$"):
            find_config(None)

    def test_a_path_that_cannot_be_looked_at(self, tmp_path: Path) -> None:
        """A lookup path the system refuses to stat (e.g. a 0700 folder of another user: EACCES,
        seen under systemd; here a name too long, which root cannot bypass) is a config error
        naming it, not a traceback."""
        folder = tmp_path / ("x" * 300)
        with pytest.raises(ConfigError, match=r"^config: cannot look at .*/x{300}/transcribed/"
                                              r"config\.toml: File name too long$"):
            find_config(None, env={"XDG_CONFIG_HOME": str(folder)})


class TestValues:
    def test_env_overrides_toml(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """TRANSCRIBED_<SECTION>__<KEY> beats the file, including inside sink tables."""
        path = write(tmp_path / "c.toml", '[log]\nlevel = "info"\n[sinks.j]\ntype = "file"\n'
                     'path = "/tmp/a.jsonl"\n')
        monkeypatch.setenv("TRANSCRIBED_LOG__LEVEL", "DEBUG")
        monkeypatch.setenv("TRANSCRIBED_SINKS__J__FSYNC", "false")
        settings = load_settings(path)
        assert settings.log.level == "debug"
        sinks = validate_sinks(load_plugins(entry_points=False), settings.effective_sinks())
        assert sinks["j"][1].model_dump()["fsync"] is False

    def test_device_index_as_a_number(self, tmp_path: Path) -> None:
        """``device = 3`` is the index, as ``"3"`` is; a negative index is named."""
        settings = load_settings(write(tmp_path / "a.toml", "[audio]\ndevice = 3\n"))
        assert settings.audio.device == "3"
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path / "b.toml", "[audio]\ndevice = -1\n"))
        assert info.value.problems == [f"{tmp_path / 'b.toml'}: audio.device: a device index is "
                                       "0 or more (see `transcribed devices`)"]
        with pytest.raises(ConfigError):
            load_settings(write(tmp_path / "c.toml", "[audio]\ndevice = true\n"))

    @pytest.mark.parametrize(("key", "url", "problem"), [
        ("streaming_url", "wss://streaming.example:99999/v3/ws", "its port is not 1-65535"),
        ("streaming_url", "wss://streaming.example:0/v3/ws", "its port is not 1-65535"),
        ("streaming_url", "wss://stream ing.example/v3/ws", "must not contain spaces"),
        ("streaming_url", "wss:///v3/ws", "must name a host"),
        ("streaming_url", "https://streaming.example/v3/ws", "must start with ws:// or wss://"),
        ("token_url", "https://x:pw-secret-3@tok.example:70000/v3/token",
         "its port is not 1-65535"),
        ("token_url", "https://tok.example/v3/token x", "must not contain spaces"),
    ])
    def test_service_urls_are_checked(self, tmp_path: Path, key: str, url: str,
                                      problem: str) -> None:
        """A service URL no connection can use is a config error naming the key (it passed,
        and every connection attempt failed and was retried for ever)."""
        path = write(tmp_path / "u.toml", f'[assemblyai]\n{key} = "{url}"\n')
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [f"{path}: assemblyai.{key}: {problem}"]

    def test_env_problem_names_the_variable(self, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad value from the environment is blamed on its variable, not on the file."""
        path = write(tmp_path / "c.toml", '[audio]\nchunk_ms = 100\n')
        monkeypatch.setenv("TRANSCRIBED_AUDIO__CHUNK_MS", "abc")
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [
            "environment TRANSCRIBED_AUDIO__CHUNK_MS: audio.chunk_ms: Input should be a valid "
            "integer, unable to parse string as an integer"]

    def test_env_variable_below_a_key_is_named(self, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        """A variable one level too deep (``…__API_KEY__X``) makes the key a table: the line
        blames that variable, as any other from the environment."""
        monkeypatch.setenv("TRANSCRIBED_ASSEMBLYAI__API_KEY__X", "k-secret-9")
        monkeypatch.setenv("TRANSCRIBED_SINKS__C__FORMAT__A", "json")
        path = write(tmp_path / "c.toml", '[sinks.c]\ntype = "console"\n')
        with pytest.raises(ConfigError) as info:
            validate(str(path), load_plugins(entry_points=False))
        assert info.value.problems == [
            "environment TRANSCRIBED_ASSEMBLYAI__API_KEY__X: assemblyai.api_key: Input should be "
            "a valid string",
            "environment TRANSCRIBED_SINKS__C__FORMAT__A: sinks.c.format: Input should be 'text' "
            "or 'json'"]

    def test_env_sink_table_value_is_json(self, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """A sink key that takes a table is written as JSON in the environment, as elsewhere."""
        path = write(tmp_path / "c.toml", '[sinks.hook]\ntype = "webhook"\n'
                     'url = "http://127.0.0.1:9/h"\n')
        monkeypatch.setenv("TRANSCRIBED_SINKS__HOOK__HEADERS", '{"X-Team": "ops"}')
        settings = load_settings(path)
        sinks = validate_sinks(load_plugins(entry_points=False), settings.effective_sinks())
        assert sinks["hook"][1].model_dump()["headers"] == {"X-Team": "ops"}

    @pytest.mark.parametrize(("annotation", "json"), [
        (dict[str, str], True), (dict[str, str] | None, True),
        (Optional[list[str]], True),  # noqa: UP045  (a plugin may write it so)
        (Mapping[str, int], True), (Sequence[str], True), (tuple[str, ...], True),
        (Annotated[list[int], "x"], True), (BaseModel, True),
        (str, False), (str | None, False), (int, False), (bytes, False), (Path, False),
    ])
    def test_which_sink_keys_read_json(self, annotation: Any, json: bool) -> None:
        """Keys taking a table, a list or a model read JSON text; text keys never do."""
        assert takes_json(annotation) is json

    def test_env_sink_problem_names_the_variable(self, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """check-config blames a bad sink value from the environment on its variable."""
        path = write(tmp_path / "c.toml", '[sinks.hook]\ntype = "webhook"\n'
                     'url = "http://127.0.0.1:9/h"\n')
        result = subprocess.run(
            [*TRANSCRIBED, "check-config", "--config", str(path)], capture_output=True,
            text=True, cwd=REPO, timeout=60, check=False,
            env={**os.environ, "TRANSCRIBED_SINKS__HOOK__TIMEOUT_S": "soon"})
        assert result.returncode == 78
        assert result.stderr.startswith("transcribed: config error: environment "
                                        "TRANSCRIBED_SINKS__HOOK__TIMEOUT_S: "
                                        "sinks.hook.timeout_s: "), result.stderr

    def test_sink_names_are_lower_case(self, tmp_path: Path) -> None:
        """A sink name the environment could not address is refused, naming it."""
        path = write(tmp_path / "c.toml", '[sinks.MyJournal]\ntype = "console"\n')
        with pytest.raises(ConfigError, match=r"^sinks\.MyJournal: a sink name is lower-case"):
            validate_sinks(load_plugins(entry_points=False), load_settings(path).effective_sinks())

    def test_unparsable_env_value_is_one_line(self, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        """A list or table in the environment that is not JSON names the variable and its key
        (in the one format of every environment line), even beside a fine variable: exit 78."""
        path = write(tmp_path / "c.toml", '[sinks.c]\ntype = "console"\n')
        monkeypatch.setenv("TRANSCRIBED_ASSEMBLYAI__KEYTERMS", "notjson")
        monkeypatch.setenv("TRANSCRIBED_ASSEMBLYAI__SPEECH_MODEL", "[fine as text")
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [
            "environment TRANSCRIBED_ASSEMBLYAI__KEYTERMS: assemblyai.keyterms: cannot parse the "
            "value (Expecting value: line 1 column 1 (char 0)); lists and tables are written as "
            "JSON, e.g. '[\"a\", \"b\"]'"]

    @pytest.mark.parametrize(("variable", "key", "value"), [
        ("TRANSCRIBED_ASSEMBLYAI__KEYTERMS", "assemblyai.keyterms", "[" * 20000 + "]" * 20000),
        ("TRANSCRIBED_SINKS", "sinks", '{"a": ' * 20000 + "1" + "}" * 20000),
    ])
    def test_env_json_nested_too_deeply(self, variable: str, key: str, value: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """JSON nested too deeply for the parser is a problem line (exit 78), not a traceback."""
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError) as info:
            load_settings(None)
        (line,) = info.value.problems
        assert line.startswith(f"environment {variable}: {key}: cannot parse the value (nested "
                               "too deeply); lists and tables are written as JSON"), line

    def test_api_key_file_and_credentials(self, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """The key comes from api_key_file, else from $CREDENTIALS_DIRECTORY."""
        key_file = write(tmp_path / "key", "file-key-123\n")
        path = write(tmp_path / "c.toml", f'[assemblyai]\napi_key_file = "{key_file}"\n')
        assert load_settings(path).assemblyai.api_key.get_secret_value() == "file-key-123"
        creds = tmp_path / "creds"
        write(creds / "assemblyai_api_key", "cred-key-456")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        settings = load_settings(None)
        assert settings.assemblyai.api_key.get_secret_value() == "cred-key-456"
        assert settings.engine_name() == "assemblyai"

    def test_secrets_masked(self, tmp_path: Path) -> None:
        """The effective config never shows a secret; the masker learns every one."""
        path = write(tmp_path / "c.toml", '[assemblyai]\napi_key = "k-secret-1"\n'
                     '[http]\ntoken = "t-secret-2"\n')
        settings = load_settings(path)
        text = repr(masked_dict(settings, {}))
        assert "k-secret-1" not in text and "t-secret-2" not in text
        assert set(secret_values(settings, {})) == {"k-secret-1", "t-secret-2"}

    def test_unparsable_url_of_a_third_party_sink_is_masked(self, tmp_path: Path) -> None:
        """A sink's ``url`` the URL parser refuses is masked whole, not a crash of check-config."""
        settings = load_settings(write(tmp_path / "c.toml", ""))
        sinks = {"x": {"type": "custom", "url": "http://[bad/p-secret-3"}}
        assert masked_dict(settings, sinks)["sinks"]["x"]["url"] == "********"
        assert "http://[bad/p-secret-3" in secret_values(settings, sinks)

    def test_non_text_url_of_a_third_party_sink_is_masked(self, tmp_path: Path) -> None:
        """A plugin's ``url: HttpUrl`` is masked and learnt like a text one."""
        settings = load_settings(write(tmp_path / "c.toml", ""))
        sinks = {"x": {"type": "custom", "url": HttpUrl("https://h.example/p-secret-4")}}
        assert masked_dict(settings, sinks)["sinks"]["x"]["url"] == "https://h.example/********"
        assert "h.example/p-secret-4" in secret_values(settings, sinks)
        ipv6 = {"x": {"type": "custom", "url": "http://[::1]:8080/p"}}
        assert masked_dict(settings, ipv6)["sinks"]["x"]["url"] == "http://[::1]:8080/********"


    def test_service_url_credentials_masked(self, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        """User info and query of ``streaming_url`` / ``token_url`` are masked by check-config
        (their path, the API's, is shown) and learnt by the log masker."""
        path = write(tmp_path / "c.toml",
                     '[assemblyai]\nstreaming_url = "wss://usr:pw-secret-5@127.0.0.1/v3/ws'
                     '?key=q-secret-6"\ntoken_url = "https://usr:pw-secret-7@127.0.0.1/v3/token"\n')
        out = printed_config(path, capsys)
        assert 'streaming_url = "wss://********@127.0.0.1/v3/ws?********"' in out
        assert 'token_url = "https://********@127.0.0.1/v3/token"' in out
        assert 'token_url = "https://streaming.assemblyai.com/v3/token"' in printed_config(
            write(tmp_path / "plain.toml", ""), capsys)
        for secret in ("pw-secret-5", "q-secret-6", "pw-secret-7"):
            assert secret not in out
        learnt = secret_values(load_settings(path), {})
        assert {"pw-secret-5", "key=q-secret-6", "pw-secret-7"} <= set(learnt)

    def test_log_masker_hides_a_url_path_only_in_the_url(self, tmp_path: Path) -> None:
        """A webhook's path is masked where the URL is written, not wherever the word is: a
        path '/hook' masked the dead-letter file of a sink named hook in every log line; nor
        is a plain header's value ('ops') learnt, only a credential header's."""
        path = write(tmp_path / "c.toml", '[sinks.hook]\ntype = "webhook"\n'
                     'url = "http://u:pw-secret-8@127.0.0.1:9/hook"\n'
                     'headers = { X-Team = "ops-team", X-Auth-Token = "hdr-secret-9" }\n')
        settings = load_settings(path)
        sinks = validate_sinks(load_plugins(entry_points=False), settings.effective_sinks())
        masker = SecretMasker(secret_values(
            settings, {name: config for name, (_t, config) in sinks.items()}))
        kept = 'path=/var/lib/dead-letter/hook.jsonl team=ops-team'
        assert masker.mask(kept) == kept
        assert masker.mask("POST http://127.0.0.1:9/hook ok") == "POST http://******** ok"
        assert masker.mask("x pw-secret-8 hdr-secret-9") == "x ******** ********"

    def test_header_values_learnt_by_the_log_masker(self, tmp_path: Path) -> None:
        """Header values, which check-config masks, are masked in log lines too."""
        path = write(tmp_path / "c.toml", '[sinks.hook]\ntype = "webhook"\n'
                     'url = "http://127.0.0.1:9"\nheaders = { X-Api-Key = "hdr-secret-3" }\n')
        settings = load_settings(path)
        sinks = validate_sinks(load_plugins(entry_points=False), settings.effective_sinks())
        learnt = secret_values(settings, {name: config for name, (_t, config) in sinks.items()})
        assert "hdr-secret-3" in learnt
        assert "hdr-secret-3" in secret_values(settings, settings.effective_sinks())


def printed_config(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """check-config's output for a valid ``path``."""
    assert check_config(argparse.Namespace(config=str(path))) == 0
    return capsys.readouterr().out


class TestErrors:
    def test_every_problem_named(self, tmp_path: Path) -> None:
        """Each bad key gives its own line naming file and key."""
        path = write(tmp_path / "c.toml", "[audio]\nbogus = 1\nchunk_ms = 20\n"
                     "[assemblyai]\ntoken_expires_in = 900\n[nosuch]\nx = 1\n")
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        lines = info.value.problems
        assert f"{path}: audio.bogus: unknown key" in lines
        assert any(line.startswith(f"{path}: audio.chunk_ms:") for line in lines)
        assert any(line.startswith(f"{path}: assemblyai.token_expires_in:") for line in lines)
        assert f"{path}: nosuch: unknown section (the sections are assemblyai, audio, http, " \
            "local, log, reconnect, sinks, state, transcriber)" in lines

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """A top-level key that is not a table is an unknown key, not a section."""
        path = write(tmp_path / "c.toml", "nosuch = 1\n")
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [f"{path}: nosuch: unknown key (the top level has only the "
                                       "sections assemblyai, audio, http, local, log, reconnect, "
                                       "sinks, state, transcriber)"]

    def test_a_key_with_a_line_break_is_one_line(self, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """A quoted TOML key with a line break or a terminal escape is named escaped: one line
        per problem, nothing written to the terminal that it would act on."""
        path = write(tmp_path / "c.toml", '[audio]\n"bo\\ngus\\u001b[2J" = 1\n'
                     '[sinks."ev\\nil"]\ntype = "console"\n[sinks.ok]\ntype = "console"\n'
                     '"x\\ny" = 1\n')
        assert check_config(argparse.Namespace(config=str(path))) == 78
        assert capsys.readouterr().err.splitlines() == [
            f"transcribed: config error: {path}: audio.'bo\\ngus\\x1b[2J': unknown key",
            f"transcribed: config error: {path}: sinks.'ev\\nil': a sink name is lower-case "
            "letters, digits, '_' or '-' (environment overrides are matched in lower case)",
            f"transcribed: config error: {path}: sinks.ok.'x\\ny': unknown key"]

    def test_invalid_toml(self, tmp_path: Path) -> None:
        """A syntax error names the file and the position."""
        path = write(tmp_path / "c.toml", "[audio\n")
        with pytest.raises(ConfigError, match=r"c\.toml: invalid TOML: .*line 1"):
            load_settings(path)

    def test_byte_order_mark_is_named(self, tmp_path: Path) -> None:
        """A file saved with a BOM (some Windows editors) says so, not "Invalid statement"."""
        path = tmp_path / "c.toml"
        path.write_bytes(b'\xef\xbb\xbf[log]\nlevel = "debug"\n')
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert info.value.problems == [f"{path}: invalid TOML: it starts with a byte order mark "
                                       "(BOM): save it as UTF-8 without one"]

    def test_unknown_sink_type_lists_known(self) -> None:
        """An unknown sink type names the sink and lists the known types."""
        with pytest.raises(ConfigError) as info:
            validate_sinks(load_plugins(entry_points=False),
                           {"alerts": {"type": "carrier-pigeon"}, "j": {"type": "file", "x": 1}})
        assert any(p.startswith("sinks.alerts.type: unknown type 'carrier-pigeon' (known types:")
                   and "file" in p for p in info.value.problems)
        assert "sinks.j.x: unknown key" in info.value.problems


BAD_VALUES = [
    ("[reconnect]\nbacklog_seconds = 0\n",
     "reconnect.backlog_seconds: Input should be greater than or equal to 1"),
    ("[reconnect]\nbacklog_seconds = inf\n",
     "reconnect.backlog_seconds: Input should be a finite number"),
    ('[local]\ncompute_type = "bogus"\n', "local.compute_type: Input should be 'int8'"),
    ('[transcriber]\nengine = "local"\n[local]\ncompute_type = "int8_bfloat16"\n',
     "local.compute_type: 'int8_bfloat16' is not supported on this CPU (supported: auto, "),
    ('[assemblyai]\napi_key = "k"\nmax_session_seconds = 30\n',
     "assemblyai.max_session_seconds: the service accepts 60..10800 (got 30)"),
    ('[http]\ntoken = "two words"\n',
     "http.token: must be printable ASCII without spaces"),
    ('[sinks.q]\ntype = ["file"]\n', "sinks.q.type: must be text (a type name) (known types: "),
    ('[sinks.f]\ntype = "file"\npath = "/tmp/x.jsonl"\nrotate_bytes = nan\n',
     "sinks.f.rotate_bytes: Input should be a finite number"),
]


@pytest.mark.parametrize(("text", "expected"), [
    *BAD_VALUES, ('[state]\ndir = "{tmp}/c.toml"\n', "state.dir: {tmp}/c.toml exists and is not")])
def test_bad_values_one_line_each(text: str, expected: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Values the daemon could not run with are config errors naming the key (exit 78)."""
    text, expected = text.replace("{tmp}", str(tmp_path)), expected.replace("{tmp}", str(tmp_path))
    path = write(tmp_path / "c.toml", text)
    assert check_config(argparse.Namespace(config=str(path))) == 78
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"transcribed: config error: {path}: {expected}"), line


def _problems(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """check-config's problem lines for ``path`` (it must exit 78), without the common prefix."""
    assert check_config(argparse.Namespace(config=str(path))) == 78
    return [line.removeprefix("transcribed: config error: ")
            for line in capsys.readouterr().err.splitlines()]


def test_a_bad_value_hides_no_other_problem(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One check-config names every problem: a section's bad value does not hide the cross-key
    problems of the other sections, nor the sinks'; the bad section's own checks wait."""
    path = write(tmp_path / "c.toml", '[audio]\nsource = "file"\nchunk_ms = 5\n'
                 '[transcriber]\nengine = "assemblyai"\n[reconnect]\ninitial_delay = 50\n'
                 f'[assemblyai]\napi_key_file = "{tmp_path / "nokey"}"\n'
                 '[sinks.j]\ntype = "file"\npath = ""\n')
    assert _problems(path, capsys) == [
        f"{path}: audio.chunk_ms: Input should be greater than or equal to 50",
        f"{path}: assemblyai.api_key_file: cannot read {tmp_path / 'nokey'}: No such file or "
        "directory",
        f"{path}: reconnect.initial_delay: must not exceed reconnect.max_delay",
        f"{path}: sinks.j.path: must name a file",
    ]        # not "audio.path: required …" (audio is unchecked) nor a missing key (unreadable)
    path.write_text('[nosuch]\nx = 1\n[sinks.j]\ntype = "file"\npath = ""\n')
    [unknown, sink] = _problems(path, capsys)
    assert unknown.startswith(f"{path}: nosuch: unknown section (the sections are assemblyai")
    assert sink == f"{path}: sinks.j.path: must name a file"


def test_an_api_key_a_header_cannot_carry(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is sent in a header: a non-ASCII letter (it crashed the token request, exit 1) or
    a second line in its file (every token request failed, retried for ever) is a config error
    naming where the key came from, never showing it."""
    problem = "must be printable ASCII without spaces (it is sent in a header)"
    path = write(tmp_path / "c.toml", '[assemblyai]\napi_key = "key-secret-1\u00e9"\n')
    assert _problems(path, capsys) == [f"{path}: assemblyai.api_key: {problem}"]
    key_file = write(tmp_path / "key", "key-secret-2\nsecond line\n")
    path = write(tmp_path / "c.toml", f'[assemblyai]\napi_key_file = "{key_file}"\n')
    assert _problems(path, capsys) == [
        f"{path}: assemblyai.api_key_file: the key in {key_file} {problem}"]
    write(tmp_path / "creds" / "assemblyai_api_key", "key secret 3\r\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert check_config(argparse.Namespace(config=None)) == 78
    assert capsys.readouterr().err == (
        "transcribed: config error: assemblyai.api_key (credential): the key in "
        f"{tmp_path / 'creds' / 'assemblyai_api_key'} {problem}\n")
    write(tmp_path / "creds" / "assemblyai_api_key", "key-secret-4\r\n")   # CRLF: stripped
    assert load_settings(None).assemblyai.api_key.get_secret_value() == "key-secret-4"


class TestEveryProblemOnce:
    def test_paths_that_cannot_be_looked_at(self, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        """audio.path and state.dir the system refuses to stat (EACCES under ProtectHome=yes;
        here names too long) are one line each, not a traceback (exit 1, restarted in a loop)."""
        long = tmp_path / ("x" * 300)
        path = write(tmp_path / "c.toml", f'[audio]\nsource = "file"\npath = "{long}/a.wav"\n'
                     f'[state]\ndir = "{long}/state"\n')
        assert _problems(path, capsys) == [
            f"{path}: audio.path: cannot look at {long}/a.wav: File name too long",
            f"{path}: state.dir: cannot look at {long}/state: File name too long"]

    def test_unreadable_key_file_holds_back_only_the_key(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """An unreadable api_key_file, set from the environment, is blamed on its variable and
        hides no check that does not need the key."""
        monkeypatch.setenv("TRANSCRIBED_ASSEMBLYAI__API_KEY_FILE", str(tmp_path / "nokey"))
        path = write(tmp_path / "c.toml", '[transcriber]\nengine = "local"\n'
                     f'[local]\nmodel = "{tmp_path / "nomodel"}"\n'
                     '[assemblyai]\nmax_session_seconds = 20\n')
        lines = _problems(path, capsys)
        assert lines[0] == ("environment TRANSCRIBED_ASSEMBLYAI__API_KEY_FILE: assemblyai."
                            f"api_key_file: cannot read {tmp_path / 'nokey'}: No such file or "
                            "directory")
        assert lines[1].startswith(f"{path}: assemblyai.max_session_seconds: the service accepts")
        assert lines[2].startswith(f"{path}: local.model: ") and len(lines) == 3, lines

    def test_environment_names_and_typos(self, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """A table set from the environment is blamed for its keys' problems; a TRANSCRIBED_*
        variable that names no section (one underscore) is an error, not silently ignored."""
        monkeypatch.setenv("TRANSCRIBED_AUDIO", '{"chunk_ms": 5}')
        monkeypatch.setenv("TRANSCRIBED_ASSEMBLYAI_API_KEY", "sk-typo-secret")
        lines = _problems(write(tmp_path / "c.toml", ""), capsys)
        assert lines[0] == ("environment TRANSCRIBED_AUDIO: audio.chunk_ms: Input should be "
                            "greater than or equal to 50")
        assert lines[1].startswith("environment TRANSCRIBED_ASSEMBLYAI_API_KEY: unknown setting "
                                   "(TRANSCRIBED_<SECTION>__<KEY>, sections: assemblyai, audio,")
        assert len(lines) == 2 and "sk-typo-secret" not in "".join(lines)

    def test_sinks_when_the_settings_cannot_be_built(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """With an unknown section the file's sink tables are still checked, but an entry that
        is not a table is named once, and a sink the environment completes is not blamed."""
        monkeypatch.setenv("TRANSCRIBED_SINKS__HOOK__URL", "http://127.0.0.1:9/x")
        path = write(tmp_path / "c.toml", '[nosuch]\nx = 1\n[sinks]\nx = 1\n'
                     '[sinks.hook]\ntype = "webhook"\n[sinks.j]\ntype = "file"\npath = ""\n')
        [table, unknown, sink] = _problems(path, capsys)
        assert table == f"{path}: sinks.x: expected a table, found an integer"
        assert unknown.startswith(f"{path}: nosuch: unknown section (the sections are")
        assert sink == f"{path}: sinks.j.path: must name a file"


def test_files_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file or key file that is not UTF-8 is one line naming the file."""
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe key")
    assert check_config(argparse.Namespace(config=str(binary))) == 78
    assert capsys.readouterr().err == (
        f"transcribed: config error: {binary}: not UTF-8 text (byte 0)\n")
    path = write(tmp_path / "c.toml", f'[assemblyai]\napi_key_file = "{binary}"\n')
    assert check_config(argparse.Namespace(config=str(path))) == 78
    assert capsys.readouterr().err == (f"transcribed: config error: {path}: "
                                       f"assemblyai.api_key_file: {binary} is not UTF-8 text "
                                       "(byte 0)\n")


class TestCheckConfigCommand:
    def run(self, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TRANSCRIBED, *args], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, **(env or {})}, timeout=60, check=False)

    def test_valid_config_printed_masked(self, tmp_path: Path) -> None:
        """check-config exits 0 and prints the effective config with secrets masked."""
        path = write(tmp_path / "c.toml", '[assemblyai]\napi_key = "sk-live-abcdef"\n'
                     '[sinks.j]\ntype = "file"\npath = "/tmp/x.jsonl"\n'
                     '[sinks.hook]\ntype = "webhook"\n'
                     'url = "http://user:pw-77@127.0.0.1:9/services/T0/PATHSECRET?k=q-secret"\n'
                     'headers = { Authorization = "Bearer hdr-secret-42" }\n'
                     '[sinks.plain]\ntype = "webhook"\nurl = "http://127.0.0.1:9"\n')
        result = self.run("check-config", "--config", str(path))
        assert result.returncode == 0, result.stderr
        for secret in ("sk-live-abcdef", "hdr-secret-42", "pw-77", "PATHSECRET", "q-secret"):
            assert secret not in result.stdout + result.stderr
        assert 'url = "http://127.0.0.1:9/********"' in result.stdout
        assert 'url = "http://127.0.0.1:9"' in result.stdout
        assert 'api_key = "********"' in result.stdout
        assert "[sinks.j]" in result.stdout and "rotate_bytes = 0" in result.stdout

    def test_closed_pipe_is_a_quiet_exit(self, tmp_path: Path) -> None:
        """``check-config | head -1``: output cut short by its reader ends it quietly (exit 1, as
        SIGPIPE would, never a success that was not one), no traceback."""
        path = write(tmp_path / "c.toml", '[sinks.j]\ntype = "file"\npath = "/tmp/x.jsonl"\n')
        reader, writer = os.pipe()
        os.close(reader)                     # the reader is gone before anything is written
        try:
            result = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(path)],
                                    stdout=writer, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                    timeout=60, check=False)
        finally:
            os.close(writer)
        assert (result.returncode, result.stderr) == (1, "")

    def test_invalid_config_exit_78(self, tmp_path: Path) -> None:
        """check-config exits 78 with one line per problem, all at once, and no secret."""
        path = write(tmp_path / "c.toml", '[assemblyai]\napi_key = "sk-live-abcdef"\n'
                     'token_expires_in = 0\n[sinks.alerts]\ntype = "file"\npath = ""\n')
        result = self.run("check-config", "--config", str(path))
        assert result.returncode == 78
        lines = result.stderr.strip().splitlines()
        assert any("assemblyai.token_expires_in" in line for line in lines)
        assert "sk-live-abcdef" not in result.stdout + result.stderr
        assert f"{path}: sinks.alerts.path: must name a file" in lines[-1]
        path.write_text('[audio]\nsource = "file"\n[sinks.alerts]\ntype = "file"\npath = ""\n')
        result = self.run("check-config", "--config", str(path))
        assert result.returncode == 78
        assert result.stderr.strip().splitlines() == [
            f"transcribed: config error: {path}: audio.path: required when audio.source = 'file'",
            f"transcribed: config error: {path}: sinks.alerts.path: must name a file",
        ]

    def test_file_source_that_is_not_a_wav_exit_78(self, tmp_path: Path) -> None:
        """check-config reads the WAV header ``run`` would refuse: 78, not a failure (1) that
        systemd restarts in a loop."""
        audio = tmp_path / "notes.wav"
        audio.write_text("not audio at all\n" * 10)
        path = write(tmp_path / "c.toml", f'[audio]\nsource = "file"\npath = "{audio}"\n')
        for command in ("check-config", "run"):
            result = self.run(command, "--config", str(path))
            assert result.returncode == 78, result.stderr
            assert result.stderr.strip().splitlines() == [
                f"transcribed: config error: {path}: audio.path: {audio}: not a WAV file (it "
                "does not start with 'RIFF')"]
        folder = tmp_path / "recordings"
        folder.mkdir()
        path.write_text(f'[audio]\nsource = "file"\npath = "{folder}"\n')
        result = self.run("check-config", "--config", str(path))
        assert result.stderr.strip().splitlines() == [
            f"transcribed: config error: {path}: audio.path: {folder}: a directory, not a WAV "
            "file"]

    def test_files_that_would_hang_or_flood(self, tmp_path: Path) -> None:
        """A secret file that is a FIFO (it blocked check-config and a reload forever), a device
        (/dev/zero filled the memory) or too large, a config nested 100,000 deep (a RecursionError
        traceback) or a config that is a FIFO: one line each, exit 78."""
        fifo = tmp_path / "key.fifo"
        os.mkfifo(fifo)
        big = tmp_path / "big.key"
        big.write_text("k" * 70_000)
        cases = {str(fifo): "is not a regular file", "/dev/zero": "is not a regular file",
                 str(big): "is larger than 64 KiB"}
        for key_file, problem in cases.items():
            path = write(tmp_path / "c.toml", f'[assemblyai]\napi_key_file = "{key_file}"\n')
            result = self.run("check-config", "--config", str(path))
            assert result.returncode == 78
            assert result.stderr.strip().splitlines() == [
                f"transcribed: config error: {path}: assemblyai.api_key_file: {key_file} "
                f"{problem}"]
        deep = tmp_path / "deep.toml"
        deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
        result = self.run("check-config", "--config", str(deep))
        assert (result.returncode, result.stderr.strip()) == (
            78, f"transcribed: config error: {deep}: invalid TOML: nested too deeply")
        config_fifo = tmp_path / "config.fifo"
        os.mkfifo(config_fifo)
        result = self.run("check-config", "--config", str(config_fifo))
        assert (result.returncode, result.stderr.strip()) == (
            78, f"transcribed: config error: {config_fifo}: not a regular file")

    def test_missing_local_model_exit_78(self, tmp_path: Path) -> None:
        """A local model directory that is not one fails check-config (and run) with 78."""
        path = write(tmp_path / "c.toml", '[transcriber]\nengine = "local"\n'
                     f'[local]\nmodel = "{tmp_path / "nope"}"\n')
        for command in ("check-config", "run"):
            result = self.run(command, "--config", str(path))
            assert result.returncode == 78, result.stderr
            assert result.stderr.strip().endswith(
                "local.model: " + str(tmp_path / "nope") + ": no such directory")

    def test_an_unknown_option_shows_the_commands_usage(self) -> None:
        """``transcribed run --bogus`` exits 2 with ``run``'s usage (its options), not the top
        level's, which lists none of them."""
        result = self.run("run", "--bogus")
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "usage: transcribed run [-h] [--config PATH]",
            "transcribed run: error: unrecognized arguments: --bogus"]

    def test_version_is_fast_to_import(self) -> None:
        """--version prints the version without importing the daemon's heavy modules."""
        result = self.run("--version")
        assert result.returncode == 0
        assert result.stdout.startswith("transcribed ")


def test_example_config_is_valid() -> None:
    """config/example.toml shows every key and passes check-config as shipped."""
    import tomllib

    from daemon.config import Settings

    result = subprocess.run([*TRANSCRIBED, "check-config", "--config",
                             str(REPO / "config" / "example.toml")],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads((REPO / "config" / "example.toml").read_text())
    for section, model in Settings.model_fields.items():
        if section != "sinks":
            keys = set(model.annotation.model_fields)  # type: ignore[union-attr]
            assert keys == set(shown[section]), section
