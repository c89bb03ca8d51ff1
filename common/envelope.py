"""The voicebus wire format: one message is three ZeroMQ frames.

    frame 0  topic    ASCII, dotted: b"audio.user", b"rt.response.done", b"health.gateway"
    frame 1  header   msgpack map: v, src, seq, t_ns, session (+ data for events;
                      + rate, channels, fmt, pts, t_capture_ns for audio)
    frame 2  payload  raw s16le PCM for audio topics; absent for events

The topic's first segment picks the header model from `HEADER_TYPES`; nothing on the wire ever
names a class. `decode` raises `EnvelopeError` with a short reason that receivers count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import msgspec

SCHEMA_VERSION = 1
MAX_TOPIC_BYTES = 128
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
BYTES_PER_SAMPLE = 2  # s16le, the bus's own sample format
# bytes per sample of each format a payload may have: s16le, or G.711 codes passed through untouched
# from a phone line to the Realtime API and back (common.g711)
SAMPLE_BYTES = {"s16le": 2, "pcmu": 1, "pcma": 1}
TOPIC_PATTERN = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_\-]+)*$")
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class EnvelopeError(ValueError):
    """A frame set that is not a voicebus message; `reason` is a short, countable label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# The schema is declared with msgspec, not pydantic: every stage decodes ~100 headers a second and
# pydantic costs each process ~15 MB of RSS and several times the CPU for these few scalar fields.
# pydantic stays where schemas meet users (tool signatures, the Realtime SDK's event types).
class Header(msgspec.Struct, frozen=True, kw_only=True):
    """Fields every message carries. Unknown fields on the wire are kept in `extra` (forward
    compatibility; stages add their own, e.g. `item_id` on assistant audio)."""

    v: Annotated[int, msgspec.Meta(ge=1)]
    src: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    seq: NonNegative
    t_ns: NonNegative
    session: Annotated[str, msgspec.Meta(max_length=128)]
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    FIELDS: ClassVar[frozenset[str]] = frozenset()

    def as_dict(self) -> dict[str, Any]:
        """The flat map that goes on the wire: declared fields (None left out), then `extra`."""
        fields = {name: value for name, value in msgspec.structs.asdict(self).items()
                  if name != "extra" and value is not None}
        return {**self.extra, **fields}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Header:
        """Validate a decoded map (raises msgspec.ValidationError); unknown keys go to `extra`."""
        known = {name: value for name, value in fields.items() if name in cls.FIELDS}
        extra = {name: value for name, value in fields.items() if name not in cls.FIELDS}
        return msgspec.convert({**known, "extra": extra}, cls)


class EventHeader(Header, frozen=True, kw_only=True):
    """An event: its content travels in `data`, there is no payload frame."""

    data: dict[str, Any] = msgspec.field(default_factory=dict)


class AudioHeader(Header, frozen=True, kw_only=True):
    """A frame of raw PCM: the payload's format is always stated here, never assumed."""

    rate: Annotated[int, msgspec.Meta(ge=1000, le=384_000)]
    channels: Annotated[int, msgspec.Meta(ge=1, le=32)]
    fmt: Literal["s16le", "pcmu", "pcma"] = "s16le"
    pts: NonNegative  # index of the first sample (per channel) in this stream
    t_capture_ns: NonNegative  # wall clock of the first sample's capture, carried end to end


for _model in (Header, EventHeader, AudioHeader):
    _model.FIELDS = frozenset(_model.__struct_fields__) - {"extra"}

# topic's first segment -> header model; anything else is an event
HEADER_TYPES: dict[str, type[Header]] = {"audio": AudioHeader}
_encoder = msgspec.msgpack.Encoder()
_map_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def header_type(topic: str) -> type[Header]:
    return HEADER_TYPES.get(topic.split(".", 1)[0], EventHeader)


