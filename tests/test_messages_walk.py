"""Messages a new user met on a first walk through: each one line, in plain words, naming the key.

``tail`` with no daemon, a ``local.model`` that does not exist, an ``http.listen`` port out of
range, a language the bundled model cannot transcribe, ``audio.path`` problems worded one way,
and a ``--help`` page per command that says what the command does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import struct
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from daemon.cli import main
from daemon.commands import check_config
from daemon.config import HttpConfig
from daemon.errors import AudioError, ConfigError, EngineError
from daemon.pcm import open_wav
from daemon.recognizer import language_problems, resolve_model_path
from daemon.web import check_http, parse_listen
from tests.conftest import REPO

_RUN_TAIL = ("import sys; from daemon.tail import tail_main; "
             "sys.exit(tail_main(sys.argv[1], '', False))")
_HINT = "(is `transcribed run` running with http.enabled?)"
PREFIX = "transcribed: config error: "


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _tail_err(url: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_TAIL, url, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(15):
        _out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


class TestTailWithoutDaemon:
    async def test_nothing_listening_is_said_in_plain_words(self) -> None:
        """No daemon: "connection refused: nothing listens on HOST:PORT", not asyncio's
        "Connect call failed ('127.0.0.1', PORT)"."""
        port = _free_port()
        code, err = await _tail_err(f"http://127.0.0.1:{port}")
        assert (code, err) == (1, (
            f"transcribed tail: cannot reach the daemon at ws://127.0.0.1:{port}/events: "
            f"connection refused: nothing listens on 127.0.0.1:{port} {_HINT}\n"))

    async def test_a_host_name_is_said_the_same_way(self) -> None:
        """``localhost`` (resolved, then refused): the same plain words, naming it."""
        port = _free_port()
        code, err = await _tail_err(f"http://localhost:{port}")
        assert code == 1
        assert err.endswith(f": connection refused: nothing listens on localhost:{port} {_HINT}\n")

    def test_every_address_refused_is_nothing_listening(self) -> None:
        """A name with two addresses, both refused (Python 3.11's "Multiple exceptions: [Errno
        111] …, [Errno 111] …" error, which has no errno of its own): nothing listens."""
        from daemon.tail import _reason

        both = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 8765, 0, 0), "
                       "[Errno 111] Connect call failed ('127.0.0.1', 8765)")
        assert _reason(both, "ws://localhost:8765/events") == (
            "connection refused: nothing listens on localhost:8765")


class TestModelDirectory:
    def test_a_path_that_does_not_exist_is_no_such_directory(self, tmp_path: Path) -> None:
        """A missing absolute path is "no such directory", not "missing model.bin, …"."""
        missing = tmp_path / "x" / "nomodel"
        with pytest.raises(EngineError) as refused:
            resolve_model_path(str(missing))
        assert str(refused.value) == f"local.model: {missing}: no such directory"

    def test_a_relative_name_says_where_it_was_looked_for(self) -> None:
        """A model name (a relative path that does not exist): no such directory, where it was
        looked for, and that nothing is downloaded."""
        with pytest.raises(EngineError) as refused:
            resolve_model_path("tiny.en")
        assert str(refused.value) == (
            f"local.model: tiny.en: no such directory (a relative path is taken from "
            f"{Path.cwd()}, and model names are not downloaded)")

    def test_a_file_is_a_file_and_a_fifo_is_no_directory(self, tmp_path: Path) -> None:
        """A regular file in place of the folder is named a file; a FIFO is not called one."""
        file = tmp_path / "model.bin"
        file.write_bytes(b"")
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        give = "(give the directory holding model.bin, config.json and tokenizer.json)"
        for path, what in ((file, "is a file, not a model directory"),
                           (fifo, "is not a directory")):
            with pytest.raises(EngineError) as refused:
                resolve_model_path(str(path))
            assert str(refused.value) == f"local.model: {path} {what} {give}"


