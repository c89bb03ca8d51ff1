"""PyAudio devices: list them, pick one by index or name, and keep ALSA's chatter off stderr."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
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


# The output's period. A flush stops the stream (its buffer is never heard) and `player.state`
# subtracts what the device still holds, so the period only trades CPU against latency: at 5 ms,
# 200 callbacks a second took ~2.3 % of a core while a reply played, at 10 ms ~1.3 %, at 20 ms ~1.0 %;
# the device's buffer (2 periods and PulseAudio's own) added ~13, ~23 and ~50 ms to server -> ear.
# 10 ms is WebRTC's own audio callback period.
OUTPUT_PERIOD_MS = 10
AUDIO_NICE = -10  # above ordinary work, below PulseAudio's own -11
AUDIO_SWITCH_INTERVAL_S = 0.001  # a PortAudio callback waits at most ~1 ms for the GIL (default 5 ms)
AUDIO_RT_PRIORITY = 4  # round-robin, just below PulseAudio's own sink threads (5)
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def prioritize_audio_process() -> dict[str, object]:
    """Make a process that feeds an audio device hard to starve; returns what could be applied.

    A PortAudio callback runs Python, so it needs the GIL: a main thread preempted while holding
    it, a 5 ms GIL switch interval, or a page fault on evicted code all delay the callback past a
    small device buffer, and the listener hears a gap. Each measure is best effort (priority and
    locked memory need root or CAP_SYS_NICE / RLIMIT_MEMLOCK); what was refused is reported, not fatal.
    MCL_ONFAULT locks pages as they are touched instead of populating every mapping (no RSS growth).
    """
    applied: dict[str, object] = {}
    sys.setswitchinterval(AUDIO_SWITCH_INTERVAL_S)
    applied["switch_interval_ms"] = AUDIO_SWITCH_INTERVAL_S * 1000
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > AUDIO_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, AUDIO_NICE)
        applied["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        applied["nice"] = f"unchanged ({os.getpriority(os.PRIO_PROCESS, 0)}: not permitted)"
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        ok = libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0
        applied["memory_locked"] = ok or f"no ({os.strerror(ctypes.get_errno())})"
    except OSError:
        applied["memory_locked"] = "no (libc not found)"
    return applied


def realtime_threads() -> str:
    """Put every thread of this process under round-robin real-time scheduling; returns what happened.

    Call it once the device stream is open, so PortAudio's callback thread and libpulse's
    mainloop thread exist. Nice -10 is not enough on a busy 2-core machine: with three CPU-bound
    neighbours the player's callback was measured 160 ms late (a gap the listener hears); under
    SCHED_RR it runs ahead of all ordinary work. All threads, not just the callback's, because the
    callback needs the GIL and the main thread may hold it (no priority inversion through the GIL).
    The kernel still keeps 5 % of every second for ordinary tasks (sched_rt_runtime_us), and
    RESET_ON_FORK keeps child processes ordinary. Needs root or RLIMIT_RTPRIO; refused is reported.
    """
    if not hasattr(os, "SCHED_RR"):
        return "no (not Linux)"
    policy = os.SCHED_RR | getattr(os, "SCHED_RESET_ON_FORK", 0)
    threads = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setscheduler(int(tid), policy, os.sched_param(AUDIO_RT_PRIORITY))
                threads += 1
    except OSError as error:
        return f"no ({error.strerror})"
    return f"SCHED_RR {AUDIO_RT_PRIORITY} on {threads} threads"


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


@contextlib.contextmanager
def _stderr_to_devnull():
    """Point fd 2 at /dev/null for a moment: libjack prints its probing noise straight to the fd."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def open_pyaudio():
    """PortAudio, initialised without the ALSA and JACK chatter its probing prints on stderr.

    PortAudio asks every host API it was built with (JACK included) for devices; with no JACK
    server, libjack prints "jack server is not running" and JackShm lines. Set
    VOICEBUS_ALSA_VERBOSE=1 to see all of it.
    """
    _silence_alsa()
    import pyaudio

    if os.environ.get("VOICEBUS_ALSA_VERBOSE"):
        return pyaudio.PyAudio()
    with _stderr_to_devnull():
        return pyaudio.PyAudio()


def close_stream(pa, stream) -> None:
    """Stop and close a PortAudio stream, then release PortAudio (either may be None)."""
    if stream is not None:
        stream.stop_stream()
        stream.close()
    if pa is not None:
        pa.terminate()


def abort_stream(stream) -> None:
    """Stop a PortAudio stream at once, dropping what its buffers still hold.

    PyAudio's `Stream.stop_stream` is Pa_StopStream, which plays the buffers out: on the ALSA pulse
    plugin that blocked for up to ~2 s after a stream had just started. Pa_AbortStream returns in
    under a millisecond; PyAudio binds it but does not expose it on `Stream`, hence `_portaudio`.
    `stream.start_stream()` starts it again.
    """
    from pyaudio import _portaudio

    if not stream.is_stopped():
        _portaudio.abort_stream(stream._stream)
    stream._is_running = False  # what Stream.stop_stream records, so that start_stream starts it again


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
