"""Writing to a file descriptor: all of the data, however little each ``write`` takes."""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``.

    A pipe, or a regular file near full, may take less than asked (and then fail: ``OSError``).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
