"""Bad ``local.model`` directories: one line naming the path, the same from check-config and run.

Everything that can be told without loading the model is told by ``resolve_model_path``, which
``check-config`` and ``run`` (before it starts anything) both call: these used to pass
check-config and then fail in ``run`` at load time (exit 1, a line from CTranslate2's insides),
or to be a traceback.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("faster_whisper", reason="the local engine needs the 'local' extra")

from daemon.config import LocalConfig
from daemon.errors import EngineError
from daemon.recognizer import load_model, resolve_model_path
from tests.conftest import SPEECH_DIR
from tests.daemon_proc import run_daemon
from tests.test_local import bundled_model, check_config, model_copy

PREFIX = "transcribed: config error: "


def config_for(tmp_path: Path, model: str) -> Path:
    """A config using the offline engine on a short WAV, with ``local.model = model``."""
    config = tmp_path / "c.toml"
    config.write_text(f"""
[audio]
source = "file"
path = "{SPEECH_DIR / "espeak-s5.wav"}"
[transcriber]
engine = "local"
[http]
enabled = false
[state]
dir = "{tmp_path / "state"}"
[sinks.journal]
type = "file"
path = "{tmp_path / "turns.jsonl"}"
[local]
model = {json.dumps(model)}
""")
    return config


def weights(spec: str, variables: int = 0, version: int = 6) -> bytes:
    """A CTranslate2 ``model.bin`` (binary ``version``) of ``variables`` one-byte variables."""
    def text(value: str) -> bytes:
        raw = value.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    body = b"".join(text(f"v{i}") + bytes([0, 1]) + struct.pack("<I", 1) + b"\0"
                    for i in range(variables))
    return (struct.pack("<I", version) + text(spec) + struct.pack("<II", 1, variables) + body
            + struct.pack("<I", 0))


class TestWhatIsNoModelDirectory:
    def test_a_file_is_named_as_a_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """local.model = the model.bin itself: said to be a file (it said "missing model.bin")."""
        target = bundled_model() / "model.bin"
        config = config_for(tmp_path, str(target))
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: {target} is a file, not a model directory (give "
            "the directory holding model.bin, config.json and tokenizer.json)"])

    def test_a_model_name_is_not_downloaded(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A Hugging Face name ("tiny.en") is a relative path that does not exist: the line says
        where it was looked for and that nothing is fetched."""
        config = config_for(tmp_path, "tiny.en")
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: tiny.en: no such directory (a relative path is "
            f"taken from {Path.cwd()}, and model names are not downloaded)"])

    def test_a_symlink_loop_is_named(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        config = config_for(tmp_path, str(tmp_path / "a"))
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: {tmp_path / 'a'} is a symbolic link loop"])

    def test_a_path_that_cannot_be_looked_at_is_a_line_not_a_traceback(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A name too long (like EACCES under ProtectHome=yes) raised OSError out of check-config
        and run: a traceback, exit 1."""
        name = "x" * 300
        config = config_for(tmp_path, name)
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: cannot look at {name}: File name too long"])


class TestDamagedModels:
    def test_no_vocabulary_is_named_before_loading(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without vocabulary.txt check-config passed; run failed loading (exit 1)."""
        folder = model_copy(tmp_path / "model")
        (folder / "vocabulary.txt").unlink()
        config = config_for(tmp_path, str(folder))
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: {folder} is not a CTranslate2 Whisper model "
            "directory (missing vocabulary.json or vocabulary.txt)"])

    def test_a_truncated_vocabulary_json_names_the_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Half a vocabulary.json: the file is named (the loader's line named only the folder)."""
        tokens = (bundled_model() / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
        text = json.dumps(tokens).encode()
        folder = model_copy(tmp_path / "model")
        (folder / "vocabulary.txt").unlink()
        (folder / "vocabulary.json").write_bytes(text[: len(text) // 2])
        config = config_for(tmp_path, str(folder))
        code, lines = check_config(config, capsys)
        assert code == 78 and len(lines) == 1
        assert lines[0].startswith(f"{PREFIX}{config}: local.model: cannot read "
                                   f"{folder / 'vocabulary.json'}: Unterminated string")

    def test_a_whole_vocabulary_json_is_a_vocabulary(self, tmp_path: Path) -> None:
        """vocabulary.json instead of vocabulary.txt is a model CTranslate2 loads: accepted."""
        tokens = (bundled_model() / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
        folder = model_copy(tmp_path / "model")
        (folder / "vocabulary.txt").unlink()
        (folder / "vocabulary.json").write_text(json.dumps(tokens), encoding="utf-8")
        assert resolve_model_path(str(folder)) == folder

    @pytest.mark.parametrize("size", [0, 1024])
    def test_a_truncated_model_bin_is_named(
        self, size: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """model.bin cut short passed check-config; loading said "Variable 'decoder/embeddings/
        weight' has an invalid payload size" (exit 1)."""
        with (bundled_model() / "model.bin").open("rb") as original:
            head = original.read(size)
        folder = model_copy(tmp_path / "model", **{"model.bin": head})
        config = config_for(tmp_path, str(folder))
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: {folder / 'model.bin'} is incomplete ({size} bytes, "
            "cut short): copy it again"])

    def test_a_model_that_is_not_whisper_is_named(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Another CTranslate2 model: its kind is named (loading said "[json.exception.
        type_error.302] type must be string, but is null")."""
        folder = model_copy(tmp_path / "model", **{"model.bin": weights("TransformerDecoderSpec",
                                                                        3)})
        config = config_for(tmp_path, str(folder))
        assert check_config(config, capsys) == (78, [
            f"{PREFIX}{config}: local.model: {folder / 'model.bin'} holds a CTranslate2 "
            "TransformerDecoderSpec model, not Whisper"])

    def test_another_binary_version_is_left_to_the_library(self, tmp_path: Path) -> None:
        """Only the layout CTranslate2 writes now is walked: a model of another binary version
        (an older converter, or a newer one) is not refused on a guess at its layout."""
        folder = model_copy(tmp_path / "model", **{"model.bin": weights("Other", 3, version=7)})
        assert resolve_model_path(str(folder)) == folder

    def test_load_model_refuses_the_same(self, tmp_path: Path) -> None:
        """The engine's own load (used when nothing validated first) says the same."""
        folder = model_copy(tmp_path / "model", **{"model.bin": weights("WhisperSpec")[:-2]})
        config = LocalConfig.model_validate({"model": str(folder)})
        with pytest.raises(EngineError, match=re.escape(f"{folder / 'model.bin'} is incomplete")):
            load_model(config)

    def test_the_bundled_model_passes(self) -> None:
        """The walk over model.bin accepts a real Whisper model."""
        assert resolve_model_path("") == bundled_model()


async def test_run_says_what_check_config_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run`` on a truncated model.bin: exit 78 and check-config's line, not exit 1 after
    loading."""
    folder = model_copy(tmp_path / "model", **{"model.bin": b"\x06\0\0\0"})
    config = config_for(tmp_path, str(folder))
    checked = check_config(config, capsys)
    result = await run_daemon("run", "--config", str(config), limit_s=30)
    assert checked[0] == result.code == 78
    assert checked[1] == [line for line in result.stderr.splitlines()
                          if line.startswith(PREFIX)], result.stderr[-2000:]
