"""`voicebus player`: play `audio.assistant` through a device (or into a WAV), flush on barge-in.

Publishes `player.state` on every item change, on flush, and every 100 ms while playing; the
gateway truncates the assistant's item at the `played_ms` reported here, never at a wall-clock guess.
`played_ms` is what left the device, not what was handed to it: the samples the device still holds
(PortAudio's DAC time for the last one handed over) are subtracted, and a flush aborts the stream, so
that what it held is never heard and no longer counts as played. A flush is therefore silent at once
whatever the output period (it was ~13 ms at 5 ms periods when it waited for the device's buffer to
play out), and the period only trades CPU against latency (`common.audio_devices.OUTPUT_PERIOD_MS`).
The stream also stops once nothing has been playable for `--idle-pause-s`, so that no callback runs
while the user talks, and starts again (in ~1 ms) when the next frame arrives, before the jitter
buffer lets it play.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from common.audio_devices import (
    abort_stream,
    close_stream,
    open_pyaudio,
    pick_device,
    prioritize_audio_process,
    realtime_threads,
)
from common.envelope import AudioHeader, Message
from common.g711 import as_s16
from common.log import RateLimitedLog, kv
from common.stage import Stage
from common.wavio import WavWriter
from services.stages.playback import PlaybackBuffer, Segment

if TYPE_CHECKING:
    from common.resample import StreamResampler

STATE_INTERVAL_S = 0.1
IDLE_STATE_INTERVAL_S = 1.0
MIN_RATE, MAX_RATE = 8000, 192_000
WAV_HEADER_SYNC_S = 1.0

log = logging.getLogger("voicebus.player")


class DeviceSink:
    def __init__(self, device: str | None, period_ms: int, idle_pause_s: float) -> None:
        self.wanted, self.period_ms = device, period_ms
        self.idle_pause_s = idle_pause_s  # 0: the stream runs from start to stop
        self.latency_ms = 0.0
        self._pa = self._stream = None
        self.paused = False
        self.pauses = 0
        self.callbacks = 0
        self.output_underflows = 0
        self.late_callbacks = 0  # the audio thread came back later than the device buffer lasts
        self.max_callback_gap_ms = 0.0
        self._last_callback = 0.0
        self._audio_heard_by = 0.0  # stream time when the last item sample handed over is played (0: none)

    def start(self, buffer: PlaybackBuffer) -> None:
        import pyaudio

        self.priority = prioritize_audio_process()
        self._pa = open_pyaudio()
        device = pick_device(self._pa, self.wanted, "output")
        frames = buffer.rate * self.period_ms // 1000

        def callback(_in_data, frame_count: int, time_info: dict[str, float], status: int):
            now = time.monotonic()
            self.callbacks += 1
            if self._last_callback and buffer.playing:
                gap_ms = 1000 * (now - self._last_callback)
                if gap_ms > self.max_callback_gap_ms:
                    self.max_callback_gap_ms = gap_ms
                if gap_ms > self.latency_ms:  # longer than the device could play from its buffer
                    self.late_callbacks += 1
            self._last_callback = now
            if status & pyaudio.paOutputUnderflow:
                self.output_underflows += 1
            pcm = buffer.pull(frame_count)
            if buffer.pulled_audio and time_info.get("output_buffer_dac_time"):
                self._audio_heard_by = time_info["output_buffer_dac_time"] + buffer.pulled_audio / buffer.rate
            return pcm, pyaudio.paContinue

        self._stream = self._pa.open(format=pyaudio.paInt16, channels=1, rate=buffer.rate, output=True,
                                     output_device_index=device.index, frames_per_buffer=frames,
                                     stream_callback=callback)
        self.latency_ms = round(self._stream.get_output_latency() * 1000, 1)
        self.priority["scheduling"] = realtime_threads()
        log.info(kv("device_open", device=repr(device.name), rate=buffer.rate, period_ms=self.period_ms,
                    latency_ms=self.latency_ms, idle_pause_s=self.idle_pause_s, **self.priority))

    def resume(self) -> None:
        """Audio arrived: run the stream again if it was paused (its callback thread is a new one)."""
        if not self.paused or self._stream is None:
            return
        self._last_callback = 0.0  # the pause is not a late callback
        self._audio_heard_by = 0.0
        self._stream.start_stream()
        self.paused = False
        realtime_threads()
        log.debug(kv("stream_resumed", pauses=self.pauses))

    def unheard_s(self) -> float:
        """How much item audio the device has been handed and not played yet (PortAudio's DAC time)."""
        stream, heard_by = self._stream, self._audio_heard_by
        if stream is None or self.paused or not heard_by:
            return 0.0
        return max(0.0, heard_by - stream.get_time())

    def drop_unheard(self) -> float:
        """A flush: stop the stream at once, so that what the device holds is never heard, whatever the
        period; returns how many seconds of item audio that was. The next frame starts it again."""
        unheard = self.unheard_s()
        if self._stream is not None and not self.paused:
            abort_stream(self._stream)
            self.paused = True
        self._audio_heard_by = 0.0
        return unheard

    def pause_when_idle(self, buffer: PlaybackBuffer) -> None:
        """Stop the stream once nothing has been playable for `idle_pause_s`: only silence is dropped."""
        if self.paused or self._stream is None or not self.idle_pause_s or \
                buffer.idle_for() < self.idle_pause_s:
            return
        abort_stream(self._stream)
        self.paused = True
        self.pauses += 1
        log.debug(kv("stream_paused", idle_s=self.idle_pause_s))

    def stop(self) -> None:
        close_stream(self._pa, self._stream)  # a paused stream is stopped already: only closed
        self._pa = self._stream = None  # nothing asks a closed stream for its time


class WavSink:
    """Writes what a device would have played, in real time, silence included."""

    def __init__(self, path: str, period_ms: int) -> None:
        self.path, self.period_ms = path, period_ms
        self.latency_ms = 0.0
        self.output_underflows = 0
        self.late_callbacks = 0  # a WAV clock is never late; the counters exist for one heartbeat shape
        self.max_callback_gap_ms = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.writer: WavWriter | None = None
        self.paused = False  # a WAV's clock never pauses: its silence is part of what it records
        self.pauses = self.callbacks = 0

    def resume(self) -> None:
        pass

    def pause_when_idle(self, buffer: PlaybackBuffer) -> None:
        pass

    def unheard_s(self) -> float:
        return 0.0  # what is pulled is written: a file has no buffer still to play

    def drop_unheard(self) -> float:
        return 0.0

    def start(self, buffer: PlaybackBuffer) -> None:
        self.writer = WavWriter(self.path, buffer.rate, 1)
        self._thread = threading.Thread(target=self._run, args=(buffer,), name="wav-sink", daemon=True)
        self._thread.start()
        log.info(kv("wav_sink", path=self.path, rate=buffer.rate, period_ms=self.period_ms))

    def _run(self, buffer: PlaybackBuffer) -> None:
        samples = buffer.rate * self.period_ms // 1000
        started = time.monotonic()
        last_sync = started
        periods = 0
        while not self._stop.is_set():
            delay = started + periods * self.period_ms / 1000 - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                continue
            self.writer.write(buffer.pull(samples))
            periods += 1
            if time.monotonic() - last_sync >= WAV_HEADER_SYNC_S:
                self.writer.flush()
                last_sync = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self.writer is not None:
            self.writer.close()


class PlayerStage(Stage):
    name = "player"
    subscriptions = ["audio.assistant", "player.flush", "player.hold"]
    tick_interval_s = STATE_INTERVAL_S

    def __init__(self, sink: DeviceSink | WavSink, rate: int = 24_000, jitter_ms: int = 40) -> None:
        super().__init__()
        self.sink = sink
        self.buffer = PlaybackBuffer(rate, jitter_ms)
        self.converters: dict[tuple[int, int], StreamResampler] = {}
        self.dropped_frames = 0
        self.flushes = 0
        self._last_state = 0.0
        self._last_playing = False
        self._reported_unheard = False  # the last state held back audio the device had not played yet
        self._warn = RateLimitedLog(log)

    def start(self) -> None:
        self.sink.start(self.buffer)

    def handle(self, message: Message) -> None:
        if message.topic == "player.flush":
            self.flush(message.data)
        elif message.topic == "player.hold":  # the gateway weighs whether the user really interrupted
            self.buffer.hold(bool(message.data.get("hold")))
            self.publish_state(reason=str(message.data.get("reason", "")))
        elif message.topic == "audio.assistant" and isinstance(message.header, AudioHeader):
            self.enqueue(message)

    def enqueue(self, message: Message) -> None:
        header = message.header
        assert isinstance(header, AudioHeader)
        if not MIN_RATE <= header.rate <= MAX_RATE or header.channels > 8:
            self.dropped_frames += 1
            self._warn.warning("format", kv("dropped_frame", reason="unsupported_format", rate=header.rate,
                                            channels=header.channels))
            return
        pcm = as_s16(message.payload, header.fmt)  # a G.711 session's reply (audio/pcmu) is decoded here
        if (header.rate, header.channels) != (self.buffer.rate, 1):
            key = (header.rate, header.channels)
            if key not in self.converters:
                from common.resample import StreamResampler  # numpy, only when a format needs converting

                self.converters[key] = StreamResampler(header.rate, self.buffer.rate, header.channels)
                log.info(kv("converting", rate_in=header.rate, channels=header.channels, rate_out=self.buffer.rate))
            pcm = self.converters[key].feed(pcm)
        extra = header.extra
        self.buffer.push(Segment(str(extra.get("item_id", "")), int(extra.get("content_index", 0)),
                                 str(extra.get("response_id", "")), pcm, received_at=time.monotonic()))
        self.sink.resume()

    def flush(self, data: dict[str, Any]) -> None:
        unheard_s = self.sink.drop_unheard()
        dropped_ms = self.buffer.flush(unheard=round(unheard_s * self.buffer.rate))
        self.flushes += 1
        for converter in self.converters.values():
            converter.flush()
        state = self.publish_state(flushed=True, dropped_ms=dropped_ms, reason=data.get("reason", ""))
        log.info(kv("flushed", item_id=state["item_id"], played_ms=state["played_ms"], dropped_ms=dropped_ms))

    def current_state(self, **extra: Any) -> dict[str, Any]:
        state = {**self.buffer.snapshot(), "latency_ms": self.sink.latency_ms, **extra}
        unheard_ms = 1000 * self.sink.unheard_s()  # handed to the device, not yet out of it
        self._reported_unheard = bool(unheard_ms and state["item_id"])
        if self._reported_unheard:
            state["played_ms"] = max(0.0, round(state["played_ms"] - unheard_ms, 1))
        return state

    def publish_state(self, **extra: Any) -> dict[str, Any]:
        state = self.current_state(**extra)
        self._last_playing = bool(state["playing"])
        self.out.event("player.state", state)
        self._last_state = time.monotonic()
        return state

    def tick(self) -> None:
        playing = self.buffer.playing
        interval = STATE_INTERVAL_S if playing else IDLE_STATE_INTERVAL_S
        # a stop is news too: until it is told, the gateway takes a finished item for one still audible
        # ... and so is the end of a reply leaving the device: else its last state, sent before the
        # device had played its tail, would stand for a second and read as a reply not heard in full
        drained = self._reported_unheard and not self.sink.unheard_s()
        if self.buffer.item_changed or playing != self._last_playing or drained or \
                time.monotonic() - self._last_state >= interval - 0.005:
            self.publish_state()
        self.sink.pause_when_idle(self.buffer)

    def stop(self) -> None:
        self.sink.stop()

    def counters(self) -> dict[str, Any]:
        handoff = sorted(self.buffer.handoff_ms)
        percentiles = {f"handoff_p{p}_ms": round(handoff[min(len(handoff) - 1, len(handoff) * p // 100)], 2)
                       for p in (50, 99)} if handoff else {}
        return {**percentiles, "underruns": self.buffer.underruns, "dropped_frames": self.dropped_frames, "flushes": self.flushes,
                "output_underflows": self.sink.output_underflows, "output_paused": self.sink.paused,
                "output_pauses": self.sink.pauses, "output_callbacks": self.sink.callbacks,
                "late_callbacks": self.sink.late_callbacks,
                "max_callback_gap_ms": round(self.sink.max_callback_gap_ms, 1)}
