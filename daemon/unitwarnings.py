"""What ``install-service`` warns about: a unit written from here that would not start or read.

An ``ExecStart`` in a temporary environment (a cache), a program or Python the system unit's
sandbox hides, a system config its dynamic user cannot read. Each check returns its warning
lines (none when all is well); ``daemon.service`` puts them in the plan it prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final


def in_the_cache(executable: str, env: dict[str, str]) -> tuple[str, ...]:
    """An ``ExecStart`` in a cache folder: a temporary environment that will go away.

    ``pipx run`` and ``uvx`` run from environments in a cache (``~/.cache/uv``, pipx's
    ``.cache``) that they, or a cache clean-up, delete later; the unit then fails to start
    (203/EXEC) days or weeks after it was written.
    """
    home = env.get("HOME") or str(Path.home())
    xdg = Path(env.get("XDG_CACHE_HOME") or Path(home) / ".cache")
    path = Path(executable)
    cache = next((c for p in (path, path.resolve()) for c in (xdg, *_dot_caches(p))
                  if p.is_relative_to(c)), None)
    if cache is None:
        return ()
    return (f"ExecStart={executable} is in {cache}, a temporary environment (pipx run, uvx) "
            "that is deleted later, and the unit then no longer starts: install transcribed "
            "(pipx install, uv tool install or a venv) and run install-service from there",)


HIDDEN_FROM_SYSTEM_UNIT: Final = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes",
                                  "/run/user": "ProtectHome=yes", "/tmp": "PrivateTmp=yes",
                                  "/var/tmp": "PrivateTmp=yes"}


def hidden_from_system_unit(executable: str, interpreter: str) -> tuple[str, ...]:
    """Why the system unit could not start from here: a tree it hides, if any.

    ``ProtectHome=yes`` hides the homes, ``PrivateTmp=yes`` the temporary folders.

    Both the script and the Python it runs on count, links followed (a venv in /opt made with
    a pyenv or uv Python in ~ runs that one).
    """
    python = Path(interpreter).resolve()
    candidates = ((Path(executable), f"ExecStart={executable}"),
                  (Path(executable).resolve(), f"ExecStart={executable}"),
                  (python, f"its Python ({python})"))
    for path, what in candidates:
        tree = next((t for t in HIDDEN_FROM_SYSTEM_UNIT if path.is_relative_to(t)), None)
        if tree is not None:
            return (f"{what} is under {tree}, which the system unit's "
                    f"{HIDDEN_FROM_SYSTEM_UNIT[tree]} hides: it "
                    "would not start. Install transcribed outside it (e.g. a venv in "
                    "/opt/transcribed on a system Python) and run that one's install-service "
                    "--system, or use the user unit (--user)",)
    return ()


def _dot_caches(path: Path) -> list[Path]:
    """The folders named ``.cache`` that ``path`` is in."""
    return [Path(*path.parts[:i + 1]) for i, part in enumerate(path.parts[:-1]) if part == ".cache"]


def unreadable_by_others(config: Path) -> tuple[str, ...]:
    """An existing system config (kept as it is) that the unit's dynamic user could not read."""
    try:
        modes = [(path, path.stat().st_mode & 0o777, need)
                 for path, need in ((config.parent, 0o005), (config, 0o004))]
    except OSError:               # none yet (or not ours to look at: install() will say so)
        return ()
    for path, mode, need in modes:
        if mode & need != need:
            return (f"{path} is not readable by the system unit's dynamic user (mode "
                    f"{mode:04o}): chmod {755 if need == 0o005 else 644} it; keep secrets out "
                    "of it (the key as the credential, *_file keys)",)
    return ()
