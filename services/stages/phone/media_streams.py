"""Twilio Media Streams, the websocket protocol of a bidirectional `<Connect><Stream>`, as typed messages.

From the carrier: `connected`, `start` (streamSid, callSid, tracks, customParameters, mediaFormat),
`media` (track, chunk, timestamp, base64 μ-law), `dtmf`, `mark` (one we sent, echoed once the audio
before it has played, or at once when a `clear` dropped it), `stop`. To the carrier: `media`, `mark`,
`clear`. Twilio sends its counters (sequenceNumber, chunk, timestamp) as strings; both are accepted.

One parser for both ends: the phone stage reads the carrier's messages with it, and the fake
carrier (`voicebus call --carrier twilio`) reads the stage's, so neither can drift from the other
without a test noticing.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

MAX_MESSAGE_CHARS = 64 * 1024  # a 20 ms media message is ~300 characters; Twilio's largest is `start`
FRAME_MS = 20
FRAME_BYTES = 160  # 20 ms of 8 kHz μ-law
MULAW = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}

Count = Annotated[int, BeforeValidator(lambda value: int(value) if isinstance(value, str) else value), Field(ge=0)]


class MediaStreamError(ValueError):
    """A message that is not Media Streams: `reason` is short and countable, str() says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class MediaFormat(_Message):
    encoding: str
    sample_rate: int = Field(alias="sampleRate")
    channels: int


class StartInfo(_Message):
    stream_sid: str = Field(alias="streamSid", min_length=1, max_length=64)
    call_sid: str = Field(alias="callSid", default="", max_length=64)
    account_sid: str = Field(alias="accountSid", default="", max_length=64)
    tracks: list[str] = Field(default_factory=lambda: ["inbound"])
    custom_parameters: dict[str, str] = Field(alias="customParameters", default_factory=dict)
    media_format: MediaFormat = Field(alias="mediaFormat")


class MediaInfo(_Message):
    track: str = "inbound"
    chunk: Count = 0
    timestamp: Count = 0  # ms since the stream started, on the carrier's clock
    payload: str


class DtmfInfo(_Message):
    track: str = "inbound_track"
    digit: str = Field(pattern=r"^[0-9*#A-D]$")


class MarkInfo(_Message):
    name: str = Field(max_length=256)


class Connected(_Message):
    event: Literal["connected"]
    protocol: str = "Call"
    version: str = ""


class Start(_Message):
    event: Literal["start"]
    sequence_number: Count = Field(alias="sequenceNumber", default=0)
    start: StartInfo
    stream_sid: str = Field(alias="streamSid", default="")


class Media(_Message):
    event: Literal["media"]
    sequence_number: Count = Field(alias="sequenceNumber", default=0)
    media: MediaInfo
    stream_sid: str = Field(alias="streamSid")

    def codes(self) -> bytes:
        """The payload's μ-law bytes (MediaStreamError if it is not base64)."""
        return payload_codes(self.media.payload)


def payload_codes(payload: str) -> bytes:
    """A media message's base64 payload as its bytes (MediaStreamError if it is not base64)."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaStreamError("bad_payload", "media payload is not base64") from exc


class Dtmf(_Message):
    event: Literal["dtmf"]
    sequence_number: Count = Field(alias="sequenceNumber", default=0)
    dtmf: DtmfInfo
    stream_sid: str = Field(alias="streamSid")


class Mark(_Message):
    event: Literal["mark"]
    sequence_number: Count = Field(alias="sequenceNumber", default=0)
    mark: MarkInfo
    stream_sid: str = Field(alias="streamSid")


class Stop(_Message):
    event: Literal["stop"]
    sequence_number: Count = Field(alias="sequenceNumber", default=0)
    stream_sid: str = Field(alias="streamSid", default="")


class Clear(_Message):
    """Only ever sent to the carrier: drop all audio you hold (and echo the marks among it)."""

    event: Literal["clear"]
    stream_sid: str = Field(alias="streamSid")


class OutboundMedia(_Message):
    """Audio to the carrier: `media` with only a payload (no track, chunk or timestamp)."""

    event: Literal["media"]
    stream_sid: str = Field(alias="streamSid")
    media: dict[str, str]


FROM_CARRIER: dict[str, type[_Message]] = {"connected": Connected, "start": Start, "media": Media, "dtmf": Dtmf,
                                           "mark": Mark, "stop": Stop}
TO_CARRIER: dict[str, type[_Message]] = {"media": OutboundMedia, "mark": Mark, "clear": Clear}


def parse(text: str | bytes, kinds: dict[str, type[_Message]] = FROM_CARRIER) -> Any:
    """One websocket text message as its typed message, or MediaStreamError saying why not."""
    if isinstance(text, bytes):
        raise MediaStreamError("binary", "Media Streams messages are JSON text, not binary")
    if len(text) > MAX_MESSAGE_CHARS:
        raise MediaStreamError("oversize", f"{len(text)} characters")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise MediaStreamError("bad_json", f"not JSON: {str(exc)[:60]}") from exc
    if not isinstance(raw, dict):
        raise MediaStreamError("bad_json", "not a JSON object")
    model = kinds.get(raw.get("event")) if isinstance(raw.get("event"), str) else None
    if model is None:
        raise MediaStreamError("unknown_event", f"unknown event {str(raw.get('event'))[:40]!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MediaStreamError("bad_fields", f"{raw['event']}: {where}: {first['msg']}") from None


def media(stream_sid: str, codes: bytes) -> str:
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": base64.b64encode(codes).decode()}})


def mark(stream_sid: str, name: str, sequence_number: int | None = None) -> str:
    message: dict[str, Any] = {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}
    if sequence_number is not None:
        message["sequenceNumber"] = str(sequence_number)
    return json.dumps(message)


def clear(stream_sid: str) -> str:
    return json.dumps({"event": "clear", "streamSid": stream_sid})
