"""`voicebus phone`: the mic's and the player's jobs for a caller on a phone line (Twilio Media Streams).

The caller's μ-law goes on the bus as it came (`audio.user`, fmt pcmu, 8 kHz) for a gateway whose
session is `audio/pcmu` (`--audio-format pcmu`), which hands the codes to the server untouched; the
server's μ-law comes back the same way (`audio.assistant`, pcmu) and leaves for the carrier as it
came. Nothing on that path decodes or resamples (the counters say so: `audio_converted`). With a
pcm16 session (`--session-format pcm16`) the resample stage's code converts on the way in (decode,
8 -> 24 kHz, seam-free, in this process as the web stage does) and back (24 -> 8 kHz, encode).

Under the player's contract: `player.flush` sends `clear`; `player.state` reports `played_ms` as the
last mark the carrier echoed (services/stages/phone/line.py), so the gateway's truncate is at what
the phone played, and none when nothing has; `sent_ms` beside it. `player.hold` sends `clear` too, and
takes back what the carrier had not played, to send again on resuming. DTMF digits go on the bus as
`phone.dtmf`. Each call is a conversation of its own (`session.begin`/`session.end`), as each browser
is for the web stage.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from common import g711
from common.audio_devices import prioritize_audio_process
from common.envelope import AudioHeader, Message
from common.log import kv
from common.stage import SESSION_BEGIN, SESSION_END
from services.stages.caller import CallerStage
from services.stages.phone.line import LEAD_MS, PhoneLine
from services.stages.playback import PlaybackBuffer, Segment

if TYPE_CHECKING:
    from services.stages.resampler import ResampleStage

log = logging.getLogger("voicebus.phone")
MAX_GAP_FILL_MS = 1000  # frames the carrier never sent: filled with silence up to this much, beyond it restart
DTMF_TOPIC = "phone.dtmf"


class PhoneStage(CallerStage):
    name = "phone"
    subscriptions = ["audio.assistant", "player.flush", "player.hold", "rt.gateway.idle_end"]
    publishes_from_thread = True  # caller audio goes out from the phone loop's thread

    def __init__(self, host: str, port: int, session_format: str = "pcmu", jitter_ms: int = 40,
                 lead_ms: int = LEAD_MS, token: str = "", public_url: str = "") -> None:
        super().__init__(sink=None, rate=g711.RATE, jitter_ms=jitter_ms)
        self.buffer = PlaybackBuffer(g711.RATE, jitter_ms, sample_bytes=1)  # the carrier's μ-law codes
        self.session_format = session_format  # the gateway's --audio-format: pcmu passes through, pcm16 converts
        self.sink = self.line = PhoneLine(host, port, self.buffer, on_audio=self._caller_audio,
                                          on_call=self._call_event, on_dtmf=self._dtmf, token=token,
                                          public_url=public_url, lead_ms=lead_ms)
        self.resampler: ResampleStage | None = None  # pcm16 session: the caller's 8 kHz -> 24 kHz
        self.mic_pts = 0
        self._next_pts: int | None = None  # the next frame's first sample, if none is lost
        self._clock_offset_ns: int | None = None  # arrival - carrier time, least delayed frame so far
        self.converted_in = self.converted_out = self.passed_in = self.passed_out = 0
        self._reported_played = 0.0  # the played position the last player.state said

    # --- runner thread --------------------------------------------------------------------------
    def start(self) -> None:
        priority = prioritize_audio_process()
        if self.session_format != "pcmu":
            from services.stages.resampler import ResampleStage

            assert self.thread_out is not None
            self.resampler = ResampleStage()
            self.resampler.out = self.thread_out
            self.resampler.start()
        self.line.start()
        log.info(kv("serving", url=self.line.url, session_format=self.session_format, **priority))

    def handle(self, message: Message) -> None:
        if self.not_for_this_caller(message):
            return
        if message.topic == "rt.gateway.idle_end":
            self.line.hang_up(str(message.data.get("reason") or "nobody spoke"))
            return
        if message.topic == "player.hold" and message.data.get("hold"):
            self.buffer.hold(True)  # first: the line's sender takes nothing more, then what the carrier holds comes back
            self.line.take_back_unplayed()
        super().handle(message)

    def enqueue(self, message: Message) -> None:
        header = message.header
        assert isinstance(header, AudioHeader)
        if (header.fmt, header.rate, header.channels) == ("pcmu", g711.RATE, 1):
            codes = message.payload  # the server's μ-law, to the carrier as it is
            self.passed_out += 1
        else:
            pcm = g711.as_s16(message.payload, header.fmt)
            if (header.rate, header.channels) != (g711.RATE, 1):
                key = (header.rate, header.channels)
                if key not in self.converters:  # the player's own: a flush empties them too
                    from common.resample import StreamResampler

                    self.converters[key] = StreamResampler(header.rate, g711.RATE, header.channels)
                pcm = self.converters[key].feed(pcm)
            codes = g711.encode(pcm, "pcmu")
            self.converted_out += 1
        extra = header.extra
        self.buffer.push(Segment(str(extra.get("item_id", "")), int(extra.get("content_index", 0)),
                                 str(extra.get("response_id", "")), codes, received_at=time.monotonic()))

    def current_state(self, **extra: Any) -> dict[str, Any]:
        state = super().current_state(**extra)
        state["sent_ms"] = state["played_ms"]
        state["played_ms"] = round(self.line.played_ms(state["item_id"]), 1)  # the carrier's last echoed mark
        return state

    def publish_state(self, **extra: Any) -> dict[str, Any]:
        state = super().publish_state(**extra)
        self._reported_played = state["played_ms"]
        return state

    def tick(self) -> None:
        super().tick()
        # the carrier plays out the last `lead_ms` after the stage has sent everything: its marks move the
        # played position on while nothing is "playing" here, and that is news (a reply heard to its end)
        item = self.buffer.current.item_id if self.buffer.current else None
        if item and self.line.played_ms(item) != self._reported_played:
            self.publish_state()

    def stop(self) -> None:
        super().stop()
        if self.resampler is not None:
            self.resampler.stop()

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), **self.line.counts, **self.caller_counters(), "url": self.line.url,
                "on_line": self.caller_on_line,
                "audio_passed_in": self.passed_in, "audio_passed_out": self.passed_out,
                "audio_converted_in": self.converted_in, "audio_converted_out": self.converted_out}

    # --- phone loop thread ------------------------------------------------------------------------
    def _call_event(self, kind: str, data: dict[str, Any]) -> None:
        assert self.thread_out is not None
        if kind == "started":
            self._next_pts, self._clock_offset_ns = None, None
            session = self.caller_arrived()
            self.thread_out.event("phone.started", data)
            self.thread_out.event(SESSION_BEGIN, {"session": session, "reason": "phone call connected"})
            log.info(kv("call_begins", session=session, call_sid=data.get("call_sid"), remote=data.get("remote")))
        else:
            session = self.caller_left()
            self.thread_out.event("phone.ended", data)
            self.thread_out.event(SESSION_END, {"session": session, "reason": data.get("reason")})
            log.info(kv("call_ended", session=session, reason=repr(data.get("reason")),
                        duration_s=data.get("duration_s")))

    def _dtmf(self, digit: str) -> None:
        assert self.thread_out is not None
        self.thread_out.event(DTMF_TOPIC, {"digit": digit})
        log.info(kv("dtmf", digit=digit))

    def _caller_audio(self, codes: bytes, timestamp_ms: int, arrival_ns: int) -> None:
        """One media frame -> `audio.user`, timed by the carrier's timestamps, lost frames filled."""
        pts = timestamp_ms * g711.RATE // 1000
        offset = arrival_ns - timestamp_ms * 1_000_000
        if self._clock_offset_ns is None or offset < self._clock_offset_ns:
            self._clock_offset_ns = offset
        t_capture_ns = timestamp_ms * 1_000_000 + self._clock_offset_ns
        if self._next_pts is not None and 0 < pts - self._next_pts <= MAX_GAP_FILL_MS * g711.RATE // 1000:
            missing = pts - self._next_pts
            self.line.counts["gap_fills"] += 1
            self._publish(bytes([g711.SILENCE["pcmu"]]) * missing, t_capture_ns - missing * 1_000_000_000 // g711.RATE)
        self._next_pts = pts + len(codes)
        self._publish(codes, t_capture_ns)

    def _publish(self, codes: bytes, t_capture_ns: int) -> None:
        assert self.thread_out is not None
        if self.resampler is None:
            self.thread_out.audio("audio.user", codes, rate=g711.RATE, channels=1, pts=self.mic_pts,
                                  t_capture_ns=t_capture_ns, fmt="pcmu", clock="carrier", t_callback_ns=time.time_ns())
            self.passed_in += 1
        else:  # a pcm16 session: the resample stage's code decodes and converts, here
            now_ns = time.time_ns()
            self.resampler.handle(self.thread_out.stamper.audio(
                "audio.mic", codes, rate=g711.RATE, channels=1, pts=self.mic_pts, t_capture_ns=t_capture_ns,
                t_ns=now_ns, fmt="pcmu", clock="carrier", t_callback_ns=now_ns))
            self.converted_in += 1
        self.mic_pts += len(codes)
