"""Keeping PortAudio, ALSA and JACK chatter out of the daemon's stderr (its log stream).

ALSA and JACK report through handlers we replace with no-ops; PortAudio prints straight to fd 2,
so its calls run inside :func:`stderr_silenced`, which parks fd 2 on a scratch file and passes on
what other threads wrote meanwhile (the daemon's own log lines), dropping only the noise.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, Final

from daemon.fdio import write_all

_stderr_lock = threading.Lock()
# What PortAudio, ALSA and JACK print while probing or opening devices (lines starting so)
_NOISE: Final = (b"ALSA lib ", b"Expression '", b"Cannot connect to server", b"jack server is not",
                 b"JackShm")
# fd 2 is parked no longer: a hung PortAudio call lets the logs out (and is back before the
# callers give up on such a call: audio.CLOSE_LIMIT_S, devices.LIST_LIMIT_S)
SILENCE_LIMIT_S: Final = 3.0
_installed: list[Any] = []  # the C callbacks, kept alive for as long as the libraries may call


def quiet_libraries() -> None:
    """Replace ALSA's error handler and JACK's error/info handlers with no-ops (once)."""
    if _installed:
        return
    _installed.append(None)
    import ctypes  # here, not at the top: only a microphone needs it (~0.7 MB RSS)
    import ctypes.util

    alsa_handler = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p
    )
    jack_handler = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    with contextlib.suppress(OSError, AttributeError):
        alsa = ctypes.CDLL(ctypes.util.find_library("asound") or "libasound.so.2")
        handler = alsa_handler(lambda *_: None)
        alsa.snd_lib_error_set_handler(handler)
        _installed.append(handler)
    with contextlib.suppress(OSError, AttributeError):
        jack = ctypes.CDLL(ctypes.util.find_library("jack") or "libjack.so.0")
        quiet = jack_handler(lambda _: None)
        jack.jack_set_error_function(quiet)
        jack.jack_set_info_function(quiet)
        _installed.append(quiet)


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Keep PortAudio's noise off fd 2 for a moment; what other threads wrote is passed on.

    A moment at most: a call that hangs (a frozen sound server never answers PortAudio) gets
    fd 2 back after :data:`SILENCE_LIMIT_S`, so the daemon's own lines meanwhile (the watchdog
    saying capture is stuck) reach the journal instead of piling up unseen.
    """
    with _stderr_lock:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to protect
            yield
            return
        scratch = _scratch_fd()
        parked = _Parked(saved, scratch)
        timer = threading.Timer(SILENCE_LIMIT_S, parked.restore)
        timer.daemon = True
        try:
            os.dup2(scratch, 2)
            timer.start()
            yield
        finally:
            timer.cancel()
            parked.restore()
            os.close(saved)
            os.close(scratch)


class _Parked:
    """fd 2 parked on a scratch file; :meth:`restore` swaps it back once, from either thread."""

    def __init__(self, saved: int, scratch: int) -> None:
        self._saved, self._scratch = saved, scratch
        self._lock = threading.Lock()
        self._restored = False

    def restore(self) -> None:
        """Swap fd 2 back, passing on what was caught (in order but for the swap's instant)."""
        with self._lock:
            if self._restored:
                return
            self._restored = True
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.flush()
            done = _pass_on(self._scratch, 0, self._saved, whole_lines=True)
            os.dup2(self._saved, 2)
            _pass_on(self._scratch, done, 2, whole_lines=False)


def _scratch_fd() -> int:
    """An anonymous file to hold fd 2's output (``/dev/null`` if none can be had)."""
    try:
        return os.memfd_create("transcribed-stderr")
    except (AttributeError, OSError):
        return os.open(os.devnull, os.O_RDWR)


def _pass_on(scratch: int, start: int, target: int, *, whole_lines: bool) -> int:
    """Write what ``scratch`` caught from ``start`` on to ``target``, without the library noise.

    Reads with ``pread``, as fd 2 may still be appending to the same file; with ``whole_lines``
    an unfinished last line is left for the next call. Returns where that call starts.
    """
    caught = bytearray()
    with contextlib.suppress(OSError):  # /dev/null: nothing was kept
        while block := os.pread(scratch, 65536, start + len(caught)):
            caught += block
    if whole_lines:
        del caught[caught.rfind(b"\n") + 1 :]
    kept = b"".join(
        line for line in bytes(caught).splitlines(keepends=True)
        if line.strip() and not line.startswith(_NOISE)
    )
    if kept and not kept.endswith(b"\n"):  # a line cut by the swap back: its end went ahead
        kept += b"\n"
    with contextlib.suppress(OSError):
        write_all(target, kept)
    return start + len(caught)
