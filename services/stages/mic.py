"""`voicebus mic`: capture audio and publish `audio.mic` frames (20 ms, native rate, s16le).

The PortAudio callback (or the WAV clock's thread) publishes each frame itself, on a PUB socket of
its own (`publishes_from_thread`): a send never waits on the bus (a full queue drops and counts),
and handing every frame to the runner thread first cost a thread wake-up per 20 ms. The end of a
WAV and a cue's start and end go through the stage inbox to the runner thread.

`t_capture_ns` is the wall-clock time of the frame's first sample. With a device it comes from
PortAudio's `input_buffer_adc_time` mapped onto the wall clock when PortAudio provides it
(`clock="adc"`), else from the callback time minus the frame length (`clock="callback"`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from common.audio_devices import (
    close_stream,
    open_pyaudio,
    pick_device,
    prioritize_audio_process,
    realtime_threads,
)
from common.envelope import Message
from common.log import kv
from common.resample import float_to_pcm, pcm_to_mono_float, resample_oneshot
from common.silence import Release, SilenceBatcher
from common.stage import Output, Stage
from common.wavio import WavError, read_wav

log = logging.getLogger("voicebus.mic")
MAX_ADC_SKEW_S = 1.0  # adc time further than this from "now" is not trusted


@dataclass(frozen=True)
class CapturedFrame:
    pcm: bytes
    t_capture_ns: int
    overflow: bool = False
    t_callback_ns: int = 0  # when PortAudio (or the WAV clock) handed the frame over


END_OF_SOURCE = object()


PREFERRED_RATE = 48_000


def preferred_rate(pa: Any, index: int, channels: int, default_rate: int) -> int:
    """48 kHz when the device takes it, else its default. PortAudio's "default" rate for the ALSA
    pulse/pipewire devices is a nominal 44.1 kHz while the sound server (and most hardware) runs at
    48 kHz: asking for 44.1 kHz would add a resampling in the sound server before ours, and 44.1 to
    24 kHz is the costlier ratio for our resampler (80 phases against 1)."""
    import pyaudio

    try:
        if pa.is_format_supported(PREFERRED_RATE, input_device=index, input_channels=channels,
                                  input_format=pyaudio.paInt16):
            return PREFERRED_RATE
    except ValueError:  # PyAudio raises ValueError for an unsupported format
        pass
    return int(default_rate)


class DeviceSource:
    """A PyAudio input stream in callback mode."""

    def __init__(self, device: str | None, rate: int | None, channels: int, frame_ms: int) -> None:
        self.wanted, self.rate, self.channels, self.frame_ms = device, rate, channels, frame_ms
        self.clock = "callback"
        self._pa = None
        self._stream = None

    def start(self, put) -> None:
        import pyaudio

        priority = prioritize_audio_process()
        self._pa = open_pyaudio()
        device = pick_device(self._pa, self.wanted, "input")
        self.rate = self.rate or preferred_rate(self._pa, device.index, self.channels, device.default_rate)
        self.channels = min(self.channels, device.max_input_channels)
        frames = self.rate * self.frame_ms // 1000
        frame_ns = int(self.frame_ms * 1e6)

        def callback(in_data: bytes, _count: int, time_info: dict[str, float], status: int):
            now_ns = time.time_ns()
            adc, current = time_info.get("input_buffer_adc_time", 0.0), time_info.get("current_time", 0.0)
            if adc > 0 and current > 0 and 0 <= current - adc < MAX_ADC_SKEW_S:
                self.clock = "adc"
                t_capture = now_ns - int((current - adc) * 1e9)
            else:
                t_capture = now_ns - frame_ns
            put(CapturedFrame(in_data, t_capture, bool(status & pyaudio.paInputOverflow), now_ns))
            return None, pyaudio.paContinue

        self._stream = self._pa.open(format=pyaudio.paInt16, channels=self.channels, rate=self.rate, input=True,
                                     input_device_index=device.index, frames_per_buffer=frames,
                                     stream_callback=callback)
        priority["scheduling"] = realtime_threads()
        log.info(kv("device_open", device=repr(device.name), rate=self.rate, channels=self.channels,
                    frame_ms=self.frame_ms, latency_ms=round(self._stream.get_input_latency() * 1000, 1), **priority))

    def stop(self) -> None:
        close_stream(self._pa, self._stream)


class WavSource:
    """A WAV file played into the bus at real-time pace (or faster), like a microphone would."""

    clock = "wav"

    def __init__(self, path: str, frame_ms: int, speed: float = 1.0, loop: bool = False,
                 lead_silence_s: float = 0.0, tail_silence_s: float = 0.0) -> None:
        self.audio = read_wav(path)  # raises WavError with a clear message
        self.rate, self.channels, self.frame_ms = self.audio.rate, self.audio.channels, frame_ms
        self.speed, self.loop = speed, loop
        self.lead_silence_s, self.tail_silence_s = lead_silence_s, tail_silence_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, put) -> None:
        self._thread = threading.Thread(target=self._run, args=(put,), name="wav-source", daemon=True)
        self._thread.start()
        log.info(kv("wav_open", rate=self.rate, channels=self.channels, seconds=round(self.audio.seconds, 2),
                    speed=self.speed, loop=self.loop))

    def _run(self, put) -> None:
        frame_bytes = self.rate * self.frame_ms // 1000 * 2 * self.channels
        sample_frame = 2 * self.channels
        pcm = bytes(int(self.lead_silence_s * self.rate) * sample_frame) + self.audio.pcm + \
            bytes(int(self.tail_silence_s * self.rate) * sample_frame)
        period_s = self.frame_ms / 1000 / self.speed if self.speed > 0 else 0.0
        started = time.monotonic()
        index = 0
        while not self._stop.is_set():
            for offset in range(0, len(pcm), frame_bytes):
                if self._stop.is_set():
                    return
                due = started + index * period_s
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                now_ns = time.time_ns()
                put(CapturedFrame(pcm[offset:offset + frame_bytes], now_ns, t_callback_ns=now_ns))
                index += 1
            if not self.loop:
                break
        put(END_OF_SOURCE)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


CUE_TOPIC = "mic.play"  # {cue, path}: speak this WAV into a cued mic now
CUE_STATE_TOPIC = "mic.cue"  # {cue, state: started|ended|error, t_capture_ns, pts, reason}


@dataclass
class _Cue:
    cue: str
    pcm: bytes
    offset: int = 0
    started: bool = False


class CuedSource:
    """A live microphone that hears silence until it is told to speak (`voicebus eval`).

    Each `mic.play {cue, path}` on the bus queues a WAV; its first sample goes out in the next frame
    (<= one frame after the cue), so a test can barge in at a chosen moment of a reply, and the
    stream never stops between turns, as a real microphone's does not. The start and end of each cue
    are published (`mic.cue`) with their capture times, on the same clock as the frames.
    """

    clock = "wav"

    def __init__(self, rate: int, frame_ms: int) -> None:
        self.rate, self.channels, self.frame_ms = rate, 1, frame_ms
        self._queue: deque[_Cue] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notify = None

    def cue(self, cue: str, path: str) -> float:
        """Queue a WAV (any rate, mono or stereo, 16-bit); its length in seconds. Raises WavError."""
        audio = read_wav(path)
        if audio.rate == self.rate and audio.channels == 1:
            pcm = audio.pcm  # as it is: no float round trip
        else:
            pcm = float_to_pcm(resample_oneshot(pcm_to_mono_float(audio.pcm, audio.channels), audio.rate, self.rate))
        with self._lock:
            self._queue.append(_Cue(cue, pcm))
        return audio.seconds

    def start(self, put, notify=None) -> None:
        self._notify = notify
        self._thread = threading.Thread(target=self._run, args=(put,), name="cued-source", daemon=True)
        self._thread.start()
        log.info(kv("cued_mic_open", rate=self.rate, frame_ms=self.frame_ms, cue_topic=CUE_TOPIC))

    def _next_frame(self, frame_bytes: int, t_ns: int, pts: int) -> bytes:
        with self._lock:
            current = self._queue[0] if self._queue else None
            if current is None:
                return bytes(frame_bytes)
            if not current.started:
                current.started = True
                self._tell(current.cue, "started", t_ns, pts)
            chunk = current.pcm[current.offset:current.offset + frame_bytes]
            current.offset += len(chunk)
            if current.offset >= len(current.pcm):
                self._queue.popleft()
                end_ns = t_ns + len(chunk) // 2 * 1_000_000_000 // self.rate
                self._tell(current.cue, "ended", end_ns, pts + len(chunk) // 2)
        return chunk + bytes(frame_bytes - len(chunk))

    def _tell(self, cue: str, state: str, t_ns: int, pts: int) -> None:
        if self._notify is not None:
            self._notify({"cue": cue, "state": state, "t_capture_ns": t_ns, "pts": pts})

    def _run(self, put) -> None:
        """Frames on a sample clock: frame i was captured at start + i frames, however late the
        thread wakes to send it (a sound card's ADC clock does not wander with the scheduler)."""
        frame_bytes = self.rate * self.frame_ms // 1000 * 2
        period_s, period_ns = self.frame_ms / 1000, self.frame_ms * 1_000_000
        started, started_ns = time.monotonic(), time.time_ns()
        index = 0
        while not self._stop.is_set():
            delay = started + index * period_s - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            captured_ns = started_ns + index * period_ns
            put(CapturedFrame(self._next_frame(frame_bytes, captured_ns, index * frame_bytes // 2), captured_ns,
                              t_callback_ns=time.time_ns()))
            index += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


class MicStage(Stage):
    name = "mic"
    publishes_from_thread = True  # frames go out from the audio (or WAV clock) thread itself

    def __init__(self, source: DeviceSource | WavSource | CuedSource, topic: str = "audio.mic",
                 silence: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.source, self.topic = source, topic
        self.silence_settings = silence or {}  # SilenceBatcher's keyword arguments; {"batch_ms": 0}: off
        self.batcher: SilenceBatcher | None = None  # made once the source knows its rate
        self.pts = 0
        self.overflows = 0
        self.frames = 0
        self.cues = {"queued": 0, "refused": 0}
        if isinstance(source, CuedSource):
            self.subscriptions = [CUE_TOPIC]

    def start(self) -> None:
        put = self._take if self.thread_out is not None else self.inbox.put
        if isinstance(self.source, CuedSource):
            self.source.start(put, notify=self.inbox.put)
        else:
            self.source.start(put)
        self.batcher = SilenceBatcher(self.source.rate, self.source.channels, **self.silence_settings)
        log.info(kv("silence_batching", setting=self.batcher.describe()))

    def handle(self, message: Message) -> None:
        """A cue (cued mic only): queue its WAV; a bad one is refused, said on the bus, and counted."""
        if message.topic != CUE_TOPIC or not isinstance(self.source, CuedSource):
            return
        data = message.data if isinstance(message.data, dict) else {}
        cue, path = str(data.get("cue", "")), data.get("path")
        try:
            if not isinstance(path, str):
                raise WavError(f"a cue needs a WAV path, got {path!r}")
            seconds = self.source.cue(cue, path)
        except WavError as exc:
            self.cues["refused"] += 1
            log.warning(kv("cue_refused", cue=cue, reason=str(exc)))
            self.out.event(CUE_STATE_TOPIC, {"cue": cue, "state": "error", "reason": str(exc)})
            return
        self.cues["queued"] += 1
        log.info(kv("cue_queued", cue=cue, seconds=round(seconds, 2)))

    def _take(self, item: Any) -> None:
        """On the source's thread: publish a frame at once; the end of a WAV goes to the runner."""
        if item is END_OF_SOURCE:
            self._release_held(self.thread_out)
            self.inbox.put(item)
        else:
            self.publish(item, self.thread_out)

    def on_inbox(self, item: Any) -> None:
        if isinstance(item, dict):  # a cue started or ended (cued mic)
            self.out.event(CUE_STATE_TOPIC, item)
            return
        if item is END_OF_SOURCE:
            self._release_held(self.out)
            log.info(kv("end_of_source", frames=self.frames, seconds=round(self.pts / self.source.rate, 2)))
            self.finished = True
            return
        self.publish(item, self.out)

    def publish(self, frame: CapturedFrame, out: Output) -> None:
        """One captured frame: out at once, or held with the silence around it (common.silence)."""
        self.overflows += frame.overflow
        self.frames += 1
        if self.batcher is None:  # a frame before start() finished: nothing to batch with yet
            self._release([Release(frame.pcm, frame.t_capture_ns, 1)], frame.t_callback_ns, out)
        else:
            self._release(self.batcher.push(frame.pcm, frame.t_capture_ns), frame.t_callback_ns, out)

    def _release_held(self, out: Output) -> None:
        """The end of the source: the silence still held goes out, so nothing is lost at the tail."""
        if self.batcher is not None:
            self._release(self.batcher.flush(), 0, out)

    def _release(self, releases: list[Release], t_callback_ns: int, out: Output) -> None:
        """`t_callback_ns`: the callback that released them (what the latency budget counts from)."""
        for release in releases:
            out.audio(self.topic, release.pcm, rate=self.source.rate, channels=self.source.channels, pts=self.pts,
                      t_capture_ns=release.t_capture_ns, clock=self.source.clock,
                      t_callback_ns=t_callback_ns or time.time_ns())
            self.pts += len(release.pcm) // (2 * self.source.channels)

    def stop(self) -> None:
        self.source.stop()

    def counters(self) -> dict[str, Any]:
        counters = {"frames": self.frames, "overflows": self.overflows, "clock": self.source.clock,
                    "rate": self.source.rate, "channels": self.source.channels}
        if self.batcher is not None:
            counters.update(self.batcher.counters())
        if isinstance(self.source, CuedSource):
            counters["cues"] = dict(self.cues)
        return counters
