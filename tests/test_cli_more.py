"""The command line under systemd: what ``systemctl status`` is left with when ``run`` fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon import service
from daemon.notify import Notifier
from daemon.recognizer import resolve_model_path
from tests.conftest import REPO, SPEECH_DIR, TRANSCRIBED, TRANSCRIPTS, as_nobody
from tests.daemon_proc import Daemon, cloud_config, read_turns
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.notify_socket import NotifySocket
from tests.vmic import VirtualMic

S1 = "espeak-s1.wav"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as server:
        yield server


async def _run_with_socket(tmp_path: Path, *args: str, env: dict[str, str] | None = None
                           ) -> tuple[int, str, list[str]]:
    """``transcribed run ARGS`` with a real NOTIFY_SOCKET: exit code, stderr, STATUS= lines."""
    async with NotifySocket.listening(tmp_path / "notify.sock") as sock:
        daemon = await Daemon.start("run", *args, env={**(env or {}), **sock.env()})
        result = await daemon.finish(30)
        async with asyncio.timeout(5):       # the datagrams sent before exit, all read
            while True:
                count = len(sock.messages)
                try:
                    async with asyncio.timeout(0.5):
                        await sock.wait_for(lambda _m: True, after=count)
                except TimeoutError:
                    break
    return result.code, result.stderr, [m.fields["STATUS"] for m in sock.with_key("STATUS")]


class TestLastStatusOnFailure:
    """systemd keeps a dead unit's last ``STATUS=``: ``systemctl status`` shows it as the
    headline. It said ``stopping (input ended)`` after the credentials were rejected (exit 77),
    and nothing at all after a config error: it must say why the daemon stopped."""

    async def test_rejected_key_says_so(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        fake.faults.key_revoked = fake.faults.echo_key = True
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        code, stderr, statuses = await _run_with_socket(tmp_path, "--config", str(config))
        assert code == 77, stderr
        assert statuses[-1].startswith("failed (exit 77): "), statuses
        assert "assemblyai.api_key" in statuses[-1]
        assert not [s for s in statuses if "input ended" in s], statuses    # STOPPING=1's too
        assert not [s for s in statuses if fake.api_key in s]

    async def test_config_error_at_start_says_so(self, tmp_path: Path) -> None:
        config = tmp_path / "config.toml"
        config.write_text("[audio]\nchunk_ms = 5\nbogus = 1\n")
        code, stderr, statuses = await _run_with_socket(tmp_path, "--config", str(config))
        assert code == 78, stderr
        assert statuses == [f"failed (exit 78): config error: {config}: audio.chunk_ms: Input "
                            "should be greater than or equal to 50 (and 1 more problem)"]

    async def test_unexpected_failure_says_so(self, tmp_path: Path) -> None:
        """Exit 1 (here: a tokenizer.json that is valid JSON but no tokenizer: check-config
        does not read the tokenizer, so only loading it finds out)."""
        model = tmp_path / "model"
        model.mkdir()
        for name in ("model.bin", "config.json", "vocabulary.txt"):
            (model / name).symlink_to(resolve_model_path("") / name)
        (model / "tokenizer.json").write_text('{"x": 1}')
        config = tmp_path / "config.toml"
        config.write_text(f'[audio]\nsource = "file"\npath = "{SPEECH_DIR / S1}"\n'
                          f'[transcriber]\nengine = "local"\n[local]\nmodel = "{model}"\n'
                          f'[http]\nenabled = false\n[state]\ndir = "{tmp_path / "state"}"\n')
        code, stderr, statuses = await _run_with_socket(tmp_path, "--config", str(config))
        assert code == 1, stderr
        assert statuses[-1].startswith(f"failed (exit 1): local.model: cannot load {model}"), \
            statuses

    async def test_ambiguous_microphone_is_a_config_error(self, vmic: VirtualMic,
                                                          tmp_path: Path) -> None:
        """A microphone name matching several devices: exit 78 (systemd does not restart it),
        the devices named (a missing one is waited for instead)."""
        config = tmp_path / "config.toml"
        config.write_text('[audio]\ndevice = "e"\n[transcriber]\n'
                          'engine = "local"\n[http]\nenabled = false\n'
                          f'[state]\ndir = "{tmp_path / "state"}"\n')
        code, stderr, statuses = await _run_with_socket(tmp_path, "--config", str(config),
                                                        env=vmic.env())
        assert code == 78, stderr
        assert statuses[-1].startswith("failed (exit 78): "), statuses
        assert "audio device 'e' matches 2 input devices" in statuses[-1]

    @pytest.mark.parametrize(("device", "code"), [("e", 78), ("puls", 0), ("absent", 0)])
    async def test_check_config_says_so_too(self, vmic: VirtualMic, tmp_path: Path,
                                            device: str, code: int) -> None:
        """check-config said OK to the name ``run`` then refused with 78; now it lists the
        devices and refuses it too, naming where the name was set. A name that fits one
        device, or none listed now (run waits for it), passes."""
        config = tmp_path / "config.toml"
        config.write_text("[transcriber]\nengine = \"local\"\n")
        env = {**vmic.env(), "TRANSCRIBED_AUDIO__DEVICE": device}
        process = await asyncio.create_subprocess_exec(
            *TRANSCRIBED, "check-config", "--config", str(config), cwd=REPO, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            _out, err = await process.communicate()
        assert process.returncode == code, err
        if code:
            assert err.decode().startswith(
                "transcribed: config error: environment TRANSCRIBED_AUDIO__DEVICE: audio.device: "
                "audio device 'e' matches 2 input devices: "), err

    async def test_check_config_names_a_table_variable(self, vmic: VirtualMic,
                                                       tmp_path: Path) -> None:
        """The name set by a whole-table variable is blamed on it, not on the file."""
        config = tmp_path / "config.toml"
        config.write_text("[transcriber]\nengine = \"local\"\n")
        env = {**vmic.env(), "TRANSCRIBED_AUDIO": '{"device": "e"}'}
        process = await asyncio.create_subprocess_exec(
            *TRANSCRIBED, "check-config", "--config", str(config), cwd=REPO, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            _out, err = await process.communicate()
        assert process.returncode == 78, err
        assert err.decode().startswith("transcribed: config error: environment "
                                       "TRANSCRIBED_AUDIO: audio.device: "), err

    def test_check_config_without_portaudio(self, tmp_path: Path) -> None:
        """PortAudio that cannot be loaded (a missing libportaudio) leaves the device check
        out: check-config passed such a config, then failed with a traceback (exit 1)."""
        broken = tmp_path / "nopa"
        broken.mkdir()
        (broken / "pyaudio.py").write_text(
            "raise OSError('libportaudio.so.2: cannot open shared object file')\n")
        config = tmp_path / "config.toml"
        config.write_text('[audio]\ndevice = "usb"\n[transcriber]\nengine = "local"\n')
        done = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(broken)},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr


class TestStateDirThatCannotBeMade:
    """A ``state.dir`` below a regular file: ``check-config`` passed it and ``run`` failed at
    the outbox with exit 1, which systemd restarts (10 times, then the unit is dead). It is a
    configuration error: named by check-config, exit 78 from both."""

    @pytest.mark.parametrize("command", ["check-config", "run"])
    def test_named_and_78(self, tmp_path: Path, command: str) -> None:
        (tmp_path / "file").write_text("")
        state = tmp_path / "file" / "state"
        config = tmp_path / "config.toml"
        config.write_text(f'[audio]\nsource = "file"\npath = "{SPEECH_DIR / S1}"\n'
                          '[transcriber]\nengine = "local"\n[http]\nenabled = false\n'
                          f'[state]\ndir = "{state}"\n'
                          '[sinks.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/"\n')
        done = subprocess.run([*TRANSCRIBED, command, "--config", str(config)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 78, done.stderr
        assert (f"transcribed: config error: {config}: state.dir: {state} cannot be created: "
                f"{tmp_path / 'file'} is not a directory\n") in done.stderr


def test_tail_names_the_file_of_its_config_error(tmp_path: Path) -> None:
    """``tail``'s config errors name the file (or the variable) like every other command's:
    it said only ``http.listen: …``."""
    config = tmp_path / "config.toml"
    config.write_text('[http]\nlisten = "0.0.0.0:8765"\n')
    done = subprocess.run([*TRANSCRIBED, "tail", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    assert done.stderr.startswith(f"transcribed: config error: {config}: http.listen: "), \
        done.stderr


def _fill(address: str, most: int = 1000) -> list[socket.socket]:
    """Fill the queue of the datagram socket at ``address`` (``net.unix.max_dgram_qlen``: 10
    by default, 512 where systemd sets it): senders until a fresh one cannot add a datagram
    (one sender alone may first run out of its own send buffer). Close them afterwards."""
    fillers: list[socket.socket] = []
    while len(fillers) < most:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        fillers.append(filler)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                filler.sendto(b"FILLER=1", address)
                sent += 1
        if sent == 0:
            return fillers
    raise AssertionError(f"{address}: still taking datagrams after {most} senders")


class TestANotifySocketNobodyReads:
    """A manager that stops reading its notification socket (busy, hung, a container runtime's
    proxy that read only until READY=1): the socket's queue fills (10 datagrams by default)
    and a blocking send froze the whole daemon, SIGTERM included. Sends must never block."""

    async def test_the_daemon_runs_on(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        address = tmp_path / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unread:
            unread.bind(str(address))
            fillers = _fill(str(address))
            config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
            daemon = await Daemon.start("run", "--config", str(config), env={
                "NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "100000"})   # pings every 50 ms
            result = await daemon.finish(30)
            for filler in fillers:
                filler.close()
        assert result.code == 0, result.stderr
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]
        assert len(result.events("notify.send_failed")) == 1

    def test_a_state_change_is_sent_once_the_manager_reads_again(self, tmp_path: Path) -> None:
        """``READY=1`` that found the queue full is sent before the next message, not lost
        (systemd would wait for it until the start timed out); pings are simply dropped."""
        address = tmp_path / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
            manager.bind(str(address))
            manager.setblocking(False)
            notifier = Notifier({"NOTIFY_SOCKET": str(address)})
            sent = 0
            while notifier.watchdog():              # fill the queue
                sent += 1
                assert sent < 100_000
            assert not notifier.ready("up") and not notifier.watchdog()
            for _ in range(sent):                   # the manager reads again
                assert manager.recv(4096) == b"WATCHDOG=1"
            assert notifier.status("later")
            assert manager.recv(4096) == b"READY=1\nSTATUS=up"
            assert manager.recv(4096) == b"STATUS=later"
            with pytest.raises(BlockingIOError):
                manager.recv(4096)
            notifier.close()


class TestInstallServiceFromATemporaryEnvironment:
    """``pipx run transcribed install-service`` or ``uvx transcribed install-service`` run
    from an environment in the cache, which pipx and uv delete later: the unit they wrote
    started for days, then failed (203/EXEC) once the cache was cleaned. Said at install."""

    @pytest.mark.parametrize("system", [False, True])
    @pytest.mark.parametrize(("cached", "folder"), [
        (".cache/uv/archive-v0/Xq1/bin/transcribed", ".cache"),             # uvx
        (".cache/pipx/5f2d1c/bin/transcribed", ".cache"),                   # pipx run
        (".local/pipx/.cache/5f2d1c/bin/transcribed", ".local/pipx/.cache"),  # older pipx run
    ])
    def test_warned(self, tmp_path: Path, cached: str, folder: str, system: bool) -> None:
        home = tmp_path / "home"
        executable = str(home / cached)
        target = service.plan(system=system, root=tmp_path / "root", executable=executable,
                              interpreter=executable.removesuffix("transcribed") + "python",
                              env={"HOME": str(home)})
        [warning] = [w for w in target.warnings if "pipx install" in w]
        assert warning.startswith(f"ExecStart={executable} is in {home}/{folder}, "), warning
        assert "pipx install" in warning and "uv tool install" in warning

    def test_xdg_cache_home_and_an_installed_tool_are_not_confused(self, tmp_path: Path) -> None:
        cache = tmp_path / "cache"
        warned = service.plan(system=False, root=tmp_path, env={"XDG_CACHE_HOME": str(cache)},
                              executable=str(cache / "pipx/1/bin/transcribed")).warnings
        assert len(warned) == 1 and f"is in {cache}, " in warned[0]
        installed = tmp_path / ".local/share/pipx/venvs/transcribed/bin/transcribed"
        assert not service.plan(system=False, root=tmp_path, executable=str(installed),
                                env={"XDG_CACHE_HOME": str(cache)}).warnings


class TestWatchdogKillLeavesATrace:
    async def test_sigabrt_dumps_the_threads(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """systemd ends a daemon that stopped its watchdog pings with SIGABRT: the journal got
        "Aborted" and nothing that said where it was stuck (a blocked event loop logs nothing).
        Every thread's stack goes to stderr (the journal) first, then it dies as before."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        async with NotifySocket.listening(tmp_path / "notify.sock") as sock:
            daemon = await Daemon.start("run", "--config", str(config), env=sock.env())
            async with asyncio.timeout(20):
                await sock.wait_for(lambda m: "READY" in m)
            daemon.signal(signal.SIGABRT)
            result = await daemon.finish(20)
        assert result.code == -signal.SIGABRT
        assert "Fatal Python error: Aborted" in result.stderr
        assert 'File "' in result.stderr.split("Fatal Python error: Aborted")[1]


