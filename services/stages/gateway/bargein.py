"""Barge-in and echo guard: what is audible now, where to truncate, which mic frames to forward.

Pure logic, fed by the stage: assistant audio received per item, the player's reports, and the
level of what is being played. Truncation uses the position the player reports as played, never a
wall-clock estimate, and never goes past the audio received for that item.
"""

from __future__ import annotations

import logging
import math
import operator
import sys
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

log = logging.getLogger("voicebus.gateway")

RATE = 24_000
LEVEL_WINDOW_MS = 20
ECHO_LOOKBACK_MS = 250  # echo reaches the mic this long after the sample was handed to the output
ECHO_LOOKAHEAD_MS = 60
WARMUP_MS = 150
HANGOVER_S = 0.4  # echo still in flight (output latency + room) after the player stops
ITEMS_REMEMBERED = 16
# A player reports on a new item within ~100 ms of its first sample. An item no player has ever
# reported on (no player on this bus: a replay into the gateway, a web stage with no browser) could
# at most be playing until its audio would have run out, plus this much: after that nobody hears it.
UNREPORTED_GRACE_S = 1.0


@dataclass
class AssistantItem:
    item_id: str
    response_id: str
    content_index: int
    received_samples: int = 0
    levels: list[float] = field(default_factory=list)  # RMS per 20 ms of received audio
    transcript: str = ""
    truncated: bool = False
    first_audio_at: float = 0.0  # monotonic, when its first audio arrived
    complete: bool = False  # its response finished on its own (not cancelled): no more audio comes
    rate: int = RATE  # of its audio (8 kHz in a G.711 session)

    def could_still_be_unreported(self, now: float) -> bool:
        return now - self.first_audio_at < self.received_ms / 1000 + UNREPORTED_GRACE_S

    @property
    def received_ms(self) -> float:
        return 1000 * self.received_samples / self.rate


class AudibleTracker:
    """Assistant items and what the player says about them."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, AssistantItem] = OrderedDict()
        self.player: dict = {}
        self.playback_started_at: float | None = None  # monotonic, for the echo-guard warm-up
        self.last_playing_at = float("-inf")

    def add_audio(self, item_id: str, response_id: str, content_index: int, pcm: bytes,
                  now: float | None = None, rate: int = RATE) -> AssistantItem:
        """`pcm`: the delta as s16le (decoded first in a G.711 session), at `rate`."""
        item = self.items.get(item_id)
        if item is None:
            item = self.items[item_id] = AssistantItem(item_id, response_id, content_index, rate=rate,
                                                       first_audio_at=time.monotonic() if now is None else now)
            while len(self.items) > ITEMS_REMEMBERED:
                self.items.popitem(last=False)
        samples = _samples(pcm)
        step = item.rate * LEVEL_WINDOW_MS // 1000
        start = item.received_samples % step
        if item.levels and start:  # finish the partial window first
            head, samples = samples[:step - start], samples[step - start:]
            item.levels[-1] = max(item.levels[-1], _rms(head))
        for offset in range(0, len(samples), step):
            item.levels.append(_rms(samples[offset:offset + step]))
        item.received_samples += len(pcm) // 2
        return item

    def on_player_state(self, state: dict, now: float) -> None:
        if state.get("playing") and not self.player.get("playing"):
            self.playback_started_at = now
        if state.get("playing") or self.player.get("playing"):
            self.last_playing_at = now
        self.player = state

    def audible_item(self, now: float | None = None) -> AssistantItem | None:
        """The assistant item the user is hearing (or about to hear), if any."""
        now = time.monotonic() if now is None else now
        item_id = self.player.get("item_id")
        if item_id in self.items:
            item = self.items[item_id]
            if self.player.get("playing") or self.player.get("buffered_ms", 0) > 0 or \
                    self.player.get("played_ms", 0) < item.received_ms - 1:
                return item
        if self.items:  # audio received that the player has not started yet
            last = next(reversed(self.items.values()))
            if last.item_id != item_id and last.received_samples > 0 and last.could_still_be_unreported(now):
                return last
        return None

    def truncate_at_ms(self, item: AssistantItem, played_ms: float) -> int:
        """audio_end_ms for conversation.item.truncate: what was played, capped at what was received."""
        return int(min(played_ms, item.received_ms))

    def echo_possible(self, now: float) -> bool:
        """Assistant audio is playing, about to play, or its echo may still be arriving."""
        return bool(self.player.get("playing")) or self.audible_item(now) is not None or \
            now - self.last_playing_at < HANGOVER_S

    def playback_level(self) -> float:
        """Loudest level around what the player is playing now (the echo the mic may pick up).

        Before the player has reported on the item (its state comes every 100 ms; echo takes ~50),
        the item's opening is the reference.
        """
        item = self.audible_item() or self.items.get(self.player.get("item_id"))
        if item is None or not item.levels:
            return 0.0
        played_ms = self.player.get("played_ms", 0.0) if self.player.get("item_id") == item.item_id else 0.0
        first = max(0, int((played_ms - ECHO_LOOKBACK_MS) // LEVEL_WINDOW_MS))
        last = int((played_ms + ECHO_LOOKAHEAD_MS) // LEVEL_WINDOW_MS) + 1
        window = item.levels[first:last]
        return max(window) if window else 0.0


class EchoGuard:
    """Forward a mic frame while the assistant is audible only if it is clearly louder than the playback.

    `ratio` 1.5 holds back an echo even at unity coupling (the virtual rig's loopback: one frame of
    echo at 1.01x the playback level was enough for the server's VAD to hear speech at ratio 1.0).

    Frames it holds back are replaced by silence, not dropped, so the server's audio clock (and
    every audio_start_ms/audio_end_ms it reports) stays aligned with the capture.
    """

    def __init__(self, ratio: float = 1.5, floor: float = 0.01) -> None:
        self.ratio, self.floor = ratio, floor
        self.gated_frames = 0
        self.passed_frames = 0

    def admit(self, pcm: bytes, tracker: AudibleTracker, now: float) -> bool:
        if not tracker.echo_possible(now):
            return True
        level = _rms(_samples(pcm))
        started = tracker.playback_started_at
        warming = started is None or (now - started) * 1000 < WARMUP_MS
        threshold = max(self.floor, tracker.playback_level() * self.ratio) * (2.0 if warming else 1.0)
        if level > threshold:
            self.passed_frames += 1
            log.debug("echo_guard_pass level=%.4f threshold=%.4f player=%s", level, threshold, tracker.player)
            return True
        self.gated_frames += 1
        return False


def _samples(pcm: bytes) -> array:
    """s16le bytes as int16 samples (no numpy: it would cost this process ~15 MB for a level meter)."""
    samples = array("h")
    samples.frombytes(pcm[:len(pcm) - len(pcm) % 2])
    if sys.byteorder != "little":
        samples.byteswap()
    return samples


def _rms(samples: array) -> float:
    """RMS level in full-scale units (1.0 = a full-scale square wave)."""
    return math.sqrt(sum(map(operator.mul, samples, samples)) / len(samples)) / 32768 if len(samples) else 0.0
