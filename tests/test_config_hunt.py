"""Odd config files: each is one line naming the file (and key), exit 78, never a traceback,
a hang or a read without end."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
from pathlib import Path

import pytest

from daemon.commands import check_config
from tests.conftest import REPO, TRANSCRIBED


def _problems(config: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """check-config's problem lines for ``config`` (it must exit 78), without the prefix."""
    assert check_config(argparse.Namespace(config=config)) == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    return [line.removeprefix("transcribed: config error: ")
            for line in captured.err.splitlines()]


def _limit_memory() -> None:
    """In the child: at most 2 GiB of address space, so that a read without end fails fast."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_an_integer_python_will_not_read(tmp_path: Path) -> None:
    """An integer of more than 4300 digits (``int()``'s limit) was a ValueError traceback, exit 1,
    from check-config and run alike (and a reload): now one line naming the file, exit 78."""
    path = tmp_path / "c.toml"
    path.write_text('[sinks.f]\ntype = "file"\npath = "/tmp/x.jsonl"\n'
                    f"rotate_bytes = {'9' * 5000}\n")
    for command in ("check-config", "run"):
        result = subprocess.run([*TRANSCRIBED, command, "--config", str(path)], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=False)
        assert (result.returncode, result.stderr) == (
            78, f"transcribed: config error: {path}: invalid TOML: an integer of more than "
                "4300 digits\n")


def test_a_file_too_large_for_a_config_is_not_read(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A config file over 1 MiB is refused: a sparse file (or a disk image named by mistake) was
    read whole into memory, twice over, before TOML found it wrong; 8 GiB here (no disk used)
    with the address space limited to 2 GiB was a MemoryError traceback, exit 1."""
    sparse = tmp_path / "sparse.toml"
    with sparse.open("wb") as handle:
        handle.truncate(8 << 30)
    result = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(sparse)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False,
                            preexec_fn=_limit_memory)
    assert (result.returncode, result.stderr) == (
        78, f"transcribed: config error: {sparse}: larger than 1 MiB, too large for a config "
            "file\n")
    comments = tmp_path / "c.toml"
    comments.write_text("#" * (1 << 20) + "\n")          # valid TOML, one byte over
    assert _problems(str(comments), capsys) == [
        f"{comments}: larger than 1 MiB, too large for a config file"]
    comments.write_text("#" * ((1 << 20) - 1) + "\n")    # at the limit: read
    assert check_config(argparse.Namespace(config=str(comments))) == 0


def test_a_file_name_with_a_line_break_is_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A config file, ``audio.path`` or ``state.dir`` whose name holds a line break or a
    terminal escape is named escaped: one line per problem, nothing the terminal acts on."""
    odd = "new\nline\x1b[2J"
    path = tmp_path / f"{odd}.toml"
    path.write_text('[log]\nlevel = "loud"\n')
    assert _problems(str(path), capsys) == [
        f"{str(path)!r}: log.level: Input should be 'debug', 'info', 'warning' or 'error'"]
    path.write_text("[log\n")
    assert _problems(str(path), capsys) == [
        f"{str(path)!r}: invalid TOML: Expected ']' at the end of a table declaration "
        "(at line 1, column 5)"]
    assert _problems(str(tmp_path / f"{odd}.missing"), capsys) == [
        f"{str(tmp_path / f'{odd}.missing')!r}: config file not found"]
    state = tmp_path / f"{odd}.state"
    state.write_text("")
    audio = tmp_path / f"{odd}.wav"
    path.write_text(f'[audio]\nsource = "file"\npath = {json.dumps(str(audio))}\n'
                    f"[state]\ndir = {json.dumps(str(state))}\n")
    assert _problems(str(path), capsys) == [
        f"{str(path)!r}: audio.path: {str(audio)!r}: no such file",
        f"{str(path)!r}: state.dir: {str(state)!r} exists and is not a directory"]


def test_an_empty_config_option_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--config "$CONF"`` with ``CONF`` unset ran on whatever the lookup found (the defaults
    here), exit 0, instead of the file meant."""
    assert _problems("", capsys) == [
        "--config: an empty path (name a file, or leave --config out)"]


