"""Shared fixtures. Fixture modules of their own live beside this file (servers, vmic, broker)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon import logs
from daemon.logoutput import LogOutput
from tests.vmic import VirtualMic

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = REPO / "tests" / "data" / "speech"
TRANSCRIPTS: dict[str, str] = json.loads((SPEECH_DIR / "transcripts.json").read_text())
TRANSCRIBED = [sys.executable, "-m", "daemon"]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def pytest_configure(config: pytest.Config) -> None:
    """Programs the tests start hear Ctrl-C (SIGINT) as from a terminal.

    A suite started in the background by a shell without job control (``scripts/test.sh &``
    in a script) inherits SIGINT ignored, and so would every daemon it starts: the tests that
    send SIGINT would see it ignored. An ignored signal is inherited across ``exec``, a handled
    one is reset to the default, so handling it here gives the children the default.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.cache
def _nobody_can_run() -> str:
    """Why uid 65534 cannot run this checkout's ``transcribed`` ("" when it can)."""
    if os.geteuid() != 0:
        return "only root can run a program as another user"
    try:
        done = subprocess.run([*AS_NOBODY, *TRANSCRIBED, "--version"], cwd=REPO,
                              capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"setpriv: {exc.strerror}"
    return "" if done.returncode == 0 else (
        f"uid 65534 cannot run {sys.executable} here (a checkout below a private folder): "
        f"{done.stderr.strip()[:200]}")


def as_nobody() -> list[str]:
    """The command prefix that runs a program as uid 65534, a user without root's rights; the
    test is skipped, saying why, where that user cannot run this checkout."""
    if why := _nobody_can_run():
        pytest.skip(why)
    return AS_NOBODY


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Tests never read the user's config or state, nor leak TRANSCRIBED_* settings."""
    for key in list(os.environ):
        if key.startswith("TRANSCRIBED_") or key in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    structlog.reset_defaults()
    _forget_log_output()


def _forget_log_output() -> None:
    """The root handler a test's ``logs.configure`` left on that test's stream goes with it.

    A later test's library line went to it: to a stream closed since (the line counted as
    lost, then a notice rendered by the next test's processors) or to a descriptor number a
    later file was given.
    """
    logs.close()
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers
                        if not isinstance(getattr(h, "stream", None), LogOutput)]


@pytest.fixture(scope="session")
def vmic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualMic]:
    """A private PulseAudio acting as the default microphone, for the whole session."""
    with VirtualMic.running(tmp_path_factory.mktemp("vmic")) as mic:
        yield mic


@pytest.fixture
def speech_dir() -> Path:
    """The directory of test speech WAVs (with ``transcripts.json``)."""
    return SPEECH_DIR
