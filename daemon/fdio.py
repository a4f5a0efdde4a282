"""Writing to a file descriptor: all of the data, however little each ``write`` takes.

And appending to a file all of the data or none of it (``append_whole``).
"""

from __future__ import annotations

import os
from contextlib import suppress


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``.

    A pipe, or a regular file near full, may take less than asked (and then fail: ``OSError``).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_whole(fd: int, data: bytes, *, fsync: bool = False) -> None:
    """Append all of ``data`` to the file open as ``fd`` (then ``fsync`` it), or none of it.

    A write the disk cuts short (full) is cut off again before the error is raised, so a retry
    does not run on from a piece of this one: every line of a JSON-lines file stays whole.
    """
    start = os.fstat(fd).st_size    # not tell(): a file truncated under us keeps a stale offset
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except OSError:
        with suppress(OSError):
            os.ftruncate(fd, start)
        raise
