"""Fewer, longer messages while nobody speaks: silence batched after a hold-off, sound sent at once.

Every stage on the path wakes, and the bus carries a message, for every frame, whatever is in it.
At 20 ms frames a listening `voicebus up` spends most of its CPU moving silence (bench_footprint,
2026-12-05: 8.2 % of a core listening with 20 ms frames, 4.7 % with 40 ms ones). Speech needs small
frames only at its edges: the server's VAD must hear the first sound at once (speech_started,
barge-in) and the silence after it on time (speech_stopped, `silence_duration_ms` later). So frames
go out one by one while there is sound and for `hold_s` of silence after it (past the server's
end-of-turn decision); after that, silent frames are held and sent `batch_ms` at a time. The first
frame with sound releases what is held at once, as a message of its own, and then goes out alone,
so an echo gate or a VAD that looks at one message sees it undiluted by the silence before it.

Nothing is dropped or reordered: the samples and their pts are exactly those of frame-by-frame
sending; only how many messages carry them changes. It is what WebRTC's DTX does for silence, except
that the silence still arrives (the Realtime server's audio clock counts it).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH_MS = 100
DEFAULT_HOLD_S = 1.0  # OpenAI's server VAD decides end of turn after 500 ms of silence by default
DEFAULT_LEVEL_DBFS = -50.0  # RMS; speech is -35 to -15 dBFS, a quiet room through a laptop mic -60 to -50


@dataclass(frozen=True)
class Release:
    """Audio to publish now: contiguous samples starting at the first held (or the current) frame."""

    pcm: bytes
    t_capture_ns: int  # capture time of its first sample
    frames: int  # how many source frames it carries


class SilenceBatcher:
    """Decides, frame by frame, what goes out now; see the module docstring. Not thread-safe: one
    publishing thread owns it."""

    def __init__(self, rate: int, channels: int = 1, batch_ms: int = DEFAULT_BATCH_MS,
                 hold_s: float = DEFAULT_HOLD_S, level_dbfs: float = DEFAULT_LEVEL_DBFS) -> None:
        if batch_ms < 0 or hold_s < 0:
            raise ValueError("batch_ms and hold_s must not be negative")
        self.rate, self.channels = rate, channels
        self.batch_samples = rate * batch_ms // 1000
        self.hold_samples = int(hold_s * rate)
        self.level_dbfs = level_dbfs
        self.silent_mean_square = (32768.0 * 10 ** (level_dbfs / 20)) ** 2
        import numpy  # here, not at the top: the CLI reads this module's defaults for its --help

        self._np = numpy
        self.silent_run = 0  # samples per channel of silence since the last sound
        self._held: list[bytes] = []
        self._held_samples = 0
        self._held_t_capture_ns = 0
        self.batched_frames = 0  # frames that went out inside a batch of more than one
        self.batches = 0

    @property
    def enabled(self) -> bool:
        return self.batch_samples > 0

    def is_silent(self, pcm: bytes) -> bool:
        samples = self._np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2).astype(self._np.float32)
        return not len(samples) or float(samples @ samples) / len(samples) <= self.silent_mean_square

    def push(self, pcm: bytes, t_capture_ns: int) -> list[Release]:
        """One source frame in; what to publish now (possibly nothing), in order."""
        samples = len(pcm) // (2 * self.channels)
        if not self.enabled:
            return [Release(pcm, t_capture_ns, 1)]
        if not self.is_silent(pcm):
            self.silent_run = 0
            return [*self.flush(), Release(pcm, t_capture_ns, 1)]
        self.silent_run += samples
        if self.silent_run <= self.hold_samples:  # the end of a turn: each frame on time
            return [*self.flush(), Release(pcm, t_capture_ns, 1)]
        if not self._held:
            self._held_t_capture_ns = t_capture_ns
        self._held.append(pcm)
        self._held_samples += samples
        return self.flush() if self._held_samples >= self.batch_samples else []

    def flush(self) -> list[Release]:
        """What is held, as one release (at the end of a stream, or before sound)."""
        if not self._held:
            return []
        frames = len(self._held)
        release = Release(b"".join(self._held), self._held_t_capture_ns, frames)
        self._held, self._held_samples = [], 0
        if frames > 1:
            self.batched_frames += frames
            self.batches += 1
        return [release]

    def reset(self) -> None:
        """A new stream (a new caller): nothing held, and its start counts as sound until heard."""
        self._held, self._held_samples, self.silent_run = [], 0, 0

    def describe(self) -> str:
        """For a stage's start-up log line."""
        if not self.enabled:
            return "off"
        return (f"{1000 * self.batch_samples // self.rate}ms_after_{self.hold_samples / self.rate:g}s_"
                f"below_{self.level_dbfs:g}dBFS")

    def counters(self) -> dict[str, int]:
        return {"silence_batches": self.batches, "silence_batched_frames": self.batched_frames}

