"""PyAudio devices: list them, pick one by index or name, and keep ALSA's chatter off stderr."""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass

from common.stage import StageError

_alsa_silenced = False
_ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)


def _ignore_alsa_error(*_args) -> None:
    pass


_alsa_handler = _ERROR_HANDLER(_ignore_alsa_error)


def _silence_alsa() -> None:
    """ALSA prints dozens of harmless 'unable to open slave' lines when PortAudio probes; drop them."""
    global _alsa_silenced
    if _alsa_silenced or os.environ.get("VOICEBUS_ALSA_VERBOSE"):
        return
    with contextlib.suppress(OSError):
        ctypes.cdll.LoadLibrary("libasound.so.2").snd_lib_error_set_handler(_alsa_handler)
    _alsa_silenced = True


class DeviceError(StageError):
    pass


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_rate: int
    is_default_input: bool
    is_default_output: bool


def open_pyaudio():
    _silence_alsa()
    import pyaudio

    return pyaudio.PyAudio()


def close_stream(pa, stream) -> None:
    """Stop and close a PortAudio stream, then release PortAudio (either may be None)."""
    if stream is not None:
        stream.stop_stream()
        stream.close()
    if pa is not None:
        pa.terminate()


def list_devices(pa) -> list[Device]:
    try:
        default_in = pa.get_default_input_device_info()["index"]
    except OSError:
        default_in = -1
    try:
        default_out = pa.get_default_output_device_info()["index"]
    except OSError:
        default_out = -1
    devices = []
    for index in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(index)
        host = pa.get_host_api_info_by_index(info["hostApi"])["name"]
        devices.append(Device(index, info["name"], host, int(info["maxInputChannels"]),
                              int(info["maxOutputChannels"]), int(info["defaultSampleRate"]),
                              index == default_in, index == default_out))
    return devices


def describe_devices(devices: list[Device]) -> str:
    lines = [f"{'idx':>3}  {'name':<28} {'api':<6} {'in':>3} {'out':>3} {'rate':>6}  default"]
    for d in devices:
        marks = ",".join(m for m, on in (("input", d.is_default_input), ("output", d.is_default_output)) if on)
        lines.append(f"{d.index:>3}  {d.name[:28]:<28} {d.host_api[:6]:<6} {d.max_input_channels:>3} "
                     f"{d.max_output_channels:>3} {d.default_rate:>6}  {marks}")
    return "\n".join(lines)


def pick_device(pa, wanted: str | None, direction: str) -> Device:
    """`wanted` is an index or a case-insensitive name substring; None picks the default device."""
    devices = list_devices(pa)
    usable = [d for d in devices if (d.max_input_channels if direction == "input" else d.max_output_channels) > 0]
    if not usable:
        raise DeviceError(f"no {direction} device found; is PulseAudio running? (`voicebus doctor`, "
                          f"or scripts/pulse-up.sh for virtual devices)")
    if wanted is None:
        chosen = [d for d in usable if (d.is_default_input if direction == "input" else d.is_default_output)]
        return (chosen or usable)[0]
    if wanted.isdigit():
        match = [d for d in usable if d.index == int(wanted)]
    else:
        match = [d for d in usable if wanted.lower() in d.name.lower()]
    if not match:
        raise DeviceError(f"no {direction} device matches {wanted!r}; available:\n{describe_devices(usable)}")
    return match[0]