class TestListen:
    def test_a_port_out_of_range_is_named(self) -> None:
        """``127.0.0.1:99999``: the port is out of range, not "expected HOST:PORT"."""
        with pytest.raises(ConfigError) as refused:
            parse_listen("127.0.0.1:99999")
        assert refused.value.problems == ["http.listen: port 99999 is out of range (1-65535)"]
        assert check_http(HttpConfig(listen="[::1]:65536")) == [
            "http.listen: port 65536 is out of range (1-65535)"]

    def test_port_0_in_a_config_is_out_of_range_too(self) -> None:
        """Port 0 (a random port: ``tail`` would connect to port 80) is refused from a config,
        worded the same way; the server itself still takes it (tests bind to any free port)."""
        assert check_http(HttpConfig(listen="127.0.0.1:0")) == [
            "http.listen: port 0 is out of range (1-65535; 0 would be a random port that "
            "transcribed tail could not find)"]
        assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
        assert check_http(HttpConfig(listen="0.0.0.0:0"))[0].endswith(   # the worse problem
            "is not a loopback address; set http.token to serve beyond this machine")
        assert check_http(HttpConfig(listen="0.0.0.0:8765", token=SecretStr("t"))) == []

    @pytest.mark.parametrize("listen", ["127.0.0.1:\u00b2", "127.0.0.1:\u0663"])
    def test_a_digit_that_is_not_ascii_is_not_a_port(self, listen: str) -> None:
        """A superscript or Arabic-Indic digit (``str.isdigit`` says yes) is one line, not a
        ValueError traceback from ``int()``."""
        assert check_http(HttpConfig(listen=listen)) == [
            f"http.listen: expected HOST:PORT, got {listen!r}"]


class TestLanguage:
    def test_the_bundled_model_is_named_not_its_site_packages_path(self) -> None:
        """``local.language = "de"`` with the bundled model names "the bundled tiny.en model"."""
        assert language_problems("de", resolve_model_path("")) == [
            "local.language: 'de' is not a language the bundled tiny.en model transcribes (it is "
            "English-only: use 'en' or 'auto', or a multilingual model)"]

    def test_a_model_of_ones_own_is_named_by_its_path(self, tmp_path: Path) -> None:
        """A model at a path of the user's own is still named by that path."""
        shutil.copy(resolve_model_path("") / "vocabulary.txt", tmp_path / "vocabulary.txt")
        assert language_problems("de", tmp_path) == [
            f"local.language: 'de' is not a language {tmp_path} transcribes (it is "
            "English-only: use 'en' or 'auto', or a multilingual model)"]


def _audio_problems(tmp_path: Path, audio: Path, capsys: pytest.CaptureFixture[str]
                    ) -> list[str]:
    """check-config's lines for a file source reading ``audio``."""
    config = tmp_path / "c.toml"
    config.write_text(f'[audio]\nsource = "file"\npath = "{audio}"\n[http]\nenabled = false\n'
                      f'[state]\ndir = "{tmp_path / "state"}"\n')
    assert check_config(argparse.Namespace(config=str(config))) == 78
    return [line.removeprefix(f"{PREFIX}{config}: ")
            for line in capsys.readouterr().err.splitlines()]


class TestAudioPath:
    def test_every_problem_reads_key_path_reason(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Missing, a folder, a text file, another RIFF file: ``audio.path: X: <why>`` each,
        a non-WAV file said plainly (it was Python's "file does not start with RIFF id")."""
        folder = tmp_path / "recordings"
        folder.mkdir()
        text = tmp_path / "notes.wav"
        text.write_text("not audio at all\n" * 10)
        avi = tmp_path / "film.wav"
        avi.write_bytes(b"RIFF" + struct.pack("<I", 4) + b"AVI ")
        expected = {
            tmp_path / "missing.wav": "no such file",
            folder: "a directory, not a WAV file",
            text: "not a WAV file (it does not start with 'RIFF')",
            avi: "not a WAV file (it is a RIFF 'AVI ' file, not WAVE)",
        }
        for audio, why in expected.items():
            assert _audio_problems(tmp_path, audio, capsys) == [f"audio.path: {audio}: {why}"]

    def test_the_reader_says_it_plainly_too(self, tmp_path: Path) -> None:
        """``run``'s reader (the file changed after the check): the same words."""
        text = tmp_path / "notes.wav"
        text.write_text("not audio at all\n")
        with pytest.raises(AudioError) as refused:
            open_wav(text)
        assert str(refused.value) == (
            f"audio file {text}: not a WAV file (it does not start with 'RIFF')")


@pytest.mark.parametrize(
    ("command", "opening"),
    [("run", "Run the daemon in the foreground"),
     ("check-config", "Validate the config and print"),
     ("devices", "List audio input devices"),
     ("test-sinks", "Send one synthetic turn"),
     ("tail", "Attach to the running daemon"),
     ("install-service", "Write the systemd unit")])
def test_each_commands_help_says_what_it_does(
    command: str, opening: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transcribed COMMAND --help``: the usage, then a description, then the options (it was
    the options alone)."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    usage, description, *_rest = capsys.readouterr().out.split("\n\n")
    assert usage.startswith(f"usage: transcribed {command} ")
    assert " ".join(description.split()).startswith(opening), description
