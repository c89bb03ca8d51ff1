"""Talk to a `voicebus web` or `voicebus serve` endpoint as a browser would, over real WebRTC.

The caller sends the same offer the page sends (`POST /offer`, a data channel for the page's
messages, one audio m-line both ways), speaks a WAV (then silence, as a live mic does: a stage
hangs up on a browser that sends no RTP for 3 s), records what it receives, and reads the page's
messages for transcripts and turn latency. It hangs up like the page (a `hangup` message).
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from common.pacing import FrameClock

MIC_RATE = 48_000
FRAME_MS = 20
OFFER_TIMEOUT_S = 30.0
# once the last reply was sent in full, this much quiet received after its last loud sample means all of
# it has arrived (counted in received audio, not wall time: a starved caller decodes late)
QUIET_AFTER_REPLY_S = 0.8
IN_FLIGHT_MAX_S = 5.0  # sent in full, but still arriving: no longer than this
QUIET_LEVEL = 300  # peak sample (of 32767) below which a received frame is silence
REPLY_PLAYOUT_MAX_S = 60.0
# taking turns by ear: a reply has played out after this much quiet received (longer than the pauses
# between a reply's sentences)
REPLY_QUIET_S = 1.5
LATE_AT_CALLER_MS = 100.0


class CallTimeout(TimeoutError):
    """A step of the call did not happen in time; says which."""


class CallRefused(RuntimeError):
    """The endpoint said no (busy, bad offer): the HTTP status and what it said."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class SpeakingTrack(MediaStreamTrack):
    """A microphone on a real-time clock: says `pcm` (48 kHz mono s16le) from the start, then whatever
    `say()` is given, and silence in between (as a live mic does)."""

    kind = "audio"

    def __init__(self, pcm: bytes = b"") -> None:
        super().__init__()
        self.script = bytearray(pcm)  # what the mic says, from its first sample on
        self.samples = MIC_RATE * FRAME_MS // 1000
        self.clock = FrameClock(self.samples, MIC_RATE)
        self.next_sample = 0  # the first sample of the next frame
        self._ends: list[tuple[int, asyncio.Future]] = []

    def say(self, pcm: bytes) -> asyncio.Future:
        """Speak `pcm` from the next frame on; the future gets the monotonic time its last frame left."""
        start = max(len(self.script) // 2, self.next_sample)
        self.script += bytes(2 * start - len(self.script)) + pcm
        done = asyncio.get_running_loop().create_future()
        self._ends.append((start + len(pcm) // 2, done))
        return done

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self.clock.tick()
        frame = AudioFrame(format="s16", layout="mono", samples=self.samples)
        frame.planes[0].update(bytes(self.script[2 * pts:2 * (pts + self.samples)]).ljust(2 * self.samples, b"\0"))
        frame.pts, frame.sample_rate = pts, MIC_RATE
        frame.time_base = fractions.Fraction(1, MIC_RATE)
        self.next_sample = pts + self.samples
        now = time.monotonic()
        for end, done in [e for e in self._ends if e[0] <= self.next_sample]:
            self._ends.remove((end, done))
            if not done.done():
                done.set_result(now)
        return frame


@dataclass
class CallResult:
    session: str = ""
    user: list[str] = field(default_factory=list)  # what the server heard, per turn
    assistant: list[str] = field(default_factory=list)  # what the assistant generated, per reply
    assistant_items: list[str | None] = field(default_factory=list)  # each reply's item id
    latency_ms: list[float] = field(default_factory=list)  # as the stage measured it (speech end -> heard)
    truncated: list[dict[str, Any]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)  # what the caller heard, 48 kHz mono s16le
    connect_ms: float = 0.0  # offer sent -> first audio frame received (the line is live)
    dial_late_ms: float = 0.0  # with dial_at: how late the offer went (the caller was not ready in time)
    gaps: int = 0  # received frames that did not follow on from the one before (lost or late audio)
    # frames of the assistant's voice that arrived more than LATE_AT_CALLER_MS behind the sender's own
    # timeline (pts, anchored at the least-delayed frame): later than a browser's jitter buffer holds,
    # so a browser would have played a gap. Silence is not counted: nobody hears it late
    late_frames: int = 0
    max_late_ms: float = 0.0
    quiet_samples: int = 0  # received since the last frame that was not silence
    heard_ms: list[float] = field(default_factory=list)  # at the caller: each sentence's end -> first reply sample
    page_messages: int = 0  # data-channel messages from the endpoint (a voicebus page's events; 0 elsewhere)
    listen_from: float | None = None  # monotonic time after which the next loud frame is a reply's first
    heard_at: float | None = None  # when it arrived

    def heard(self, index: int) -> tuple[str, dict[str, Any] | None]:
        """Reply `index` as the caller heard it: the words up to the cut when it was cut (and the cut)."""
        item = self.assistant_items[index] if index < len(self.assistant_items) else None
        cut = next((t for t in self.truncated if item is not None and t.get("item_id") == item), None)
        return (str(cut.get("heard") or "") if cut else self.assistant[index]), cut


async def call(url: str, pcm: bytes, turns: int, timeout_s: float, hang_up: bool = True, *,
               offer_path: str = "offer", utterances: list[bytes] | None = None, pause_s: float = 0.0,
               dial_at: float | None = None, result: CallResult | None = None) -> CallResult:
    """One call: speak `pcm`, wait for `turns` assistant replies, hang up; what was heard and said.

    With `utterances` the caller takes turns instead, counting by ear alone (any WebRTC endpoint, not
    only voicebus): after `pcm` (a lead-in) it speaks each one once the reply to the one before has
    played out (and `pause_s` after that), and times each reply at the caller (`heard_ms`). `offer_path` is where the endpoint
    takes offers (`offer` for voicebus; `api/offer` for pipecat's SmallWebRTC runner). With `dial_at`
    (wall-clock seconds since the epoch) everything is ready before it and the offer goes at that moment,
    as when a person presses Connect (`dial_late_ms`: how far past it the caller was when it could).
    `result` (a fresh one by default) fills as the call goes: a caller stopped midway still has the turns
    that were done.
    """
    result = result if result is not None else CallResult()
    peer = RTCPeerConnection()
    channel = peer.createDataChannel("voicebus")
    mic = SpeakingTrack(pcm)
    peer.addTrack(mic)
    replies = asyncio.Event()
    first_audio = asyncio.Event()
    reply_items: list[str | None] = []  # each reply's item id, in order
    sent_items: set[str | None] = set()  # replies the endpoint has sent in full (or cut)

    @channel.on("message")
    def on_message(text: str) -> None:
        message = json.loads(text)
        result.page_messages += 1
        kind = message.get("type")
        if kind == "hello":
            result.session = message.get("session", "")
        elif kind == "user_done":
            result.user.append(message.get("text", ""))
        elif kind == "assistant_done":
            result.assistant.append(message.get("text", ""))
            result.assistant_items.append(message.get("item_id"))
            reply_items.append(message.get("item_id"))
            if len(result.assistant) >= turns:
                replies.set()
        elif kind == "assistant_sent":
            sent_items.add(message.get("item_id"))
        elif kind == "turn":
            result.latency_ms.append(float(message.get("latency_ms", 0)))
        elif kind == "truncated":
            result.truncated.append(message)
            sent_items.add(message.get("item_id"))  # cut: nothing more of it comes

    @peer.on("track")
    def on_track(track) -> None:
        asyncio.ensure_future(_record(track, result, first_audio))

    if dial_at is not None:
        await asyncio.sleep(max(0.0, dial_at - time.time()))
        result.dial_late_ms = round(max(0.0, 1000 * (time.time() - dial_at)), 1)
    started = time.monotonic()
    try:
        await peer.setLocalDescription(await peer.createOffer())
        answer = await _post_offer(url, offer_path, {"type": "offer", "sdp": peer.localDescription.sdp,
                                         "mic": {"channelCount": 1, "sampleRate": MIC_RATE}})
        await peer.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await _within(first_audio.wait(), OFFER_TIMEOUT_S, "no audio arrived after the offer was answered")
        result.connect_ms = round(1000 * (time.monotonic() - started), 1)
        watch = asyncio.ensure_future(_watch_line(url, answer["session"])) if answer.get("node_id") else None
        if utterances is not None:
            waiting = asyncio.ensure_future(_within(
                _take_turns(mic, utterances, result, pause_s), timeout_s,
                lambda: f"fewer than {len(utterances)} replies heard (heard {len(result.heard_ms)})"))
        else:
            waiting = asyncio.ensure_future(_within(
                replies.wait(), timeout_s, lambda: f"fewer than {turns} replies (got {len(result.assistant)})"))
        done, _ = await asyncio.wait([t for t in (waiting, watch) if t], return_when=asyncio.FIRST_COMPLETED)
        for task in (waiting, watch):
            if task is not None and task not in done:
                task.cancel()
        next(iter(done)).result()  # the line dropped, or too few replies: raised here
        if utterances is not None:
            return result
        # the transcript comes with the reply's first audio: stay until the endpoint has sent all of the
        # last reply, then until what was in flight has arrived (it goes quiet)
        deadline = time.monotonic() + REPLY_PLAYOUT_MAX_S
        while time.monotonic() < deadline and reply_items[-1] not in sent_items:
            await asyncio.sleep(0.05)
        deadline = min(deadline, time.monotonic() + IN_FLIGHT_MAX_S)
        while time.monotonic() < deadline and result.quiet_samples < QUIET_AFTER_REPLY_S * MIC_RATE:
            await asyncio.sleep(0.05)
    finally:
        if hang_up and channel.readyState == "open":
            channel.send(json.dumps({"type": "hangup"}))
            await asyncio.sleep(0.1)
        await peer.close()
    return result


async def _take_turns(mic: SpeakingTrack, utterances: list[bytes], result: CallResult, pause_s: float) -> None:
    """Say each utterance, wait for the reply's first sample, then for it to play out (quiet received),
    then `pause_s` more before the next: a pause after the reply, however late the reply came."""
    for index, pcm in enumerate(utterances):
        if index and pause_s > 0:
            await asyncio.sleep(pause_s)
        ended = await mic.say(pcm)
        result.listen_from, result.heard_at = ended, None
        while result.heard_at is None:
            await asyncio.sleep(0.01)
        result.heard_ms.append(round(1000 * (result.heard_at - ended), 1))
        result.quiet_samples = 0
        deadline = time.monotonic() + REPLY_PLAYOUT_MAX_S
        while time.monotonic() < deadline and result.quiet_samples < REPLY_QUIET_S * MIC_RATE:
            await asyncio.sleep(0.02)


class LineDropped(RuntimeError):
    """`serve` says the conversation's node went away mid-call."""


async def _watch_line(url: str, session: str, interval_s: float = 1.0) -> None:
    """Under `serve`, ask the front door now and then what became of this call (a lost node cannot say)."""
    target = urllib.parse.urljoin(url if url.endswith("/") else url + "/", f"call/{session}")
    async with aiohttp.ClientSession() as http:
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with http.get(target, timeout=aiohttp.ClientTimeout(total=5)) as response:
                    state = await response.json() if response.status == 200 else {}
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue  # the front door busy or restarting: ask again
            if state.get("state") == "dropped":
                raise LineDropped(f"the line dropped: {state.get('reason', '')}")


async def _within(waiting, timeout_s: float, what: str | Callable[[], str]) -> None:
    """`what` did not happen in time: a string, or a function saying it as things stand at the timeout."""
    try:
        await asyncio.wait_for(waiting, timeout_s)
    except TimeoutError:
        raise CallTimeout(f"{what() if callable(what) else what} within {timeout_s:g} s") from None


async def _post_offer(url: str, path: str, offer: dict[str, Any]) -> dict[str, Any]:
    target = urllib.parse.urljoin(url if url.endswith("/") else url + "/", path.lstrip("/"))
    try:
        async with aiohttp.ClientSession() as session, \
                session.post(target, json=offer, timeout=aiohttp.ClientTimeout(total=OFFER_TIMEOUT_S)) as response:
            body = await response.text()
            status, retry = response.status, response.headers.get("Retry-After")
    except TimeoutError:
        raise CallTimeout(f"the offer was not answered within {OFFER_TIMEOUT_S:g} s") from None
    if status != 200:
        try:
            message = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            message = body[:200]
        raise CallRefused(status, message, float(retry) if retry else None)
    return json.loads(body)


async def _record(track, result: CallResult, first_audio: asyncio.Event) -> None:
    expected_pts = None
    anchor = None  # arrival minus pts of the least-delayed frame: the sender's timeline on this clock
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        channels = len(frame.layout.channels)
        samples = frame.to_ndarray().reshape(-1, channels)[:, 0]
        if frame.sample_rate != MIC_RATE:
            from common.resample import float_to_pcm, resample_oneshot

            samples = np.frombuffer(float_to_pcm(resample_oneshot(samples.astype(np.float64) / 32768,
                                                                  frame.sample_rate, MIC_RATE)), "<i2")
        if expected_pts is not None and frame.pts != expected_pts:
            result.gaps += 1
        expected_pts = frame.pts + frame.samples
        result.received += np.ascontiguousarray(samples, dtype="<i2").tobytes()
        arrived = time.monotonic()
        offset = arrived - frame.pts / frame.sample_rate
        anchor = offset if anchor is None else min(anchor, offset)
        if len(samples) and int(np.abs(samples.astype(np.int32)).max()) > QUIET_LEVEL:
            late_ms = 1000 * (offset - anchor)
            result.max_late_ms = max(result.max_late_ms, round(late_ms, 1))
            if late_ms > LATE_AT_CALLER_MS:
                result.late_frames += 1
            result.quiet_samples = 0
            if result.listen_from is not None and result.heard_at is None and time.monotonic() > result.listen_from:
                result.heard_at = time.monotonic()
        else:
            result.quiet_samples += len(samples)
        first_audio.set()
