"""Running under systemd: notifications from the real daemon, units, install-service, watchdog."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon import service
from daemon.dispatch import Dispatcher
from daemon.events import TurnRecord
from daemon.health import Health, Reporter
from daemon.notify import Notifier, watchdog_interval
from daemon.plugins import SinkConfig, SinkType
from daemon.queues import MemoryQueue
from daemon.runner import SinkRunner
from tests.conftest import REPO, SPEECH_DIR, TRANSCRIBED, TRANSCRIPTS, as_nobody
from tests.daemon_proc import Daemon, cloud_config, read_turns
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.notify_socket import Message, NotifySocket
from tests.test_outbox import make_turn

S1, S2 = "espeak-s1.wav", "espeak-s2.wav"
WATCHDOG_USEC = 600_000  # pings every 0.3 s


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1, S2)) as server:
        yield server


class TestNotifyFromTheDaemon:
    async def test_ready_status_watchdog_stopping(self, fake: FakeAssemblyAI,
                                                  tmp_path: Path) -> None:
        """READY only after Begin with audio flowing; STATUS lines; pings on time; STOPPING.

        A 1.2 s watchdog (pings every 0.6 s) over the 5 s sentence: a gap must stay under the
        watchdog, and 0.6 s of slack keeps a loaded test machine's late read from counting as
        a late ping (0.3 s of slack did not, once).
        """
        usec = 2 * WATCHDOG_USEC
        begun_at_ready: list[bool] = []

        def snapshot(message: Message) -> None:
            if "READY" in message:
                begun_at_ready.append(bool(fake.sessions) and fake.sessions[0].began_at is not None)

        config = cloud_config(tmp_path, fake, SPEECH_DIR / S2)
        async with NotifySocket.listening(tmp_path / "notify.sock", snapshot) as sock:
            daemon = await Daemon.start("run", "--config", str(config),
                                        env=sock.env(usec))
            result = await daemon.finish(30)
        assert result.code == 0, result.stderr
        keys = [next(iter(m.fields)) for m in sock.messages]
        assert keys.count("READY") == 1 and begun_at_ready == [True]
        ready = keys.index("READY")
        assert "EXTEND_TIMEOUT_USEC" in keys[:ready]
        assert "session live" in sock.messages[ready].fields["STATUS"]
        stopping = keys.index("STOPPING")
        assert ready < stopping
        assert "input ended" in sock.messages[stopping].fields["STATUS"]
        assert "1 turns" in sock.messages[stopping].fields["STATUS"]
        assert all("assemblyai:" in m.fields["STATUS"] for m in sock.with_key("STATUS"))
        pings = [m.at for m in sock.with_key("WATCHDOG")]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 6 and max(gaps) < usec / 1e6
        # not more often than every 0.6 s (counted, not gap by gap: a busy test process reads
        # two datagrams back to back)
        assert len(pings) - 1 <= (pings[-1] - pings[0]) / (usec / 2e6) + 1
        assert [t["transcript"] for t in read_turns(tmp_path / "turns.jsonl")] == [TRANSCRIPTS[S2]]

    async def test_ready_with_the_first_audio(self, fake: FakeAssemblyAI,
                                              tmp_path: Path) -> None:
        """READY follows the first chunk sent to a live session, not the next status poll or
        turn (without watchdog pings nothing else wakes the reporter for 5 s)."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S1)
        async with NotifySocket.listening(tmp_path / "notify.sock") as sock:
            daemon = await Daemon.start("run", "--config", str(config), env=sock.env())
            result = await daemon.finish(30)
        assert result.code == 0, result.stderr
        ready = [m for m in sock.messages if "READY" in m.fields]
        assert len(ready) == 1 and "session live, 0 turns" in ready[0].fields["STATUS"]

    async def test_sigterm_mid_turn(self, fake: FakeAssemblyAI, tmp_path: Path) -> None:
        """SIGTERM mid-turn: STOPPING names the signal, the partial turn is delivered, exit 0."""
        config = cloud_config(tmp_path, fake, SPEECH_DIR / S2)
        async with NotifySocket.listening(tmp_path / "notify.sock") as sock:
            daemon = await Daemon.start("run", "--config", str(config),
                                        env=sock.env(WATCHDOG_USEC))
            async with asyncio.timeout(15):
                await sock.wait_for(lambda m: "READY" in m)
                session = await fake.wait_for_session(0)
                await session.wait_for(lambda s: s.audio_ms >= 2500)
            daemon.signal(signal.SIGTERM)
            result = await daemon.finish(15)
        assert result.code == 0, result.stderr
        stopping = sock.with_key("STOPPING")
        assert len(stopping) == 1 and "SIGTERM" in stopping[0].fields["STATUS"]
        turns = read_turns(tmp_path / "turns.jsonl")
        assert len(turns) == 1 and TRANSCRIPTS[S2].startswith(turns[0]["transcript"].rstrip("."))


