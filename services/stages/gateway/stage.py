"""The gateway stage: audio.user -> websocket; server events -> rt.*, audio.assistant; barge-in."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, TextIO

import msgpack
from pydantic import ValidationError

from common import g711
from common.envelope import SAMPLE_BYTES, AudioHeader, Message
from common.log import RateLimitedLog, kv
from common.realtime_types import (
    ClientEventError,
    build_validators,
    validate_client_event,
)
from common.stage import SESSION_BEGIN, SESSION_END, Stage
from common.transcripts import cut_transcript
from services.stages.gateway.bargein import AudibleTracker, EchoGuard
from services.stages.gateway.events import parse_server_event, strip_audio
from services.stages.gateway.function_calls import FunctionCalls, error_output, output_item
from services.stages.gateway.idle import IdleWatch
from services.stages.gateway.interruptions import InterruptionPolicy
from services.stages.gateway.keypad import KeyPad, keys_text
from services.stages.gateway.session import (
    AUDIO_FORMATS,
    ConversationSettings,
    SessionSettings,
    replay_item,
    session_update,
)
from services.stages.gateway.socket import PAUSED_REASON, RealtimeSocket, SocketEvent

FLUSH_WAIT_S = 0.3  # how long to wait for the player's flushed position before truncating with the last one
MAX_EVENT_HEADER_BYTES = 60_000
RESUME_TURNS = 20
APPEND_HISTORY = 3000  # 60 s of 20 ms frames: maps the server's audio ms back to capture time
# Appended audio is reported on the bus as runs of contiguous frames, not one event per 20 ms frame
# (50 messages a second that woke the bus and the logger for nothing); a run is published at this
# length, and always before any other event of ours, so whoever maps the server's audio clock (the
# logger) has it before the speech_started/stopped that refers to it.
APPEND_RUN_S = 1.0
# server errors that only say a race was lost and the server already did what we asked: reported on
# the bus with benign=true and counted apart, never shown to the user as a failure
BENIGN_ERRORS = {"response_cancel_not_active", "conversation_already_has_active_response"}
TOOL_TIMEOUT_MARGIN_S = 1.0  # the tools stage answers a timeout itself; the gateway waits this much longer

FINISHED_STATUSES = ("completed", "incomplete")  # a response that ended by itself; "cancelled" was cut
IDLE_TICK_S = 0.25  # how often a quiet line is looked at when an idle timeout is set
LINE_LIVE_S = 1.0  # user audio this recent: someone is on the line
log = logging.getLogger("voicebus.gateway")


class GatewayStage(Stage):
    name = "gateway"
    subscriptions = ["audio.user", "player.state", "gateway.send", "gateway.configure", "tools.available",
                     "tool.result", "phone.dtmf"]
    deadline_tick_s = 0.05

    @property
    def tick_interval_s(self) -> float | None:  # type: ignore[override]
        """Tick at 20 Hz only while a deadline runs (a tool call, a cut waiting on the player): idle, none."""
        if self.calls.pending or self.pending_truncate is not None or self.held is not None or self.keypad.keys:
            return self.deadline_tick_s
        return IDLE_TICK_S if self.idle is not None and not self.idle.ended else None

    def __init__(self, url: str, headers: list[str], protocol: str, settings: SessionSettings,
                 echo_guard: EchoGuard | None = None, ws_log: Path | None = None, max_session_s: float = 55 * 60,
                 target_label: str = "", tool_timeout_s: float = 15.0) -> None:
        super().__init__()
        self.protocol, self.settings, self.echo_guard = protocol, settings, echo_guard
        self.base_settings = settings  # the command line's; a conversation may set some apart (gateway.configure)
        self.configured: OrderedDict[str, dict[str, Any]] = OrderedDict()  # session ("" = the next) -> overrides
        # the session's audio both ways: its bus format, its rate, its bytes per sample (s16le at 24 kHz,
        # or a phone line's G.711 at 8 kHz, whose codes go to the server and back as they are)
        _, _, self.audio_fmt, self.rate = AUDIO_FORMATS[settings.audio_format]
        self.sample_bytes = SAMPLE_BYTES[self.audio_fmt]
        self.socket = RealtimeSocket(url, headers, self.inbox.put, max_session_s)
        self.url_for_logs = url.split("?", 1)[0]
        self.target_label = target_label
        self.tracker = AudibleTracker()
        self.response_active: str | None = None
        self.pending_truncate: dict[str, Any] | None = None
        self.conversation: OrderedDict[str, tuple[str, str]] = OrderedDict()  # item_id -> (role, text)
        self.tools: list[dict[str, Any]] = []  # as announced on tools.available
        # the server's session as it last confirmed it (session.updated), None until then: in every
        # heartbeat, for whoever subscribed after that one event went by
        self.session_tools: list[str] | None = None
        self.tools_instance = ""
        self.calls = FunctionCalls(tool_timeout_s)
        self.idle: IdleWatch | None = None
        self.policy: InterruptionPolicy | None = None
        self._use_settings(settings)
        self.user_speaking = False
        self.held: dict[str, Any] | None = None  # a reply paused while the user speaks over it (policy on)
        self.keypad = KeyPad(settings.keys_wait_s or 0.0)
        self.greeted = False  # this conversation's greeting was asked for
        # responses the caller cannot interrupt (metadata interruptible=false: the greeting, or any reply a
        # client asks for so): while one plays, the caller's audio goes to the server as silence
        self.uninterruptible: set[str] = set()
        self.create_after_done = False  # the user's turn wants a response once the one running is done
        self.line_heard_at = 0.0  # the last user audio: a line with nobody on it (a web stage between callers) is not idle
        self.ws_log_path = ws_log
        self._ws_log: TextIO | None = None
        self._warn = RateLimitedLog(log)
        self.appended_frames: deque[tuple[int, int, int]] = deque(maxlen=APPEND_HISTORY)  # (start, n, t_capture)
        self.append_run: dict[str, Any] | None = None  # frames sent, not yet reported on the bus
        self.session_samples = 0  # audio appended since this server session began
        self.fresh_session = False  # the next connect starts a new conversation: nothing to resume
        self.counts = {"appended": 0, "dropped_disconnected": 0, "unknown_events": 0, "server_errors": 0,
                       "reconnects": 0, "barge_ins": 0, "truncations": 0, "events_in": 0,
                       "rejected_commands": 0, "benign_errors": 0, "late_tool_results": 0, "conversations": 1,
                       "played_to_end": 0, "audio_converted": 0,
                       "key_turns": 0, "keys_refused": 0, "configurations_refused": 0, "mcp_approved": 0,
                       "mcp_refused": 0, "muted_frames": 0}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        # the openai SDK's event tables take seconds to import on a busy machine, and their validators
        # a moment to build: done here, within the launcher's start-up grace, not on the first server
        # events, when heartbeats are already due (a no-op when forked from the zygote, which built them)
        build_validators(self.protocol)  # type: ignore[arg-type]
        if self.ws_log_path is not None:
            self.ws_log_path.parent.mkdir(parents=True, exist_ok=True)
            self._ws_log = open(self.ws_log_path, "a")  # noqa: SIM115 - closed in stop()
        log.info(kv("connecting", url=self.url_for_logs, protocol=self.protocol, target=self.target_label or "-"))
        self.out.event("tools.query", {})  # a tools stage that is already up announces its set again
        self.socket.start()

    def stop(self) -> None:
        self.socket.stop()
        if self.append_run is not None:
            self._publish_append_run()
        if self._ws_log is not None:
            self._ws_log.close()

    def counters(self) -> dict[str, Any]:
        extra = {"connected": self.socket.connected, "session_configured": self.session_tools is not None,
                 "session_tools": self.session_tools or []}
        if self.echo_guard is not None:
            extra.update(echo_gated_frames=self.echo_guard.gated_frames, echo_passed_frames=self.echo_guard.passed_frames)
        return {**self.counts, **self.calls.counts, "tools": len(self.tools), **extra}

    def on_session(self, topic: str, session: str, previous: str) -> None:
        """A conversation ended: close the server session (nothing of it may reach the next caller).
        One began: connect afresh; a new session on a server session already used is renewed."""
        self.held, self.create_after_done, self.greeted = None, False, False
        self.keypad.take()  # keys of the last caller are not the next one's
        configured = self.settings
        if topic == SESSION_BEGIN:  # its own settings, if it was given any, else the command line's
            overrides = self.configured.pop(session, None) or self.configured.pop("", None) or {}
            self._use_settings(dataclasses.replace(self.base_settings, **overrides))
            if overrides:
                log.info(kv("conversation_settings", session=session, **overrides))
        else:
            self._use_settings(self.settings)  # nothing asked yet of whoever comes next
        if topic == SESSION_END:
            self._forget_conversation()
            self.socket.pause()
            log.info(kv("conversation_ended", session=session, server_session="closed"))
        elif self.socket.paused:
            self.counts["conversations"] += 1
            self.socket.resume()
            log.info(kv("conversation_begins", session=session, server_session="new"))
        elif session != previous and (self.session_samples or self.conversation or self.tracker.items):
            self.counts["conversations"] += 1
            self._forget_conversation()
            self.socket.renew()
            log.info(kv("conversation_begins", session=session, server_session="renewed"))
        elif self.settings != configured and self.socket.connected:  # the same server session, set anew
            self.send(session_update(self.settings, self.protocol, self.tools))

    def _use_settings(self, settings: SessionSettings) -> None:
        """The session's settings, and what follows from them (idle watch, interruption policy), fresh."""
        self.settings = settings
        self.idle = IdleWatch(settings.idle_timeout_s, settings.idle_prompt, settings.idle_prompts) \
            if settings.idle_timeout_s else None
        self.policy = InterruptionPolicy(min_speech_s=settings.min_interruption_s,
                                         min_words=settings.min_interruption_words) \
            if settings.false_interruptions else None

    def _configure(self, data: dict[str, Any]) -> None:
        """`gateway.configure` {session?, settings}: settings for a conversation about to begin (none: the next)."""
        try:
            overrides = ConversationSettings.model_validate(data.get("settings") or {}).overrides()
        except ValidationError as exc:
            self.counts["configurations_refused"] += 1
            self._warn.warning("configure", kv("configuration_refused", reason=repr(str(exc).splitlines()[0:3])))
            return
        self.configured[str(data.get("session") or "")] = overrides
        while len(self.configured) > 16:  # never begun: forgotten
            self.configured.popitem(last=False)

    def _forget_conversation(self) -> None:
        if self.append_run is not None:
            self._publish_append_run()
        self.conversation.clear()
        self.tracker = AudibleTracker()
        self.uninterruptible.clear()
        self.response_active = None
        self.pending_truncate = None
        self.calls.reset()
        self.fresh_session = True

    # --- sending ---------------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> bool:
        sent = self.socket.send(json.dumps(event))
        stripped = strip_audio(event)
        self._log_ws("out", stripped)
        if sent:
            self._publish_event(f"rt.sent.{event['type']}", {"event": stripped, "protocol": self.protocol})
        return sent

    def _log_ws(self, direction: str, event: dict[str, Any]) -> None:
        if self._ws_log is not None:
            self._ws_log.write(json.dumps({"t_ns": time.time_ns(), "dir": direction, "event": event}) + "\n")
            self._ws_log.flush()

    def _publish_event(self, topic: str, data: dict[str, Any]) -> None:
        if self.append_run is not None:
            self._publish_append_run()
        self._publish_checked(topic, data)

    def _publish_append_run(self) -> None:
        run, self.append_run = self.append_run, None
        self._publish_checked("rt.sent.input_audio_buffer.append", {"event": run, "protocol": self.protocol})

    def _note_append(self, header: AudioHeader, pcm: bytes) -> None:
        """Add a sent frame to the current run (frames contiguous in pts), publishing it when due."""
        run = self.append_run
        sent_ns = time.time_ns()
        if run is not None and header.pts != run["pts"] + run["audio_bytes"] // self.sample_bytes:
            self._publish_append_run()
            run = None
        if run is None:
            run = self.append_run = {"type": "input_audio_buffer.append", "audio_bytes": 0, "pts": header.pts,
                                     "bytes_per_sample": self.sample_bytes, "rate": self.rate,
                                     "t_capture_ns": header.t_capture_ns, "frames": 0, "t_callback_ns": [],
                                     "t_sent_ns": []}
        run["audio_bytes"] += len(pcm)
        run["frames"] += 1
        run["t_callback_ns"].append(header.extra.get("t_callback_ns", 0))
        run["t_sent_ns"].append(sent_ns)
        if run["audio_bytes"] >= APPEND_RUN_S * self.rate * self.sample_bytes:
            self._publish_append_run()

    def _publish_checked(self, topic: str, data: dict[str, Any]) -> None:
        if len(msgpack.packb(data, use_bin_type=True, default=str)) > MAX_EVENT_HEADER_BYTES:
            data = {"event": {"type": data.get("event", {}).get("type")}, "omitted": "too large for the bus"}
        self.out.event(topic, data)

    # --- bus input -------------------------------------------------------------------------
    def handle(self, message: Message) -> None:
        if message.topic == "audio.user" and isinstance(message.header, AudioHeader):
            self._forward_audio(message)
        elif message.topic == "gateway.send":
            self._send_command(message.data.get("event"))
        elif message.topic == "gateway.configure":
            self._configure(message.data if isinstance(message.data, dict) else {})
        elif message.topic == "tools.available":
            self._tools_available(message.data.get("tools") or [], str(message.data.get("instance", "")))
        elif message.topic == "tool.result":
            self._tool_result(message.data)
        elif message.topic == "phone.dtmf":
            self._key(message.data.get("digit"), message.header.t_ns)
        elif message.topic == "player.state":
            self.tracker.on_player_state(message.data, time.monotonic())
            if self.pending_truncate is not None and message.data.get("flushed"):
                self._truncate(message.data.get("played_ms", 0.0), source="player_flush_state")

    def _forward_audio(self, message: Message) -> None:
        self.line_heard_at = time.monotonic()
        header = message.header
        if header.rate != self.rate or header.channels != 1:
            self._warn.warning("format", kv("dropped_audio", reason=f"not {self.rate} Hz mono ({self.settings.audio_format})",
                                            rate=header.rate, channels=header.channels))
            return
        if not self.socket.connected:
            self.counts["dropped_disconnected"] += 1
            return
        pcm = message.payload
        if header.fmt != self.audio_fmt:  # s16le <-> G.711 at the same rate: recoded, never resampled
            pcm = g711.encode(g711.as_s16(pcm, header.fmt), self.audio_fmt) if self.audio_fmt != "s16le" \
                else g711.as_s16(pcm, header.fmt)
            self.counts["audio_converted"] += 1
        if self.settings.greeting and not self.greeted and self.session_tools is not None:
            self._greet()  # someone is on the line
        audible = self.tracker.audible_item()
        muted = audible is not None and audible.response_id in self.uninterruptible
        if muted:
            self.counts["muted_frames"] += 1
        if muted or (self.echo_guard is not None and
                     not self.echo_guard.admit(self._s16(pcm), self.tracker, time.monotonic())):
            # silence keeps the server's audio clock in step with capture
            pcm = bytes(len(pcm)) if self.audio_fmt == "s16le" else bytes([g711.SILENCE[self.audio_fmt]]) * len(pcm)
        if self.socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})):
            self.counts["appended"] += 1
            samples = len(pcm) // self.sample_bytes
            self.appended_frames.append((self.session_samples, samples, header.t_capture_ns))
            self.session_samples += samples
            if self._ws_log is not None:
                self._log_ws("out", {"type": "input_audio_buffer.append", "audio_bytes": len(pcm), "pts": header.pts,
                                     "t_capture_ns": header.t_capture_ns})
            self._note_append(header, pcm)
        else:
            self.counts["dropped_disconnected"] += 1

    def _send_command(self, event: Any) -> None:
        """A client event from the bus (debugging, tests, tools): checked against the SDK's types first."""
        try:
            if not isinstance(event, dict):
                raise ClientEventError("gateway.send needs data.event: a client event object")
            validate_client_event(event, self.protocol)  # type: ignore[arg-type]
        except ClientEventError as exc:
            self.counts["rejected_commands"] += 1
            self._warn.warning("command", kv("command_rejected", reason=repr(str(exc))))
            return
        self.send(event)

    # --- socket input ----------------------------------------------------------------------
    def on_inbox(self, item: SocketEvent) -> None:
        if item.kind == "message":
            self._on_server_text(item.text, item.t_recv_ns)
        elif item.kind == "connected":
            self._on_connected(item.attempt)
        elif item.kind == "closed":
            self._on_closed(item.reason, item.attempt)

    def _on_connected(self, attempt: int) -> None:
        resumed = self.socket.connects > 1 and not self.fresh_session
        self.fresh_session = False
        self.session_samples = 0  # a new socket is a new server session: its audio clock starts at 0
        self.appended_frames.clear()
        self.session_tools = None  # until this server session confirms its configuration
        log.info(kv("connected", url=self.url_for_logs, attempt=attempt, resumed=resumed))
        self.send(session_update(self.settings, self.protocol, self.tools))
        replayed = 0
        if resumed:
            for role, text in list(self.conversation.values())[-RESUME_TURNS:]:
                if text:
                    self.send(replay_item(role, text, self.protocol))
                    replayed += 1
        self._publish_event("rt.gateway.connected", {"attempt": attempt, "resumed": resumed,
                                                     "replayed_items": replayed, "protocol": self.protocol})

    def _on_closed(self, reason: str, attempt: int) -> None:
        was_active = self.response_active is not None
        self.session_tools = None
        self.response_active = None
        self.pending_truncate = None
        self.calls.reset()
        if reason == PAUSED_REASON:
            self._publish_event("rt.gateway.closed", {"reason": reason})
            return
        if reason.startswith("connect failed"):
            log.debug(kv("not_connected", reason=repr(reason), attempt=attempt))
        else:
            self.counts["reconnects"] += 1
            log.warning(kv("disconnected", reason=repr(reason), attempt=attempt, response_lost=was_active))
        self._publish_event("rt.gateway.disconnected", {"reason": reason, "attempt": attempt,
                                                        "response_lost": was_active})

    def _on_server_text(self, text: str, t_recv_ns: int) -> None:
        parsed = parse_server_event(text, self.protocol)  # type: ignore[arg-type]
        self.counts["events_in"] += 1
        if parsed.type == "unknown":
            self.counts["unknown_events"] += 1
            self._warn.warning(parsed.problem, kv("unknown_event", reason=parsed.problem,
                                                  wire_type=parsed.data.get("wire_type", "-")))
            self._log_ws("in", parsed.data)
            self._publish_event("rt.unknown", {**parsed.data, "protocol": self.protocol, "t_recv_ns": t_recv_ns})
            return
        data = parsed.data
        self._log_ws("in", data)
        kind = parsed.type
        if kind == "response.output_audio.delta":
            self._on_audio_delta(data, parsed.audio, t_recv_ns)
        elif kind == "session.updated":
            self.session_tools = [str(tool.get("name")) for tool in data.get("session", {}).get("tools") or []
                                  if tool.get("type", "function") == "function"]
        benign = kind == "error" and data.get("error", {}).get("code") in BENIGN_ERRORS
        self._publish_event(f"rt.{kind}", {"event": data, "protocol": self.protocol, "t_recv_ns": t_recv_ns,
                                           **({"benign": True} if benign else {})})
        if kind == "error":
            error = data.get("error", {})
            self.counts["benign_errors" if benign else "server_errors"] += 1
            log.log(logging.INFO if benign else logging.WARNING,
                    kv("server_error", code=error.get("code"), benign=benign,
                       message=repr(str(error.get("message"))[:200])))
        elif kind == "response.created":
            self.response_active = data["response"].get("id")
            if (data["response"].get("metadata") or {}).get("interruptible") == "false":
                self.uninterruptible.add(self.response_active or "")
            if self.calls.on_response_created(data["response"]):
                # a follow-up asked for before the user spoke, created after: it would talk over them
                self.send({"type": "response.cancel", "response_id": self.response_active})
                log.info(kv("orphan_cancelled", response_id=self.response_active))
        elif kind == "response.output_item.done" and data.get("item", {}).get("type") == "function_call":
            self._function_call(data["item"], data.get("response_id", ""))
        elif kind == "response.output_item.done" and data.get("item", {}).get("type") == "mcp_approval_request":
            self._approve(data["item"])
        elif kind == "response.done":
            self.response_active = None
            if self.create_after_done:  # the user's turn, held back while the cut reply was ending
                self.create_after_done = False
                self.send({"type": "response.create"})
            response_id = data["response"].get("id", "")
            if data["response"].get("status") in FINISHED_STATUSES:
                for item in self.tracker.items.values():
                    item.complete = item.complete or item.response_id == response_id
            self.calls.on_response_done(response_id)
            self._maybe_follow_up(response_id)
        elif kind == "response.output_audio_transcript.delta":
            item = self.tracker.items.get(data["item_id"])
            if item is not None:
                item.transcript += data.get("delta", "")
        elif kind == "response.output_audio_transcript.done":
            item = self.tracker.items.get(data["item_id"])
            if item is not None and not item.truncated:
                item.transcript = data.get("transcript", "")
                self._remember(data["item_id"], "assistant", item.transcript)
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._remember(data["item_id"], "user", data.get("transcript", ""))
            held = self.held
            if held is not None and held.get("speech_s") is not None and held.get("user_item") == data["item_id"]:
                self._decide(data.get("transcript", ""))
        elif kind == "input_audio_buffer.speech_started":
            self.user_speaking = True
            if self.idle is not None:
                self.idle.heard_user()
            self.calls.on_speech_started()
            if self.policy is None or not self._hold(data.get("item_id"), data.get("audio_start_ms")):
                self._barge_in()
        elif kind == "input_audio_buffer.speech_stopped":
            self.user_speaking = False
            self._speech_end(data)
            if self.policy is not None:
                self._user_turn_over(data.get("audio_end_ms"))

    def _s16(self, audio: bytes) -> bytes:
        """The session's audio as s16le, for level meters (G.711 decoded; s16le as it is)."""
        return audio if self.audio_fmt == "s16le" else g711.as_s16(audio, self.audio_fmt)

    def _on_audio_delta(self, data: dict[str, Any], audio: bytes, t_recv_ns: int) -> None:
        """`audio`: the delta as the server sent it, in the session's format; on the bus as it is."""
        before = self.tracker.items[data["item_id"]].received_samples if data["item_id"] in self.tracker.items else 0
        self.tracker.add_audio(data["item_id"], data["response_id"], data["content_index"], self._s16(audio),
                               time.monotonic(), rate=self.rate)
        self.out.audio("audio.assistant", audio, rate=self.rate, channels=1, pts=before, t_capture_ns=t_recv_ns,
                       fmt=self.audio_fmt, item_id=data["item_id"], response_id=data["response_id"],
                       content_index=data["content_index"])

    def _remember(self, item_id: str, role: str, text: str) -> None:
        self.conversation[item_id] = (role, text)
        while len(self.conversation) > 4 * RESUME_TURNS:
            self.conversation.popitem(last=False)

    def capture_time_of(self, session_ms: float) -> int | None:
        """Wall-clock capture time of the audio the server knows as `session_ms` (None if too old)."""
        target = session_ms * self.rate / 1000
        for start, samples, t_capture_ns in reversed(self.appended_frames):
            if start <= target:
                return t_capture_ns + int((target - start) * 1e9 / self.rate) if target <= start + samples else None
        return None

    def _speech_end(self, data: dict[str, Any]) -> None:
        """The user stopped speaking `silence_duration_ms` before the server said so: when was that, really?"""
        # server_vad's audio_end_ms includes its silence_duration_ms; semantic_vad's is where the words ended
        silence_ms = self.settings.vad_silence_duration_ms if self.settings.vad_type == "server_vad" else 0
        speech_end_ms = data["audio_end_ms"] - silence_ms
        self._publish_event("rt.gateway.speech_end", {"item_id": data["item_id"], "audio_end_ms": data["audio_end_ms"],
                                                      "speech_end_ms": speech_end_ms,
                                                      "speech_end_capture_ns": self.capture_time_of(speech_end_ms)})

    # --- tools ------------------------------------------------------------------------------
    def _tools_available(self, listing: list[dict[str, Any]], instance: str) -> None:
        if instance != self.tools_instance:
            if self.tools_instance:  # a restarted tools stage: what the old one was running is lost
                for call in self.calls.abandon_pending():
                    log.warning(kv("tool_lost", name=call.name, call_id=call.call_id, reason="tools stage restarted"))
                    self._answer_call({**error_output(call.call_id, call.name, f"{call.name} was interrupted: the "
                                                      "tools stage restarted"), "source": "gateway"},
                                      call.response_id, (time.time_ns() - call.started_ns) / 1e6)
            self.tools_instance = instance
        if listing == self.tools:
            return
        self.tools = listing
        log.info(kv("tools", names=",".join(t.get("name", "?") for t in listing) or "-"))
        if self.socket.connected:
            self.send(session_update(self.settings, self.protocol, self.tools))

    def _function_call(self, item: dict[str, Any], response_id: str) -> None:
        timeout = next((t.get("timeout_s") for t in self.tools if t.get("name") == item.get("name")), None)
        call, immediate = self.calls.on_call_item(item, response_id, time.monotonic(),
                                                  timeout + TOOL_TIMEOUT_MARGIN_S if timeout else None)
        if call is not None:
            self._publish_event("tool.call", call)
        else:
            self._answer_call({**immediate, "source": "gateway"}, response_id, 0.0)

    def _tool_result(self, result: dict[str, Any]) -> None:
        pending = self.calls.on_result(result)
        if pending is None:  # answered already (the gateway's own timeout), or another session's
            self.counts["late_tool_results"] += 1
            return
        self._answer_call(result, pending.response_id, (time.time_ns() - pending.started_ns) / 1e6)

    def _answer_call(self, result: dict[str, Any], response_id: str, round_trip_ms: float) -> None:
        """The output goes to the server, and on the bus as what the model was told (for the trace)."""
        self.send(output_item(result))
        self._publish_event("rt.gateway.tool_output", {
            "call_id": result["call_id"], "name": result.get("name"), "response_id": response_id,
            "output": result.get("output"), "error": result.get("error"), "source": result.get("source"),
            "tool_ms": result.get("duration_ms"), "round_trip_ms": round(round_trip_ms, 2)})
        self.calls.answered(result["call_id"], response_id)
        self._maybe_follow_up(response_id)

    def _maybe_follow_up(self, response_id: str) -> None:
        metadata, why = self.calls.followup_due(response_id, self.response_active is not None)
        if metadata is not None:
            self.send({"type": "response.create", "response": {"metadata": metadata}})
        elif why != "waiting":
            log.info(kv("no_follow_up", response_id=response_id, reason=repr(why)))
            self._publish_event("rt.gateway.follow_up_skipped", {"response_id": response_id, "reason": why})

    # --- keys pressed on a phone ---------------------------------------------------------------
    def _key(self, digit: Any, t_ns: int) -> None:
        if self.settings.keys_wait_s is None:
            return
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCD":
            self.counts["keys_refused"] += 1
            self._warn.warning("key", kv("key_refused", digit=repr(digit)[:20], reason="not a DTMF key"))
            return
        if not self.keypad.keys:  # the first key of a turn: the caller has taken the turn, as speech does
            if self.idle is not None:
                self.idle.heard_user()
            self._barge_in(by_keys=True)
        keys = self.keypad.press(digit, time.monotonic(), t_ns)
        if keys:
            self._keys_turn(keys)

    def _keys_turn(self, keys: str) -> None:
        """The keys typed, as the user's turn: a text item, and a response to it (after the running one)."""
        text = keys_text(keys)
        self.counts["key_turns"] += 1
        log.info(kv("keys", keys=keys))
        self._publish_event("rt.gateway.keys", {"keys": keys, "text": text, "last_key_ns": self.keypad.last_t_ns})
        self.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                "content": [{"type": "input_text", "text": text}]}})
        if self.response_active is None:
            self.send({"type": "response.create"})
        else:
            self.create_after_done = True

    def _greet(self) -> None:
        """The conversation's first words, the gateway's own (not the model's): once per conversation."""
        self.greeted = True
        metadata = {"voicebus": "greeting", **({} if self.settings.greeting_interruptible else {"interruptible": "false"})}
        self.send({"type": "response.create", "response": {"instructions": f"Say exactly: {self.settings.greeting}",
                                                           "metadata": metadata}})
        log.info(kv("greeting", interruptible=self.settings.greeting_interruptible))
        self._publish_event("rt.gateway.greeting", {"text": self.settings.greeting,
                                                    "interruptible": self.settings.greeting_interruptible})

    # --- server-side MCP: the server asks before a call, the allow-list answers ------------------------
    def _approve(self, request: dict[str, Any]) -> None:
        name, allowed = str(request.get("name", "")), self.settings.mcp_approve
        approve = "*" in allowed or name in allowed
        reason = "on the allow-list" if approve else "not on the gateway's --mcp-approve list"
        self.counts["mcp_approved" if approve else "mcp_refused"] += 1
        log.info(kv("mcp_approval", server_label=request.get("server_label"), name=name, approve=approve))
        self._publish_event("rt.gateway.mcp_approval", {"approval_request_id": request.get("id"), "name": name,
                                                        "server_label": request.get("server_label"),
                                                        "arguments": request.get("arguments"), "approve": approve,
                                                        "reason": reason})
        self.send({"type": "conversation.item.create", "item": {
            "type": "mcp_approval_response", "id": f"mcpresp_{secrets.token_hex(8)}",
            "approval_request_id": request.get("id"), "approve": approve, "reason": reason}})
        if self.response_active is None:  # the call is made (or refused aloud) in a response of its own
            self.send({"type": "response.create"})
        else:
            self.create_after_done = True

    # --- barge-in --------------------------------------------------------------------------
    def _barge_in(self, by_keys: bool = False) -> None:
        if by_keys and self.response_active is not None and self.tracker.audible_item() is None \
                and self.response_active not in self.uninterruptible:
            self.send({"type": "response.cancel"})  # made, not heard yet: the keys replace what it answers
        item = self.tracker.audible_item()
        if item is None or item.truncated or item.response_id in self.uninterruptible:
            return
        self.counts["barge_ins"] += 1
        self._publish_event("player.flush", {"reason": "keys" if by_keys else "barge_in", "item_id": item.item_id})
        # with interrupt_response the server has cancelled already (as the Agents SDK assumes too); it
        # never does for keys, which it does not hear
        server_cancels = self.settings.interrupt_response and self.policy is None and not by_keys
        cancel = self.response_active is not None and not server_cancels
        if cancel:
            self.send({"type": "response.cancel"})
        self.pending_truncate = {"item_id": item.item_id, "deadline": time.monotonic() + FLUSH_WAIT_S}
        log.info(kv("barge_in", item_id=item.item_id, received_ms=round(item.received_ms), cancel_sent=cancel))

    # --- false interruptions (policy on) -------------------------------------------------------
    def _hold(self, user_item: str | None, audio_start_ms: int | None) -> bool:
        """The user speaks over a reply: pause it where it is (not cut) until what they said is known."""
        item = self.tracker.audible_item()
        if item is None or item.truncated or self.held is not None or item.response_id in self.uninterruptible:
            return False
        self.held = {"item_id": item.item_id, "since": time.monotonic(), "user_item": user_item, "speech_s": None,
                     "audio_start_ms": audio_start_ms}
        self._publish_event("player.hold", {"hold": True, "item_id": item.item_id, "reason": "user speaking"})
        self._interruption("paused", item.item_id)
        return True

    def _user_turn_over(self, audio_end_ms: int | None) -> None:
        """speech_stopped: weigh a paused reply's interruption, or answer the user (the server will not)."""
        held = self.held
        if held is None:
            self._answer_user(cancel_running=True)  # a response made but not heard yet: this turn replaces it
            return
        held["speech_s"] = self._speech_s(held.get("audio_start_ms"), audio_end_ms, held["since"])
        if self.policy is not None and self.policy.too_long(held["speech_s"]):
            self._decide("", too_long=True)
        elif not self.settings.transcription_model:
            self._decide("")  # no words to weigh: short speech resumes
        # else: the transcript of held["user_item"] decides (conversation.item.input_audio_transcription.completed)

    def _speech_s(self, audio_start_ms: int | None, audio_end_ms: int | None, since: float) -> float:
        """How long they spoke, on the server's audio clock: its start less the prefix padding, its end less
        the silence that ended it (server_vad); by the wall clock when the server did not say."""
        if audio_start_ms is None or audio_end_ms is None:
            return round(time.monotonic() - since, 2)
        server_vad = self.settings.vad_type == "server_vad"
        start = audio_start_ms + (self.settings.vad_prefix_padding_ms if server_vad else 0)
        end = audio_end_ms - (self.settings.vad_silence_duration_ms if server_vad else 0)
        return round(max(0, end - start) / 1000, 2)

    def _decide(self, transcript: str, too_long: bool = False) -> None:
        held, self.held = self.held, None
        if held is None or self.policy is None:
            return
        resume, why = (False, "too long for a backchannel") if too_long else \
            self.policy.judge(transcript, held.get("speech_s"))
        if resume:
            self._publish_event("player.hold", {"hold": False, "item_id": held["item_id"], "reason": why})
            self._interruption("resumed", held["item_id"], transcript, held.get("speech_s"), why)
            return
        self._interruption("interrupted", held["item_id"], transcript, held.get("speech_s"), why)
        self._barge_in()  # flush, cancel (interrupt_response is off), truncate at the played position
        self._answer_user(cancel_running=False)

    def _answer_user(self, cancel_running: bool) -> None:
        """The user's turn wants an answer (create_response is off): now, or once the running response is done."""
        if self.response_active is None:
            self.send({"type": "response.create"})
            return
        if cancel_running:
            self.send({"type": "response.cancel"})
        self.create_after_done = True

    def _interruption(self, decision: str, item_id: str, transcript: str = "", speech_s: float | None = None,
                      why: str = "") -> None:
        log.info(kv("interruption", decision=decision, item_id=item_id, transcript=repr(transcript), speech_s=speech_s,
                    why=repr(why)))
        self._publish_event("rt.gateway.interruption", {"decision": decision, "item_id": item_id,
                                                        "transcript": transcript, "speech_s": speech_s, "why": why})

    def _check_idle(self) -> None:
        """Quiet on the line for the idle timeout: ask whether they are there; after the last ask, end."""
        if self.idle is None or self.session_tools is None or not self.socket.connected:
            return
        now = time.monotonic()
        live = now - self.line_heard_at < LINE_LIVE_S  # a mic sends silence too (batched, 10 times a second)
        quiet = live and not self.user_speaking and self.response_active is None and self.tracker.audible_item() is None
        due = self.idle.check(quiet, now)
        if due == "prompt":
            self.send({"type": "response.create", "response": {
                "instructions": f"Say exactly: {self.idle.prompt}", "metadata": {"voicebus": "idle_prompt"}}})
            log.info(kv("idle_prompt", count=self.idle.prompts, after_s=self.idle.timeout_s))
            self._publish_event("rt.gateway.idle_prompt", {"count": self.idle.prompts, "prompt": self.idle.prompt,
                                                           "after_s": self.idle.timeout_s})
        elif due == "end":
            log.info(kv("idle_end", prompts=self.idle.prompts, reason="nobody spoke after the prompts"))
            self._publish_event("rt.gateway.idle_end", {"prompts": self.idle.prompts,
                                                        "reason": f"nobody spoke after {self.idle.prompts} prompt"
                                                                  f"{'' if self.idle.prompts == 1 else 's'}"})

    def tick(self) -> None:
        self._check_idle()
        keys = self.keypad.due(time.monotonic())
        if keys:
            self._keys_turn(keys)
        held = self.held
        # still talking past the longest backchannel (and the silence the server waits before it says stopped)
        if held is not None and self.policy is not None and held.get("speech_s") is None and self.policy.too_long(
                time.monotonic() - held["since"] - self.settings.vad_silence_duration_ms / 1000):
            held["speech_s"] = round(time.monotonic() - held["since"], 2)
            self._decide("", too_long=True)  # still talking: not a backchannel, whatever it turns out to say
        for call in self.calls.expired(time.monotonic()):
            log.warning(kv("tool_timeout", name=call.name, call_id=call.call_id))
            self._answer_call({**error_output(call.call_id, call.name, f"{call.name} did not answer in time (the "
                                              "tools stage may be down)"), "source": "gateway"}, call.response_id,
                              (time.time_ns() - call.started_ns) / 1e6)
        if self.pending_truncate is not None and time.monotonic() > self.pending_truncate["deadline"]:
            # no flushed state from the player in time: fall back to its last report, and say so
            self._truncate(self.tracker.player.get("played_ms", 0.0) if
                           self.tracker.player.get("item_id") == self.pending_truncate["item_id"] else 0.0,
                           source="last_player_state")

    def _truncate(self, played_ms: float, source: str) -> None:
        pending, self.pending_truncate = self.pending_truncate, None
        item = self.tracker.items.get(pending["item_id"]) if pending else None
        if item is None or item.truncated:
            return
        item.truncated = True
        audio_end_ms = self.tracker.truncate_at_ms(item, played_ms)
        if audio_end_ms >= int(item.received_ms) and item.complete:
            # the whole reply had been heard when the user spoke: a new turn, nothing to cut. Not so
            # for a reply the server cancelled when the user spoke (interrupt_response): it stopped
            # sending there, so all it sent was heard, but the reply was cut all the same
            self.counts["played_to_end"] += 1
            log.info(kv("not_truncated", item_id=item.item_id, played_ms=played_ms,
                        received_ms=round(item.received_ms), reason="played to its end"))
            return
        heard = cut_transcript(item.transcript, audio_end_ms / item.received_ms) if item.received_ms else ""
        if audio_end_ms <= 0:
            # nothing was heard: truncating at 0 is an API error; the honest conversation has no such reply
            self.send({"type": "conversation.item.delete", "item_id": item.item_id})
            self.conversation.pop(item.item_id, None)
        else:
            self.send({"type": "conversation.item.truncate", "item_id": item.item_id,
                       "content_index": item.content_index, "audio_end_ms": audio_end_ms})
            self._remember(item.item_id, "assistant", heard)
        self.counts["truncations"] += 1
        log.info(kv("truncated", item_id=item.item_id, audio_end_ms=audio_end_ms, played_ms=played_ms,
                    received_ms=round(item.received_ms), source=source))
        self._publish_event("rt.gateway.truncated", {"item_id": item.item_id, "response_id": item.response_id,
                                                     "audio_end_ms": audio_end_ms, "played_ms": played_ms,
                                                     "received_ms": round(item.received_ms, 1),
                                                     "deleted": audio_end_ms <= 0, "transcript_heard": heard,
                                                     "transcript_generated": item.transcript, "source": source})
