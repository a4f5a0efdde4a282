"""The file sink's ``keep`` lowered: rotations beyond it are removed at the next rotation.

Lowering ``keep`` (5 to 2) left ``turns.jsonl.3`` … ``.5`` on disk for ever. A rotation now
removes ``path.<keep+1>``, ``path.<keep+2>`` … up to the first missing one (or one that is not a
file), and a removal that fails is one warning, never a lost turn.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.plugins import SinkContext
from plugins.file import FileSink, FileSinkConfig
from tests.test_sinks_local import record

CONTEXT = SinkContext(host="h", state_dir=Path("/nonexistent"))


def config(path: Path, keep: int) -> FileSinkConfig:
    """Every record rotates a file that already holds something (``rotate_bytes`` is tiny)."""
    return FileSinkConfig(type="file", path=str(path), rotate_bytes=10, keep=keep, fsync=False)


def left_by_keep_5(path: Path, *indexes: int) -> None:
    """The current file and the rotations ``indexes`` a higher ``keep`` left behind."""
    path.write_text("old\n")
    for index in indexes:
        Path(f"{path}.{index}").write_text(f"r{index}\n")


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


async def test_lowered_keep_removes_higher_rotations_at_the_next_rotation(tmp_path: Path) -> None:
    """Nothing is removed at start; the first rotation leaves exactly ``keep`` rotated files,
    a symlink goes but not what it points to, and a file that only looks like a rotation
    (``.x``, ``.05``) is left alone."""
    path = tmp_path / "t.jsonl"
    left_by_keep_5(path, 1, 2, 3, 5)
    for other in ("t.jsonl.x", "t.jsonl.05", "target"):
        (tmp_path / other).write_text("mine\n")
    (tmp_path / "t.jsonl.4").symlink_to(tmp_path / "target")
    async with FileSink("j", config(path, keep=2), CONTEXT) as sink:
        assert len(names(tmp_path)) == 9    # start removes nothing: the rotation does
        await sink.send(record(0))
    assert names(tmp_path) == [
        "t.jsonl", "t.jsonl.05", "t.jsonl.1", "t.jsonl.2", "t.jsonl.x", "target"]
    assert (tmp_path / "target").read_text() == "mine\n"
    assert ids(path) == ["s:0"]
    assert [(tmp_path / n).read_text() for n in ("t.jsonl.1", "t.jsonl.2")] == ["old\n", "r1\n"]


async def test_a_gap_stops_the_sweep(tmp_path: Path) -> None:
    """``.3`` missing: ``.4`` and ``.5`` are not this sink's run of rotations, and stay."""
    path = tmp_path / "t.jsonl"
    left_by_keep_5(path, 1, 2, 4, 5)
    async with FileSink("j", config(path, keep=1), CONTEXT) as sink:
        await sink.send(record(0))
    assert names(tmp_path) == ["t.jsonl", "t.jsonl.1", "t.jsonl.4", "t.jsonl.5"]
    assert ids(path) == ["s:0"]


async def test_a_folder_is_never_removed_and_stops_the_sweep(tmp_path: Path) -> None:
    """``.3`` (a file) goes; ``.4``, a folder, stays with what is in it, and so does ``.5``;
    the turn is written and nothing is logged as failed."""
    path = tmp_path / "t.jsonl"
    left_by_keep_5(path, 1, 2, 3, 5)
    (tmp_path / "t.jsonl.4").mkdir()
    (tmp_path / "t.jsonl.4" / "keep-me").write_text("x")
    with capture_logs() as logs:
        async with FileSink("j", config(path, keep=2), CONTEXT) as sink:
            await sink.send(record(0))
    assert names(tmp_path) == ["t.jsonl", "t.jsonl.1", "t.jsonl.2", "t.jsonl.4", "t.jsonl.5"]
    assert (tmp_path / "t.jsonl.4" / "keep-me").read_text() == "x"
    assert ids(path) == ["s:0"]
    assert [e for e in logs if e["log_level"] == "warning"] == []


async def test_keep_0_starts_the_file_again_and_removes_old_rotations(tmp_path: Path) -> None:
    """``keep = 0``: the file is started again, and rotations a higher ``keep`` left go."""
    path = tmp_path / "t.jsonl"
    left_by_keep_5(path, 1, 2)
    async with FileSink("j", config(path, keep=0), CONTEXT) as sink:
        await sink.send(record(0))
    assert names(tmp_path) == ["t.jsonl"]
    assert ids(path) == ["s:0"]


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Path]:
    """A file no one may remove (``chattr +i``; root on a file system that has it)."""
    target = tmp_path / "t.jsonl.2"
    target.write_text("r2\n")
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(target)], capture_output=True,
                                        timeout=10, check=False).returncode != 0:
        pytest.skip("cannot make a file immutable here (chattr +i needs root and ext4/xfs…)")
    try:
        yield target
    finally:
        subprocess.run([chattr, "-i", str(target)], capture_output=True, timeout=10, check=True)


async def test_a_removal_that_fails_is_one_warning_and_loses_no_turn(
    tmp_path: Path, immutable: Path
) -> None:
    """Three rotations that cannot remove ``.2``: one warning naming it and why; each turn
    is written (the last two files hold the last two turns)."""
    path = tmp_path / "t.jsonl"
    path.write_text("old\n")
    with capture_logs() as logs:
        async with FileSink("j", config(path, keep=1), CONTEXT) as sink:
            for i in range(3):
                await sink.send(record(i))
    assert ids(Path(f"{path}.1")) == ["s:1"] and ids(path) == ["s:2"]
    assert immutable.exists()
    failed = [e for e in logs if e["event"] == "file.rotate_failed"]
    assert [(e["path"], e["error"]) for e in failed] == [
        (str(path), f"cannot remove {immutable}: Operation not permitted")]


async def test_a_linked_path_rotates_the_file_it_names(tmp_path: Path) -> None:
    """``path`` a symbolic link to a file elsewhere (``~/turns.jsonl`` -> ``/data/turns.jsonl``):
    the rotation renames that file beside it and the link names the new one, so every turn
    stays in the folder the link points to. The link itself was rotated: later turns went to
    a new regular file where the link was."""
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    home.mkdir()
    (data / "t.jsonl").write_text("old\n")
    (home / "t.jsonl").symlink_to(data / "t.jsonl")
    async with FileSink("j", config(home / "t.jsonl", keep=2), CONTEXT) as sink:
        for n in range(3):
            await sink.send(record(n))
    assert names(home) == ["t.jsonl"] and (home / "t.jsonl").is_symlink()
    assert names(data) == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    assert ids(data / "t.jsonl") == [record(2).id]
    assert ids(data / "t.jsonl.1") == [record(1).id]