@dataclass(frozen=True)
class Message:
    topic: str
    header: Header
    payload: bytes = b""
    raw_header: bytes = field(default=b"", compare=False, repr=False)

    @property
    def data(self) -> dict[str, Any]:
        return self.header.data if isinstance(self.header, EventHeader) else {}

    @property
    def samples(self) -> int:
        """Samples per channel in an audio payload (derived, never stored)."""
        if not isinstance(self.header, AudioHeader):
            return 0
        return len(self.payload) // (SAMPLE_BYTES[self.header.fmt] * self.header.channels)

    @property
    def duration_ms(self) -> float:
        if not isinstance(self.header, AudioHeader):
            return 0.0
        return 1000.0 * self.samples / self.header.rate


def encode(message: Message) -> list[bytes]:
    """Frames for `socket.send_multipart`; header fields that are None are left out."""
    frames = [message.topic.encode("ascii"), _encoder.encode(message.header.as_dict())]
    if message.payload:
        frames.append(bytes(message.payload) if isinstance(message.payload, memoryview) else message.payload)
    return frames


def decode(frames: list[bytes]) -> Message:
    """Parse and validate one multipart message, or raise EnvelopeError saying why not."""
    if len(frames) not in (2, 3):
        raise EnvelopeError("part_count", f"{len(frames)} frames")
    topic_bytes, header_bytes = bytes(frames[0]), bytes(frames[1])
    payload = bytes(frames[2]) if len(frames) == 3 else b""
    if len(topic_bytes) > MAX_TOPIC_BYTES or len(header_bytes) > MAX_HEADER_BYTES:
        raise EnvelopeError("oversize", "topic or header")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise EnvelopeError("oversize", f"payload {len(payload)} bytes")
    try:
        topic = topic_bytes.decode("ascii")
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_topic", "not ASCII") from exc
    if not TOPIC_PATTERN.match(topic):
        raise EnvelopeError("bad_topic", repr(topic[:40]))
    try:
        fields = _map_decoder.decode(header_bytes)
    except msgspec.ValidationError as exc:  # valid msgpack, but not a map with string keys
        raise EnvelopeError("bad_header", "not a map with string keys") from exc
    except Exception as exc:  # DecodeError, but also UnicodeDecodeError and others on garbage
        raise EnvelopeError("bad_msgpack", f"{type(exc).__name__}: {str(exc)[:80]}") from exc
    try:
        header = header_type(topic).from_fields(fields)
    except msgspec.ValidationError as exc:
        raise EnvelopeError("bad_header", str(exc)[:120]) from exc
    if header.v != SCHEMA_VERSION:
        raise EnvelopeError("bad_version", str(header.v))
    if isinstance(header, AudioHeader):
        if len(payload) % (SAMPLE_BYTES[header.fmt] * header.channels):
            raise EnvelopeError("bad_audio", f"{len(payload)} bytes is not whole {header.fmt} frames")
    elif payload:
        raise EnvelopeError("unexpected_payload", topic)
    return Message(topic=topic, header=header, payload=payload, raw_header=header_bytes)


class Stamper:
    """Builds headers for one publisher: `src`, `session`, and a `seq` that rises by one per topic.

    One counter per topic (not per publisher) so that a subscriber that filters by prefix still sees
    consecutive numbers and can count what the bus really lost.
    """

    def __init__(self, src: str, session: str) -> None:
        self.src = src
        self.session = session
        self.seqs: dict[str, int] = {}

    def _base(self, topic: str, t_ns: int) -> dict[str, Any]:
        seq = self.seqs.get(topic, 0)
        self.seqs[topic] = seq + 1
        return {"v": SCHEMA_VERSION, "src": self.src, "seq": seq, "t_ns": t_ns, "session": self.session}

    def event(self, topic: str, data: dict[str, Any], t_ns: int) -> Message:
        return Message(topic, EventHeader(**self._base(topic, t_ns), data=data))

    def audio(self, topic: str, pcm: bytes, *, rate: int, channels: int, pts: int, t_capture_ns: int,
              t_ns: int, fmt: str = "s16le", **extra: Any) -> Message:
        header = AudioHeader(**self._base(topic, t_ns), rate=rate, channels=channels, pts=pts,
                             t_capture_ns=t_capture_ns, fmt=fmt, extra=extra)
        return Message(topic, header, pcm)
