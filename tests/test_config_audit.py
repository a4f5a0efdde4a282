"""A new user's audit of the configuration: what check-config said, and what it should have."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from daemon.commands import check_config
from daemon.config import Settings, find_config
from daemon.service import plan

PREFIX = "transcribed: config error: "


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """check-config's problem lines (it must exit 78), without the common prefix."""
    assert check_config(argparse.Namespace(config=str(path))) == 78
    return [line.removeprefix(PREFIX) for line in capsys.readouterr().err.splitlines()]


def passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config(argparse.Namespace(config=str(path))) == 0, capsys.readouterr().err
    capsys.readouterr()


class TestTypeFromTheEnvironment:
    def test_the_variable_that_changed_the_type_is_named(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """The file's `path` is valid for its `type = "file"`: the variable that made the sink a
        console one made it unknown, and the line names both, and the type it was read for."""
        path = write(tmp_path / "cfg.toml", '[sinks.journal]\ntype = "file"\n'
                     f'path = "{tmp_path}/turns.jsonl"\n')
        passes(path, capsys)
        monkeypatch.setenv("TRANSCRIBED_SINKS__JOURNAL__TYPE", "console")
        assert problems(path, capsys) == [
            f"{path}, environment TRANSCRIBED_SINKS__JOURNAL__TYPE: sinks.journal.path: "
            "unknown key for type 'console'"]

    def test_a_key_from_the_environment_names_the_files_type(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """The other way round: the key from a variable, the type it does not fit from the file."""
        path = write(tmp_path / "cfg.toml", '[sinks.screen]\ntype = "console"\n')
        monkeypatch.setenv("TRANSCRIBED_SINKS__SCREEN__PATH", str(tmp_path / "t.jsonl"))
        assert problems(path, capsys) == [
            f"{path}, environment TRANSCRIBED_SINKS__SCREEN__PATH: sinks.screen.path: "
            "unknown key for type 'console'"]

    def test_both_from_the_environment_name_no_file(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        path = write(tmp_path / "cfg.toml", '[sinks.journal]\ntype = "file"\n')
        monkeypatch.setenv("TRANSCRIBED_SINKS__JOURNAL__TYPE", "console")
        monkeypatch.setenv("TRANSCRIBED_SINKS__JOURNAL__KEEP", "3")
        assert problems(path, capsys) == [
            "environment TRANSCRIBED_SINKS__JOURNAL__KEEP, TRANSCRIBED_SINKS__JOURNAL__TYPE: "
            "sinks.journal.keep: unknown key for type 'console'"]

    def test_a_table_the_file_alone_set_is_as_before(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The type stands in the same table: the line stays as it was."""
        path = write(tmp_path / "cfg.toml", '[sinks.screen]\ntype = "console"\npath = "x"\n')
        assert problems(path, capsys) == [f"{path}: sinks.screen.path: unknown key"]


class TestRelativeXdgFolders:
    @pytest.fixture
    def home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """A home of its own, and a working folder holding ``relative/dir``."""
        home = tmp_path / "home"
        monkeypatch.setenv("HOME", str(home))
        work = tmp_path / "work"
        (work / "relative" / "dir" / "transcribed").mkdir(parents=True)
        monkeypatch.chdir(work)
        return home

    def test_a_relative_config_home_is_ignored(self, home: Path) -> None:
        """The XDG Base Directory spec: a relative ``$XDG_CONFIG_HOME`` is invalid, ignored."""
        write(Path("relative/dir/transcribed/config.toml"), "")
        ours = home / ".config" / "transcribed" / "config.toml"
        ours.parent.mkdir(parents=True)
        write(ours, "")
        assert find_config(None, {"XDG_CONFIG_HOME": "relative/dir"}) == ours

    def test_a_relative_state_home_is_ignored(self, home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")
        assert Settings().state_path() == home / ".local" / "state" / "transcribed"

    def test_install_service_ignores_a_relative_config_home(self, home: Path) -> None:
        target = plan(system=False, executable="/usr/bin/transcribed",
                      env={"XDG_CONFIG_HOME": "relative/dir", "HOME": str(home)})
        assert target.config_path == home / ".config" / "transcribed" / "config.toml"
        assert target.unit_path == home / ".config" / "systemd" / "user" / "transcribed.service"


class TestFileSinkPath:
    def test_a_folder_is_a_config_error(self, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        """`run` failed every send for ever ("Is a directory") after check-config passed."""
        folder = tmp_path / "transcripts"
        folder.mkdir()
        path = write(tmp_path / "cfg.toml",
                     f'[sinks.journal]\ntype = "file"\npath = "{folder}"\n')
        assert problems(path, capsys) == [
            f"{path}: sinks.journal.path: {folder} is a directory (name a file in it)"]

    def test_a_path_below_a_file_is_a_config_error(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Its parent, or a folder further up, is a regular file: it can never be created."""
        blocker = write(tmp_path / "notes", "")
        path = write(tmp_path / "cfg.toml", '[sinks.journal]\ntype = "file"\n')
        monkeypatch.setenv("TRANSCRIBED_SINKS__JOURNAL__PATH", f"{blocker}/day/turns.jsonl")
        assert problems(path, capsys) == [
            f"environment TRANSCRIBED_SINKS__JOURNAL__PATH: sinks.journal.path: "
            f"{blocker}/day/turns.jsonl cannot be created: {blocker} is not a directory"]

    def test_a_missing_folder_passes_and_is_not_created(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The sink creates its folder when it starts; checking the config creates nothing."""
        target = tmp_path / "new" / "turns.jsonl"
        path = write(tmp_path / "cfg.toml", f'[sinks.journal]\ntype = "file"\npath = "{target}"\n')
        passes(path, capsys)
        assert not target.parent.exists()


class TestTurnSilence:
    def test_min_above_max_names_both_keys(self, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """A turn ends after max_turn_silence of silence whatever the confidence, and a confident
        one after min_turn_silence (the protocol reference, "Turn-detection presets"): a minimum
        above the maximum is a mistake."""
        path = write(tmp_path / "cfg.toml",
                     "[assemblyai]\nmin_turn_silence = 2000\nmax_turn_silence = 1000\n")
        line = "assemblyai.min_turn_silence: must not exceed assemblyai.max_turn_silence"
        assert problems(path, capsys) == [f"{path}: {line} (got 2000 > 1000)"]
        monkeypatch.setenv("TRANSCRIBED_ASSEMBLYAI__MAX_TURN_SILENCE", "1500")
        assert problems(path, capsys) == [
            f"{path}, environment TRANSCRIBED_ASSEMBLYAI__MAX_TURN_SILENCE: {line} "
            "(got 2000 > 1500)"]

    def test_equal_or_below_passes(self, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
        for low in (1000, 160):
            passes(write(tmp_path / "cfg.toml", f"[assemblyai]\nmin_turn_silence = {low}\n"
                         "max_turn_silence = 1000\n"), capsys)
