"""`voicebus web`: the mic's and the player's jobs for a person in a browser, over WebRTC.

Browser mic (with the browser's echo cancellation) -> Opus -> `audio.user` (24 kHz mono);
`audio.assistant` -> Opus -> the browser, under the player's contract (`player.flush` empties at
once, `player.state` reports per item). The gateway, tools and logger do not know the difference.

The resampler's job is done here, by the resample stage's own code (`ResampleStage`, the same
seam-free filter, gap bridging and capture-time mapping) run on the decoded frames: its own process
cost a conversation ~2.5 % of a core, 34 MB of PSS and one more bus hop for every 20 ms frame.
The browser's Opus is decoded straight to 24 kHz mono (services/stages/web/opus.py), so for it the
resampler only passes frames through, gaps bridged; it filters what aiortc's decoder gives
(`--aiortc-decoder`: 48 kHz) and other codecs (PCMU: 8 kHz). `voicebus web --via-resampler`
publishes `audio.mic` as decoded instead, for a `voicebus resample` stage to convert (a local
mic's path, which stays so: there the device's rate is anything and PortAudio's callback is its own).

Where the user is in the reply: what left for the browser (frames pulled by the outgoing track on
its real-time clock) minus what the browser reports it still holds (jitter buffer + audio output +
half the round trip, from its getStats and AudioContext every 0.5 s). What it holds drains in real
time once nothing more is sent, so a reply sent to its end is played to its end that much later.
On a flush, what already left will still be heard, so the flushed state reports everything sent:
that is where the user stops.

Every browser connection is a conversation of its own: `session.begin` with a new session id
(the first caller keeps the one the stage started with) when it connects, `session.end` when it
hangs up or vanishes; the other stages start and close their side of it on those (common.stage).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from common.audio_devices import prioritize_audio_process
from common.envelope import Message
from common.log import kv
from common.silence import SilenceBatcher
from common.stage import SESSION_BEGIN, SESSION_END
from services.stages.caller import CallerStage
from services.stages.resampler import ResampleStage
from services.stages.web import reports
from services.stages.web.opus import MicFrame, RtpTimeline, as_mic_frame
from services.stages.web.rtc import RX_PREFETCH_FRAMES, BrowserLink

if TYPE_CHECKING:
    import ssl

    from av import AudioFrame

log = logging.getLogger("voicebus.web")
TOOL_TEXT_CHARS = 300  # of a call's arguments or its result, on the page (the report has them whole)
REPORTS_KEPT = 100  # sessions whose report this stage can still serve
MAX_GAP_FILL_S = 1.0  # lost packets: fill the timeline with silence up to this much, beyond it restart
# bus events the page shows, and what it calls them
PAGE_EVENTS = {
    "rt.conversation.item.input_audio_transcription.delta": "user_delta",
    "rt.conversation.item.input_audio_transcription.completed": "user_done",
    "rt.response.output_audio_transcript.delta": "assistant_delta",
    "rt.response.output_audio_transcript.done": "assistant_done",
    "rt.input_audio_buffer.speech_started": "speech_started",
    "rt.input_audio_buffer.speech_stopped": "speech_stopped",
    "rt.error": "error",
}


class WebStage(CallerStage):
    name = "web"
    subscriptions = ["audio.assistant", "player.flush", "player.hold", "rt.", "health.logger", "tool.call", "tool.result"]
    publishes_from_thread = True  # mic frames go out from the web loop's thread

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, rate: int = 24_000,
                 jitter_ms: int = 40, rx_prefetch: int = RX_PREFETCH_FRAMES, via_resampler: bool = False,
                 aiortc_encoder: bool = False, aiortc_decoder: bool = False,
                 silence: dict[str, Any] | None = None) -> None:
        super().__init__(sink=None, rate=rate, jitter_ms=jitter_ms)
        self.silence_settings = silence or {}  # SilenceBatcher's keyword arguments; {"batch_ms": 0}: off
        self.batcher: SilenceBatcher | None = None  # for the caller's current rate and channels (web loop)
        # converts the browser's mic to `audio.user` in this process (None: `audio.mic` for a resample stage)
        self.resampler = None if via_resampler else ResampleStage()
        self.sink = self.link = BrowserLink(host, port, self.buffer, on_mic_frame=self._mic_frame,
                                            on_client=self._client_event, ssl_context=ssl_context,
                                            rx_prefetch=rx_prefetch, aiortc_encoder=aiortc_encoder,
                                            aiortc_decoder=aiortc_decoder)
        self.mic_pts = 0
        self.mic_frames = 0
        self.mic_gap_fills = 0
        self._rtp_timeline = RtpTimeline()  # this caller's packet timestamps, counted on past 32 bits
        self._rtp_next: int | None = None  # the next frame's first sample, at its rate, if none is lost
        self._clock_offset_ns: int | None = None  # arrival - RTP time, least delayed frame so far
        self._speech_end_ns: int | None = None
        self._latency_item: str | None = None
        self._reply_done_item: str | None = None  # the last reply the server finished, until it has all been sent

    # --- runner thread --------------------------------------------------------------------------
    def start(self) -> None:
        # the web loop is this conversation's audio clock both ways (as the local mic and player are):
        # the same protection from starvation, taken before its thread starts so the thread inherits it
        priority = prioritize_audio_process()
        if self.resampler is not None:
            assert self.thread_out is not None  # the web loop's thread publishes what it resamples
            self.resampler.out = self.thread_out
            self.resampler.start()  # warmed before the first caller's first words
        self.link.hello = self._hello(self.out.stamper.session)
        self.link.start()
        log.info(kv("serving", url=self.link.url, **priority))

    def handle(self, message: Message) -> None:
        topic = message.topic
        if self.not_for_this_caller(message):  # the caller on the line is `caller_on_line`, not `link.client`,
            return  # which is set at the offer, while the last caller's session is still this one
        if topic in ("audio.assistant", "player.flush", "player.hold"):
            super().handle(message)
            if topic == "player.flush":
                self.link.send_page({"type": "flush", "reason": message.data.get("reason", "")})
        elif topic == "rt.gateway.idle_end":  # nobody answered the idle prompts: the call is over
            self.link.hang_up(str(message.data.get("reason") or "nobody spoke"))
        elif topic == "rt.gateway.idle_prompt":
            self.link.send_page({"type": "idle_prompt", "count": message.data.get("count")})
        elif topic in ("tool.call", "tool.result"):
            self.link.send_page(_tool_message(topic, message.data))
        elif topic == "health.logger":
            report = str(message.data.get("session_dir", ""))
            if report:
                self.link.report_dirs[message.header.session] = report
                while len(self.link.report_dirs) > REPORTS_KEPT:
                    self.link.report_dirs.pop(next(iter(self.link.report_dirs)))
            if report != self.link.hello.get("report"):
                self.link.hello["report"] = report
                self.link.send_page({"type": "report", "report": report})
        elif topic == "rt.response.done":
            output = ((message.data.get("event") or {}).get("response") or {}).get("output") or []
            replies = [item.get("id") for item in output if isinstance(item, dict) and item.get("type") == "message"]
            self._reply_done_item = replies[-1] if replies else self._reply_done_item
        elif topic == "rt.gateway.speech_end":
            self._speech_end_ns = message.data.get("speech_end_capture_ns")
        elif topic == "rt.gateway.truncated":
            data = message.data
            self.link.send_page({"type": "truncated", "item_id": data.get("item_id"),
                                 "audio_end_ms": data.get("audio_end_ms"), "heard": data.get("transcript_heard", "")})
        elif topic in PAGE_EVENTS:
            event = message.data.get("event") or {}
            self.link.send_page({"type": PAGE_EVENTS[topic], "item_id": event.get("item_id"),
                                 "text": event.get("delta") or event.get("transcript") or "",
                                 "error": (event.get("error") or {}).get("message", "") if topic == "rt.error" else ""})

    def current_state(self, **extra: Any) -> dict[str, Any]:
        state = super().current_state(**extra)
        sent_ms = state["played_ms"]
        state["sent_ms"] = sent_ms
        if not state.get("flushed"):  # the browser still holds what left in the last delay_ms ...
            held_ms = self.link.stats.delay_ms
            if self.buffer.ran_dry_at:  # ... and plays it out once nothing more is sent
                held_ms = max(0.0, held_ms - int(1000 * (time.monotonic() - self.buffer.ran_dry_at)))
            state["played_ms"] = max(0.0, round(sent_ms - held_ms, 1))
        return state

    def publish_state(self, **extra: Any) -> dict[str, Any]:
        state = super().publish_state(**extra)
        self._turn_latency(state)
        self._reply_sent(state)
        return state

    def _reply_sent(self, state: dict[str, Any]) -> None:
        """Tell the page once the server's last reply has left in full. A caller that hangs up after a
        reply needs it: on a starved machine a reply can pause for a second mid-sentence, so a silence
        is no sign that it is over."""
        item_id = self._reply_done_item
        if item_id and state["item_id"] == item_id and self.buffer.ran_dry_at and \
                state["sent_ms"] >= state["received_ms"]:
            self._reply_done_item = None
            self.link.send_page({"type": "assistant_sent", "item_id": item_id, "sent_ms": state["sent_ms"]})

    def _turn_latency(self, state: dict[str, Any]) -> None:
        """User stopped speaking (captured) -> first reply sample heard in the browser, per turn."""
        item_id = state["item_id"]
        if not item_id or item_id == self._latency_item or not self._speech_end_ns or not state["item_started_ns"]:
            return
        self._latency_item = item_id
        heard_ns = state["item_started_ns"] + int(self.link.stats.delay_ms * 1e6)
        latency_ms = round((heard_ns - self._speech_end_ns) / 1e6)
        self._speech_end_ns = None
        log.info(kv("turn_latency", item_id=item_id, latency_ms=latency_ms))
        self.link.send_page({"type": "turn", "item_id": item_id, "latency_ms": latency_ms})
        self.out.event("web.turn", {"item_id": item_id, "latency_ms": latency_ms})

    def stop(self) -> None:
        super().stop()  # the web loop has stopped: its thread no longer publishes
        if self.resampler is not None:
            self.resampler.stop()  # what the filter still holds (~2 ms) goes out

    def counters(self) -> dict[str, Any]:
        track = self.link.track
        resampled = {f"resample_{key}": value for key, value in self.resampler.counters().items()} \
            if self.resampler is not None else {}
        batched = self.batcher.counters() if self.batcher is not None else {}
        return {**super().counters(), **self.link.counts, **resampled, **batched,
                "connected": self.link.client is not None, "mic_frames": self.mic_frames, "mic_gap_fills": self.mic_gap_fills,
                "mic_decode_errors": self.link.decode_errors,
                **self.caller_counters(),
                "browser_delay_ms": round(self.link.stats.delay_ms, 1),
                "late_frames": track.late_frames if track else 0,
                "opus_frames_encoded": track.encoder.frames_encoded if track and track.encoder else 0,
                "opus_silence_repeated": track.encoder.silent_frames_repeated if track and track.encoder else 0}

    def _hello(self, session: str) -> dict[str, Any]:
        return {"session": session, "report": "", "report_url": reports.report_url(self.link.report_secret, session)}

    # --- web loop thread --------------------------------------------------------------------------
    def _client_event(self, kind: str, data: dict[str, Any]) -> None:
        assert self.thread_out is not None
        if kind == "connected":
            self._rtp_timeline, self._rtp_next, self._clock_offset_ns = RtpTimeline(), None, None
            if self.batcher is not None:
                self.batcher.reset()
            self.buffer.reset()  # nothing of a previous browser's reply is left to send to this one
            self._reply_done_item = None
            session = self.caller_arrived()  # adopted at once: this thread publishes the caller's mic frames
            self.link.hello = self._hello(session)
            self.thread_out.event(f"web.{kind}", data)
            self.thread_out.event(SESSION_BEGIN, {"session": session, "reason": "browser connected"})
            log.info(kv("conversation_begins", session=session, remote=data.get("remote")))
        else:
            session = self.caller_left()
            self._flush_mic()  # the caller's last silence belongs to their conversation
            self.buffer.reset()  # no more state reports about an item nobody is listening to
            self.thread_out.event(f"web.{kind}", data)
            self.thread_out.event(SESSION_END, {"session": session, "reason": data.get("reason")})
            log.info(kv("conversation_ended", session=session, reason=repr(data.get("reason"))))

    def _mic_frame(self, frame: AudioFrame | MicFrame, arrival_ns: int, settings: dict[str, Any]) -> None:
        """One decoded frame -> `audio.user` (or `audio.mic`), timed from RTP, lost packets filled."""
        assert self.thread_out is not None
        if not isinstance(frame, MicFrame):  # aiortc's decoder (--aiortc-decoder, or PCMU/PCMA)
            frame = as_mic_frame(frame, settings.get("channelCount", 1))
        rate, samples, channels = frame.rate, frame.samples, frame.channels
        pts = self._rtp_timeline.extend(frame.rtp_timestamp) * rate // frame.clock_rate
        rtp_ns = pts * 1_000_000_000 // rate
        offset = arrival_ns - rtp_ns
        if self._clock_offset_ns is None or offset < self._clock_offset_ns:
            self._clock_offset_ns = offset
        t_capture_ns = rtp_ns + self._clock_offset_ns - samples * 1_000_000_000 // rate
        if self._rtp_next is not None and 0 < pts - self._rtp_next <= MAX_GAP_FILL_S * rate:
            missing = pts - self._rtp_next
            self.mic_gap_fills += 1
            self._publish_mic(bytes(missing * channels * 2), rate, channels,
                              t_capture_ns - missing * 1_000_000_000 // rate)
        self._rtp_next = pts + samples
        self.mic_frames += 1
        self._publish_mic(frame.pcm, rate, channels, t_capture_ns)

    def _publish_mic(self, pcm: bytes, rate: int, channels: int, t_capture_ns: int) -> None:
        """One frame (or a lost stretch's silence): out at once, or held with the silence around it."""
        if self.batcher is None or (self.batcher.rate, self.batcher.channels) != (rate, channels):
            self._flush_mic()
            self.batcher = SilenceBatcher(rate, channels, **self.silence_settings)
        for release in self.batcher.push(pcm, t_capture_ns):
            self._send_mic(release.pcm, rate, channels, release.t_capture_ns)

    def _flush_mic(self) -> None:
        if self.batcher is not None:
            for release in self.batcher.flush():
                self._send_mic(release.pcm, self.batcher.rate, self.batcher.channels, release.t_capture_ns)

    def _send_mic(self, pcm: bytes, rate: int, channels: int, t_capture_ns: int) -> None:
        assert self.thread_out is not None
        if self.resampler is None:
            self.thread_out.audio("audio.mic", pcm, rate=rate, channels=channels, pts=self.mic_pts,
                                  t_capture_ns=t_capture_ns, clock="rtp", t_callback_ns=time.time_ns())
        else:  # the frame the resample stage would have been sent, handed to its code here instead
            now_ns = time.time_ns()
            self.resampler.handle(self.thread_out.stamper.audio(
                "audio.mic", pcm, rate=rate, channels=channels, pts=self.mic_pts, t_capture_ns=t_capture_ns,
                t_ns=now_ns, clock="rtp", t_callback_ns=now_ns))
        self.mic_pts += len(pcm) // (2 * channels)



def _tool_message(topic: str, data: dict[str, Any]) -> dict[str, Any]:
    """A tool call as the page shows it while it happens: its name, its arguments, then its result or error."""
    def text(value: Any) -> str:
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        return shown if len(shown) <= TOOL_TEXT_CHARS else shown[:TOOL_TEXT_CHARS - 1] + "…"

    message = {"type": "tool_call" if topic == "tool.call" else "tool_result",
               "call_id": str(data.get("call_id") or ""), "name": str(data.get("name") or "")}
    if topic == "tool.call":
        return {**message, "arguments": text(data.get("arguments") or {})}
    return {**message, "output": text(data.get("output")) if data.get("output") is not None else "",
            "error": text(data.get("error")) if data.get("error") else "", "duration_ms": data.get("duration_ms")}