def test_a_loop_of_links_is_not_called_missing(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A named config file that is a link to nothing, or a loop of links, says so (it said
    ``config file not found``, with the link right there)."""
    (tmp_path / "a.toml").symlink_to(tmp_path / "b.toml")
    (tmp_path / "b.toml").symlink_to(tmp_path / "a.toml")
    (tmp_path / "gone.toml").symlink_to(tmp_path / "nothing.toml")
    for name in ("a.toml", "gone.toml"):
        assert _problems(str(tmp_path / name), capsys) == [
            f"{tmp_path / name}: a link to a missing file"]


def test_keys_that_are_not_one_key_part_are_quoted(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``[sinks."a.b"]`` was named ``sinks.a.b`` (the key ``b`` of a sink ``a``?), ``[sinks.""]``
    ``sinks.`` and ``[sinks."a b"]`` ``sinks.a b``: quoted, each is plainly one name."""
    path = tmp_path / "c.toml"
    path.write_text('[audio]\n"x.y" = 1\n[sinks."a.b"]\ntype = "console"\n'
                    '[sinks." "]\ntype = "console"\n[sinks.""]\ntype = "console"\n'
                    '[sinks."a:b"]\ntype = "console"\n')
    rule = ("a sink name is lower-case letters, digits, '_' or '-' (environment overrides are "
            "matched in lower case)")
    assert _problems(str(path), capsys) == [
        f"{path}: audio.'x.y': unknown key",
        f"{path}: sinks.'a.b': {rule}", f"{path}: sinks.' ': {rule}",
        f"{path}: sinks.'': {rule}", f"{path}: sinks.'a:b': {rule}"]


def test_a_section_that_is_not_a_table_names_no_class(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``[[audio]]`` or ``log = 3`` said "… or instance of AudioConfig": a class of ours, no
    word of the config's."""
    path = tmp_path / "c.toml"
    path.write_text('log = 3\n[[audio]]\nsource = "file"\n')
    assert _problems(str(path), capsys) == [
        f"{path}: audio: expected a table, found an array",
        f"{path}: log: expected a table, found an integer"]


def test_odd_but_valid_files_still_load(tmp_path: Path) -> None:
    """CRLF line ends, a 1000-sink file and an integer of 4300 digits (a device index no
    device has, but TOML) are read as before."""
    path = tmp_path / "c.toml"
    path.write_bytes(b'[log]\r\nlevel = "debug"\r\n[audio]\r\ndevice = ' + b"9" * 4300 + b"\r\n"
                     + b"".join(f'[sinks.s{i}]\r\ntype = "console"\r\n'.encode()
                                for i in range(1000)))
    assert check_config(argparse.Namespace(config=str(path))) == 0
    assert os.path.getsize(path) < 1 << 20


def test_a_secret_file_name_with_a_line_break_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``api_key_file`` named with a line break split its problem over two lines."""
    config = tmp_path / "config.toml"
    config.write_text('[assemblyai]\napi_key_file = "/nowhere/no\\nkey"\n')
    problems = _problems(str(config), capsys)
    assert len(problems) == 1, problems
    assert "'/nowhere/no\\nkey'" in problems[0], problems


def test_a_sink_type_that_is_not_text_is_not_repeated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``type = {…}`` printed the whole value (whatever it held: a pasted secret); a long type
    name was printed in full."""
    config = tmp_path / "config.toml"
    config.write_text('[sinks.a]\ntype = {token = "sk-live-do-not-print"}\n'
                      f'[sinks.b]\ntype = "{"x" * 5000}"\n')
    problems = _problems(str(config), capsys)
    assert not any("sk-live-do-not-print" in p for p in problems), problems
    assert any("sinks.a.type: must be text (a type name)" in p for p in problems), problems
    assert all(len(p) < 400 for p in problems), [len(p) for p in problems]
