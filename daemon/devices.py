"""Audio input devices as PortAudio sees them: listing, the ``devices`` table, selection.

Also PortAudio's blocking calls, each in a thread of its own (a hung sound server never answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from daemon.audio_noise import quiet_libraries, stderr_silenced
from daemon.errors import EX_CONFIG, AudioError

if TYPE_CHECKING:  # PortAudio loads only when a device is opened or listed
    import pyaudio

_T = TypeVar("_T")
LIST_LIMIT_S: Final = 20.0  # listing the devices taking longer than this: the sound server is hung


class AmbiguousDevice(AudioError):
    """``audio.device`` matches several input devices: a configuration error, never waited out.

    Exit 78, as every config error: systemd does not restart the unit into the same ambiguity.
    """

    exit_code = EX_CONFIG


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One audio input device as PortAudio reports it."""

    index: int
    name: str
    default_sample_rate: int
    max_input_channels: int
    is_default: bool


def new_pyaudio() -> pyaudio.PyAudio:
    """Initialise PortAudio (blocking, ~100 ms) without its stderr noise."""
    import pyaudio

    quiet_libraries()
    with stderr_silenced():
        return pyaudio.PyAudio()


def close_pyaudio(pa: pyaudio.PyAudio) -> None:
    """Terminate PortAudio (blocking) without its stderr noise."""
    with stderr_silenced():
        pa.terminate()


def input_devices(pa: pyaudio.PyAudio) -> list[DeviceInfo]:
    """Enumerate the input devices of an initialised PortAudio."""
    try:
        default = int(pa.get_default_input_device_info()["index"])
    except OSError:
        default = -1
    devices = []
    for index in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(index)
        if int(info["maxInputChannels"]) > 0:
            devices.append(
                DeviceInfo(
                    index=index,
                    name=str(info["name"]),
                    default_sample_rate=round(float(info["defaultSampleRate"])),
                    max_input_channels=int(info["maxInputChannels"]),
                    is_default=index == default,
                )
            )
    return devices


def list_devices(limit_s: float = LIST_LIMIT_S) -> list[DeviceInfo]:
    """Return the audio input devices (blocking: call it via ``asyncio.to_thread`` in a loop).

    Raises:
        AudioError: no answer within ``limit_s`` (a hung sound server hangs PortAudio's
            start-up for ever; the listing is left to its thread).
    """
    outcome: list[list[DeviceInfo] | Exception] = []

    def listing() -> None:
        try:
            pa = new_pyaudio()
            try:
                outcome.append(input_devices(pa))
            finally:
                close_pyaudio(pa)
        except Exception as exc:  # raised again in the caller
            outcome.append(exc)

    thread = threading.Thread(target=listing, name="portaudio-list", daemon=True)
    thread.start()
    thread.join(limit_s)
    if not outcome:
        raise AudioError(f"listing audio devices: no answer within {limit_s:g} s "
                         "(is the sound server (PipeWire/PulseAudio) hung?)")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def format_devices(devices: list[DeviceInfo]) -> str:
    """Render devices as the table ``transcribed devices`` prints (``*`` marks the default)."""
    if not devices:
        return "no audio input devices found"
    width = max(4, *(len(d.name) for d in devices))
    lines = [f"{'INDEX':>5}  {'NAME':<{width}}  {'RATE':>6}  {'CHANNELS':>8}  DEFAULT"]
    for d in devices:
        mark = "*" if d.is_default else ""
        lines.append(
            f"{d.index:>5}  {d.name:<{width}}  {d.default_sample_rate:>6}  "
            f"{d.max_input_channels:>8}  {mark}"
        )
    return "\n".join(lines)


_CARD_SUFFIX = re.compile(r" \(hw:\d+,\d+\)$")  # ALSA's card number: a replug may change it


def resolve_device(
    devices: list[DeviceInfo], spec: str, opened: DeviceInfo | None = None
) -> DeviceInfo:
    """Pick a device per SPEC: '' = default, an integer = index, else a name substring.

    ``opened`` is the device a reopen replaces. An index named that device, which is found
    again by its name wherever it now is (a device plugged in meanwhile, or a replug, moves
    indices); while it is not listed, it is missing, whatever now has its index.

    Raises:
        AudioError: nothing or several match; the message lists the devices to choose from.
    """
    if opened is None or not spec.strip().isdecimal():
        return _resolve(devices, spec)
    for key in (lambda name: name, lambda name: _CARD_SUFFIX.sub("", name)):
        same = [d for d in devices if key(d.name) == key(opened.name)]
        if len(same) == 1:
            return same[0]
    raise AudioError(
        f"audio device {spec.strip()} ({opened.name!r}) is gone; "
        f"available input devices: {describe_devices(devices)}"
    )


def describe_devices(devices: list[DeviceInfo]) -> str:
    """One-line list of input devices for error messages and logs."""
    return ", ".join(f"{d.index} {d.name!r}" for d in devices) or "none"


def _resolve(devices: list[DeviceInfo], spec: str) -> DeviceInfo:
    """The device ``spec`` names in ``devices``.

    A name matched in full wins over names that merely contain it; a name that matches several
    devices is an error, never a guess.

    Raises:
        AudioError: nothing matches (:class:`AmbiguousDevice`: several do); the message lists
            the devices to choose from.
    """
    spec = spec.strip()
    if not spec:
        found = [d for d in devices if d.is_default]
        problem = "no default audio input device"
    elif spec.isdecimal():
        found = [d for d in devices if d.index == int(spec)]
        problem = f"audio device {spec} not found or not an input"
    else:
        needle = spec.casefold()
        found = [d for d in devices if d.name.casefold() == needle] or [
            d for d in devices if needle in d.name.casefold()
        ]
        problem = f"no audio input device matches {spec!r}"
    if len(found) > 1:
        raise AmbiguousDevice(
            f"audio device {spec!r} matches {len(found)} input devices: {describe_devices(found)}; "
            "set audio.device to the index or more of the name (see `transcribed devices`)"
        )
    if not found:
        raise AudioError(f"{problem}; available input devices: {describe_devices(devices)}")
    return found[0]


async def blocking(call: Callable[[], _T], undo: Callable[[_T], object] | None = None) -> _T:
    """Run a blocking PortAudio call in a daemon thread of its own and await its outcome.

    Unlike ``asyncio.to_thread``, a call that never returns (a hung sound server never answers)
    holds neither the loop's executor nor the process's exit once its caller gives up on it.
    What such a call opens after all is closed again with ``undo``.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: Exception | None) -> None:  # on the loop
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]  # None only with an error
        elif undo is not None and result is not None:  # the caller gave up on it
            threading.Thread(target=undo, args=(result,), name="portaudio-undo",
                             daemon=True).start()

    def run() -> None:
        result: _T | None = None
        error: Exception | None = None
        try:
            result = call()
        except Exception as exc:  # raised again in the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits any more
            if undo is not None and result is not None:
                undo(result)

    threading.Thread(target=run, name="portaudio-call", daemon=True).start()
    return await future


def shut(stream: pyaudio.Stream | None, pa: pyaudio.PyAudio | None) -> None:
    """Blocking: stop and close the stream, then terminate PortAudio."""
    if stream is not None:
        stop_stream(stream)
    if pa is not None:
        close_pyaudio(pa)


def stop_stream(stream: pyaudio.Stream) -> None:
    """Blocking: stop and close a stream, ignoring a device that is already gone."""
    with stderr_silenced(), contextlib.suppress(OSError):
        stream.stop_stream()
    with stderr_silenced(), contextlib.suppress(OSError):
        stream.close()
