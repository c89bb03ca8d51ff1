"""Server VAD for the simulator: an energy detector on 10 ms frames of the 24 kHz input.

The API's `threshold` (0..1, a speech probability for its model) maps onto a level in dBFS:
-60 dBFS at 0, -10 dBFS at 1 (0.5 -> -35 dBFS). Flite speech sits around -20 dBFS, silence from a
virtual mic is digital zero, so that mapping separates them with a wide margin. Timings follow the
API's documentation: `audio_start_ms` includes `prefix_padding_ms`, `audio_end_ms` includes
`silence_duration_ms`, both counted from the first sample appended in the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 10
ONSET_FRAMES = 2  # 20 ms above the threshold starts speech: a click does not


@dataclass
class VadEvent:
    kind: str  # "started" | "stopped"
    audio_ms: int  # audio_start_ms or audio_end_ms


def threshold_dbfs(threshold: float) -> float:
    return -60.0 + 50.0 * threshold


class EnergyVad:
    def __init__(self, rate: int, threshold: float = 0.5, prefix_padding_ms: int = 300,
                 silence_duration_ms: int = 500) -> None:
        self.rate = rate
        self.frame_samples = rate * FRAME_MS // 1000
        self.configure(threshold, prefix_padding_ms, silence_duration_ms)
        self._pending = np.zeros(0, dtype=np.float32)
        self.position_ms = 0  # ms of audio processed since the session began
        self.in_speech = False
        self._above = 0
        self._silent_ms = 0
        self.speech_start_ms = 0

    def configure(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        self.level = 10 ** (threshold_dbfs(threshold) / 20)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        self._pending = np.concatenate([self._pending, samples])
        events: list[VadEvent] = []
        while len(self._pending) >= self.frame_samples:
            frame, self._pending = self._pending[:self.frame_samples], self._pending[self.frame_samples:]
            loud = float(np.sqrt(np.mean(frame * frame))) >= self.level
            self.position_ms += FRAME_MS
            if not self.in_speech:
                self._above = self._above + 1 if loud else 0
                if self._above >= ONSET_FRAMES:
                    self.in_speech = True
                    self._silent_ms = 0
                    onset_ms = self.position_ms - ONSET_FRAMES * FRAME_MS
                    self.speech_start_ms = max(0, onset_ms - self.prefix_padding_ms)
                    events.append(VadEvent("started", self.speech_start_ms))
            else:
                self._silent_ms = 0 if loud else self._silent_ms + FRAME_MS
                if self._silent_ms >= self.silence_duration_ms:
                    self.in_speech = False
                    self._above = 0
                    events.append(VadEvent("stopped", self.position_ms))
        return events
