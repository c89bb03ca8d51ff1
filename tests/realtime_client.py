"""A raw Realtime client for tests: websocket-client, JSON dicts in and out, timeouts everywhere."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import websocket

from common.config import realtime_ws_url

APPEND_BYTES = 4800  # 100 ms of 24 kHz s16


class RawRealtime:
    def __init__(self, base_url: str, model: str = "gpt-realtime", beta: bool = False, key: str = "sk-test",
                 query: str = "") -> None:
        headers = [f"Authorization: Bearer {key}"] + (["OpenAI-Beta: realtime=v1"] if beta else [])
        url = realtime_ws_url(base_url, model) + (f"&{query}" if query else "")
        self.ws = websocket.create_connection(url, header=headers, timeout=30)
        self.events: list[dict[str, Any]] = []
        self.raw_frames: list[str] = []

    def send(self, event: dict[str, Any]) -> None:
        self.ws.send(json.dumps(event))

    def append(self, pcm: bytes) -> None:
        for offset in range(0, len(pcm), APPEND_BYTES):
            self.send({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(pcm[offset:offset + APPEND_BYTES]).decode()})

    def recv(self, timeout_s: float = 30.0) -> dict[str, Any]:
        self.ws.settimeout(timeout_s)
        frame = self.ws.recv()
        self.raw_frames.append(frame)
        event = json.loads(frame)
        self.events.append(event)
        return event

    def until(self, event_type: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            event = self.recv(max(0.1, deadline - time.monotonic()))
            if event.get("type") == event_type:
                return event
        raise AssertionError(f"no {event_type} within {timeout_s}s")

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == event_type]

    def audio(self, delta_type: str = "response.output_audio.delta") -> bytes:
        return b"".join(base64.b64decode(e["delta"]) for e in self.of_type(delta_type))

    def close(self) -> None:
        self.ws.close()
