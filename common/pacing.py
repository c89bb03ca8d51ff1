"""A real-time clock for outgoing media tracks: aiortc asks for the next frame as soon as it sent one,
so pacing is the track's job (as in aiortc's own AudioStreamTrack)."""

from __future__ import annotations

import asyncio
import time


class FrameClock:
    """Frames of `samples` at `rate` Hz: `await tick()` returns when the next frame is due, and its pts."""

    def __init__(self, samples: int, rate: int) -> None:
        self.samples, self.rate = samples, rate
        self._start = 0.0
        self.pts = 0
        self.lateness_s = 0.0  # how late the caller came back for the frame just due (0 when early)

    async def tick(self) -> int:
        now = time.monotonic()
        if not self._start:
            self._start = now
        else:
            self.pts += self.samples
            due = self._start + self.pts / self.rate
            if due > now:
                await asyncio.sleep(due - now)
            self.lateness_s = max(0.0, now - due)
        return self.pts