def _ignores_sighup(pid: int) -> bool:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def _until_ignoring_sighup(pid: int, limit_s: float) -> bool:
    """Read /proc until ``pid`` ignores SIGHUP (no event says so; reading is all there is)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if _ignores_sighup(pid):
            return True
    return False


async def test_a_sighup_while_run_imports_is_ignored(fake: FakeAssemblyAI, tmp_path: Path) -> None:
    """``run`` ignores SIGHUP before its heavy imports (pydantic and on: ~0.3 s), as the README
    says of a SIGHUP while it starts; it was ignored only after them, and one in between
    (logrotate's ``kill -HUP`` right after a restart) killed it (129)."""
    config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
    daemon = await Daemon.start("run", "--config", str(config))
    try:
        pid = daemon.process.pid
        assert await asyncio.to_thread(_until_ignoring_sighup, pid, 10), "never ignored SIGHUP"
        maps = Path(f"/proc/{pid}/maps").read_text()
        daemon.signal(signal.SIGHUP)
        assert "pydantic_core" not in maps, "SIGHUP was ignored only after the heavy imports"
        result = await daemon.finish(30)
    finally:
        await daemon.kill_if_running()
    assert result.code == 0, result.stderr
    assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S1]]


async def _install_system(root: Path, *, as_user: list[str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *as_user, *TRANSCRIBED, "install-service", "--system", "--root", str(root), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_install_service_says_sudo_only_when_root_is_what_is_missing(tmp_path: Path) -> None:
    """The hint to run it as root comes for a permission error, with the full path (sudo
    resets PATH: ``sudo transcribed`` is not found); a path that does not exist gets none (it
    was given to root too)."""
    code, err = await _install_system(Path("/proc/1/nope"), as_user=[])
    assert code == 1 and "No such file or directory" in err and "sudo" not in err, err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    code, err = await _install_system(locked, as_user=as_nobody() if os.geteuid() == 0 else [])
    assert code == 1 and "Permission denied" in err, err
    beside = Path(sys.executable).parent / "transcribed"    # what python -m daemon runs for
    assert f"(run it as root: sudo {beside} install-service --system)" in err, err
