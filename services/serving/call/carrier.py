"""A fake carrier: Twilio's side of a Media Streams call, to test a phone door without a phone line.

It behaves as Twilio does where a voice agent can tell: it answers a voice webhook's TwiML
(`<Connect><Stream url>` and its `<Parameter>`s, or `<Say>`+`<Hangup>` when busy), sends `connected`
then `start` (streamSid, callSid, tracks, customParameters, μ-law 8 kHz), then the caller's audio as
20 ms `media` frames paced in real time with Twilio's counters (sequenceNumber, chunk, timestamp, as
strings), continuous, silence included. What it is sent it holds and "plays" at real time: a
`mark` is echoed only once the audio before it has played; `clear` drops what it holds and echoes
the marks among it at once (Twilio's documented behaviour). It records what the caller heard (the
codes it played, on the call's timeline), sends DTMF, and says `stop` when it hangs up.

Turns are taken by ear: a sentence is spoken once the reply before it has played out (quiet for
`REPLY_QUIET_S`) and `pause_s` more; a turn with `barge_in_ms` is spoken that far into the reply
instead, over it. Keys pressed are answered or not (a door may not tell the model): the next turn
waits for a reply to them at most `KEYS_REPLY_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from common import g711
from services.stages.phone import media_streams as ms
from services.stages.phone import twiml

FRAME = ms.FRAME_BYTES
SILENT_FRAME = bytes([g711.SILENCE["pcmu"]]) * FRAME
REPLY_QUIET_S = 1.5  # nothing held and nothing received this long: the reply has played out
LEAD_IN_S = 0.5  # silence before the first words: the line is up, the caller has not spoken yet
KEYS_REPLY_WAIT_S = 8.0  # keys may be answered (a voicebus gateway tells the model) or not: wait this long


class CarrierRefused(RuntimeError):
    """The webhook answered with a busy `<Say>` (or an HTTP error): what it said."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass
class Turn:
    pcm: bytes  # 8 kHz mono s16le
    barge_in_ms: int | None = None  # speak this far into the reply, over it (None: after it)
    dtmf: str = ""  # keys to press instead of speaking


@dataclass
class Reply:
    """One stretch of assistant audio the caller heard, on the call's timeline (frames of 20 ms)."""

    start_frame: int
    end_frame: int
    codes: bytearray = field(default_factory=bytearray)
    cleared: bool = False  # a clear cut it
    cleared_at_frame: int | None = None
    marks_played_ms: list[float] = field(default_factory=list)  # where each mark echoed as played stood in it
    gaps: int = 0  # times it ran dry and then went on: a gap the caller heard (the stage's audio came late)
    gap_ms: float = 0.0
    first_heard_at: float = 0.0  # monotonic


@dataclass
class CarrierResult:
    stream_sid: str = ""
    call_sid: str = ""
    heard: bytearray = field(default_factory=bytearray)  # every code played to the caller, silence included
    sent: bytearray = field(default_factory=bytearray)  # every code the caller said, as sent
    replies: list[Reply] = field(default_factory=list)
    clears: list[dict[str, Any]] = field(default_factory=list)  # frame, codes dropped, marks echoed by it
    marks_echoed: int = 0
    marks_echoed_on_clear: int = 0
    frames_received: int = 0
    turn_starts_frame: list[int] = field(default_factory=list)  # when each turn's first frame (or key) went
    turn_ends_frame: list[int] = field(default_factory=list)  # when each spoken turn's last frame went
    bad_messages: list[str] = field(default_factory=list)
    closed_by: str = ""
    parameters: dict[str, str] = field(default_factory=dict)  # the TwiML's (a voicebus serve's: its session)
    connect_ms: float = 0.0  # dialled (the webhook posted, or the socket opened) -> `start` sent: the line is live
    started_at: float = 0.0  # monotonic, when frame 0 was due
    started_ns: int = 0  # the same moment on the wall clock (the bus's clock)

    def heard_ms(self) -> list[float]:
        """Per spoken turn: its last frame sent -> the first sample of the next reply played."""
        out = []
        for end_frame in self.turn_ends_frame:
            ended = self.started_at + end_frame * ms.FRAME_MS / 1000
            reply = next((r for r in self.replies if r.first_heard_at > ended), None)
            if reply is not None:
                out.append(round(1000 * (reply.first_heard_at - ended), 1))
        return out

    def frame_ns(self, frame: int) -> int:
        """When frame `frame` was sent, on the wall clock."""
        return self.started_ns + frame * ms.FRAME_MS * 1_000_000

    def heard_pcm(self) -> bytes:
        return g711.decode(bytes(self.heard), "pcmu")


