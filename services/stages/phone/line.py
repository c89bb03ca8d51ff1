"""The phone stage's line: a Media Streams websocket server (aiohttp) on its own asyncio loop.

One call at a time (a stage set is one conversation; `serve` gives every call its own set). Audio
from the caller is handed to the stage as it arrives; the assistant's goes out paced by this loop's
clock, `lead_ms` ahead of real time (the carrier plays what it holds; more lead rides out network
jitter, less leaves less to clear on a barge-in), each 20 ms frame followed by a `mark`.

Where the caller is in the reply is the last mark the carrier echoed (it echoes one once the audio
before it has played), never what was sent. A `clear` makes the carrier drop what it holds and echo
the marks among it at once: marks sent before a clear that come back after it are stale, not played.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from common import g711
from common.log import RateLimitedLog, kv
from services.stages.loop_server import LoopServer, RemoteOutput
from services.stages.phone import media_streams as ms
from services.stages.phone import twiml
from services.stages.playback import PlaybackBuffer, Segment
from services.stages.web.connections import guarded_runner

log = logging.getLogger("voicebus.phone")
MEDIA_PATH = "/media"
VOICE_PATH = "/twilio/voice"
TOKEN_PARAMETER = "token"  # the customParameter a placed call carries (a Stream url keeps no query string)
LEAD_MS = 100
MARKS_KEPT = 3000  # 60 s of frames not yet echoed: a carrier that never echoes does not grow this
START_TIMEOUT_S = 10.0  # a websocket that has not said `start` by then is closed


@dataclass
class Call:
    stream_sid: str
    call_sid: str
    parameters: dict[str, str]
    remote: str
    ws: web.WebSocketResponse
    started_at: float = field(default_factory=time.monotonic)
    sent_ms: float = 0.0  # audio sent to the carrier in this call
    clock_base: float = 0.0  # monotonic time at which sent_ms 0 would have been played
    next_mark: int = 1
    # name -> (item, its ms sent, the frame's audio): what a hold takes back if the carrier has not played it
    marks: OrderedDict[int, tuple[str, float, bytes]] = field(default_factory=OrderedDict)
    cleared_below: int = 1  # marks named below this were sent before the last clear
    echoed: dict[str, float] = field(default_factory=dict)  # item -> ms played, by the last echoed mark
    sender: asyncio.Task | None = None


class PhoneLine(LoopServer, RemoteOutput):
    """The carrier's side of the stage: hands caller audio, DTMF and call events to callbacks."""

    what = "phone line"

    def __init__(self, host: str, port: int, buffer: PlaybackBuffer, *,
                 on_audio: Callable[[bytes, int, int], None], on_call: Callable[[str, dict[str, Any]], None],
                 on_dtmf: Callable[[str], None], token: str = "", public_url: str = "",
                 lead_ms: int = LEAD_MS) -> None:
        super().__init__(host, port, "phone-loop")
        self.buffer, self.lead_ms = buffer, lead_ms
        self.on_audio, self.on_call, self.on_dtmf = on_audio, on_call, on_dtmf
        self.token = token  # under `serve`: a call must carry it (customParameters.token) or is refused
        self.public_url = public_url  # what the TwiML answer points the carrier at (default: this server)
        self.call: Call | None = None
        self.lock = threading.Lock()  # marks and positions: the loop writes, the stage's thread reads
        self.counts = {"calls": 0, "busy_refused": 0, "unplaced_refused": 0, "bad_messages": 0,
                       "media_before_start": 0, "unknown_stream": 0, "bad_format_refused": 0, "start_timeouts": 0,
                       "frames_in": 0, "frames_out": 0, "marks_echoed": 0, "marks_stale": 0, "clears": 0,
                       "dtmf": 0, "gap_fills": 0, "handler_errors": 0, "hold_clears": 0}
        self.refusals = RateLimitedLog(log)
        self.url = ""
        self._runner: web.AppRunner | None = None

    # --- the player's sink contract (RemoteOutput's, and a flush that clears the carrier) --------------
    latency_ms = 0.0  # the carrier's own delay is inside the marks it echoes
    late_callbacks, max_callback_gap_ms = 0, 0.0

    def drop_unheard(self) -> float:
        """A flush: the carrier is told to drop what it holds; the seconds of the current item it had been
        sent but not played (by its marks) no longer count as played."""
        call = self.call
        if call is None:
            return 0.0
        with self.lock:
            item = self.buffer.current.item_id if self.buffer.current else ""
            sent_ms = 1000 * self.buffer.played.get(item, 0) / self.buffer.rate
            unheard_ms = max(0.0, sent_ms - call.echoed.get(item, 0.0))
            call.cleared_below = call.next_mark
            call.marks.clear()
        self.counts["clears"] += 1
        self.loop.call_soon_threadsafe(self._send, call, ms.clear(call.stream_sid))
        return unheard_ms / 1000

    def take_back_unplayed(self) -> float:
        """A hold (the caller may have interrupted): the carrier drops what it holds (`clear`), and what it had
        not played goes back to the front of the buffer, to be sent again on resuming; returns its ms. (Without
        this the carrier plays on what was sent, up to `lead_ms`, while the reply is meant to be paused.)"""
        call = self.call
        current = self.buffer.current
        if call is None or current is None:
            return 0.0
        with self.lock:
            unplayed = b"".join(audio for item, _ms, audio in call.marks.values() if item == current.item_id)
            call.cleared_below = call.next_mark
            call.marks.clear()
        self.counts["hold_clears"] += 1
        self.loop.call_soon_threadsafe(self._send, call, ms.clear(call.stream_sid))
        if unplayed:
            self.buffer.unread(Segment(current.item_id, current.content_index, current.response_id, unplayed))
        return 1000 * len(unplayed) / self.buffer.rate

    def played_ms(self, item_id: str | None) -> float:
        call = self.call
        with self.lock:
            return call.echoed.get(item_id or "", 0.0) if call else 0.0

    def hang_up(self, reason: str) -> None:
        """Thread-safe: end the current call from our side."""
        if self.call is not None:
            asyncio.run_coroutine_threadsafe(self._hang_up(self.call, reason), self.loop)

    # --- the loop's thread -------------------------------------------------------------------------
    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get(MEDIA_PATH, self._media)
        app.router.add_post(VOICE_PATH, self._voice)
        self._runner = guarded_runner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1] if self.port == 0 else self.port
        self.port = port
        self.url = f"ws://{self.host}:{port}{MEDIA_PATH}"

    async def _shutdown(self) -> None:
        if self.call is not None:
            await self._hang_up(self.call, "stage stopping")
        if self._runner is not None:
            await self._runner.cleanup()

    async def _voice(self, request: web.Request) -> web.Response:
        """A Twilio number's voice webhook, for a phone stage run alone (`serve` answers its own): connect
        the call to this line's stream."""
        if self.call is not None:
            return web.Response(text=twiml.busy("Sorry, the line is busy. Please call again later."),
                                content_type=twiml.CONTENT_TYPE)
        return web.Response(text=twiml.connect_stream(self.public_url or self.url), content_type=twiml.CONTENT_TYPE)

    def _refuse(self, counter: str, **fields: Any) -> None:
        """Count it, and say it in one line (at most every few seconds per kind)."""
        self.counts[counter] += 1
        self.refusals.warning(counter, kv(counter, **fields))

    async def _media(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=ms.MAX_MESSAGE_CHARS)
        await ws.prepare(request)
        if self.call is not None:
            self._refuse("busy_refused", remote=request.remote)
            await ws.close(code=1013, message=b"busy")
            return ws
        call: Call | None = None
        ended = "the carrier closed the stream"
        try:
            while True:
                try:
                    message = await ws.receive(timeout=None if call else START_TIMEOUT_S)
                except TimeoutError:
                    self._refuse("start_timeouts", remote=request.remote)
                    break
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                try:
                    event = ms.parse(message.data if message.type == WSMsgType.TEXT else bytes(message.data))
                except ms.MediaStreamError as exc:
                    self._refuse("bad_messages", reason=exc.reason, detail=repr(str(exc)), remote=request.remote)
                    continue
                if isinstance(event, ms.Start):
                    if call is not None:
                        self._refuse("bad_messages", reason="second_start", remote=request.remote)
                        continue
                    call = self._started(event, ws, request.remote or "")
                    if call is None:
                        ended = "refused"
                        break
                elif isinstance(event, ms.Stop):
                    ended = "the caller hung up"
                    break
                elif isinstance(event, ms.Connected):
                    continue
                elif call is None:
                    self._refuse("media_before_start", kind=event.event, remote=request.remote)
                elif event.stream_sid != call.stream_sid:
                    self._refuse("unknown_stream", stream_sid=repr(event.stream_sid[:40]), remote=request.remote)
                else:
                    try:
                        self._in_call(call, event)
                    except Exception as exc:  # noqa: BLE001 - one message never ends the call: counted, said
                        self._refuse("handler_errors", kind=event.event, error=repr(exc)[:200])
        finally:
            if call is not None:
                await self._hang_up(call, ended)
            elif not ws.closed:
                await ws.close()
        return ws

    def _in_call(self, call: Call, event: ms.Media | ms.Mark | ms.Dtmf) -> None:
        if isinstance(event, ms.Media):
            self._media_in(event)
        elif isinstance(event, ms.Mark):
            self._mark_echoed(call, event.mark.name)
        elif isinstance(event, ms.Dtmf):
            self.counts["dtmf"] += 1
            self.on_dtmf(event.dtmf.digit)

    def _started(self, event: ms.Start, ws: web.WebSocketResponse, remote: str) -> Call | None:
        start = event.start
        if self.call is not None:  # two sockets opened at once: the first to say `start` has the line
            self._refuse("busy_refused", remote=remote, call_sid=start.call_sid)
            return None
        if self.token and not hmac.compare_digest(start.custom_parameters.get(TOKEN_PARAMETER, "").encode(),
                                                  self.token.encode()):
            self._refuse("unplaced_refused", remote=remote, call_sid=start.call_sid)
            return None
        media_format = start.media_format
        if (media_format.encoding, media_format.sample_rate, media_format.channels) != \
                (ms.MULAW["encoding"], ms.MULAW["sampleRate"], ms.MULAW["channels"]):
            self._refuse("bad_format_refused", encoding=media_format.encoding, rate=media_format.sample_rate)
            return None
        parameters = {k: v for k, v in start.custom_parameters.items() if k != TOKEN_PARAMETER}
        call = Call(start.stream_sid, start.call_sid, parameters, remote, ws)
        self.call = call
        self.counts["calls"] += 1
        self.buffer.reset()
        self.on_call("started", {"stream_sid": call.stream_sid, "call_sid": call.call_sid, "remote": remote,
                                 "parameters": parameters, "tracks": start.tracks})
        call.sender = asyncio.ensure_future(self._send_loop(call))
        return call

    def _media_in(self, event: ms.Media) -> None:
        if event.media.track not in ("inbound", "inbound_track"):
            return
        try:
            codes = event.codes()
        except ms.MediaStreamError as exc:
            self._refuse("bad_messages", reason=exc.reason)
            return
        self.counts["frames_in"] += 1
        self.on_audio(codes, event.media.timestamp, time.time_ns())

    def _mark_echoed(self, call: Call, name: str) -> None:
        try:
            number = int(name)
        except ValueError:
            self._refuse("bad_messages", reason="foreign_mark", name=repr(name[:40]))
            return
        with self.lock:
            if number < call.cleared_below:
                self.counts["marks_stale"] += 1  # dropped by a clear, echoed at once: never played
                return
            if number not in call.marks:
                return
            while call.marks:  # the carrier plays in order: every mark up to this one has played
                oldest, (item, item_ms, _audio) = call.marks.popitem(last=False)
                call.echoed[item] = max(call.echoed.get(item, 0.0), item_ms)
                if oldest == number:
                    break
        self.counts["marks_echoed"] += 1

    async def _send_loop(self, call: Call) -> None:
        """Pull 20 ms frames from the buffer as the call's clock allows, `lead_ms` ahead of it."""
        frame_samples = ms.FRAME_BYTES
        silence = g711.SILENCE["pcmu"]
        call.clock_base = time.monotonic()
        while self.call is call and not call.ws.closed:
            now = time.monotonic()
            if call.sent_ms < 1000 * (now - call.clock_base) - ms.FRAME_MS:
                call.clock_base = now - call.sent_ms / 1000  # idle: the next reply starts with the lead again
            while call.sent_ms <= 1000 * (now - call.clock_base) + self.lead_ms:
                codes = self.buffer.pull(frame_samples)
                audio = self.buffer.pulled_audio
                if not audio:
                    break
                item = self.buffer.current.item_id if self.buffer.current else ""
                frame = codes[:audio] + bytes([silence]) * (frame_samples - audio)  # a partial last frame: padded
                with self.lock:
                    number = call.next_mark
                    call.next_mark += 1
                    call.marks[number] = (item, 1000 * self.buffer.played.get(item, 0) / self.buffer.rate,
                                          codes[:audio])
                    while len(call.marks) > MARKS_KEPT:
                        call.marks.popitem(last=False)
                await call.ws.send_str(ms.media(call.stream_sid, frame))
                await call.ws.send_str(ms.mark(call.stream_sid, str(number)))
                call.sent_ms += ms.FRAME_MS
                self.counts["frames_out"] += 1
            await asyncio.sleep(ms.FRAME_MS / 1000)

    def _send(self, call: Call, text: str) -> None:
        if self.call is call and not call.ws.closed:
            asyncio.ensure_future(call.ws.send_str(text))

    async def _hang_up(self, call: Call, reason: str) -> None:
        if self.call is not call:
            return
        self.call = None
        if call.sender is not None:
            call.sender.cancel()
        if not call.ws.closed:
            await call.ws.close()
        self.buffer.reset()
        self.on_call("ended", {"stream_sid": call.stream_sid, "call_sid": call.call_sid, "reason": reason,
                               "duration_s": round(time.monotonic() - call.started_at, 1)})
