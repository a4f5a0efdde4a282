"""A secret in a file every user of the machine can read is warned about, never shown.

README told users to keep the config at mode 0600 "(it may come to hold secrets)", but nothing
said so when it was 0644 (the usual umask) with an API key, a token or a sink's password in it,
or when a secret file it names was.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import REPO, SPEECH_DIR, TRANSCRIBED
from tests.daemon_proc import Daemon, cloud_config
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_check_config_names_readable_secret_files(tmp_path: Path) -> None:
    key_file, secret_file = tmp_path / "api_key", tmp_path / "webhook_secret"
    key_file.write_text("k3y-in-a-file\n")
    secret_file.write_text(WEBHOOK_SECRET)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[assemblyai]\napi_key_file = "{key_file}"\n[http]\ntoken = "t0ken-inline"\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        f'[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/in"\n'
        f'secret_file = "{secret_file}"\n'
        f'[sinks.bus]\ntype = "mqtt"\nhost = "127.0.0.1"\nusername = "u"\n'
        f'password = "pa55-inline"\n')
    for path in (key_file, secret_file, config):
        path.chmod(0o644)
    done = _check(config)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"transcribed: warning: {config}: every user can read it (mode 0644) and it holds "
        f"http.token, sinks.bus.password: chmod o-rwx {config}",
        f"transcribed: warning: {key_file}: every user can read it (mode 0644) and it holds "
        f"assemblyai.api_key_file: chmod o-rwx {key_file}",
        f"transcribed: warning: {secret_file}: every user can read it (mode 0644) and it holds "
        f"sinks.hook.secret_file: chmod o-rwx {secret_file}",
    ]
    for secret in ("k3y-in-a-file", "t0ken-inline", "pa55-inline", WEBHOOK_SECRET):
        assert secret not in done.stdout + done.stderr
    for path in (key_file, secret_file, config):
        path.chmod(0o640)           # a group may read: usual with user private groups
    assert _check(config).stderr == ""


def test_no_warning_without_a_secret(tmp_path: Path) -> None:
    """A readable config that holds no secret (a webhook URL's path is not taken for one)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n'
                      '[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/in/path"\n')
    config.chmod(0o644)
    done = _check(config)
    assert (done.returncode, done.stderr) == (0, "")


async def test_run_logs_it(tmp_path: Path) -> None:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, "espeak-s1.wav")) as fake:
        fake.faults.key_revoked = True      # run ends at once (exit 77), after its start
        config = cloud_config(tmp_path, fake, SPEECH_DIR / "espeak-s1.wav")
        config.chmod(0o644)
        daemon = await Daemon.start("run", "--config", str(config))
        result = await daemon.finish(30)
    assert result.code == 77, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [said] = [line for line in lines if line["event"] == "config.secret_readable"]
    assert said["file"] == str(config) and said["mode"] == "0644"
    assert said["holds"] == ["assemblyai.api_key"] and said["level"] == "warning"
    assert fake.api_key not in result.stderr
