"""Server events: parsed with the openai SDK's own types, renamed to GA, audio stripped for the bus.

Each protocol has an explicit `type -> SDK model` table (common/realtime_types.py) built from the
SDK's server-event union; nothing is resolved from a string on the wire beyond that lookup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from common.realtime_names import to_ga
from common.realtime_types import Protocol, server_event_models

AUDIO_FIELDS = {"delta", "audio"}  # base64 audio inside events that carry it
AUDIO_EVENTS = {"response.output_audio.delta"}

@dataclass
class ParsedEvent:
    """A server event as the gateway understands it. `type` is always the GA name."""

    type: str
    event: BaseModel | None  # the SDK model (None when unknown or unparseable)
    data: dict[str, Any]  # JSON-safe, audio stripped: what goes on the bus
    audio: bytes = b""  # decoded assistant audio, for audio deltas
    problem: str = ""  # why it is rt.unknown


def strip_audio(event: dict[str, Any]) -> dict[str, Any]:
    """A copy without base64 audio (sizes kept), for the bus, captures, logs and traces."""
    stripped = dict(event)
    for key in AUDIO_FIELDS & stripped.keys():
        if isinstance(stripped[key], str) and (key == "audio" or event.get("type", "").endswith("audio.delta")):
            stripped[f"{key}_bytes"] = len(stripped.pop(key)) * 3 // 4
    item = stripped.get("item")
    if isinstance(item, dict) and isinstance(item.get("content"), list):
        stripped["item"] = {**item, "content": [strip_audio(part) if isinstance(part, dict) else part
                                                for part in item["content"]]}
    return stripped


def parse_server_event(text: str | bytes, protocol: Protocol) -> ParsedEvent:
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return ParsedEvent("unknown", None, {"reason": "malformed_json", "size": len(text),
                                             "head": str(text[:80])}, problem="malformed_json")
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        return ParsedEvent("unknown", None, {"reason": "not_an_event", "size": len(text)}, problem="not_an_event")
    wire_type = raw["type"]
    model = server_event_models(protocol).get(wire_type)
    if model is None:
        return ParsedEvent("unknown", None, {"reason": "unknown_type", "wire_type": wire_type,
                                             "event": strip_audio(raw)}, problem="unknown_type")
    try:
        event = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        return ParsedEvent("unknown", None, {"reason": "invalid", "wire_type": wire_type,
                                             "error": f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                                             "event": strip_audio(raw)}, problem="invalid")
    ga_type = to_ga(wire_type)
    audio = b""
    if ga_type in AUDIO_EVENTS:
        import base64

        audio = base64.b64decode(raw.get("delta", ""))
    data = strip_audio({**raw, "type": ga_type})
    return ParsedEvent(ga_type, event, data, audio)
