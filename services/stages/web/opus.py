"""Opus both ways, mono and in the loop: the assistant's voice encoded at 24 kHz where the track pulls
it, the browser's mic decoded where its packets arrive.

aiortc encodes each outgoing frame in a worker thread (an executor hop and a loop wake-up back, per
20 ms), after resampling it to 48 kHz stereo. Opus encodes 24 kHz mono natively, and RTP's clock
stays 48 kHz whatever the encoder's rate (aiortc converts the packet's timestamps), so the track hands
aiortc packets it only packetises: half the encoder's work, no resampling, no thread hop
(`scripts/bench_web_footprint.py`, variant `aiortc-encoder`, measures the difference).

Incoming, aiortc decodes every packet to 48 kHz stereo in a worker thread and hands each frame back
with `run_coroutine_threadsafe` (a queue hop, a task and a loop wake-up per 20 ms), and the stage
then filters it down to 24 kHz mono. An Opus decode is ~50 us, so `LoopDecoding` decodes on the
loop, in the receiver's own call, straight to 24 kHz mono with libopus itself (`libopus.py`: FFmpeg's
wrapper only gives 48 kHz), and puts the frame on the track's queue (variant `aiortc-decoder`
measures the difference).
"""

from __future__ import annotations

import fractions
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from av import AudioFrame, CodecContext, FFmpegError
from av.packet import Packet

from services.stages.web import libopus

log = logging.getLogger("voicebus.web")
RTP_OPUS_RATE = 48_000  # Opus's RTP clock, whatever rate it is decoded at (RFC 7587)
RTP_TIMESTAMP_SPAN = 1 << 32

VOICE_BIT_RATE = 48_000  # mono speech at 24 kHz: transparent; aiortc's 96 kbit/s is for stereo music
SETTLED_SILENT_PACKETS = 3  # identical packets for silent frames in a row: the encoder has settled


def mono_frame(pcm: bytes, pts: int, rate: int) -> AudioFrame:
    """One frame of s16 mono PCM as PyAV takes it, stamped `pts` in samples at `rate`."""
    frame = AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
    frame.planes[0].update(pcm)
    frame.pts, frame.sample_rate, frame.time_base = pts, rate, fractions.Fraction(1, rate)
    return frame


class VoiceEncoder:
    """One libopus encoder for one outgoing track; `encode(pcm, pts)` gives the packet for that frame.

    Between replies the track sends silence, 50 frames a second, and encoding silence costs libopus
    what encoding speech does (~250 us a frame here: ~1.2 % of a core per conversation for nothing).
    Fed digital silence, the encoder settles within ~15 frames into emitting the same packet over and
    over; once `SETTLED_SILENT_PACKETS` in a row are identical, that packet is sent again for every
    further silent frame without running the encoder, and the first frame with a sound in it goes
    to the encoder again. The browser's decoder sees the packet it would have been sent for each
    silent frame; after the silence the encoder's history is a little shorter than if it had run on,
    so its packets differ in their bits, not in what they decode to (within -30 dB of the every-frame
    stream, tests/test_web.py).
    """

    def __init__(self, rate: int, bit_rate: int = VOICE_BIT_RATE) -> None:
        self.rate = rate
        self.time_base = fractions.Fraction(1, rate)
        self.codec = CodecContext.create("libopus", "w")
        self.codec.sample_rate = rate
        self.codec.layout = "mono"
        self.codec.format = "s16"
        self.codec.bit_rate = bit_rate
        self.codec.time_base = self.time_base
        self.codec.options = {"application": "voip"}
        self._ready: deque[Packet] = deque()
        self._silence = b""  # a zero frame of the size last seen
        self._silent_packet = b""  # what the encoder made of the last silent frame
        self._same_silent_packets = 0  # how many silent frames in a row gave exactly that packet
        self.frames_encoded = 0
        self.silent_frames_repeated = 0

    def encode(self, pcm: bytes, pts: int) -> Packet | None:
        """The packet for one frame of s16 mono, stamped with its pts (the played-position clock), or
        None if libopus held it back (it does not for whole 20 ms frames; the caller then sends the
        frame through aiortc's own encoder rather than send nothing)."""
        if len(pcm) != len(self._silence):
            self._silence = bytes(len(pcm))
        silent = pcm == self._silence
        if silent and self._same_silent_packets >= SETTLED_SILENT_PACKETS:
            self.silent_frames_repeated += 1
            return self._stamp(Packet(self._silent_packet), pts)
        self.frames_encoded += 1
        for packet in self.codec.encode(mono_frame(pcm, pts, self.rate)):
            self._ready.append(packet)
        if not self._ready:
            self._same_silent_packets = 0
            return None
        packet = self._ready.popleft()
        if not silent or self._ready:
            self._same_silent_packets = 0
        else:
            data = bytes(packet)
            self._same_silent_packets = self._same_silent_packets + 1 if data == self._silent_packet else 0
            self._silent_packet = data
        return self._stamp(packet, pts)

    def _stamp(self, packet: Packet, pts: int) -> Packet:
        packet.pts = pts
        packet.time_base = self.time_base
        return packet


