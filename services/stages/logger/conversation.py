"""Turns, rebuilt from what crosses the bus: the user's words and audio, the assistant's as heard.

Pure logic (no files, no sockets): feed it bus messages and the time, collect finished turns.
User audio is cut from `audio.user` by the server's own `audio_start_ms`/`audio_end_ms`, mapped
back to frames through the gateway's `rt.sent.input_audio_buffer.append` records (the server's audio
clock starts at 0 on every new connection). The assistant's audio "as played" is the generated audio
cut where the player stopped: the truncation point after a barge-in, else what the player reported.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from common.envelope import AudioHeader, Message
from common.g711 import as_s16
from common.transcripts import cut_transcript

RATE = 24_000  # until the session's audio says otherwise (a phone call's G.711 is 8 kHz)
USER_AUDIO_FRAMES = 9000  # ~3 min of 20 ms frames kept for cutting
FINALIZE_GRACE_S = 3.0  # after response.done, how long to wait for the player to finish or a truncation
FOLLOW_UP_WAIT_S = 30.0  # a turn whose tools were called waits this long for the spoken answer
# USD per 1M tokens (gpt-realtime list prices); pass your own with --prices
DEFAULT_PRICES = {"audio_in": 32.0, "audio_in_cached": 0.40, "text_in": 4.0, "text_in_cached": 0.40,
                  "audio_out": 64.0, "text_out": 16.0}


@dataclass
class Turn:
    user_item_id: str = ""
    user_transcript: str | None = None
    keys: str = ""  # a caller's turn typed on the phone keypad (DTMF), not spoken
    audio_start_ms: int | None = None
    audio_end_ms: int | None = None
    user_pcm: bytes = b""
    speech_end_ns: int | None = None
    response_id: str = ""
    item_id: str = ""
    status: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    transcript: str = ""
    transcript_so_far: str = ""  # from the deltas: all there is when the pipeline stops mid-answer
    truncated: dict[str, Any] | None = None
    first_delta_ns: int | None = None
    first_played_ns: int | None = None
    played_ms: float | None = None
    done_at: float | None = None
    started_ns: int = field(default_factory=time.time_ns)
    events: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)  # function calls made in this turn
    awaiting_follow_up: bool = False  # its response called tools; the spoken answer comes in a next response
    tool_response_id: str = ""
    tool_usage: dict[str, Any] = field(default_factory=dict)  # what the response that called the tools cost
    responses: list[dict[str, Any]] = field(default_factory=list)  # each server response: id, times, status, usage


def cost_usd(usage: dict[str, Any], prices: dict[str, float]) -> float:
    details_in = usage.get("input_token_details") or {}
    details_out = usage.get("output_token_details") or {}
    cached = details_in.get("cached_tokens_details") or {}
    audio_cached, text_cached = cached.get("audio_tokens", 0) or 0, cached.get("text_tokens", 0) or 0
    total = ((details_in.get("audio_tokens", 0) or 0) - audio_cached) * prices["audio_in"] \
        + audio_cached * prices["audio_in_cached"] \
        + ((details_in.get("text_tokens", 0) or 0) - text_cached) * prices["text_in"] \
        + text_cached * prices["text_in_cached"] \
        + (details_out.get("audio_tokens", 0) or 0) * prices["audio_out"] \
        + (details_out.get("text_tokens", 0) or 0) * prices["text_out"]
    return round(total / 1e6, 6)


def add_usage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Token counts of two responses of one turn, added field by field."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            out[key] = add_usage(out.get(key) or {}, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = (out.get(key) or 0) + value
        else:
            out.setdefault(key, value)
    return out


class ConversationBuilder:
    def __init__(self, prices: dict[str, float] | None = None) -> None:
        self.prices = prices or DEFAULT_PRICES
        self.user_frames: OrderedDict[int, bytes] = OrderedDict()  # audio.user pts -> pcm
        self.appended: list[tuple[int, int, int]] = []  # (server sample start, pts, samples)
        self.server_samples = 0
        self.turns: list[Turn] = []
        self.by_user_item: dict[str, Turn] = {}
        self.by_item: dict[str, Turn] = {}
        self.by_response: dict[str, Turn] = {}
        self.generated: dict[str, bytearray] = {}
        self.item_started_ns: dict[str, int] = {}
        self.finished: list[tuple[dict[str, Any], dict[str, bytes]]] = []
        self.session_events: list[dict[str, Any]] = []
        self.session_facts: dict[str, Any] = {}
        self.rate = RATE  # of the session's audio, stored as s16le at this rate (the server's clock counts in it)

    @property
    def bytes_per_ms(self) -> int:
        return self.rate * 2 // 1000

    # --- input -------------------------------------------------------------------------------
    def handle(self, message: Message, now: float) -> None:
        topic = message.topic
        if topic.startswith("audio.") and isinstance(message.header, AudioHeader):
            self.rate = message.header.rate
        if topic == "audio.user" and isinstance(message.header, AudioHeader):
            self.user_frames[message.header.pts] = as_s16(message.payload, message.header.fmt)
            while len(self.user_frames) > USER_AUDIO_FRAMES:
                self.user_frames.popitem(last=False)
        elif topic == "audio.assistant" and isinstance(message.header, AudioHeader):
            item_id = message.header.extra.get("item_id", "")
            self.generated.setdefault(item_id, bytearray()).extend(as_s16(message.payload, message.header.fmt))
            turn = self.by_item.get(item_id)
            if turn is not None and turn.first_delta_ns is None:
                turn.first_delta_ns = message.header.t_capture_ns
        elif topic == "player.state":
            self._player_state(message.data)
        elif topic == "tool.call":
            self._tool_call(message.data, message.header.t_ns)
        elif topic == "phone.dtmf":  # a key the caller pressed: in the session's and the open turn's events
            self.note({"kind": "dtmf", "digit": str(message.data.get("digit", "")), "t_ns": message.header.t_ns})
        elif topic in ("phone.started", "phone.ended"):
            self.note({"kind": topic.replace(".", "_"), "t_ns": message.header.t_ns,
                       **{k: v for k, v in message.data.items() if k in ("call_sid", "reason", "duration_s")}})
        elif topic.startswith("rt."):
            self._event(topic[3:], message.data, message.header.t_ns, now)

    def _player_state(self, state: dict[str, Any]) -> None:
        item_id = state.get("item_id")
        if not item_id:
            return
        if state.get("item_started_ns"):
            self.item_started_ns.setdefault(item_id, state["item_started_ns"])
        turn = self.by_item.get(item_id)
        if turn is not None:
            turn.played_ms = state.get("played_ms")
            turn.first_played_ns = turn.first_played_ns or self.item_started_ns.get(item_id)

    def _current(self) -> Turn | None:
        return self.turns[-1] if self.turns else None

    def _event(self, kind: str, data: dict[str, Any], t_ns: int, now: float) -> None:
        event = data.get("event", {})
        if kind == "sent.input_audio_buffer.append":
            samples = event.get("audio_bytes", 0) // event.get("bytes_per_sample", 2)
            self.appended.append((self.server_samples, event.get("pts", 0), samples))
            self.server_samples += samples
            del self.appended[:-USER_AUDIO_FRAMES]
        elif kind == "gateway.connected":
            self.server_samples = 0
            self.appended.clear()
            self.note({"kind": "connected", "resumed": data.get("resumed"), "replayed_items":
                        data.get("replayed_items"), "t_ns": t_ns})
        elif kind == "gateway.disconnected":
            self.note({"kind": "disconnected", "reason": data.get("reason"), "t_ns": t_ns,
                        "response_lost": data.get("response_lost")})
        elif kind in ("error", "unknown"):
            self.note({"kind": kind, "t_ns": t_ns, "detail": event.get("error") if kind == "error" else data,
                       **({"benign": True} if data.get("benign") else {})})
        elif kind == "session.created":
            session = event.get("session", {})
            self.session_facts.update(model=session.get("model"), protocol=data.get("protocol"),
                                      server_session_id=session.get("id"))
        elif kind == "gateway.keys":  # keys typed on a phone, told to the model as the caller's turn
            turn = Turn(user_transcript=str(data.get("text") or ""), keys=str(data.get("keys") or ""),
                        speech_end_ns=data.get("last_key_ns") or t_ns)
            self.turns.append(turn)
        elif kind == "input_audio_buffer.speech_started":
            turn = Turn(user_item_id=event.get("item_id", ""), audio_start_ms=event.get("audio_start_ms"))
            self.turns.append(turn)
            self.by_user_item[turn.user_item_id] = turn
        elif kind == "input_audio_buffer.speech_stopped":
            turn = self.by_user_item.get(event.get("item_id", ""))
            if turn is not None:
                turn.audio_end_ms = event.get("audio_end_ms")
                turn.user_pcm = self.cut_user_audio(turn.audio_start_ms or 0, turn.audio_end_ms or 0)
        elif kind == "gateway.speech_end":
            turn = self.by_user_item.get(data.get("item_id", ""))
            if turn is not None:
                turn.speech_end_ns = data.get("speech_end_capture_ns")
        elif kind == "conversation.item.input_audio_transcription.completed":
            turn = self.by_user_item.get(event.get("item_id", ""))
            if turn is not None:
                turn.user_transcript = event.get("transcript", "")
        elif kind == "response.created":
            turn = next((t for t in reversed(self.turns) if not t.response_id), None)
            if turn is None and self.turns and self.turns[-1].awaiting_follow_up:
                turn = self.turns[-1]  # the spoken answer to the tools this turn called
                turn.tool_response_id, turn.response_id, turn.item_id = turn.response_id, "", ""
                turn.tool_usage, turn.usage = turn.usage, {}
                turn.awaiting_follow_up, turn.done_at = False, None
            if turn is None:  # a response nobody spoke for (text input, resumed session)
                turn = Turn()
                self.turns.append(turn)
            turn.response_id = event.get("response", {}).get("id", "")
            self.by_response[turn.response_id] = turn
            turn.responses.append({"id": turn.response_id, "created_ns": t_ns})
        elif kind == "gateway.tool_output":
            self._tool_output(data, t_ns)
        elif kind == "gateway.follow_up_skipped":
            turn = self.by_response.get(data.get("response_id", ""))
            if turn is not None:
                turn.awaiting_follow_up = False
        elif kind == "response.output_item.added":
            turn = self.by_response.get(event.get("response_id", ""))
            if turn is not None and not turn.item_id and event.get("item", {}).get("type", "message") == "message":
                turn.item_id = event.get("item", {}).get("id", "")
                self.by_item[turn.item_id] = turn
        elif kind == "response.output_item.done" and event.get("item", {}).get("type", "").startswith("mcp_"):
            self._server_mcp(event["item"], event.get("response_id", ""), t_ns)
        elif kind == "gateway.mcp_approval":
            self.note({"kind": "mcp_approval", "t_ns": t_ns, **{k: data.get(k) for k in (
                "name", "server_label", "approve", "reason", "approval_request_id")}})
        elif kind == "response.output_audio_transcript.delta":
            turn = self.by_item.get(event.get("item_id", ""))
            if turn is not None:
                turn.transcript_so_far += event.get("delta", "")
        elif kind == "response.output_audio_transcript.done":
            turn = self.by_item.get(event.get("item_id", ""))
            if turn is not None:
                turn.transcript = event.get("transcript", "")
        elif kind in ("gateway.interruption", "gateway.idle_prompt", "gateway.idle_end"):
            record = {"kind": kind.removeprefix("gateway."), "t_ns": t_ns,
                      **{k: v for k, v in data.items() if k not in ("event", "protocol", "t_recv_ns")}}
            turn = self.by_item.get(str(data.get("item_id") or ""))
            self.note(record)  # the session's, and the open turn's
            if kind == "gateway.idle_prompt":  # the assistant takes a turn nobody spoke for: the prompt is its reply
                self.turns.append(Turn(events=[record]))
            if turn is not None and record not in turn.events:  # the reply it concerns, if that turn is closed
                turn.events.append(record)
        elif kind == "gateway.truncated":
            turn = self.by_item.get(data.get("item_id", ""))
            if turn is not None:
                turn.truncated = data
                turn.events.append({"kind": "barge_in", "audio_end_ms": data.get("audio_end_ms"), "t_ns": t_ns})
        elif kind == "response.done":
            response = event.get("response", {})
            turn = self.by_response.get(response.get("id", ""))
            if turn is not None:
                turn.status, turn.usage, turn.done_at = response.get("status", ""), response.get("usage") or {}, now
                entry = next((r for r in turn.responses if r["id"] == response.get("id")), None)
                if entry is not None:
                    details = response.get("status_details") or {}
                    entry.update(done_ns=t_ns, status=turn.status, usage=turn.usage, reason=details.get("reason"),
                                 output=[o.get("type") for o in response.get("output") or []])

    def _server_mcp(self, item: dict[str, Any], response_id: str, t_ns: int) -> None:
        """A tool the Realtime server called on a remote MCP server (or asked leave to): the turn's, as its tool calls
        are; a request for approval means the turn's answer comes in a next response."""
        turn = self.by_response.get(response_id)
        if turn is None:
            return
        if item.get("type") == "mcp_approval_request":
            turn.awaiting_follow_up = True
            turn.events.append({"kind": "mcp_approval_request", "name": item.get("name"), "t_ns": t_ns,
                                "server_label": item.get("server_label"), "approval_request_id": item.get("id")})
        elif item.get("type") == "mcp_call":
            error = item.get("error") or None
            turn.tools.append({"call_id": item.get("id"), "name": item.get("name"), "arguments": item.get("arguments"),
                               "output": item.get("output"), "error": (error or {}).get("message") if error else None,
                               "source": f"server-mcp:{item.get('server_label')}", "called_ns": t_ns,
                               "answered_ns": t_ns, "approval_request_id": item.get("approval_request_id")})

    def _tool_call(self, call: dict[str, Any], t_ns: int) -> None:
        turn = self.by_response.get(call.get("response_id", ""))
        if turn is None:
            return
        turn.awaiting_follow_up = True
        turn.tools.append({"call_id": call.get("call_id"), "name": call.get("name"),
                           "arguments": call.get("arguments"), "called_ns": t_ns})

    def _tool_output(self, data: dict[str, Any], t_ns: int) -> None:
        """What the model was told for a call (the tool's result, or the gateway's own error)."""
        turn = self.by_response.get(data.get("response_id", ""))
        if turn is None:
            return
        entry = next((t for t in turn.tools if t["call_id"] == data.get("call_id")), None)
        if entry is None:  # answered by the gateway before any tool.call (malformed arguments)
            entry = {"call_id": data.get("call_id"), "name": data.get("name"), "arguments": None, "called_ns": t_ns}
            turn.tools.append(entry)
            turn.awaiting_follow_up = True
        entry.update(output=data.get("output"), error=data.get("error"), source=data.get("source"),
                     tool_ms=data.get("tool_ms"), round_trip_ms=data.get("round_trip_ms"), answered_ns=t_ns)

    def note(self, record: dict[str, Any]) -> None:
        """A session event (error, reconnect, drop...): kept for the session and the open turn."""
        current = self._current()
        record["turn_open"] = current is not None and current.done_at is None
        self.session_events.append(record)
        if current is not None and current.done_at is None:
            current.events.append(record)

    def cut_user_audio(self, start_ms: int, end_ms: int) -> bytes:
        """The user's audio between two points of the server's audio clock.

        The gateway reports what it appended as runs of pts-contiguous frames; each run maps a span
        of the server's clock onto a span of `audio.user` pts, which is read back frame by frame
        (silence where a frame did not reach the logger)."""
        first, last = start_ms * self.rate // 1000, end_ms * self.rate // 1000
        starts = sorted(self.user_frames)
        out = bytearray()
        for server_start, run_pts, samples in self.appended:
            lo, hi = max(first, server_start), min(last, server_start + samples)
            if lo < hi:
                out += self._user_pcm(starts, run_pts + lo - server_start, run_pts + hi - server_start)
        return bytes(out)

    def _user_pcm(self, starts: list[int], pts_lo: int, pts_hi: int) -> bytes:
        out = bytearray()
        cursor = pts_lo
        index = bisect.bisect_right(starts, cursor) - 1  # invariant: starts[index] <= cursor
        while cursor < pts_hi:
            if index >= 0:
                frame_pts = starts[index]
                pcm = self.user_frames[frame_pts]
                if cursor < frame_pts + len(pcm) // 2:
                    upto = min(pts_hi, frame_pts + len(pcm) // 2)
                    out += pcm[(cursor - frame_pts) * 2:(upto - frame_pts) * 2]
                    cursor = upto
                    continue
            # nothing covers `cursor`: silence up to the next frame
            upto = max(cursor, min(pts_hi, starts[index + 1] if index + 1 < len(starts) else pts_hi))
            out += bytes((upto - cursor) * 2)
            cursor = upto
            index += 1
        return bytes(out)

    # --- output ------------------------------------------------------------------------------
    def tick(self, now: float, final: bool = False) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        """Turns that are complete now (all of them when `final`)."""
        done = []
        for turn in list(self.turns):
            if not self._complete(turn, now) and not final:
                continue
            if final and not turn.response_id and not turn.user_transcript:
                self.turns.remove(turn)
                continue
            done.append(self._record(turn))
            self._forget(turn)
        return done

    def _forget(self, turn: Turn) -> None:
        """A stored turn leaves every index (a long session must not grow with its turns)."""
        self.turns.remove(turn)
        self.by_user_item.pop(turn.user_item_id, None)
        self.by_item.pop(turn.item_id, None)
        self.by_response.pop(turn.response_id, None)
        self.by_response.pop(turn.tool_response_id, None)
        self.item_started_ns.pop(turn.item_id, None)

    def _complete(self, turn: Turn, now: float) -> bool:
        if turn.done_at is None:
            return False
        if turn.awaiting_follow_up:
            return now - turn.done_at > FOLLOW_UP_WAIT_S
        generated_ms = len(self.generated.get(turn.item_id, b"")) / self.bytes_per_ms
        fully_played = turn.played_ms is not None and turn.played_ms >= generated_ms - 1
        return turn.truncated is not None or fully_played or now - turn.done_at > FINALIZE_GRACE_S

    @staticmethod
    def _window(turn: Turn, first_played_ns: int | None, played_ms: float) -> dict[str, int]:
        """When the turn happened, on the capture clock: from the user's first word (the end of speech
        less the server's measure of it) to the last sample of the reply that reached the speaker.

        Where a part is unknown (no speech: a text turn; nothing played) the logger's own clock stands in."""
        started = turn.started_ns
        if turn.speech_end_ns and turn.audio_start_ms is not None and turn.audio_end_ms is not None:
            started = turn.speech_end_ns - int((turn.audio_end_ms - turn.audio_start_ms) * 1e6)
        ends = [r["done_ns"] for r in turn.responses if r.get("done_ns")]
        ended = first_played_ns + int(played_ms * 1e6) if first_played_ns else max(ends, default=0)
        return {"started_ns": started, "ended_ns": max(ended or time.time_ns(), started)}

    def _record(self, turn: Turn) -> tuple[dict[str, Any], dict[str, bytes]]:
        generated = bytes(self.generated.pop(turn.item_id, b""))
        generated_ms = len(generated) / self.bytes_per_ms
        unfinished = bool(turn.response_id) and turn.done_at is None  # stopped before response.done
        if unfinished and not turn.transcript:
            turn.transcript = turn.transcript_so_far
        if turn.truncated is not None:
            played_ms = float(turn.truncated.get("audio_end_ms", 0))
            heard = turn.truncated.get("transcript_heard", "")
        else:
            played_ms = turn.played_ms if turn.played_ms is not None else generated_ms
            heard = turn.transcript
            if unfinished and generated_ms:
                heard = cut_transcript(turn.transcript, min(1.0, played_ms / generated_ms))
        played = generated[:int(played_ms) * self.bytes_per_ms]
        first_played = turn.first_played_ns or self.item_started_ns.get(turn.item_id)

        def ms_between(a: int | None, b: int | None) -> float | None:
            return round((b - a) / 1e6, 1) if a and b else None

        usage = add_usage(turn.usage, turn.tool_usage)
        record = {
            "key": turn.response_id or f"user:{turn.user_item_id}", "audio_rate": self.rate,
            "user": {"item_id": turn.user_item_id, "transcript": turn.user_transcript, **({"keys": turn.keys} if turn.keys else {}),
                     "audio_start_ms": turn.audio_start_ms, "audio_end_ms": turn.audio_end_ms,
                     "audio_ms": round(len(turn.user_pcm) / self.bytes_per_ms, 1)},
            "assistant": {"response_id": turn.response_id, "item_id": turn.item_id,
                          "tool_response_id": turn.tool_response_id or None,
                          "status": "unfinished" if unfinished else turn.status, "unfinished": unfinished,
                          "transcript_heard": heard, "transcript_generated": turn.transcript,
                          "played_ms": round(played_ms, 1), "generated_ms": round(len(generated) / self.bytes_per_ms, 1),
                          "barge_in": turn.truncated is not None},
            "tools": turn.tools,
            "usage": usage, "cost_usd": cost_usd(usage, self.prices) if usage else 0.0,
            "timing": {"speech_end_ns": turn.speech_end_ns, "first_delta_ns": turn.first_delta_ns,
                       "first_played_ns": first_played,
                       "speech_end_to_first_delta_ms": ms_between(turn.speech_end_ns, turn.first_delta_ns),
                       "speech_end_to_first_played_ms": ms_between(turn.speech_end_ns, first_played),
                       "tool_ms": round(sum(t.get("round_trip_ms") or 0 for t in turn.tools), 1) if turn.tools
                       else None},
            "responses": turn.responses, "events": turn.events,
            **self._window(turn, first_played, played_ms),
        }
        audio = {"user": turn.user_pcm, "assistant-played": played, "assistant-generated": generated}
        return record, audio
