"""``transcribed install-service``: the systemd units, rendered for this installation.

The unit texts live here (the package carries them); ``systemd/*.service`` in the repository are
the same texts rendered with the default paths, and a test keeps the two identical.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from daemon.paths import xdg_home
from daemon.unitwarnings import hidden_from_system_unit, in_the_cache, unreadable_by_others

PLACEHOLDER: Final = "@TRANSCRIBED@"
USER_DEFAULT_EXEC: Final = "%h/.local/bin/transcribed"
SYSTEM_DEFAULT_EXEC: Final = "/usr/local/bin/transcribed"


def _service_common(no_restart: str) -> str:
    """The ``[Service]`` lines both units share; ``no_restart``: exit statuses never retried."""
    return f"""\
Type=notify
NotifyAccess=main
ExecStart=@TRANSCRIBED@ run
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
# a restart fixes none of: 77 credentials rejected, 78 configuration error, (system unit) 243 the
# key's credential file is missing. `run` checks the config itself: a failing ExecStartPre check
# would be restarted in a loop (RestartPreventExitStatus reads the main process's status only).
RestartPreventExitStatus={no_restart}
WatchdogSec=30
TimeoutStopSec=30
# room for sinks, the cloud engine and the live view's (capped) clients, above the 1024 default
LimitNOFILE=8192
Environment=PYTHONUNBUFFERED=1
"""


USER_UNIT: Final = f"""\
# transcribed as a user service (the default on a workstation: the microphone belongs to the
# user's PipeWire/PulseAudio session). Install: transcribed install-service --user
[Unit]
Description=transcribed: always-on speech to text
After=pipewire.service pipewire-pulse.service pulseaudio.service
StartLimitIntervalSec=600
StartLimitBurst=10

[Service]
{_service_common("77 78")}\
NoNewPrivileges=yes
LockPersonality=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=default.target
"""

SYSTEM_UNIT: Final = f"""\
# transcribed as a system service for a headless machine (ALSA capture, no desktop session).
# Install: sudo /opt/transcribed/bin/transcribed install-service --system (the full path: README)
# The API key: a root-only file /etc/transcribed/assemblyai_api_key (0600), passed in as the
# systemd credential assemblyai_api_key; the daemon reads it from $CREDENTIALS_DIRECTORY.
[Unit]
Description=transcribed: always-on speech to text
Wants=network-online.target
After=network-online.target sound.target
StartLimitIntervalSec=600
StartLimitBurst=10

[Service]
{_service_common("77 78 243")}\
Environment=TRANSCRIBED_CONFIG=/etc/transcribed/config.toml
Environment=XDG_CACHE_HOME=%C/transcribed
LoadCredential=assemblyai_api_key:/etc/transcribed/assemblyai_api_key
DynamicUser=yes
SupplementaryGroups=audio
StateDirectory=transcribed
StateDirectoryMode=0700
CacheDirectory=transcribed
CacheDirectoryMode=0700
ConfigurationDirectory=transcribed
UMask=0077
# Sandboxing: only the sound devices, only IP and local sockets, nothing else
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
PrivateDevices=yes
BindPaths=-/dev/snd
DeviceAllow=char-alsa rw
PrivateTmp=yes
PrivateIPC=yes
PrivateMounts=yes
ProtectSystem=strict
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# not ProcSubset=pid: the offline engine's onnxruntime reads /proc/cpuinfo
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


ENV: Final = "/usr/bin/env"


def render(template: str, executable: str, *, specifiers: bool = False) -> str:
    """The unit text with ``ExecStart`` pointing at ``executable``.

    A path as systemd reads it: ``%`` doubled (else a specifier) unless ``specifiers`` (the
    default ``%h/...``), and a path with a space in double quotes (else split into words):
    ``"/opt/my venv/bin/transcribed"``. systemd refuses an executable whose name has a quote,
    a backslash or a control character in it ("Executable name contains special characters":
    the unit does not load), so such a path (``/home/o'brien/...``) is started through
    ``/usr/bin/env``, as an argument, where quoting and escapes work and ``$`` is doubled
    (else a variable); the process ``env`` execs keeps its PID (``NotifyAccess=main``).
    """
    word = executable if specifiers else executable.replace("%", "%%")
    if any(c in word for c in "'\"\\$") or not word.isprintable():
        return template.replace(PLACEHOLDER, f"{ENV} {_quoted(word.replace('$', '$$'))}")
    if any(c.isspace() for c in word):
        word = _quoted(word)
    return template.replace(PLACEHOLDER, word)


