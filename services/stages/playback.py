"""The player's jitter buffer: filled from the bus, drained by the audio clock (device or WAV).

Both sides meet under one lock held for microseconds; the drain side always gets exactly the
samples it asked for (silence where there is nothing to play), so the device never starves.
`played` counts samples handed to the output per `item_id`: what the user has heard, up to the
output's own latency, which the state reports beside it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

SAMPLE_BYTES_S16 = 2
ITEMS_REMEMBERED = 16


@dataclass
class Segment:
    item_id: str
    content_index: int
    response_id: str
    pcm: bytes
    offset: int = 0  # bytes already played
    received_at: float = 0.0  # monotonic time the frame reached the player


class PlaybackBuffer:
    def __init__(self, rate: int, jitter_ms: int, sample_bytes: int = SAMPLE_BYTES_S16) -> None:
        """`sample_bytes`: 2 for s16le, 1 for a phone line's G.711 codes (their silence is the phone stage's)."""
        self.rate = rate
        self.sample_bytes = sample_bytes
        self.jitter_bytes = rate * jitter_ms // 1000 * sample_bytes
        self.jitter_s = jitter_ms / 1000
        self._lock = threading.Lock()
        self._segments: deque[Segment] = deque()
        self._buffered = 0
        self._last_arrival = time.monotonic()  # what is idle is counted from here until the first frame
        self.playing = False
        self.current: Segment | None = None
        self.played: OrderedDict[str, int] = OrderedDict()  # item_id -> samples handed to the output
        self.received: OrderedDict[str, int] = OrderedDict()
        self.underruns = 0
        self._starved_item: str | None = None
        self.item_changed = False
        self.item_started_ns = 0
        self.ran_dry_at = 0.0  # monotonic: when the output last ran out of item audio (0: it is not dry)
        self.handoff_ms: deque[float] = deque(maxlen=500)  # frame received -> first sample handed to output
        self.pulled_audio = 0  # samples of item audio (not silence) the last pull handed over
        self.held = False  # paused where it is (a possible false interruption): silence out, nothing consumed

    @staticmethod
    def _bump(table: OrderedDict[str, int], key: str, samples: int) -> None:
        table[key] = table.get(key, 0) + samples
        table.move_to_end(key)
        while len(table) > ITEMS_REMEMBERED:
            table.popitem(last=False)

    def push(self, segment: Segment) -> None:
        with self._lock:
            self._segments.append(segment)
            self._buffered += len(segment.pcm)
            self._last_arrival = time.monotonic()
            self._bump(self.received, segment.item_id, len(segment.pcm) // self.sample_bytes)
            if self._starved_item == segment.item_id:
                self.underruns += 1  # the item ran dry and then continued: the listener heard a gap
                self._starved_item = None

    def pull(self, samples: int) -> bytes:
        """Exactly `samples` mono s16le samples for the output; silence where nothing is ready."""
        wanted = samples * self.sample_bytes
        with self._lock:
            self.pulled_audio = 0
            if self.held:
                return bytes(wanted)
            if not self.playing:
                waited = time.monotonic() - self._last_arrival
                if self._buffered and (self._buffered >= self.jitter_bytes or waited >= self.jitter_s):
                    self.playing = True
                    self.ran_dry_at = 0.0
                else:
                    return bytes(wanted)
            out = bytearray()
            while len(out) < wanted and self._segments:
                segment = self._segments[0]
                if self.current is None or segment.item_id != self.current.item_id:
                    self.item_changed = True
                    self.item_started_ns = time.time_ns()  # its first sample goes to the output now
                self.current = segment
                if segment.offset == 0 and segment.received_at:
                    self.handoff_ms.append(1000 * (time.monotonic() - segment.received_at))
                take = segment.pcm[segment.offset:segment.offset + wanted - len(out)]
                out += take
                segment.offset += len(take)
                self._buffered -= len(take)
                self._bump(self.played, segment.item_id, len(take) // self.sample_bytes)
                if segment.offset >= len(segment.pcm):
                    self._segments.popleft()
            self.pulled_audio = len(out) // self.sample_bytes
            if len(out) < wanted:
                self.ran_dry_at = time.monotonic()
                self.playing = False
                self._starved_item = self.current.item_id if self.current else None
                out += bytes(wanted - len(out))
            return bytes(out)

    def hold(self, held: bool) -> None:
        """Pause the reply where it is, or go on from there: what is held is neither played nor dropped."""
        with self._lock:
            self.held = held

    def unread(self, segment: Segment) -> None:
        """Put audio handed to the output back at the front (an output that dropped it unplayed, to play it
        again): it counts as not played."""
        with self._lock:
            self._segments.appendleft(segment)
            self._buffered += len(segment.pcm) - segment.offset
            samples = (len(segment.pcm) - segment.offset) // self.sample_bytes
            self.played[segment.item_id] = max(0, self.played.get(segment.item_id, 0) - samples)

    def idle_for(self) -> float:
        """Seconds since anything was playable (0 while playing or holding audio)."""
        with self._lock:
            if self.playing or self._buffered:
                return 0.0
            return time.monotonic() - max(self._last_arrival, self.ran_dry_at)

    def flush(self, unheard: int = 0) -> int:
        """Drop everything not yet played; returns the ms dropped. `unheard`: samples of the current
        item the output had been handed but dropped unplayed; they no longer count as played."""
        with self._lock:
            dropped = self._buffered
            if unheard and self.current is not None:
                item_id = self.current.item_id
                unheard = min(unheard, self.played.get(item_id, 0))
                self.played[item_id] = self.played.get(item_id, 0) - unheard
                dropped += unheard * self.sample_bytes
            self._segments.clear()
            self._buffered = 0
            self.held = False
            if self.playing:
                self.ran_dry_at = time.monotonic()
            self.playing = False
            self._starved_item = None
        return round(1000 * dropped / self.sample_bytes / self.rate)

    def reset(self) -> None:
        """A new listener: nothing of the last one's items is played, reported or counted for them."""
        self.flush()
        with self._lock:
            self.current = None
            self.played.clear()
            self.received.clear()
            self.item_changed = True

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            current = self.current
            item_id = current.item_id if current else None
            state = {"item_id": item_id, "content_index": current.content_index if current else None,
                     "response_id": current.response_id if current else None,
                     "played_ms": round(1000 * self.played.get(item_id, 0) / self.rate, 1) if item_id else 0.0,
                     "received_ms": round(1000 * self.received.get(item_id, 0) / self.rate, 1) if item_id else 0.0,
                     "buffered_ms": round(1000 * self._buffered / self.sample_bytes / self.rate, 1),
                     "playing": self.playing, "held": self.held, "underruns": self.underruns,
                     "item_started_ns": self.item_started_ns if current else 0}
            self.item_changed = False
        return state