class FakeCarrier:
    def __init__(self, url: str, turns: list[Turn], *, pause_s: float = 0.5, timeout_s: float = 60.0,
                 auth_token: str = "", parameters: dict[str, str] | None = None, caller: str = "+15005550006",
                 tail_s: float = 1.0) -> None:
        self.url, self.turns, self.pause_s, self.timeout_s = url, turns, pause_s, timeout_s
        self.auth_token, self.parameters, self.caller, self.tail_s = auth_token, dict(parameters or {}), caller, tail_s
        self.result = CarrierResult(stream_sid="MZ" + secrets.token_hex(16), call_sid="CA" + secrets.token_hex(16))
        self.held: deque[bytes | str] = deque()  # codes to play, and mark names after the audio they follow
        self.pending_marks: list[str] = []
        self._short_ms = 0.0  # the last frame played was this much short of 20 ms (it ran dry in it)  # marks after the frame playing now: echoed once it has played out
        self.frame = 0  # frames played (and sent: both run on the one 20 ms clock)
        self.last_audio_at = 0.0  # monotonic: the last frame of reply audio received or played
        self.said_at = 0.0  # monotonic: when the last turn began to be said (or its keys pressed)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._sequence = 0

    # --- dialling ---------------------------------------------------------------------------------
    async def _stream_target(self, session: aiohttp.ClientSession) -> tuple[str, dict[str, str]]:
        """The websocket to stream to: given, or what the voice webhook's TwiML says."""
        if self.url.startswith(("ws://", "wss://")):
            return self.url, dict(self.parameters)
        params = {"AccountSid": "AC" + "0" * 32, "CallSid": self.result.call_sid, "From": self.caller,
                  "To": "+15005550001", "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"}
        headers = {twiml.SIGNATURE_HEADER: twiml.signature(self.auth_token, self.url, params)} if self.auth_token else {}
        async with session.post(self.url, data=params, headers=headers) as response:
            body = await response.text()
            if response.status != 200:
                raise CarrierRefused(response.status, body[:200])
        root = ET.fromstring(body)
        stream = root.find("./Connect/Stream")
        if stream is None:
            said = " ".join((say.text or "").strip() for say in root.iter("Say")) or body[:200]
            raise CarrierRefused(response.status, said)
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
        return stream.get("url", ""), {**parameters, **self.parameters}

    async def run(self) -> CarrierResult:
        dialled = time.monotonic()
        async with aiohttp.ClientSession() as session:
            url, parameters = await self._stream_target(session)
            self.result.parameters = {k: v for k, v in parameters.items() if k != "token"}
            async with session.ws_connect(url, max_msg_size=ms.MAX_MESSAGE_CHARS) as ws:
                self._ws = ws
                await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
                await self._send({"event": "start", "start": {
                    "accountSid": "AC" + "0" * 32, "streamSid": self.result.stream_sid, "callSid": self.result.call_sid,
                    "tracks": ["inbound"], "customParameters": parameters, "mediaFormat": dict(ms.MULAW)}})
                self.result.connect_ms = round(1000 * (time.monotonic() - dialled), 1)
                receiving = asyncio.ensure_future(self._receive(ws))
                try:
                    await asyncio.wait_for(self._talk(ws, receiving), self.timeout_s)
                finally:
                    receiving.cancel()
                    if not ws.closed:
                        await self._send({"event": "stop", "stop": {"accountSid": "AC" + "0" * 32,
                                                                    "callSid": self.result.call_sid}})
                        await ws.close()
        return self.result

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        self._sequence += 1
        try:
            await self._ws.send_json({**message, "sequenceNumber": str(self._sequence),
                                      "streamSid": self.result.stream_sid})
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.result.closed_by = "stage"  # it hung up while we spoke: the call is over, as on a phone

    # --- the call's 20 ms clock: send a frame, play a frame ----------------------------------------
    async def _talk(self, ws: aiohttp.ClientWebSocketResponse, receiving: asyncio.Future) -> None:
        outgoing: deque[bytes] = deque()  # the caller's frames still to say
        turn_index = -1
        waiting_for: str | None = None  # "reply_end", "barge", or None when speaking / done
        quiet_since: float | None = None
        replies_at_turn = 0
        start = self.result.started_at = time.monotonic()
        self.result.started_ns = time.time_ns()
        while not ws.closed and not receiving.done() and not self.result.closed_by:
            due = start + self.frame * ms.FRAME_MS / 1000
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            now = time.monotonic()
            # the caller's side: the next turn once its moment has come
            if not outgoing and waiting_for is None:
                if turn_index >= 0:
                    self.result.turn_ends_frame.append(self.frame)
                turn_index += 1
                # a reply to the turn just spoken is one that starts from now on
                replies_at_turn = len(self.result.replies)
                if turn_index >= len(self.turns):
                    waiting_for = "hang_up"
                else:
                    turn = self.turns[turn_index]
                    waiting_for = "barge" if turn.barge_in_ms is not None and turn_index > 0 else \
                        "reply_end" if turn_index > 0 else None
                    quiet_since = None
                    if waiting_for is None:  # the first turn, after a moment's silence on the new line
                        outgoing.extend([SILENT_FRAME] * int(LEAD_IN_S * 1000 / ms.FRAME_MS))
                        await self._say(turn, outgoing)
            elif waiting_for in ("reply_end", "hang_up"):
                # hanging up after the last turn's reply too
                pressed = self.turns[turn_index - 1].dtmf if 0 < turn_index <= len(self.turns) else ""
                unanswered_keys = bool(pressed) and now - self.said_at >= KEYS_REPLY_WAIT_S
                heard_reply = len(self.result.replies) > replies_at_turn or not self.turns or unanswered_keys
                quiet = not self.held and now - self.last_audio_at >= REPLY_QUIET_S
                if heard_reply and quiet:
                    quiet_since = quiet_since or now
                    wait = self.tail_s if waiting_for == "hang_up" else self.pause_s
                    if now - quiet_since >= wait:
                        if waiting_for == "hang_up":
                            return
                        waiting_for = None
                        await self._say(self.turns[turn_index], outgoing)
                else:
                    quiet_since = None
            elif waiting_for == "barge":
                reply = self.result.replies[-1] if len(self.result.replies) > replies_at_turn else None
                barge_in_ms = self.turns[turn_index].barge_in_ms or 0
                if reply is not None and len(reply.codes) >= barge_in_ms * 8:
                    waiting_for = None
                    await self._say(self.turns[turn_index], outgoing)
            frame = outgoing.popleft() if outgoing else SILENT_FRAME
            self.result.sent += frame
            await self._send({"event": "media", "media": {"track": "inbound", "chunk": str(self.frame + 1),
                                                          "timestamp": str(self.frame * ms.FRAME_MS),
                                                          "payload": _b64(frame)}})
            await self._play_frame(now)
            self.frame += 1

    async def _say(self, turn: Turn, outgoing: deque[bytes]) -> None:
        self.said_at = time.monotonic()
        self.result.turn_starts_frame.append(self.frame if turn.dtmf else self.frame + len(outgoing))  # keys: now
        if turn.dtmf:
            for digit in turn.dtmf:
                await self._send({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}})
            outgoing.append(SILENT_FRAME)
            return
        codes = g711.encode(turn.pcm, "pcmu")
        codes += SILENT_FRAME[:(-len(codes)) % FRAME]
        outgoing.extend(codes[i:i + FRAME] for i in range(0, len(codes), FRAME))

    async def _play_frame(self, now: float) -> None:
        """Play the next 20 ms of what is held (silence when nothing is). A mark is echoed once the audio
        before it has played out: at the start of the frame after that audio's last."""
        reply = self.result.replies[-1] if self.result.replies else None
        for name in self.pending_marks:  # they followed the last frame, which has now played out
            await self._echo(name)
            if reply is not None:
                reply.marks_played_ms.append(len(reply.codes) / 8)
        self.pending_marks = []
        played = bytearray()
        while self.held and len(played) < FRAME:
            head = self.held.popleft()
            if isinstance(head, str):
                if played:
                    self.pending_marks.append(head)  # it follows audio of this frame, not yet played out
                else:
                    await self._echo(head)  # it follows audio that has played
                continue
            take = head[:FRAME - len(played)]
            played += take
            if len(take) < len(head):
                self.held.appendleft(head[len(take):])
        while self.held and isinstance(self.held[0], str):  # marks right after this frame's audio
            self.pending_marks.append(self.held.popleft())  # type: ignore[arg-type]
        if played:
            self.last_audio_at = now
            if reply is None or reply.cleared or reply.end_frame < self.frame - int(REPLY_QUIET_S * 50):
                reply = Reply(self.frame, self.frame, first_heard_at=now)
                self.result.replies.append(reply)
            else:  # the same reply going on: anything short of whole frames since its last is a gap heard
                silent_ms = (self.frame - reply.end_frame - 1) * ms.FRAME_MS + self._short_ms
                if silent_ms > 0:
                    reply.gaps += 1
                    reply.gap_ms += silent_ms
            reply.codes += played
            reply.end_frame = self.frame
        self._short_ms = (FRAME - len(played)) / 8 if played else 0.0
        self.result.heard += bytes(played) + SILENT_FRAME[:FRAME - len(played)]

    async def _echo(self, name: str) -> None:
        self.result.marks_echoed += 1
        await self._send({"event": "mark", "mark": {"name": name}})

    # --- what the stage sends ------------------------------------------------------------------------
    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = ms.parse(message.data, ms.TO_CARRIER)
            except ms.MediaStreamError as exc:
                self.result.bad_messages.append(str(exc))
                continue
            if event.stream_sid != self.result.stream_sid:
                self.result.bad_messages.append(f"{event.event} for stream {event.stream_sid!r}")
                continue
            if isinstance(event, ms.OutboundMedia):
                try:
                    codes = ms.payload_codes(event.media.get("payload", ""))
                except ms.MediaStreamError as exc:
                    self.result.bad_messages.append(str(exc))
                    continue
                self.result.frames_received += 1
                self.last_audio_at = time.monotonic()
                self.held.append(codes)
            elif isinstance(event, ms.Mark):
                self.held.append(event.mark.name)
            elif isinstance(event, ms.Clear):
                dropped = sum(len(part) for part in self.held if isinstance(part, bytes))
                marks = [part for part in self.held if isinstance(part, str)]
                self.held.clear()
                if self.result.replies:
                    reply = self.result.replies[-1]
                    reply.cleared, reply.cleared_at_frame = True, self.frame
                self.result.clears.append({"frame": self.frame, "dropped_codes": dropped, "marks": len(marks)})
                self.result.marks_echoed_on_clear += len(marks)
                for name in marks:  # as Twilio does: the marks of dropped audio come back at once
                    await self._echo(name)
        self.result.closed_by = "stage"


def _b64(codes: bytes) -> str:
    return base64.b64encode(codes).decode()
