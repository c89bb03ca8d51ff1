"""`voicebus resample`: audio.mic (any rate, any channels) -> audio.user (24 kHz mono s16le).

Timing survives resampling: output pts counts output samples from the stream's first input pts,
and each output frame's `t_capture_ns` is the capture time of the input instant it is centred on
(every backend is zero-phase in that sense; its lookahead only delays emission: ~2 ms for polyphase
and resampy, 17-38 ms of block buffering for soxr).

Input gaps: a jump forward in input `pts` of up to `MAX_BRIDGE_S` is bridged with silence so the
output clock stays in step with capture time (the server's VAD offsets and the trace's user audio
stay aligned with reality); a larger jump, a jump backwards (the mic restarted) or a change of rate
or channels flushes the filter and starts a new stream, and says so.
"""

from __future__ import annotations

import logging
from typing import Any

from common.envelope import AudioHeader, Message
from common.g711 import as_s16
from common.log import kv
from common.resample import DEFAULT_BACKEND, Backend, StreamResampler
from common.stage import Stage

MAX_BRIDGE_S = 2.0
BYTES_PER_SAMPLE = 2

log = logging.getLogger("voicebus.resample")


class ResampleStage(Stage):
    name = "resample"

    def __init__(self, rate_out: int = 24_000, backend: Backend = DEFAULT_BACKEND, filter_name: str = "kaiser_best",
                 input_topic: str = "audio.mic", output_topic: str = "audio.user") -> None:
        super().__init__()
        self.subscriptions = [input_topic]
        self.input_topic, self.output_topic = input_topic, output_topic
        self.rate_out, self.backend, self.filter_name = rate_out, backend, filter_name
        self.resampler: StreamResampler | None = None
        self.expected_pts: int | None = None  # next input pts if nothing is lost
        self.first_pts_in = 0  # input pts where the current stream began
        self.pts_out_base = 0  # output pts where the current stream began (input pts, rescaled)
        self.ref_pts = 0  # latest input frame: its pts and capture time map input samples to wall clock
        self.ref_t_capture_ns = 0
        self.bridged_samples = 0
        self.resets = 0
        self.t_callback_ns = 0

    def start(self) -> None:
        """Warm the backend now (resampy's numba kernel compiles on first call, ~0.4 s), so that cost
        cannot land on the user's first words."""
        warm = StreamResampler(48_000, self.rate_out, 1, self.backend, self.filter_name)
        warm.feed(bytes(4 * 960))
        warm.flush()

    def counters(self) -> dict[str, Any]:
        return {"bridged_samples": self.bridged_samples, "resets": self.resets, "backend": self.backend}

    def handle(self, message: Message) -> None:
        header = message.header
        if message.topic != self.input_topic or not isinstance(header, AudioHeader):
            return
        if self.resampler is None or (header.rate, header.channels) != (self.resampler.rate_in,
                                                                         self.resampler.channels):
            self._restart(header, reason="format" if self.resampler else "first_frame")
        elif header.pts != self.expected_pts:
            jump = header.pts - self.expected_pts
            if 0 < jump <= MAX_BRIDGE_S * header.rate:
                self.bridged_samples += jump
                log.info(kv("bridged_gap", samples=jump, ms=round(1000 * jump / header.rate, 1)))
                self._feed(bytes(jump * header.channels * BYTES_PER_SAMPLE), header.pts - jump, header)
            else:
                self._restart(header, reason=f"pts_jump={jump}")
        self._feed(as_s16(message.payload, header.fmt), header.pts, header)  # G.711 (a phone line): decoded
        self.expected_pts = header.pts + message.samples

    def _restart(self, header: AudioHeader, reason: str) -> None:
        if self.resampler is not None:
            self._emit(self.resampler.flush(), self.ref_pts, self.ref_t_capture_ns)
            self.resets += 1
        log.info(kv("stream_start", reason=reason, rate_in=header.rate, channels=header.channels,
                    rate_out=self.rate_out, backend=self.backend))
        self.resampler = StreamResampler(header.rate, self.rate_out, header.channels, self.backend, self.filter_name)
        self.first_pts_in = header.pts
        self.pts_out_base = round(header.pts * self.rate_out / header.rate)

    def _feed(self, pcm: bytes, pts: int, header: AudioHeader) -> None:
        self.ref_pts, self.ref_t_capture_ns = pts, header.t_capture_ns
        assert self.resampler is not None
        # the mic callback that delivered this frame is what released the output: carry its time on
        self.t_callback_ns = header.extra.get("t_callback_ns", 0)
        self._emit(self.resampler.feed(pcm), pts, header.t_capture_ns)

    def _emit(self, pcm: bytes, ref_pts: int, ref_t_capture_ns: int) -> None:
        if not pcm or self.resampler is None:
            return
        n_out = len(pcm) // BYTES_PER_SAMPLE
        first_out = self.resampler.samples_out - n_out  # index within the current stream
        input_pos = self.first_pts_in + self.resampler.input_position(first_out)
        t_capture_ns = max(0, int(ref_t_capture_ns + (input_pos - ref_pts) * 1e9 / self.resampler.rate_in))
        self.out.audio(self.output_topic, pcm, rate=self.rate_out, channels=1, pts=self.pts_out_base + first_out,
                       t_capture_ns=t_capture_ns, t_callback_ns=self.t_callback_ns)

    def stop(self) -> None:
        """End of stream: what the filter still holds goes out, so nothing is lost at the tail."""
        if self.resampler is not None:
            self._emit(self.resampler.flush(), self.ref_pts, self.ref_t_capture_ns)