def _quoted(word: str) -> str:
    """``word`` as one double-quoted systemd word (C escapes for what needs them)."""
    return '"' + "".join(map(_escaped, word)) + '"'


def _escaped(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if c.isprintable():
        return c
    code = ord(c)      # \x is one byte: anything past ASCII as \u/\U (UTF-8, as systemd reads)
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code <= 0xFFFF \
        else f"\\U{code:08x}"


def current_executable() -> str:
    """The ``transcribed`` script of the running interpreter's environment (absolute)."""
    beside = Path(sys.executable).parent / "transcribed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("transcribed")
    if found:
        return str(Path(found).resolve())
    argv0 = Path(sys.argv[0])
    return str(argv0.resolve()) if argv0.name == "transcribed" else str(beside)


USER_EDIT: Final = "systemctl --user edit transcribed"
SYSTEM_EDIT: Final = "sudo systemctl edit transcribed"


@dataclass(frozen=True)
class Plan:
    """Where ``install-service`` writes, and what to run afterwards."""

    unit_path: Path
    unit_text: str
    config_path: Path
    config_text: str
    commands: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    shared: bool = False         # the system unit's dynamic user reads what is written
    edit: str = USER_EDIT        # how to change the unit locally: a drop-in, which we never touch
    later_config: Path | None = None  # the lookup's next config: one there is used as it is


SYSTEM_COMMANDS: Final = (
    "sudo install -m 600 /dev/stdin /etc/transcribed/assemblyai_api_key"
    "   # paste the key, then Ctrl-D (offline engine: delete the unit's LoadCredential= line "
    "instead; the unit does not start while that file is missing)",
    "sudo systemctl daemon-reload",
    "sudo systemctl enable --now transcribed.service",
    "systemctl status transcribed.service",
    "journalctl -u transcribed.service -f",
)
USER_COMMANDS: Final = (
    "systemctl --user daemon-reload",
    "systemctl --user enable --now transcribed.service",
    "systemctl --user status transcribed.service",
    "journalctl --user -u transcribed.service -f",
    "loginctl enable-linger \"$USER\"   # optional: keep running while logged out",
)


def plan(*, system: bool, root: Path | None = None, executable: str | None = None,
         interpreter: str | None = None, env: dict[str, str] | None = None) -> Plan:
    """Decide the unit and config paths for a user or system installation.

    Args:
        system: the headless system unit instead of the user unit.
        root: an alternative root directory (like ``systemctl --root``), for images and tests.
        executable: the ``transcribed`` path for ``ExecStart`` (default: this installation's).
        interpreter: the Python that script runs on (default: this one), checked like it.
        env: the environment (default ``os.environ``) for ``$XDG_CONFIG_HOME``.
    """
    env = dict(os.environ) if env is None else env
    exe = executable or current_executable()
    base = root or Path("/")
    if system:
        config = base / "etc/transcribed/config.toml"
        return Plan(
            unit_path=base / "etc/systemd/system/transcribed.service",
            unit_text=render(SYSTEM_UNIT, exe),
            config_path=config,
            config_text=example_config(system=True),
            commands=SYSTEM_COMMANDS,
            warnings=(*hidden_from_system_unit(exe, interpreter or sys.executable),
                      *in_the_cache(exe, env), *unreadable_by_others(config)),
            shared=True,
            edit=SYSTEM_EDIT,
        )
    config_home = xdg_home(env, "XDG_CONFIG_HOME", ".config")   # a relative one is ignored
    if root is not None:
        config_home = root / config_home.relative_to(config_home.anchor)
    return Plan(
        unit_path=config_home / "systemd/user/transcribed.service",
        unit_text=render(USER_UNIT, exe),
        config_path=config_home / "transcribed/config.toml",
        config_text=example_config(),
        commands=USER_COMMANDS,
        warnings=in_the_cache(exe, env),
        later_config=base / "etc/transcribed/config.toml",
    )


USER_JOURNAL: Final = 'path = "~/transcripts/turns.jsonl"'
SYSTEM_JOURNAL: Final = ('path = "/var/lib/transcribed/turns.jsonl"   # the unit\'s '
                         'StateDirectory (its dynamic user\'s ~ is /, read-only)')


def example_config(*, system: bool = False) -> str:
    """The commented example config.

    ``config/example.toml`` is package data, ``daemon/assets/example.toml`` (a link to it in
    the repository), as the live page is, so an installed wheel copies the same file. For the
    system unit the file sink writes below its ``StateDirectory`` instead of ``~``.
    """
    text = (resources.files("daemon") / "assets" / "example.toml").read_text(encoding="utf-8")
    if system:
        text = re.sub(rf"^{re.escape(USER_JOURNAL)}[^\n]*$", SYSTEM_JOURNAL, text, count=1,
                      flags=re.M)
    return text


def install(target: Plan) -> list[str]:
    """Write the unit and the example config (only if the lookup finds none); report lines.

    A unit already there is left as it is when it is the one we would write, and otherwise kept
    next to it as ``transcribed.service.bak`` (``.bak.1``, ``.bak.2``... when that name holds
    something else) before the new one is written: a unit edited by hand is never lost, and
    running the command twice makes no backup. The report names the backup and the drop-in
    (``systemctl edit``) for local changes, which this command never touches.

    Modes do not depend on the installer's umask: a user's config is 0600 (it may come to hold
    secrets); for the system unit the config is 0644 (its dynamic user reads it) and folders
    created are 0755 (an image built with ``--root`` keeps a readable ``/etc``). Units: 0644;
    a backup keeps the mode of the file it copies.
    """
    text = target.unit_text.encode("utf-8")
    try:
        before: bytes | None = target.unit_path.read_bytes()
    except FileNotFoundError:
        before = None
    if before == text:
        done = [f"{target.unit_path} is unchanged"]
    else:
        backup = None if before is None else _back_up(target.unit_path, before)
        _write(target.unit_path, target.unit_text, 0o644, shared=target.shared)
        done = [f"wrote {target.unit_path}" if backup is None else
                f"wrote {target.unit_path}; the unit there differed and is kept as {backup} "
                f"(for changes of your own use a drop-in, which install-service leaves alone: "
                f"{target.edit})"]
    if target.config_path.exists():
        done.append(f"kept the existing config {target.config_path}")
    elif target.later_config is not None and _exists(target.later_config):
        done.append(f"wrote no config: the unit reads {target.later_config} (one written to "
                    f"{target.config_path} would come first in the lookup and hide it)")
    else:
        _write(target.config_path, target.config_text, 0o644 if target.shared else 0o600,
               shared=target.shared)
        done.append(f"wrote an example config {target.config_path} (edit it)")
    return done


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; one we may not look at counts as absent (so does the lookup)."""
    try:
        return path.exists()
    except OSError:
        return False


def _back_up(path: Path, content: bytes) -> Path:
    """A copy of ``content`` (``path``'s) next to it: the first free ``.bak``, ``.bak.1``...

    One that already holds exactly ``content`` is reused. Created exclusively (``x``): a name
    taken meanwhile is never overwritten. systemd ignores these names (no unit suffix).
    """
    mode = path.stat().st_mode & 0o777
    for n in itertools.count():
        backup = path.with_name(f"{path.name}.bak" + (f".{n}" if n else ""))
        try:
            file = backup.open("xb")
        except FileExistsError:
            if _holds(backup, content):
                return backup
            continue
        try:
            with file:
                backup.chmod(mode)
                file.write(content)
        except BaseException:
            backup.unlink(missing_ok=True)    # no half-written backup left behind
            raise
        return backup
    raise AssertionError("unreachable")


def _holds(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except OSError:                 # a folder, or not ours to read: not a backup to reuse
        return False


def _write(path: Path, text: str, mode: int, *, shared: bool) -> None:
    missing = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        for folder in missing:
            folder.chmod(0o755)
    path.touch(mode=mode)
    path.chmod(mode)
    path.write_text(text, encoding="utf-8")
