"""The ``file`` sink: one JSON line per turn, fsynced, with optional size rotation.

Writes run in a worker thread so the event loop never blocks on the disk. A line torn by a crash
(no trailing newline) is closed off on open, so the next record always starts on its own line.
Before each write the path is checked to still name the open file (one ``stat``): a file deleted
or rotated away, or a folder replaced, is reopened (created again) rather than written into a
file nobody can see; if it cannot be reopened the send fails and the dispatcher retries it.
A write that fails part-way (disk full) is cut back off, so the retry never follows half a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import structlog
from pydantic import Field, ValidationInfo, field_validator

from daemon.errors import SinkError
from daemon.events import TurnRecord
from daemon.fdio import append_whole, write_all
from daemon.plugins import SinkConfig, SinkContext, SinkType, hookimpl
from daemon.problems import path_text
from daemon.sinktables import LOOK_AT_PATHS

log = structlog.get_logger("plugins.file")

PRIVATE_FILE = 0o600    # transcripts are private: a file the sink creates, like a dead letter
PRIVATE_DIR = 0o700     # and the folder it creates for it (folders that exist are left as is)


class FileSinkConfig(SinkConfig):
    """``type = "file"``."""

    path: str = Field("~/transcripts/turns.jsonl", description="JSONL file to append to")
    rotate_bytes: int = Field(0, ge=0, description="rotate before exceeding this; 0 = never")
    keep: int = Field(5, ge=0, le=1000, description="rotated files kept (turns.jsonl.1 …)")
    fsync: bool = Field(True, description="fsync after every record")

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a file")
        if "\0" in value:    # no file can have it: every open failed, for ever, unnamed
            raise ValueError("must not contain a NUL character")
        try:                # ~nosuchuser (or no home at all) failed only when the sink started
            Path(value).expanduser()
        except RuntimeError:
            raise ValueError(f"cannot expand {value.split('/', 1)[0]!r}: no such user, or no "
                             "home directory") from None
        return value

    @field_validator("path")
    @classmethod
    def _a_file(cls, value: str, info: ValidationInfo) -> str:
        """Not a folder, nor below a file: every send failed for ever (check-config passed).

        Checked for a table from a configuration (``LOOK_AT_PATHS``), looked at only, nothing
        created; what cannot be looked at is left to the sink's open.
        """
        if not (isinstance(info.context, dict) and info.context.get(LOOK_AT_PATHS)):
            return value
        problem = _not_a_file_path(Path(value).expanduser())
        if problem:
            raise ValueError(problem)
        return value


class FileSink:
    """Appends records to a JSONL file."""

    def __init__(self, name: str, config: FileSinkConfig, context: SinkContext) -> None:
        self.name = name
        self.config = config
        self.path = Path(config.path).expanduser()
        self._handle: IO[bytes] | None = None
        self._gone = ""         # why the open file was let go (moved away), until reopened
        self._rotate_failed = ""    # why the last rotation failed (logged once), or ""
        self._test = context.test   # test-sinks: never rotates a file a daemon may be writing

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self._open)
        except SinkError as exc:   # not fatal: every send retries the open (and is retried)
            log.warning("file.open_failed", path=str(self.path), error=str(exc))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._close)

    async def send(self, record: TurnRecord) -> None:
        """Append one line (and fsync); rotate first if the line would overflow the file."""
        line = (record.to_json() + "\n").encode("utf-8")
        try:
            await asyncio.to_thread(self._write, line)
        except OSError as exc:
            self._close()   # the next send reopens (and closes off a torn line)
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _open(self, mode: int = PRIVATE_FILE) -> None:
        """Open (create) the file for appending; one this creates is ``mode`` (0600: private)."""
        try:
            self.path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            if self.path.is_fifo():     # opening it would wait for a reader, for ever
                raise SinkError(f"cannot open {self.path}: it is a FIFO (a named pipe)")
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
            handle = open(fd, "ab", buffering=0)    # unbuffered: a failed write is undone whole
            try:
                if os.fstat(fd).st_size > 0:
                    self._end_torn_line(fd)
            except BaseException:
                handle.close()
                raise
            if created and self.config.fsync:   # the new name (and a rotation's) survives too
                _sync_folder(self.path.resolve().parent)   # a link's target's folder
            self._handle = handle
        except FileExistsError:         # mkdir: the folder's name is taken by a file
            raise SinkError(
                f"cannot open {self.path}: {self.path.parent} is not a directory"
            ) from None
        except OSError as exc:
            raise SinkError(f"cannot open {self.path}: {exc.strerror or exc}") from None

    def _end_torn_line(self, fd: int) -> None:
        """A file whose last line was cut off (a crash mid-write) gets its newline first."""
        try:
            with self.path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                torn = reader.read(1) != b"\n"
        except PermissionError:     # a file we may append to but not read: cannot tell
            return
        if torn:
            write_all(fd, b"\n")

    def _write(self, line: bytes) -> None:
        if self._handle is not None and (moved := self._moved(self._handle)):
            self._gone = moved
            self._close()
        if self._handle is None:
            self._open()
            if self._gone:      # said once it is open again: a failed open is send_failed's
                log.warning("file.reopened", sink=self.name, path=str(self.path),
                            reason=self._gone)
                self._gone = ""
        assert self._handle is not None
        limit = 0 if self._test else self.config.rotate_bytes  # test-sinks: the daemon rotates
        # the size, not tell(): a file truncated under us (copytruncate) keeps a stale offset
        size = os.fstat(self._handle.fileno()).st_size
        if limit and size > 0 and size + len(line) > limit:
            self._rotate()
            assert self._handle is not None
        # ENOSPC part-way: the torn line is cut off; the send is retried whole
        append_whole(self._handle.fileno(), line, fsync=self.config.fsync)

    def _rotate(self) -> None:
        """Shift ``path`` to ``path.1`` (… ``path.<keep>``); the new file keeps its mode.

        A rotation that fails (a folder we cannot write, ``path.1`` a folder) is logged once
        and the record goes on into the open file: turns never wait in memory for it. After
        one that worked, rotations beyond ``keep`` (left by a higher ``keep``) are removed.
        A ``path`` that is a symbolic link rotates the file it names, beside it: the link
        stays, and names the new file (renaming the link instead sent every later turn to a
        new file where the link was, away from the folder it pointed to).
        """
        assert self._handle is not None
        mode = stat.S_IMODE(os.fstat(self._handle.fileno()).st_mode)
        keep = self.config.keep
        path = self.path.resolve() if self.path.is_symlink() else self.path
        try:
            if keep == 0:
                path.unlink(missing_ok=True)
            else:
                Path(f"{path}.{keep}").unlink(missing_ok=True)
                for index in range(keep - 1, 0, -1):
                    older = Path(f"{path}.{index}")
                    if older.exists():
                        older.rename(f"{path}.{index + 1}")
                path.rename(f"{path}.1")
        except OSError as exc:
            self._note_rotation(f"{exc.filename}: {exc.strerror or exc}")
            return
        self._note_rotation(self._remove_beyond_keep(path))
        self._close()
        self._open(mode)

    def _remove_beyond_keep(self, path: Path) -> str:
        """Remove ``path.<keep+1>``, ``path.<keep+2>`` … up to the first missing one.

        Only files and symlinks are removed: anything else (a folder), like a gap or a name that
        cannot be looked up (too long), ends the sweep, so nothing but that run of old
        rotations is ever touched. Returns why one could not be removed, or ``""``.
        """
        index = self.config.keep + 1
        while True:
            older = Path(f"{path}.{index}")
            try:
                kind = older.lstat().st_mode
            except OSError:
                return ""
            if not (stat.S_ISREG(kind) or stat.S_ISLNK(kind)):
                return ""
            try:
                older.unlink(missing_ok=True)
            except OSError as exc:
                return f"cannot remove {older}: {exc.strerror or exc}"
            index += 1

    def _note_rotation(self, error: str) -> None:
        """Log why a rotation (or its clean-up) failed, once until the reason changes."""
        if error and error != self._rotate_failed:
            log.warning("file.rotate_failed", sink=self.name, path=str(self.path),
                        error=error, rotate_bytes=self.config.rotate_bytes)
        self._rotate_failed = error

    def _moved(self, handle: IO[bytes]) -> str:
        """Why ``path`` no longer names the open file (deleted, rotated, replaced), or ``""``."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return "the file was deleted or renamed"
        except OSError as exc:  # e.g. ENOTDIR: its folder was replaced by a file
            return f"the path cannot be checked: {exc.strerror or exc}"
        opened = os.fstat(handle.fileno())
        if (on_disk.st_dev, on_disk.st_ino) != (opened.st_dev, opened.st_ino):
            return "the path names another file now"
        return ""

    def _close(self) -> None:
        """Close the file (nothing is buffered: a failed send is retried whole)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()


def _not_a_file_path(path: Path) -> str:
    """Why the sink could never open ``path``: a folder, or below a file; else ``""``."""
    try:
        if path.is_dir():
            return f"{path_text(path)} is a directory (name a file in it)"
        folder = next(p for p in path.parents if p.exists())
    except OSError:           # not ours to look at (yet): the open says why
        return ""
    if folder.is_dir():
        return ""
    return f"{path_text(path)} cannot be created: {path_text(folder)} is not a directory"


def _sync_folder(folder: Path) -> None:
    """Sync a folder, so a file created or renamed in it survives a power loss.

    Best effort: a file system that cannot sync a folder must not stop the sink.
    """
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@hookimpl
def transcribed_sink_types() -> list[SinkType]:
    """Provide the ``file`` sink type."""
    return [SinkType("file", FileSinkConfig, FileSink)]