@dataclass(frozen=True)
class MicFrame:
    """A decoded frame of the browser's mic: s16 PCM at `rate`, stamped with its packet's RTP
    timestamp as it came (32 bits, counted at `clock_rate`: 48 kHz for Opus whatever it was decoded
    at, RFC 7587). The stage counts timestamps on past the 32-bit wrap, whichever decoder made the frame."""

    pcm: bytes
    rtp_timestamp: int
    rate: int
    clock_rate: int = RTP_OPUS_RATE
    channels: int = 1

    @property
    def samples(self) -> int:
        return len(self.pcm) // (2 * self.channels)


def as_mic_frame(frame: AudioFrame, channel_count: int) -> MicFrame:
    """What aiortc's decoders give (PyAV frames; for Opus 48 kHz stereo whatever was sent) as a
    MicFrame: a mono mic (the usual getUserMedia, `channel_count` 1) is one channel of it. aiortc
    stamps each frame with its packet's RTP timestamp, on the codec's clock (its time base)."""
    import numpy as np

    decoded_channels = len(frame.layout.channels)
    channels = 1 if channel_count == 1 else decoded_channels
    pcm = frame.to_ndarray().reshape(-1, decoded_channels)[:, :channels]
    return MicFrame(np.ascontiguousarray(pcm).tobytes(), frame.pts, frame.sample_rate,
                    round(1 / frame.time_base), channels)


class RtpTimeline:
    """One caller's RTP timestamps counted on past the 32-bit wrap: each is taken as the signed
    32-bit step from the last one. Timestamps start anywhere, so one call in ~150 of ten minutes
    crosses the wrap (every ~24.9 hours of a 48 kHz clock); counted on, its capture times and gap
    filling see 20 ms more, not a day less, and a packet late from before the wrap stays before it."""

    def __init__(self) -> None:
        self._extended: int | None = None  # the last timestamp, counted on past the wrap

    def extend(self, timestamp: int) -> int:
        if self._extended is None:
            self._extended = timestamp
        else:
            step = (timestamp - self._extended) % RTP_TIMESTAMP_SPAN
            self._extended += step - RTP_TIMESTAMP_SPAN if step >= RTP_TIMESTAMP_SPAN // 2 else step
        return self._extended


class VoiceDecoder:
    """One libopus decoder for the browser's mic, at the stage's own rate (24 kHz mono): each packet ->
    one MicFrame stamped with the packet's RTP timestamp."""

    def __init__(self, rate: int) -> None:
        self.decoder = libopus.Decoder(rate, 1)

    def decode(self, data: bytes, rtp_timestamp: int) -> MicFrame:
        return MicFrame(self.decoder.decode(data), rtp_timestamp, self.decoder.rate)


class LoopDecoding:
    """Stands in for an aiortc audio receiver's decoder queue (see the module docstring).

    Opus is decoded to MicFrames at `rate`; any other negotiated codec (PCMU, PCMA) by aiortc's
    decoder, in the same call, to PyAV AudioFrames. The receiver calls `put((codec, encoded_frame))` on its loop for every frame its jitter buffer
    releases, and `put(None)` when it stops; its decoder thread calls `get()`, which here waits until
    that stop and then hands the thread aiortc's own end-of-track signal.
    """

    def __init__(self, frames: Any, rate: int) -> None:
        self.frames = frames  # the RemoteStreamTrack's asyncio.Queue
        self.rate = rate
        self.decode_errors = 0
        self._decoders: dict[str, Any] = {}
        self._stopped = threading.Event()

    def put(self, task: Any) -> None:
        if task is None:
            self._stopped.set()
            return
        codec, encoded_frame = task
        try:
            decoder = self._decoders.get(codec.name) or self._new_decoder(codec)
            if isinstance(decoder, VoiceDecoder):
                decoded = [decoder.decode(encoded_frame.data, encoded_frame.timestamp)]
            else:
                decoded = decoder.decode(encoded_frame)
        except (FFmpegError, libopus.OpusError) as exc:  # one bad packet is a gap in the timeline, not the end of the call
            self.decode_errors += 1
            log.warning("undecodable %s packet from the browser (%d so far): %s", codec.name, self.decode_errors, exc)
            return
        for frame in decoded:
            self.frames.put_nowait(frame)

    def _new_decoder(self, codec: Any) -> Any:
        """One per codec for the whole call: a decoder carries state from packet to packet."""
        if codec.name.lower() == "opus":
            decoder: Any = VoiceDecoder(self.rate)
        else:
            from aiortc.codecs import get_decoder

            decoder = get_decoder(codec)
        self._decoders[codec.name] = decoder
        return decoder

    def get(self) -> None:
        self._stopped.wait()
        return None
