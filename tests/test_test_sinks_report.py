"""``test-sinks``' report: one line per sink, nothing else at the default log level.

The sinks' own log lines (an MQTT ``mqtt.connect_failed`` with a ``retry_in_s`` no retry
followed) came between the report's lines; a broker that refused the connection was reported
only after the sink's ``timeout_s`` (or the command's 15 s); a disabled sink was not named; the
test record said ``"engine": "local"`` whatever engine was configured.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import REPO, TRANSCRIBED
from tests.mosquitto import free_port


def test_one_line_per_sink_and_no_log_lines(tmp_path: Path) -> None:
    journal = tmp_path / "turns.jsonl"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[transcriber]\nengine = "assemblyai"\n[assemblyai]\napi_key = "k3y-not-used"\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        f'[sinks.bus]\ntype = "mqtt"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'timeout_s = 30\n'
        f'[sinks.journal]\ntype = "file"\npath = "{journal}"\n'
        f'[sinks.spare]\ntype = "file"\npath = "{tmp_path / "spare.jsonl"}"\nenabled = false\n')
    done = subprocess.run([*TRANSCRIBED, "test-sinks", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    bus, delivered, skipped = done.stdout.splitlines()
    assert bus.startswith("bus (mqtt): FAILED: ") and "Connection refused" in bus, bus
    assert delivered == "journal (file): delivered"
    assert skipped == "spare (file): skipped (enabled = false)"
    assert done.stderr == ""
    assert json.loads(journal.read_text())["engine"] == "assemblyai"
    assert not (tmp_path / "spare.jsonl").exists()
