"""One Realtime websocket connection: session, input buffer, VAD, conversation, responses.

Events are built under their GA names and renamed for beta clients on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common import g711
from common.log import kv
from common.realtime_names import to_beta
from common.resample import pcm_to_mono_float
from common.speech import Transcriber, TranscriberPool, synthesize
from common.transcripts import cut_transcript
from services.simulator import remote_mcp, semantic
from services.simulator.faults import Fault, FaultBudget
from services.simulator.markers import StreamFinder, chirp_pcm
from services.simulator.protocol import (
    ClientEventError,
    Protocol,
    SessionConfig,
    apply_session_update,
    assistant_item,
    error_payload,
    function_call_item,
    new_id,
    render_session,
    user_item,
    validate_client_event,
)
from services.simulator.replies import Plan, Replies
from services.simulator.vad import EnergyVad

RATE = 24_000
BYTES_PER_MS = RATE * 2 // 1000
G711_BYTES_PER_MS = g711.RATE // 1000
MAX_APPEND_BASE64 = 15 * 1024 * 1024  # the API's per-event limit
MIN_COMMIT_MS = 100
IDLE_BUFFER_MS = 2000  # input kept while nobody speaks (covers prefix padding)
ARRIVALS_KEPT = 1000
ARGUMENT_CHUNK_CHARS = 12  # function-call arguments stream as deltas of about this size
LATE_RESPONSE_S = 3.0
AUDIO_ITEMS_KEPT = 32  # older items keep their text, not their audio: a long session stays flat in memory  # fault late_response: how late response.create is honoured

log = logging.getLogger("voicebus.simulator")


@dataclass
class Options:
    pace: str = "realtime"  # "realtime": audio deltas paced at 1x after a burst; "fast": no waiting
    chunk_ms: int = 100
    burst_ms: int = 300
    think_ms: int = 0
    replies: Replies = field(default_factory=Replies)
    markers: bool = False  # timing markers for the pipeline bench (services/simulator/markers.py)
    echo: bool = False  # every reply is the user's last turn, its audio as it came (bit-exact where the formats match)


@dataclass
class Item:
    id: str
    role: str
    transcript: str | None = None
    text: str | None = None
    audio: bytes = b""  # user audio as committed (24 kHz s16le); assistant audio as generated (output format)
    raw: bytes = b""  # user audio as the client sent it, when that was not pcm16 (G.711 codes)
    audio_sent_ms: float = 0.0  # assistant: how much of it went out as deltas
    kind: str = "message"  # or "function_call", "function_call_output"
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    output: str = ""


TRANSCRIBE_WAIT_S = 30.0  # longest a response waits for the user turn it answers to be transcribed


@dataclass
class Response:
    id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    task: asyncio.Task | None = None
    metadata: dict[str, str] | None = None
    say: str | None = None  # response.create's instructions "Say exactly: ..." (a model would; so does this)


SAY_EXACTLY = "Say exactly:"


class ConnectionDropped(Exception):
    pass


def capped_reply(text: str, max_output_tokens: int | str) -> tuple[str, bool]:
    """The reply as `max_output_tokens` lets it out (the simulator counts a word a token), and whether it
    was cut (the response then ends `incomplete`, reason max_output_tokens, as the API's does)."""
    words = text.split()
    if max_output_tokens == "inf" or not isinstance(max_output_tokens, int) or len(words) <= max_output_tokens:
        return text, False
    return " ".join(words[:max_output_tokens]), True


class RealtimeConnection:
    def __init__(self, send_text: Callable[[str], Awaitable[None]], drop: Callable[[], None], protocol: Protocol,
                 model: str, options: Options, faults: list[Fault], budget: FaultBudget,
                 transcriber: Transcriber | TranscriberPool) -> None:
        self._send_text, self._drop = send_text, drop
        self.protocol = protocol
        self.config = SessionConfig(model=model)
        self.options, self.faults, self.budget, self.transcriber = options, faults, budget, transcriber
        self.vad = self._new_vad()
        self.buffer = bytearray()  # the input, as 24 kHz s16le whatever its format (the VAD and recogniser hear it)
        self.raw = bytearray()  # ... and as it came, when that was G.711 (from buffer_start_ms, like buffer)
        self._upsampler: Any = None  # G.711 input's 8 kHz -> 24 kHz (one stream: no seams between appends)
        self.buffer_start_ms = 0  # session ms of buffer[0]
        self.items: dict[str, Item] = {}
        self.order: list[str] = []
        self.response: Response | None = None
        self.speech_item_id: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self.slow = next((f for f in faults if f.kind == "slow"), None)
        self.arrivals: deque[tuple[int, int]] = deque(maxlen=ARRIVALS_KEPT)  # (audio ms received, t_ns)
        self.user_audio_ms = 0.0  # all user audio committed in this session (for usage)
        self.call_plans: dict[str, Plan] = {}  # call_id -> the plan that made the call (for what to say after)
        self.mcp_servers: dict[str, remote_mcp.RemoteServer] = {}  # server_label -> the session's MCP server
        self.approvals: dict[str, dict[str, Any]] = {}  # mcp_approval_request id -> name, plan, approve
        self.markers = StreamFinder(RATE) if options.markers else None
        # semantic_vad: the open turn's first sample, and a candidate end being judged (see semantic.py)
        self.turn_start_ms = 0
        self.pending_end: dict[str, Any] | None = None

    def _new_vad(self) -> EnergyVad:
        vad = self.config.vad
        if vad is None:
            return EnergyVad(RATE)
        return EnergyVad(RATE, vad.threshold, vad.prefix_padding_ms, self._pause_ms())

    def _semantic(self) -> bool:
        return self.config.vad is not None and self.config.vad.type == "semantic_vad"

    def _pause_ms(self) -> int:
        """The quiet the energy detector reports as a stop: the end itself (server_vad), or a candidate
        end to judge (semantic_vad)."""
        assert self.config.vad is not None
        return semantic.CANDIDATE_PAUSE_MS if self._semantic() else self.config.vad.silence_duration_ms

    # --- sending -----------------------------------------------------------------------------
    async def send(self, ga_type: str, **fields: Any) -> None:
        wire = ga_type if self.protocol == "ga" else to_beta(ga_type)
        if wire is None:
            return
        if self.slow is not None and self.budget.take(self.slow):
            await asyncio.sleep(self.slow.delay_ms / 1000)
        await self._send_text(json.dumps({"type": wire, "event_id": new_id("event"), **fields}))

    async def error(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                    event_id: str | None = None, kind: str = "invalid_request_error") -> None:
        log.info(kv("client_error", code=code, message=repr(message[:120])))
        await self.send("error", error=error_payload(message, code=code, param=param, event_id=event_id, kind=kind))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() and not isinstance(task.exception(), ConnectionDropped):
            log.error(kv("task_failed", error=repr(task.exception())))

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        log.info(kv("session_start", protocol=self.protocol, model=self.config.model, id=self.config.id))
        await self.send("session.created", session=render_session(self.config, self.protocol))

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    async def on_text(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            await self.error("The server could not parse the event: invalid JSON.", code="invalid_json")
            return
        if not isinstance(event, dict):
            await self.error("An event must be a JSON object.", code="invalid_json")
            return
        event_type, event_id = event.get("type"), event.get("event_id")
        handler = self.HANDLERS.get(event_type) if isinstance(event_type, str) else None
        if handler is None:
            await self.error(f"Invalid value: '{event_type}'. Supported values are: {', '.join(self.HANDLERS)}.",
                             param="type", event_id=event_id)
            return
        if event_type == "input_audio_buffer.append" and len(str(event.get("audio", ""))) > MAX_APPEND_BASE64:
            await self.error(f"Audio too large: at most {MAX_APPEND_BASE64} base64 characters per append.",
                             param="audio", event_id=event_id)
            return
        try:
            validate_client_event(event, self.protocol)
            await handler(self, event)
        except ClientEventError as exc:
            await self.error(str(exc), code=exc.code, param=exc.param, event_id=event_id)

    # --- client events -----------------------------------------------------------------------
    async def on_session_update(self, event: dict[str, Any]) -> None:
        apply_session_update(self.config, event.get("session") or {}, self.protocol)
        if self.config.vad is not None:
            self.vad.configure(self.config.vad.threshold, self.config.vad.prefix_padding_ms, self._pause_ms())
        await self.send("session.updated", session=render_session(self.config, self.protocol))
        self._sync_mcp()

    async def on_append(self, event: dict[str, Any]) -> None:
        try:
            pcm = base64.b64decode(event["audio"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ClientEventError("Invalid 'audio': not base64-encoded data.", "audio") from exc
        if self.config.input_format == "pcm16":
            if len(pcm) % 2:
                raise ClientEventError("Invalid 'audio': pcm16 needs an even number of bytes.", "audio")
        else:
            self.raw += pcm
            pcm = self._from_g711(pcm)
        self.buffer += pcm
        if self.markers is not None:
            for marker in self.markers.feed(pcm, time.time_ns()):
                log.info(kv("marker_in", session=self.config.id, **marker))
        if self.config.vad is None:
            return
        events = self.vad.feed(pcm_to_mono_float(pcm, 1))
        self.arrivals.append((self.vad.position_ms, time.time_ns()))
        for vad_event in events:
            if vad_event.kind == "started":
                if self.pending_end is not None:  # semantic_vad: speech again while a pause is judged
                    if self.pending_end["end_ms"] is None:  # not judged yet: the judgement says which it is
                        self.pending_end.setdefault("resumed_ms", vad_event.audio_ms)
                    else:  # inside the wait: the same turn goes on
                        self.pending_end = None
                    continue
                self.turn_start_ms = vad_event.audio_ms
                await self._speech_started(vad_event.audio_ms)
            elif self._semantic():
                self._judge_end(vad_event.audio_ms - semantic.CANDIDATE_PAUSE_MS)
            else:
                await self._speech_stopped(vad_event.audio_ms)
        await self._end_if_due()
        if not self.vad.in_speech and self.pending_end is None:
            self._trim_buffer(self.vad.position_ms - IDLE_BUFFER_MS)

    def _judge_end(self, words_end_ms: int) -> None:
        """semantic_vad: a pause after words; read what was said to decide how long to wait for more."""
        pending: dict[str, Any] = {"words_end_ms": words_end_ms, "end_ms": None, "transcript": ""}
        self.pending_end = pending
        pcm = self._buffer_slice(self.turn_start_ms, words_end_ms)
        eagerness = self.config.vad.eagerness if self.config.vad else "auto"

        async def judge() -> None:
            pending["transcript"] = await asyncio.to_thread(self.transcriber.transcribe, pcm, RATE)
            pending["end_ms"] = words_end_ms + semantic.wait_after_words_ms(pending["transcript"], eagerness)
            await self._end_if_due()  # the audio may already be past it

        self._spawn(judge())

    async def _end_if_due(self) -> None:
        """semantic_vad: the judged wait has passed in the audio with nobody speaking: the turn is over.

        Speech that came back while the pause was still being judged (a busy recogniser) is placed by
        where it came, not by when the judgement did: within the wait it continues the turn; after it,
        the turn ended at its words and the new speech is a turn of its own."""
        pending = self.pending_end
        if pending is None or pending["end_ms"] is None:
            return
        resumed = pending.get("resumed_ms")
        if resumed is not None and resumed + (self.config.vad.prefix_padding_ms if self.config.vad else 0) \
                < pending["end_ms"]:
            self.pending_end = None
            return
        if resumed is None and (self.vad.in_speech or self.vad.position_ms < pending["end_ms"]):
            return
        self.pending_end = None
        log.info(kv("semantic_end", session=self.config.id, transcript=repr(pending["transcript"]),
                    waited_ms=pending["end_ms"] - pending["words_end_ms"]))
        await self._speech_stopped(pending["words_end_ms"])
        if resumed is not None:
            self.turn_start_ms = resumed
            await self._speech_started(resumed)

    def _from_g711(self, codes: bytes) -> bytes:
        """G.711 input as the 24 kHz s16le the VAD and the recogniser take."""
        from common.resample import StreamResampler

        if self._upsampler is None:
            self._upsampler = StreamResampler(g711.RATE, RATE, 1)
        return self._upsampler.feed(g711.decode(codes, self.config.input_format))  # type: ignore[arg-type]

    def _clear_buffer(self) -> None:
        self.buffer_start_ms += len(self.buffer) // BYTES_PER_MS
        self.buffer.clear()
        self.raw.clear()

    def _trim_buffer(self, keep_from_ms: int) -> None:
        cut_ms = keep_from_ms - self.buffer_start_ms
        if cut_ms > 0:
            del self.buffer[:cut_ms * BYTES_PER_MS]
            del self.raw[:cut_ms * G711_BYTES_PER_MS]
            self.buffer_start_ms = keep_from_ms

    def _raw_slice(self, start_ms: int, end_ms: int) -> bytes:
        start = max(0, (start_ms - self.buffer_start_ms) * G711_BYTES_PER_MS)
        return bytes(self.raw[start:max(start, (end_ms - self.buffer_start_ms) * G711_BYTES_PER_MS)])

    def _buffer_slice(self, start_ms: int, end_ms: int) -> bytes:
        start = max(0, (start_ms - self.buffer_start_ms) * BYTES_PER_MS)
        return bytes(self.buffer[start:max(start, (end_ms - self.buffer_start_ms) * BYTES_PER_MS)])

    async def _speech_started(self, audio_start_ms: int) -> None:
        self.speech_item_id = new_id("item")
        log.info(kv("speech_started", session=self.config.id, audio_start_ms=audio_start_ms, t_ns=time.time_ns()))
        await self.send("input_audio_buffer.speech_started", audio_start_ms=audio_start_ms,
                        item_id=self.speech_item_id)
        if self.response is not None and self.config.vad and self.config.vad.interrupt_response:
            self._cancel_response("turn_detected")

    async def _speech_stopped(self, audio_end_ms: int) -> None:
        item_id = self.speech_item_id or new_id("item")
        # when did the last word actually arrive? (server_vad says so silence_duration_ms later; semantic_vad's
        # audio_end_ms is where the words ended)
        speech_end_ms = audio_end_ms - (self._pause_ms() if self.config.vad and not self._semantic() else 0)
        arrived = next((t for ms, t in self.arrivals if ms >= speech_end_ms), time.time_ns())
        log.info(kv("speech_stopped", audio_end_ms=audio_end_ms, speech_end_received_ns=arrived, t_ns=time.time_ns()))
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id)
        pcm = self._buffer_slice(self.turn_start_ms, audio_end_ms)
        raw = self._raw_slice(self.turn_start_ms, audio_end_ms)
        self._trim_buffer(audio_end_ms)
        create = bool(self.config.vad and self.config.vad.create_response)
        await self._commit(item_id, pcm, create_response=create, raw=raw)

    async def on_commit(self, event: dict[str, Any]) -> None:
        if len(self.buffer) < MIN_COMMIT_MS * BYTES_PER_MS:
            raise ClientEventError(f"Error committing input audio buffer: buffer too small. Expected at least "
                                   f"{MIN_COMMIT_MS}ms of audio, but buffer only has "
                                   f"{len(self.buffer) / BYTES_PER_MS:.2f}ms of audio.", None,
                                   "input_audio_buffer_commit_empty")
        pcm, raw = bytes(self.buffer), bytes(self.raw)
        self._clear_buffer()
        await self._commit(new_id("item"), pcm, create_response=False, raw=raw)

    async def on_clear(self, event: dict[str, Any]) -> None:
        self._clear_buffer()
        await self.send("input_audio_buffer.cleared")

    async def _commit(self, item_id: str, pcm: bytes, create_response: bool, raw: bytes = b"") -> None:
        previous = self.order[-1] if self.order else None
        self.items[item_id] = Item(item_id, "user", audio=pcm, raw=raw)
        self.order.append(item_id)
        self.user_audio_ms += len(pcm) / BYTES_PER_MS
        for old in self.order[:-AUDIO_ITEMS_KEPT]:
            self.items[old].audio = self.items[old].raw = b""
        await self.send("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        item = user_item(item_id, None, self.protocol)
        await self.send("conversation.item.added", item=item, previous_item_id=previous)
        await self.send("conversation.item.done", item=item, previous_item_id=previous)
        self._spawn(self._transcribe_then_respond(item_id, create_response))

    async def _transcribe_then_respond(self, item_id: str, create_response: bool) -> None:
        item = self.items[item_id]
        item.transcript = await asyncio.to_thread(self.transcriber.transcribe, item.audio, RATE)
        log.info(kv("heard", item_id=item_id, transcript=repr(item.transcript)))
        if self.config.transcription_model:
            extra: dict[str, Any] = {}
            if "item.input_audio_transcription.logprobs" in (self.config.include or []):
                # one entry a word; pocketsphinx gives no probability the simulator trusts: 0.0 (certain)
                extra["logprobs"] = [{"token": word, "logprob": 0.0, "bytes": list(word.encode())}
                                     for word in item.transcript.split()]
            await self.send("conversation.item.input_audio_transcription.completed", item_id=item_id,
                            content_index=0, transcript=item.transcript,
                            usage={"type": "duration", "seconds": round(len(item.audio) / (2 * RATE), 3)}, **extra)
        if create_response and self.response is None:
            self._start_response()

    async def on_item_create(self, event: dict[str, Any]) -> None:
        raw = event["item"]
        if raw.get("type") == "function_call_output":
            await self._function_output(raw)
            return
        if raw.get("type") == "mcp_approval_response":
            await self._approval_response(raw)
            return
        if raw.get("type") != "message" or raw.get("role") not in ("user", "assistant", "system"):
            raise ClientEventError("The simulator accepts message and function_call_output items only.", "item.type")
        texts = [part.get("text") or part.get("transcript") or "" for part in raw.get("content") or []]
        item_id = raw.get("id") or new_id("item")
        previous = self.order[-1] if self.order else None
        self.items[item_id] = Item(item_id, raw["role"], text=" ".join(t for t in texts if t))
        self.order.append(item_id)
        item = {**raw, "id": item_id, "object": "realtime.item", "status": "completed"}
        await self.send("conversation.item.added", item=item, previous_item_id=previous)
        await self.send("conversation.item.done", item=item, previous_item_id=previous)

    async def _function_output(self, raw: dict[str, Any]) -> None:
        call_id = raw.get("call_id")
        if not any(i.kind == "function_call" and i.call_id == call_id for i in self.items.values()):
            raise ClientEventError(f"Tool call id not found in conversation: {call_id}", "item.call_id")
        item_id = raw.get("id") or new_id("item")
        previous = self.order[-1] if self.order else None
        self.items[item_id] = Item(item_id, "tool", kind="function_call_output", call_id=call_id,
                                   output=str(raw.get("output", "")))
        self.order.append(item_id)
        item = {"id": item_id, "object": "realtime.item", "type": "function_call_output", "call_id": call_id,
                "output": str(raw.get("output", "")), "status": "completed"}
        await self.send("conversation.item.added", item=item, previous_item_id=previous)
        await self.send("conversation.item.done", item=item, previous_item_id=previous)
        if self.response is None and await self._fault("auto_response"):
            log.info(kv("fault", kind="auto_response", call_id=call_id))
            self._start_response()  # the race: the client's response.create will find this one active

    async def on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event["item_id"]
        if item_id not in self.items:
            raise ClientEventError(f"Item with item_id not found: {item_id}", "item_id", "item_not_found")
        del self.items[item_id]
        self.order.remove(item_id)
        await self.send("conversation.item.deleted", item_id=item_id)

    async def on_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self.items.get(event["item_id"])
        if item is None:
            raise ClientEventError(f"Item with item_id not found: {event['item_id']}", "item_id", "item_not_found")
        if item.kind == "function_call":
            rendered = function_call_item(item.id, item.call_id, item.name, item.arguments, "completed")
        elif item.kind == "function_call_output":
            rendered = {"id": item.id, "object": "realtime.item", "type": "function_call_output",
                        "call_id": item.call_id, "output": item.output, "status": "completed"}
        elif item.role == "user":
            rendered = user_item(item.id, item.transcript, self.protocol, item.text)
        else:
            rendered = assistant_item(item.id, item.transcript, "completed", self.protocol)
        await self.send("conversation.item.retrieved", item=rendered)

    async def on_truncate(self, event: dict[str, Any]) -> None:
        item = self.items.get(event["item_id"])
        if item is None:
            raise ClientEventError(f"Item with item_id not found: {event['item_id']}", "item_id", "item_not_found")
        if item.role != "assistant" or not item.audio:
            raise ClientEventError("Only model output audio messages can be truncated", "item_id")
        audio_end_ms = int(event["audio_end_ms"])
        if audio_end_ms > item.audio_sent_ms:
            raise ClientEventError(f"Audio content of {int(item.audio_sent_ms)}ms is already shorter than "
                                   f"{audio_end_ms}ms", "audio_end_ms")
        full_ms = len(item.audio) / self._output_bytes_per_ms()
        item.transcript = cut_transcript(item.text or "", audio_end_ms / full_ms if full_ms else 0.0)
        item.audio_sent_ms = audio_end_ms
        item.audio = item.audio[:audio_end_ms * self._output_bytes_per_ms()]
        log.info(kv("truncated", item_id=item.id, audio_end_ms=audio_end_ms, transcript=repr(item.transcript)))
        await self.send("conversation.item.truncated", item_id=item.id, content_index=event["content_index"],
                        audio_end_ms=audio_end_ms)

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.response is not None:
            raise ClientEventError("Conversation already has an active response in progress.", None,
                                   "conversation_already_has_active_response")
        metadata = (event.get("response") or {}).get("metadata")
        instructions = str((event.get("response") or {}).get("instructions") or "")
        say = instructions.removeprefix(SAY_EXACTLY).strip() if instructions.startswith(SAY_EXACTLY) else None
        if await self._fault("late_response"):
            self._spawn(self._start_late(metadata))  # created later whatever happens meanwhile
            return
        self._start_response(metadata, say)

    async def _start_late(self, metadata: dict[str, str] | None) -> None:
        await asyncio.sleep(LATE_RESPONSE_S)
        if self.response is None:
            self._start_response(metadata)

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        if self.response is None:
            raise ClientEventError("Cancellation failed: no active response found", None, "response_cancel_not_active")
        self._cancel_response("client_cancelled")

    async def on_output_buffer_clear(self, event: dict[str, Any]) -> None:
        raise ClientEventError("output_audio_buffer.clear is for WebRTC and SIP connections only", "type")

    HANDLERS: dict[str, Callable[[RealtimeConnection, dict[str, Any]], Awaitable[None]]] = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "conversation.item.create": on_item_create,
        "conversation.item.delete": on_item_delete,
        "conversation.item.retrieve": on_item_retrieve,
        "conversation.item.truncate": on_truncate,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
        "output_audio_buffer.clear": on_output_buffer_clear,
    }

    # --- responses ---------------------------------------------------------------------------
    def _start_response(self, metadata: dict[str, str] | None = None, say: str | None = None) -> None:
        self.response = Response(new_id("resp"), metadata=metadata, say=say)
        self.response.task = self._spawn(self._respond(self.response))

    def _cancel_response(self, reason: str) -> None:
        if self.response is not None and not self.response.cancelled.is_set():
            self.response.reason = reason
            self.response.cancelled.set()

    async def _heard_last_user_item(self, within_s: float = TRANSCRIBE_WAIT_S) -> None:
        """A response.create right after speech stopped (the client answers, create_response off): the
        model hears the audio itself; the simulator answers from its transcript, so it waits for it."""
        last = next((self.items[i] for i in reversed(self.order) if self.items[i].role == "user"), None)
        deadline = time.monotonic() + within_s
        while last is not None and last.audio and last.transcript is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _last_user_words(self) -> str:
        for item_id in reversed(self.order):
            item = self.items[item_id]
            if item.role == "user":
                return item.text or item.transcript or ""
        return ""

    async def _fault(self, kind: str) -> bool:
        for fault in self.faults:
            if fault.kind == kind and self.budget.take(fault):
                log.info(kv("fault", kind=kind))
                return True
        return False

    def _plan(self) -> Plan:
        """After a function output: speak about it. Otherwise answer (or call a tool for) the user."""
        last = self.items[self.order[-1]] if self.order else None
        if last is not None and last.kind == "function_call_output":
            plan = self.call_plans.get(last.call_id)
            return Plan(self.options.replies.after_call(plan, last.output))
        if last is not None and last.kind == "mcp_approval_response":
            asked = self.approvals[last.call_id]
            if not asked["approve"]:
                return Plan(f"I was not allowed to use {asked['name']}, so I cannot do that.")
            plan = asked["plan"]
            return Plan(call_name=plan.call_name, arguments=plan.arguments, rule=plan.rule, groups=plan.groups,
                        approval_request_id=last.call_id)
        tools = {t.get("name") for t in self.config.tools} | {
            t["name"] for server in self.mcp_servers.values() for t in server.tools}
        plan = self.options.replies.plan(self._last_user_words(), tools)
        if plan.call_name is not None and plan.call_name not in tools:
            return Plan(f"I cannot do that: no tool called {plan.call_name} is available.")
        return plan

    async def _respond(self, response: Response) -> None:
        audio_out = "audio" in self.config.output_modalities
        await self._heard_last_user_item()
        plan = Plan(response.say) if response.say else \
            Plan(self._last_user_words() or "nothing") if self.options.echo else self._plan()
        reply, capped = capped_reply(plan.text, self.config.max_output_tokens)
        base = {"id": response.id, "object": "realtime.response", "conversation_id": "conv_sim",
                "output_modalities": ["audio"] if audio_out else ["text"], "metadata": response.metadata}
        await self.send("response.created", response={**base, "status": "in_progress", "output": []})
        if plan.call_name is not None and self._mcp_server_of(plan.call_name) is not None:
            await self._mcp_call(response, plan, base, audio_out)
            return
        if plan.call_name is not None:
            await self._call_function(response, plan, base)
            return
        await self._speak(response, base, audio_out, reply, capped)

    async def _speak(self, response: Response, base: dict[str, Any], audio_out: bool, reply: str, capped: bool,
                     earlier: list[dict[str, Any]] | None = None) -> None:
        """The response's spoken (or written) message, after what it put out already (an MCP call), then done."""
        earlier = earlier or []
        if await self._fault("error_event"):
            await self.error("The simulator was asked to fail here.", code="simulated_error", kind="server_error")
        if await self._fault("unknown_event"):
            await self._send_text(json.dumps({"type": "simulator.mystery_event", "event_id": new_id("event")}))
        if await self._fault("malformed_json"):
            await self._send_text('{"type": "response.output_audio.delta", "delta": ')
        item = Item(new_id("item"), "assistant", text=reply)
        previous = self.order[-1] if self.order else None
        self.items[item.id] = item
        self.order.append(item.id)
        ids = {"response_id": response.id, "item_id": item.id, "output_index": len(earlier), "content_index": 0}
        await self.send("response.output_item.added", response_id=response.id, output_index=len(earlier),
                        item=assistant_item(item.id, None, "in_progress", self.protocol, audio_out))
        await self.send("conversation.item.added", item=assistant_item(item.id, None, "in_progress", self.protocol,
                                                                       audio_out), previous_item_id=previous)
        spoken = await (self._stream_audio(response, item, reply, ids) if audio_out
                        else self._stream_text(response, reply, ids))
        item.transcript = spoken if item.transcript is None else item.transcript
        cancelled = response.cancelled.is_set()
        status = "cancelled" if cancelled else "incomplete" if capped else "completed"
        done_item = assistant_item(item.id, item.transcript, "incomplete" if cancelled or capped else "completed",
                                   self.protocol, audio_out)
        await self.send("response.output_item.done", response_id=response.id, output_index=len(earlier),
                        item=done_item)
        await self.send("conversation.item.done", item=done_item, previous_item_id=previous)
        details = {"type": "cancelled", "reason": response.reason} if cancelled else \
            {"type": "incomplete", "reason": "max_output_tokens"} if capped else None
        await self.send("response.done", response={**base, "status": status, "status_details": details,
                                                   "output": [*earlier, done_item], "usage": self._usage(item)})
        self.response = None

    # --- server-side MCP tools (remote_mcp.py) ----------------------------------------------------
    def _sync_mcp(self) -> None:
        """The session's MCP servers: each new (or moved) one is listed, as OpenAI's server does."""
        wanted: dict[str, remote_mcp.RemoteServer] = {}
        for tool in self.config.mcp:
            server = remote_mcp.RemoteServer.from_tool(tool)
            known = self.mcp_servers.get(server.label)
            if known is not None and known.url == server.url:
                server.tools = known.tools
            else:
                self._spawn(self._list_mcp(server))
            wanted[server.label] = server
        self.mcp_servers = wanted

    def _mcp_server_of(self, name: str) -> remote_mcp.RemoteServer | None:
        return next((server for server in self.mcp_servers.values() if server.offers(name)), None)

    async def _add_item(self, item: Item, rendered: dict[str, Any]) -> str | None:
        previous = self.order[-1] if self.order else None
        self.items[item.id] = item
        self.order.append(item.id)
        await self.send("conversation.item.added", item=rendered, previous_item_id=previous)
        return previous

    async def _list_mcp(self, server: remote_mcp.RemoteServer) -> None:
        item_id = new_id("mcpl")
        previous = await self._add_item(Item(item_id, "tool", kind="mcp_list_tools", name=server.label),
                                        remote_mcp.list_item(item_id, server))
        await self.send("mcp_list_tools.in_progress", item_id=item_id)
        try:
            server.tools = await remote_mcp.list_tools(server)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not MCP: the session says it failed
            log.warning(kv("mcp_list_failed", server_label=server.label, error=repr(exc)[:200]))
            await self.send("mcp_list_tools.failed", item_id=item_id)
        else:
            log.info(kv("mcp_listed", server_label=server.label, tools=",".join(t["name"] for t in server.tools)))
            await self.send("mcp_list_tools.completed", item_id=item_id)
        await self.send("conversation.item.done", item=remote_mcp.list_item(item_id, server), previous_item_id=previous)

    async def _approval_response(self, raw: dict[str, Any]) -> None:
        request_id = raw.get("approval_request_id")
        if request_id not in self.approvals:
            raise ClientEventError(f"No MCP approval request with id {request_id!r} in the conversation.",
                                   "item.approval_request_id")
        self.approvals[request_id]["approve"] = bool(raw.get("approve"))
        item_id = raw.get("id") or new_id("mcpr")
        rendered = {"id": item_id, "type": "mcp_approval_response", "approval_request_id": request_id,
                    "approve": bool(raw.get("approve")), "reason": raw.get("reason")}
        previous = await self._add_item(Item(item_id, "user", kind="mcp_approval_response", call_id=request_id),
                                        rendered)
        await self.send("conversation.item.done", item=rendered, previous_item_id=previous)

    async def _mcp_call(self, response: Response, plan: Plan, base: dict[str, Any], audio_out: bool) -> None:
        """Ask for approval (the response ends with the request), or make the call and speak about its output."""
        name, arguments = plan.call_name or "", plan.arguments
        server = self._mcp_server_of(name)
        assert server is not None
        if plan.approval_request_id is None and server.needs_approval(name):
            item_id = new_id("mcpr")
            asking = remote_mcp.approval_request_item(item_id, server, name, arguments)
            self.approvals[item_id] = {"name": name, "plan": plan, "approve": None}
            await self.send("response.output_item.added", response_id=response.id, output_index=0, item=asking)
            previous = await self._add_item(Item(item_id, "tool", kind="mcp_approval_request", name=name), asking)
            await self.send("response.output_item.done", response_id=response.id, output_index=0, item=asking)
            await self.send("conversation.item.done", item=asking, previous_item_id=previous)
            log.info(kv("mcp_approval_requested", server_label=server.label, name=name))
            await self.send("response.done", response={**base, "status": "completed", "status_details": None,
                                                       "output": [asking], "usage": self._usage(Item("", ""))})
            self.response = None
            return
        item_id = new_id("mcp")
        started = remote_mcp.call_item(item_id, server, name, "", plan.approval_request_id)
        ids = {"response_id": response.id, "item_id": item_id, "output_index": 0}
        await self.send("response.output_item.added", response_id=response.id, output_index=0, item=started)
        item = Item(item_id, "tool", kind="mcp_call", name=name, arguments=arguments)
        previous = await self._add_item(item, started)
        for offset in range(0, len(arguments), ARGUMENT_CHUNK_CHARS):
            await self.send("response.mcp_call_arguments.delta", **ids,
                            delta=arguments[offset:offset + ARGUMENT_CHUNK_CHARS])
        await self.send("response.mcp_call_arguments.done", **ids, arguments=arguments)
        await self.send("response.mcp_call.in_progress", item_id=item_id, output_index=0)
        output, error = await remote_mcp.call_tool(server, name, arguments)
        await self.send("response.mcp_call.failed" if error else "response.mcp_call.completed", item_id=item_id,
                        output_index=0)
        done_item = remote_mcp.call_item(item_id, server, name, arguments, plan.approval_request_id, output, error)
        item.output = output if output is not None else json.dumps({"error": (error or {}).get("message")})
        await self.send("response.output_item.done", response_id=response.id, output_index=0, item=done_item)
        await self.send("conversation.item.done", item=done_item, previous_item_id=previous)
        log.info(kv("mcp_call", server_label=server.label, name=name, ok=error is None))
        reply, capped = capped_reply(self.options.replies.after_call(plan, item.output), self.config.max_output_tokens)
        await self._speak(response, base, audio_out, reply, capped, earlier=[done_item])

    async def _call_function(self, response: Response, plan: Plan, base: dict[str, Any]) -> None:
        """A response whose output is one function_call item, its arguments streamed as the API does."""
        name, arguments = plan.call_name or "", plan.arguments
        if await self._fault("unknown_tool"):
            name = "no_such_tool"
        if await self._fault("bad_arguments"):
            arguments = arguments[:max(1, len(arguments) // 2)]  # cut mid-object: not JSON
        item = Item(new_id("item"), "function", kind="function_call", call_id=new_id("call"), name=name,
                    arguments=arguments)
        self.call_plans[item.call_id] = plan
        previous = self.order[-1] if self.order else None
        self.items[item.id] = item
        self.order.append(item.id)
        started = function_call_item(item.id, item.call_id, name, "", "in_progress")
        await self.send("response.output_item.added", response_id=response.id, output_index=0, item=started)
        await self.send("conversation.item.added", item=started, previous_item_id=previous)
        ids = {"response_id": response.id, "item_id": item.id, "output_index": 0, "call_id": item.call_id}
        for offset in range(0, len(arguments), ARGUMENT_CHUNK_CHARS):
            await self.send("response.function_call_arguments.delta", **ids,
                            delta=arguments[offset:offset + ARGUMENT_CHUNK_CHARS])
        await self.send("response.function_call_arguments.done", **ids, name=name, arguments=arguments)
        done_item = function_call_item(item.id, item.call_id, name, arguments, "completed")
        await self.send("response.output_item.done", response_id=response.id, output_index=0, item=done_item)
        await self.send("conversation.item.done", item=done_item, previous_item_id=previous)
        log.info(kv("function_call", name=name, call_id=item.call_id, arguments=repr(arguments)))
        await self.send("response.done", response={**base, "status": "completed", "status_details": None,
                                                   "output": [done_item], "usage": self._usage(item)})
        self.response = None

    async def _stream_audio(self, response: Response, item: Item, reply: str, ids: dict[str, Any]) -> str:
        await self.send("response.content_part.added", **ids, part={"type": "audio", "transcript": ""})
        item.audio = await asyncio.to_thread(self._voice, reply)
        if self.markers is not None and self.config.output_format == "pcm16":
            item.audio = chirp_pcm(RATE) + item.audio
        if self.options.think_ms:
            await asyncio.sleep(self.options.think_ms / 1000)
        words = reply.split()
        bytes_per_ms = self._output_bytes_per_ms()
        chunk_bytes = self.options.chunk_ms * bytes_per_ms
        total_ms = len(item.audio) / bytes_per_ms
        started = time.monotonic()
        said = 0
        drop = next((f for f in self.faults if f.kind == "drop_mid_response"), None)
        for index, offset in enumerate(range(0, len(item.audio), chunk_bytes)):
            if response.cancelled.is_set():
                break
            chunk = item.audio[offset:offset + chunk_bytes]
            if index == 0:
                log.info(kv("first_audio_delta", response_id=response.id, t_ns=time.time_ns()))
                if self.markers is not None:  # the marker is this delta's first sample
                    log.info(kv("marker_out", session=self.config.id, response_id=response.id, sent_ns=time.time_ns()))
            await self.send("response.output_audio.delta", **ids, delta=base64.b64encode(chunk).decode())
            item.audio_sent_ms += len(chunk) / bytes_per_ms
            due = math.ceil(len(words) * item.audio_sent_ms / total_ms) if total_ms else len(words)
            while said < min(due, len(words)):
                await self.send("response.output_audio_transcript.delta", **ids,
                                delta=("" if said == 0 else " ") + words[said])
                said += 1
            if drop is not None and index + 1 == drop.after_deltas and self.budget.take(drop):
                log.info(kv("fault", kind="drop_mid_response", after_deltas=index + 1))
                self._drop()
                raise ConnectionDropped()
            if self.options.pace == "realtime":
                ahead_s = (item.audio_sent_ms - self.options.burst_ms) / 1000 - (time.monotonic() - started)
                if ahead_s > 0:
                    with contextlib.suppress(TimeoutError):  # woken early by a cancel
                        await asyncio.wait_for(response.cancelled.wait(), timeout=ahead_s)
            else:
                await asyncio.sleep(0)
        transcript = " ".join(words[:said]) if response.cancelled.is_set() else reply
        await self.send("response.output_audio.done", **ids)
        await self.send("response.output_audio_transcript.done", **ids, transcript=transcript)
        await self.send("response.content_part.done", **ids, part={"type": "audio", "transcript": transcript})
        return transcript

    def _output_bytes_per_ms(self) -> int:
        return BYTES_PER_MS if self.config.output_format == "pcm16" else G711_BYTES_PER_MS

    def _voice(self, reply: str) -> bytes:
        """The reply's audio in the session's output format: spoken, or (--echo) the user's last turn, whose
        G.711 codes go back exactly as they came when the output format is the input's."""
        out = self.config.output_format
        last = next((self.items[i] for i in reversed(self.order) if self.items[i].role == "user"), None)
        if self.options.echo and last is not None and (last.raw or last.audio):
            if out == self.config.input_format and last.raw:
                return last.raw
            pcm, rate = last.audio, RATE
        else:
            rate = RATE if out == "pcm16" else g711.RATE
            return synthesize(reply, self.config.voice, rate) if out == "pcm16" else \
                g711.encode(synthesize(reply, self.config.voice, rate), out)  # type: ignore[arg-type]
        if out == "pcm16":
            return pcm
        from common.resample import StreamResampler

        down = StreamResampler(rate, g711.RATE, 1)
        return g711.encode(down.feed(pcm) + down.flush(), out)  # type: ignore[arg-type]

    async def _stream_text(self, response: Response, reply: str, ids: dict[str, Any]) -> str:
        await self.send("response.content_part.added", **ids, part={"type": "text", "text": ""})
        for index, word in enumerate(reply.split()):
            if response.cancelled.is_set():
                break
            await self.send("response.output_text.delta", **ids, delta=("" if index == 0 else " ") + word)
        await self.send("response.output_text.done", **ids, text=reply)
        await self.send("response.content_part.done", **ids, part={"type": "text", "text": reply})
        return reply

    def _usage(self, item: Item) -> dict[str, Any]:
        """Plausible token counts: ~10 audio tokens/s in, ~20/s out, a word ~1.3 text tokens."""
        audio_in = math.ceil(self.user_audio_ms / 100)
        text_in = math.ceil(1.3 * (len(self.config.instructions.split()) + sum(
            len((i.transcript or i.text or "").split()) for i in self.items.values() if i.id != item.id)))
        cached = text_in // 2 if len(self.order) > 2 else 0
        audio_out = math.ceil(item.audio_sent_ms / 50)
        text_out = math.ceil(1.3 * len((item.transcript or "").split()))
        return {"total_tokens": audio_in + text_in + audio_out + text_out, "input_tokens": audio_in + text_in,
                "output_tokens": audio_out + text_out,
                "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in, "cached_tokens": cached,
                                        "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0}},
                "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}