class TestNotifier:
    async def test_abstract_socket_and_messages(self) -> None:
        """``@name`` addresses the abstract namespace; each call is one datagram."""
        name = f"@transcribed-test-{os.getpid()}"
        async with NotifySocket.listening(name) as sock:
            notifier = Notifier({"NOTIFY_SOCKET": name})
            assert notifier.reloading() and notifier.ready("ok") and notifier.stopping()
            async with asyncio.timeout(5):
                await sock.wait_for(lambda m: "STOPPING" in m)
            notifier.close()
        reloading, ready, _stopping = sock.messages
        assert int(reloading.fields["MONOTONIC_USEC"]) > 0
        assert ready.fields == {"READY": "1", "STATUS": "ok"}

    def test_watchdog_interval(self) -> None:
        """Half of WATCHDOG_USEC; ignored when WATCHDOG_PID names another process."""
        assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
        assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
        assert watchdog_interval({}) is None

    def test_no_socket_is_a_no_op(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        notifier = Notifier({})
        assert not notifier.enabled and not notifier.ready() and not notifier.watchdog()


class TestReporterWhileStopping:
    async def test_no_ready_after_stopping_and_status_says_stopping(self) -> None:
        """After STOPPING=1: a reload that ends meanwhile sends no READY=1 (nor RELOADING=1),
        and a later STATUS= still says the daemon is stopping (the engine's ended session read
        "reconnecting" in ``systemctl status`` while it shut down)."""
        name = f"@transcribed-stop-{os.getpid()}"
        state = ["session live"]
        async with NotifySocket.listening(name) as sock:
            notifier = Notifier({"NOTIFY_SOCKET": name})
            reporter = Reporter(notifier, Health(), ready=lambda: True, status=lambda: state[0])
            async with asyncio.timeout(10), asyncio.TaskGroup() as group:
                task = group.create_task(reporter.run())
                await sock.wait_for(lambda m: "READY" in m)
                reporter.reloading()                   # a reload under way when the stop comes
                reporter.stop("SIGTERM received")
                state[0] = "reconnecting"
                reporter.reloaded("applied")
                reporter.reloading()
                stopped = await sock.wait_for(lambda m: "STOPPING" in m)
                later = await sock.wait_for(lambda m: "reconnecting" in m.fields.get("STATUS", ""),
                                            after=stopped + 1)
                task.cancel()
            notifier.close()
        after = sock.messages[stopped + 1:]
        assert not [m for m in after if "READY" in m or "RELOADING" in m], after
        assert sock.messages[later].fields["STATUS"] == "stopping (SIGTERM received); reconnecting"


class _HungSink:
    """A sink whose send never returns."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def __aenter__(self) -> _HungSink:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def send(self, record: TurnRecord) -> None:
        self.called.set()
        await asyncio.Event().wait()


class TestWatchdogStopsWhenStuck:
    async def test_stuck_capture_and_hung_sink_stop_the_pings(self, tmp_path: Path) -> None:
        """Pings flow while every heartbeat keeps its promise and stop when one is broken."""
        name = f"@transcribed-wd-{os.getpid()}"
        async with NotifySocket.listening(name) as sock:
            notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000"})
            health = Health()
            capture = health.heartbeat("capture")
            sink = _HungSink()
            runner = SinkRunner("hung", SinkType("hung", SinkConfig, lambda *_: sink),
                                SinkConfig(type="hung"), sink, MemoryQueue())
            dispatcher = Dispatcher([runner], dead_letter_dir=tmp_path, send_limit_s=0.3)
            health.watch(dispatcher.heartbeats)
            reporter = Reporter(notifier, health, ready=lambda: True, status=lambda: "test")
            async with asyncio.timeout(10), asyncio.TaskGroup() as group:
                dispatcher.start(group)
                task = group.create_task(reporter.run())
                capture.beat(0.3)
                await sock.wait_for(lambda m: "WATCHDOG" in m)
                # the capture promise lapses: pings stop until it beats again
                count = await _pings_until_silent(sock)
                capture.beat(60)
                await sock.wait_for(lambda m: "WATCHDOG" in m, after=count)
                # a send that outlives its limit stops them too
                dispatcher.dispatch(make_turn(1))
                await sink.called.wait()
                await _pings_until_silent(sock)
                assert health.problems() and health.problems()[0].startswith("sink hung")
                task.cancel()
                await dispatcher.close(0.05)
            notifier.close()


async def _pings_until_silent(sock: NotifySocket, quiet_s: float = 0.5) -> int:
    """Wait until no WATCHDOG arrives for ``quiet_s`` (fails after 5 s); returns the count."""
    async with asyncio.timeout(5):
        while True:
            count = len(sock.messages)
            try:
                async with asyncio.timeout(quiet_s):
                    await sock.wait_for(lambda m: "WATCHDOG" in m, after=count)
            except TimeoutError:
                return len(sock.messages)


# ------------------------------------------------------------------------------- units


def _need_systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is required in CI (apt: systemd)")
        pytest.skip("systemd-analyze not installed")
    return tool


def _transcribed_script() -> str:
    script = Path(sys.executable).parent / "transcribed"
    return str(script) if script.is_file() else sys.executable


def _analyze(*args: str, cwd: Path, user: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if user:
        runtime = cwd / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    return subprocess.run([_need_systemd_analyze(), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


class TestUnits:
    def test_repo_units_match_the_installer(self) -> None:
        """systemd/*.service are the installer's texts rendered with the default paths."""
        user = (REPO / "systemd" / "transcribed.service").read_text()
        system = (REPO / "systemd" / "transcribed-system.service").read_text()
        assert user == service.render(service.USER_UNIT, service.USER_DEFAULT_EXEC,
                                      specifiers=True)
        assert system == service.render(service.SYSTEM_UNIT, service.SYSTEM_DEFAULT_EXEC,
                                        specifiers=True)

    @pytest.mark.parametrize(("template", "user"),
                             [(service.USER_UNIT, True), (service.SYSTEM_UNIT, False)])
    def test_units_verify(self, tmp_path: Path, template: str, user: bool) -> None:
        """``systemd-analyze verify`` accepts both units (ExecStart = this venv's script)."""
        unit = tmp_path / "transcribed.service"
        unit.write_text(service.render(template, _transcribed_script()))
        args = ["verify", *(["--user"] if user else []), unit.name]
        done = _analyze(*args, cwd=tmp_path, user=user)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr

    def test_executable_path_with_space_and_percent(self, tmp_path: Path) -> None:
        """A venv under "my 100% venv": ExecStart quoted, % doubled, and systemd reads it as one
        existing program (it was split at the space and % taken as a specifier)."""
        script = tmp_path / "my 100% venv" / "bin" / "transcribed"
        script.parent.mkdir(parents=True)
        script.symlink_to(_transcribed_script())
        unit = tmp_path / "transcribed.service"
        text = service.render(service.USER_UNIT, str(script))
        assert f'ExecStart="{tmp_path}/my 100%% venv/bin/transcribed" run\n' in text
        unit.write_text(text)
        done = _analyze("verify", "--user", unit.name, cwd=tmp_path, user=True)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr

    @pytest.mark.parametrize(("folder", "written"), [
        ("o'brien", "o'brien"), ('say "hi"', 'say \\"hi\\"'), ("back\\slash", "back\\\\slash"),
        ("a$HOME", "a$$HOME"), ("tab\there", "tab\\x09here"),
    ])
    def test_executable_path_systemd_cannot_name(self, tmp_path: Path, folder: str,
                                                 written: str) -> None:
        """A venv under a folder with a quote or a backslash (a home like /home/o'brien):
        systemd refuses such an executable name ("contains special characters", the unit did
        not load), so ExecStart runs it through /usr/bin/env, quoted and escaped."""
        script = tmp_path / folder / "bin" / "transcribed"
        script.parent.mkdir(parents=True)
        script.symlink_to(_transcribed_script())
        text = service.render(service.USER_UNIT, str(script))
        assert f'ExecStart=/usr/bin/env "{tmp_path}/{written}/bin/transcribed" run\n' in text
        (tmp_path / "transcribed.service").write_text(text)
        done = _analyze("verify", "--user", "transcribed.service", cwd=tmp_path, user=True)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr

    def test_system_unit_exposure(self, tmp_path: Path) -> None:
        """The system unit's exposure score is at most 2.0 (README records it)."""
        unit = tmp_path / "transcribed.service"
        unit.write_text(service.render(service.SYSTEM_UNIT, _transcribed_script()))
        done = _analyze("security", "--offline=true", "--no-pager", unit.name, cwd=tmp_path)
        line = next(x for x in done.stdout.splitlines() if "Overall exposure level" in x)
        score = float(line.split(":")[1].split()[0])
        assert score <= 2.0, done.stdout
        assert f"exposure {score:.1f}" in (REPO / "README.md").read_text()

    @pytest.mark.parametrize("template", [service.USER_UNIT, service.SYSTEM_UNIT])
    def test_units_carry_the_contract(self, template: str) -> None:
        """Both units: notify, watchdog, reload by SIGHUP, no restart on 77/78; no ExecStartPre
        (its failure is outside RestartPreventExitStatus: a bad config would restart in a loop)."""
        for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure",
                     "RestartPreventExitStatus=77 78", "WatchdogSec=",
                     "ExecReload=/bin/kill -HUP $MAINPID", "ExecStart=@TRANSCRIBED@ run"):
            assert line in template
        assert "ExecStartPre=" not in template


class TestInstallService:
    def test_user_install_writes_unit_and_example_config(self, tmp_path: Path) -> None:
        """--user: the unit under $XDG_CONFIG_HOME/systemd/user, config copied, commands printed."""
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        done = subprocess.run([*TRANSCRIBED, "install-service", "--user"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        unit = (tmp_path / "cfg/systemd/user/transcribed.service").read_text()
        assert f"ExecStart={_transcribed_script()} run" in unit
        config = tmp_path / "cfg/transcribed/config.toml"
        assert config.read_text() == (REPO / "config/example.toml").read_text()
        assert config.stat().st_mode & 0o777 == 0o600          # it may come to hold secrets
        assert "systemctl --user enable --now transcribed.service" in done.stdout
        config.write_text("# mine\n")
        again = subprocess.run([*TRANSCRIBED, "install-service"], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=30, check=False)
        assert again.returncode == 0 and config.read_text() == "# mine\n"
        assert "kept the existing config" in again.stdout

    def test_user_install_leaves_the_lookup_to_an_etc_config(self, tmp_path: Path) -> None:
        """With /etc/transcribed/config.toml there (a system setup), --user writes no example
        config: one in ~/.config comes first in the lookup and hid it, without a word."""
        (tmp_path / "etc/transcribed").mkdir(parents=True)
        (tmp_path / "etc/transcribed/config.toml").write_text("# the machine's\n")
        env = {**os.environ, "XDG_CONFIG_HOME": "/cfg"}
        done = subprocess.run([*TRANSCRIBED, "install-service", "--user", "--root", str(tmp_path)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "cfg/systemd/user/transcribed.service").exists()
        assert not (tmp_path / "cfg/transcribed/config.toml").exists()
        assert f"wrote no config: the unit reads {tmp_path}/etc/transcribed/config.toml" \
            in done.stdout, done.stdout

    def test_user_install_with_an_etc_it_may_not_look_into(self) -> None:
        """/etc/transcribed unreadable to the user (0700: root-only secrets in it): the user
        config is written (the lookup cannot use /etc's either); it failed with 'cannot write
        …/etc/transcribed/config.toml: Permission denied', the unit half installed."""
        nobody = as_nobody()            # root makes the folder, a user without root's rights looks
        with tempfile.TemporaryDirectory(prefix="transcribed-etc-") as name:
            root = Path(name)                               # not below pytest's 0700 folder:
            root.chmod(0o755)                               # the user must reach it
            (root / "etc/transcribed").mkdir(parents=True)
            (root / "etc/transcribed/config.toml").write_text("# root's\n")
            (root / "etc/transcribed").chmod(0o700)
            (root / "cfg").mkdir()
            os.chown(root / "cfg", 65534, 65534)            # the user's own ~/.config
            done = subprocess.run([*nobody, *TRANSCRIBED, "install-service", "--user", "--root",
                                   str(root)],
                                  env={**os.environ, "XDG_CONFIG_HOME": "/cfg"}, cwd=REPO,
                                  capture_output=True, text=True, timeout=30, check=False)
            assert done.returncode == 0, done.stderr
            assert "wrote an example config" in done.stdout, done.stdout

    def test_system_install_under_root(self, tmp_path: Path) -> None:
        """--system --root DIR: the hardened unit and the config below DIR/etc, readable by the
        unit's dynamic user whatever the installer's umask."""
        done = subprocess.run([*TRANSCRIBED, "install-service", "--system", "--root",
                               str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=False, preexec_fn=lambda: os.umask(0o077))
        assert done.returncode == 0, done.stderr
        unit = (tmp_path / "etc/systemd/system/transcribed.service").read_text()
        assert "DynamicUser=yes" in unit and "LoadCredential=assemblyai_api_key:" in unit
        config = (tmp_path / "etc/transcribed/config.toml").read_text()
        assert 'path = "/var/lib/transcribed/turns.jsonl"' in config   # ~ is / for DynamicUser
        for path, mode in (("etc", 0o755), ("etc/systemd/system", 0o755),
                           ("etc/systemd/system/transcribed.service", 0o644),
                           ("etc/transcribed", 0o755), ("etc/transcribed/config.toml", 0o644)):
            assert (tmp_path / path).stat().st_mode & 0o777 == mode, path
        (tmp_path / "etc/transcribed/config.toml").chmod(0o600)      # kept as it is, but named
        again = subprocess.run([*TRANSCRIBED, "install-service", "--system", "--root",
                                str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                               timeout=30, check=False)
        assert again.returncode == 0, again.stderr
        assert (f"warning: {tmp_path}/etc/transcribed/config.toml is not readable by the system "
                "unit's dynamic user (mode 0600): chmod 644 it") in again.stderr
        assert "~/" not in config.split("[sinks.journal]")[1].split("[")[0]
        assert "sudo systemctl enable --now transcribed.service" in done.stdout
        assert "delete the unit's LoadCredential= line" in done.stdout

    def test_edited_unit_is_kept_as_a_backup(self, tmp_path: Path) -> None:
        """A unit edited by hand is copied, byte for byte, to transcribed.service.bak before the
        new one is written, and one line names it and the drop-in for local changes; a second
        edit goes to .bak.1 (the first backup stays), and a rerun with no edit makes none."""
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        folder = tmp_path / "cfg/systemd/user"
        unit = folder / "transcribed.service"
        assert _install(env=env).returncode == 0
        ours = unit.read_bytes()
        edited = ours.replace(b"RestartSec=5\n", b"RestartSec=5\nNice=5  # mine \xe9\n")
        unit.write_bytes(edited)                     # not even UTF-8: kept as it is
        unit.chmod(0o600)
        done = _install(env=env)
        assert done.returncode == 0, done.stderr
        assert unit.read_bytes() == ours and unit.stat().st_mode & 0o777 == 0o644
        backup = folder / "transcribed.service.bak"
        assert backup.read_bytes() == edited and backup.stat().st_mode & 0o777 == 0o600
        named = [line for line in done.stdout.splitlines() if str(backup) in line]
        assert len(named) == 1 and named[0].startswith(f"wrote {unit};"), done.stdout
        assert "systemctl --user edit transcribed" in named[0]
        unit.write_bytes(ours + b"# again\n")
        again = _install(env=env)
        assert again.returncode == 0, again.stderr
        assert backup.read_bytes() == edited and unit.read_bytes() == ours
        assert (folder / "transcribed.service.bak.1").read_bytes() == ours + b"# again\n"
        assert f"kept as {folder}/transcribed.service.bak.1 " in again.stdout
        listing = sorted(folder.iterdir())
        rerun = _install(env=env)
        assert rerun.returncode == 0 and sorted(folder.iterdir()) == listing
        assert f"{unit} is unchanged" in rerun.stdout

    def test_unchanged_unit_is_left_alone(self, tmp_path: Path) -> None:
        """Twice in a row with no edit: the second run says the unit is unchanged, does not
        write it (its mtime stays) and makes no backup."""
        unit = tmp_path / "etc/systemd/system/transcribed.service"
        first = _install("--system", "--root", str(tmp_path))
        assert first.returncode == 0 and f"wrote {unit}\n" in first.stdout, first.stderr
        os.utime(unit, ns=(1_000_000_000, 1_000_000_000))
        again = _install("--system", "--root", str(tmp_path))
        assert again.returncode == 0, again.stderr
        assert f"{unit} is unchanged\n" in again.stdout and "wrote" not in again.stdout
        assert unit.stat().st_mtime_ns == 1_000_000_000
        assert [p.name for p in unit.parent.iterdir()] == ["transcribed.service"]

    def test_edited_system_unit_names_sudo_systemctl_edit(self, tmp_path: Path) -> None:
        """--system: the backup line points at ``sudo systemctl edit transcribed``; a backup
        name already taken by something else is not overwritten."""
        unit = tmp_path / "etc/systemd/system/transcribed.service"
        assert _install("--system", "--root", str(tmp_path)).returncode == 0
        ours = unit.read_text()
        unit.write_text(ours.replace("LoadCredential=", "#LoadCredential="))
        (unit.parent / "transcribed.service.bak").write_text("someone else's\n")
        done = _install("--system", "--root", str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert unit.read_text() == ours
        assert (unit.parent / "transcribed.service.bak").read_text() == "someone else's\n"
        backup = unit.parent / "transcribed.service.bak.1"
        assert backup.read_text() == ours.replace("LoadCredential=", "#LoadCredential=")
        assert (f"wrote {unit}; the unit there differed and is kept as {backup} ") in done.stdout
        assert "sudo systemctl edit transcribed)\n" in done.stdout

    @pytest.mark.parametrize(("executable", "interpreter", "named"), [
        ("/home/ada/src/transcribed/.venv/bin/transcribed", "/usr/bin/python3", "ExecStart"),
        ("/root/.venv/bin/transcribed", "/usr/bin/python3", "ExecStart"),
        ("/opt/transcribed/bin/transcribed", "/home/ada/.pyenv/bin/python3", "its Python"),
        ("/opt/transcribed/bin/transcribed", "/usr/bin/python3", None),
        ("/usr/local/bin/transcribed", "/usr/bin/python3", None),
        ("/tmp/c/.venv/bin/transcribed", "/usr/bin/python3", "ExecStart"),
        ("/opt/transcribed/bin/transcribed", "/var/tmp/py/bin/python3", "its Python"),
    ])
    def test_system_unit_warns_of_hidden_trees(self, tmp_path: Path, executable: str,
                                               interpreter: str, named: str | None) -> None:
        """A script or Python the system unit's ProtectHome=yes or PrivateTmp=yes would hide
        is warned of, naming the setting."""
        target = service.plan(system=True, root=tmp_path, executable=executable,
                              interpreter=interpreter)
        assert [w.split(" is under")[0].split("=")[0].split(" (")[0] for w in target.warnings] \
            == ([named] if named else [])
        setting = "PrivateTmp=yes" if "tmp/" in executable + interpreter else "ProtectHome=yes"
        assert all(setting in w for w in target.warnings)
        assert not service.plan(system=False, root=tmp_path, executable=executable,
                                interpreter=interpreter).warnings

    def test_help_lists_install_service(self) -> None:
        """``--help`` names the command."""
        done = subprocess.run([*TRANSCRIBED, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=False)
        assert "install-service" in done.stdout


def _install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``transcribed install-service ARGS``, run for real."""
    return subprocess.run([*TRANSCRIBED, "install-service", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)
