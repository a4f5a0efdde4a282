"""Audio input devices as PortAudio sees them: listing, the ``devices`` table, selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.audio_noise import quiet_libraries, stderr_silenced
from daemon.errors import AudioError

if TYPE_CHECKING:  # PortAudio loads only when a device is opened or listed
    import pyaudio


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


def list_devices() -> list[DeviceInfo]:
    """Return the audio input devices (blocking: call it via ``asyncio.to_thread`` in a loop)."""
    pa = new_pyaudio()
    try:
        return input_devices(pa)
    finally:
        close_pyaudio(pa)


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


def _describe(devices: list[DeviceInfo]) -> str:
    """One-line list of input devices for error messages."""
    return ", ".join(f"{d.index} {d.name!r}" for d in devices) or "none"


def resolve_device(devices: list[DeviceInfo], spec: str) -> DeviceInfo:
    """Pick a device per SPEC: '' = default, an integer = index, else a name substring.

    A name matched in full wins over names that merely contain it; a name that matches several
    devices is an error, never a guess.

    Raises:
        AudioError: nothing or several match; the message lists the devices to choose from.
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
        raise AudioError(
            f"audio device {spec!r} matches {len(found)} input devices: {_describe(found)}; "
            "set audio.device to the index or more of the name (see `transcribed devices`)"
        )
    if not found:
        raise AudioError(f"{problem}; available input devices: {_describe(devices)}")
    return found[0]
