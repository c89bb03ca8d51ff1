"""The assistant's voice for the browser, Opus-encoded where the track pulls it: 24 kHz mono, in the loop.

aiortc encodes each outgoing frame in a worker thread (an executor hop and a loop wake-up back, per
20 ms), after resampling it to 48 kHz stereo. Opus encodes 24 kHz mono natively, and RTP's clock
stays 48 kHz whatever the encoder's rate (aiortc converts the packet's timestamps), so the track hands
aiortc packets it only packetises: half the encoder's work, no resampling, no thread hop
(`scripts/bench_web_footprint.py`, variant `aiortc-encoder`, measures the difference).
"""

from __future__ import annotations

import fractions
from collections import deque

from av import AudioFrame, CodecContext
from av.packet import Packet

VOICE_BIT_RATE = 48_000  # mono speech at 24 kHz: transparent; aiortc's 96 kbit/s is for stereo music


class VoiceEncoder:
    """One libopus encoder for one outgoing track; `encode(frame)` gives the packet for that frame."""

    def __init__(self, rate: int, bit_rate: int = VOICE_BIT_RATE) -> None:
        self.time_base = fractions.Fraction(1, rate)
        self.codec = CodecContext.create("libopus", "w")
        self.codec.sample_rate = rate
        self.codec.layout = "mono"
        self.codec.format = "s16"
        self.codec.bit_rate = bit_rate
        self.codec.time_base = self.time_base
        self.codec.options = {"application": "voip"}
        self._ready: deque[Packet] = deque()

    def encode(self, frame: AudioFrame) -> Packet | None:
        """The frame's packet, stamped with the frame's own pts (the played-position clock), or None
        if libopus held it back (it does not for whole 20 ms frames; the caller then sends the frame
        through aiortc's own encoder rather than send nothing)."""
        for packet in self.codec.encode(frame):
            self._ready.append(packet)
        if not self._ready:
            return None
        packet = self._ready.popleft()
        packet.pts = frame.pts
        packet.time_base = self.time_base
        return packet
