"""The web stage's network side: aiohttp serves the page and takes WebRTC offers; aiortc carries Opus.

Runs on an asyncio loop in a thread of its own; the stage (runner thread) talks to it only through
`send_page` (thread-safe) and the PlaybackBuffer the outgoing track drains. One browser at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame
from av.packet import Packet

from common.log import RateLimitedLog, kv
from common.pacing import FrameClock
from common.stage import StageError
from services.stages.loop_server import LoopServer, RemoteOutput
from services.stages.playback import PlaybackBuffer
from services.stages.web import libopus, page_messages, reports
from services.stages.web.connections import guarded_runner
from services.stages.web.opus import LoopDecoding, MicFrame, VoiceEncoder, mono_frame
from services.stages.web.placement import OFFER_SECRET_ENV, OFFER_SECRET_HEADER
from services.stages.web.sdp import OfferError, parse_offer

log = logging.getLogger("voicebus.web")
# aioice narrates every candidate pair at INFO; our own lines say when a browser connects and goes
for _chatty in ("aioice", "aiortc"):
    if logging.getLogger(_chatty).level == logging.NOTSET:
        logging.getLogger(_chatty).setLevel(logging.WARNING)
STATIC = Path(__file__).resolve().parent / "static"
FRAME_MS = 20
MIC_SILENT_TIMEOUT_S = 3.0  # a browser sends RTP every 20 ms, muted or not: this long without any, it is gone
MAX_OFFER_BYTES = 256 * 1024
MAX_PAGE_QUEUE = 512  # events queued for a data channel that is not open yet
# aiortc holds 4 audio frames (80 ms) before decoding, for reordering on the open internet; on
# loopback or a LAN one is enough, and 60 ms less from mouth to server (`voicebus web --rx-prefetch`)
RX_PREFETCH_FRAMES = 1


class AssistantTrack(MediaStreamTrack):
    """`audio.assistant` for the browser: 20 ms frames drained from the player's buffer on its own clock.

    aiortc asks for the next frame as soon as it has sent one; pacing is the track's job (as in
    aiortc's AudioStreamTrack). A frame is pulled when its first sample is due, so what was pulled
    is what left for the browser; a flush empties the buffer and the next frame is silence.
    """

    kind = "audio"

    def __init__(self, buffer: PlaybackBuffer, encode: bool = True) -> None:
        super().__init__()
        self.buffer = buffer
        # Opus-encode here (24 kHz mono, in the loop) rather than in aiortc's worker thread (48 kHz stereo)
        self.encoder = VoiceEncoder(buffer.rate) if encode else None
        self.samples = buffer.rate * FRAME_MS // 1000
        self.clock = FrameClock(self.samples, buffer.rate)
        # the loop came back for a frame of the assistant's audio more than a frame after it was due
        # (a late frame of silence, while the call is set up or nobody speaks, is heard by nobody)
        self.late_frames = 0
        self.max_lateness_ms = 0.0

    async def recv(self) -> AudioFrame | Packet:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self.clock.tick()
        lateness_ms = 1000 * self.clock.lateness_s
        pcm = self.buffer.pull(self.samples)
        if self.buffer.playing:
            self.max_lateness_ms = max(self.max_lateness_ms, lateness_ms)
            if lateness_ms > FRAME_MS:
                self.late_frames += 1
        packet = self.encoder.encode(pcm, pts) if self.encoder is not None else None
        if packet is not None:
            return packet
        return mono_frame(pcm, pts, self.buffer.rate)


@dataclass
class BrowserStats:
    """What the page reports of its own playout (getStats + AudioContext), every half second."""

    jitter_buffer_ms: float = 0.0
    output_latency_ms: float = 0.0
    rtt_ms: float = 0.0

    @property
    def delay_ms(self) -> float:
        """Sent by us -> heard: the browser's jitter buffer, its audio output, half the round trip."""
        return self.jitter_buffer_ms + self.output_latency_ms + self.rtt_ms / 2


@dataclass
class Client:
    peer: RTCPeerConnection
    remote: str
    started_ns: int = field(default_factory=time.time_ns)
    channel: Any = None
    pending: list[str] = field(default_factory=list)
    mic_settings: dict[str, Any] = field(default_factory=dict)
    closing: bool = False
    mic_at: float = 0.0  # monotonic time of the last mic frame (or of the mic track's start)


class BrowserLink(LoopServer, RemoteOutput):
    """aiohttp + aiortc on their own asyncio loop; hands mic frames and page events to callbacks."""

    what = "web server"
    busy_port_hint = "another web stage running? --port 0 picks a free port"

    def __init__(self, host: str, port: int, buffer: PlaybackBuffer, *,
                 on_mic_frame: Callable[[AudioFrame | MicFrame, int, dict[str, Any]], None],
                 on_client: Callable[[str, dict[str, Any]], None],
                 ssl_context: ssl.SSLContext | None = None, rx_prefetch: int = RX_PREFETCH_FRAMES,
                 aiortc_encoder: bool = False, aiortc_decoder: bool = False, mic_rate: int = 24_000) -> None:
        super().__init__(host, port, "web-loop")
        self.buffer, self.rx_prefetch = buffer, rx_prefetch
        self.aiortc_encoder = aiortc_encoder  # aiortc encodes the assistant's audio, not the track
        self.aiortc_decoder = aiortc_decoder  # aiortc decodes the mic (48 kHz stereo, in its thread)
        self.mic_rate = mic_rate  # what LoopDecoding decodes the browser's Opus to
        if not aiortc_decoder:
            try:
                libopus.load()  # now, not at the first caller's first packet
            except libopus.LibOpusMissing as exc:
                raise StageError(str(exc)) from None
        self.decoding: LoopDecoding | None = None  # the current caller's
        self._decode_errors_before = 0  # earlier callers'
        self.on_mic_frame, self.on_client = on_mic_frame, on_client
        self.ssl_context = ssl_context
        self.stats = BrowserStats()
        self.client: Client | None = None
        self.track: AssistantTrack | None = None
        self.counts = {"clients": 0, "busy_refused": 0, "bad_offers": 0, "bad_page_messages": 0, "clients_gone": 0,
                       "unplaced_refused": 0}
        self.offer_secret = os.environ.get(OFFER_SECRET_ENV, "")
        self.refusals = RateLimitedLog(log)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self.hello: dict[str, Any] = {}  # sent to every page that connects (session id, report dir)
        self.report_secret = reports.new_secret()  # keys the link to each caller's own report
        self.report_dirs: dict[str, str] = {}  # session -> its directory in the store, as the logger said

    # --- the player's sink contract (read by PlayerStage for state and heartbeat) -----------------
    @property
    def latency_ms(self) -> float:
        return round(self.stats.delay_ms, 1)

    @property
    def late_callbacks(self) -> int:
        return self.track.late_frames if self.track else 0

    @property
    def max_callback_gap_ms(self) -> float:
        return self.track.max_lateness_ms if self.track else 0.0

    def send_page(self, message: dict[str, Any]) -> None:
        """Thread-safe: one JSON event to the connected page (dropped when no page is connected)."""
        if self.client is not None:
            self.loop.call_soon_threadsafe(self._send, json.dumps(message))

    def hang_up(self, reason: str) -> None:
        """Thread-safe: end the current caller's call from our side (the page is told why first)."""
        if self.client is not None:
            self.send_page({"type": "ended", "reason": reason})
            asyncio.run_coroutine_threadsafe(self._hang_up(reason), self.loop)

    # --- the loop's thread ------------------------------------------------------------------------
    async def _serve(self) -> None:
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self._page)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/report/{session}", self._report)
        app.router.add_static("/static/", STATIC)
        self._runner = guarded_runner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1] if self.port == 0 else self.port
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://{self.host}:{port}/"

    async def _shutdown(self) -> None:
        await self._hang_up("stage stopping")
        if self._runner is not None:
            await self._runner.cleanup()

    async def _report(self, request: web.Request) -> web.StreamResponse:
        session = request.match_info.get("session", "")
        return reports.report_response(request, self.report_secret, self.report_dirs.get(session))

    def _unplaced(self, request: web.Request) -> web.Response | None:
        """Under `serve`: a request that did not come through this set's host is refused, touching nothing."""
        if not self.offer_secret or hmac.compare_digest(request.headers.get(OFFER_SECRET_HEADER, "").encode(),
                                                        self.offer_secret.encode()):
            return None
        self.counts["unplaced_refused"] += 1
        self.refusals.warning("unplaced", kv("unplaced_refused", remote=request.remote, path=request.path))
        return web.json_response({"error": "this conversation takes calls only from its voicebus serve front door"},
                                 status=403)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        refused = self._unplaced(request)
        if refused is not None:
            return refused
        if self.client is not None:
            self.counts["busy_refused"] += 1
            log.warning(kv("busy", refused=request.remote, connected=self.client.remote))
            return web.FileResponse(STATIC / "busy.html", status=409)
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def _refuse(self, status: int, error: str, remote: str | None) -> web.Response:
        if status == 409:
            self.counts["busy_refused"] += 1
        else:
            self.counts["bad_offers"] += 1
        log.warning(kv("offer_refused", remote=remote, status=status, error=repr(error)))
        return web.json_response({"error": error}, status=status)

    async def _offer(self, request: web.Request) -> web.Response:
        refused = self._unplaced(request)
        if refused is not None:
            return refused
        if self.client is not None:
            return self._refuse(409, "busy: this voicebus web stage is in a conversation with another browser "
                                     "(one conversation per web stage); try again when it hangs up", request.remote)
        try:  # before the caller slot is touched: a bad offer leaves this stage as it was
            body = parse_offer(await request.read())
        except OfferError as exc:
            return self._refuse(400, f"malformed offer: {exc}", request.remote)
        offer = RTCSessionDescription(sdp=body["sdp"], type="offer")
        peer = RTCPeerConnection()
        client = Client(peer, str(request.remote), mic_settings=body.get("mic") if isinstance(body.get("mic"), dict) else {})
        self.client = client  # taken before the first await below: a second offer meanwhile is busy
        try:
            self.track = AssistantTrack(self.buffer, encode=not self.aiortc_encoder)
            self._wire(client)
            await peer.setRemoteDescription(offer)
            for transceiver in peer.getTransceivers():
                _set_prefetch(transceiver.receiver, self.rx_prefetch)
                if not self.aiortc_decoder:
                    self._decode_in_loop(transceiver.receiver)
            if not any(t.kind == "audio" for t in peer.getTransceivers()):
                raise ValueError("the offer has no audio section")
            peer.addTrack(self.track)  # joins the offer's audio transceiver: one m-line, both ways
            await peer.setLocalDescription(await peer.createAnswer())
        except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds for a bad SDP; all mean 400
            self.client = None
            await peer.close()
            return self._refuse(400, f"malformed offer: {type(exc).__name__}: {exc}", request.remote)
        self.counts["clients"] += 1
        log.info(kv("client_connected", remote=client.remote, mic=json.dumps(client.mic_settings, sort_keys=True)))
        self.on_client("connected", {"remote": client.remote, "mic": client.mic_settings})
        return web.json_response({"type": "answer", "sdp": peer.localDescription.sdp})

    def _wire(self, client: Client) -> None:
        peer = client.peer

        @peer.on("datachannel")
        def on_datachannel(channel) -> None:
            client.channel = channel
            for text in client.pending:
                channel.send(text)
            client.pending.clear()
            channel.send(json.dumps({"type": "hello", **self.hello}))

            @channel.on("message")
            def on_message(text) -> None:
                self._page_message(client, text)

        @peer.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                asyncio.ensure_future(self._read_mic(client, track))

        @peer.on("connectionstatechange")
        async def on_state() -> None:
            log.info(kv("client_state", remote=client.remote, state=peer.connectionState))
            if peer.connectionState in ("failed", "closed"):
                await self._hang_up(f"connection {peer.connectionState}", client)

    async def _read_mic(self, client: Client, track) -> None:
        """Every mic frame to the stage as it comes. A browser that stops sending is noticed by a
        watchdog beside it, not by a timeout on each frame (a task and a timer 50 times a second)."""
        client.mic_at = time.monotonic()
        watchdog = asyncio.ensure_future(self._watch_mic(client))
        try:
            while self.client is client:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                client.mic_at = time.monotonic()
                self.on_mic_frame(frame, time.time_ns(), client.mic_settings)
        finally:
            watchdog.cancel()

    async def _watch_mic(self, client: Client) -> None:
        while self.client is client:
            silent_s = time.monotonic() - client.mic_at
            if silent_s >= MIC_SILENT_TIMEOUT_S:
                self.counts["clients_gone"] += 1
                await self._hang_up(f"no audio from the browser for {MIC_SILENT_TIMEOUT_S:.0f} s (closed or "
                                    "lost without hanging up)", client)
                return
            await asyncio.sleep(MIC_SILENT_TIMEOUT_S - silent_s + 0.01)

    def _page_message(self, client: Client, text: Any) -> None:
        try:
            message = page_messages.parse(text)
        except page_messages.BadPageMessage as exc:
            self.counts["bad_page_messages"] += 1
            self.refusals.warning("bad_page_message", kv("bad_page_message", why=repr(str(exc)[:120])))
            return
        if isinstance(message, page_messages.Stats):
            self.stats = BrowserStats(message.jitter_buffer_ms, message.output_latency_ms, message.rtt_ms)
        else:
            asyncio.ensure_future(self._hang_up("the caller hung up", client))

    def _send(self, text: str) -> None:
        client = self.client
        if client is None:
            return
        if client.channel is not None and client.channel.readyState == "open":
            client.channel.send(text)
        elif len(client.pending) < MAX_PAGE_QUEUE:
            client.pending.append(text)

    async def _hang_up(self, reason: str, client: Client | None = None) -> None:
        client = client or self.client
        if client is None or client.closing:
            return
        client.closing = True
        if self.client is client:
            self.client = None
        if self.track is not None:
            self.track.stop()
        log.info(kv("client_gone", remote=client.remote, reason=repr(reason),
                    seconds=round((time.time_ns() - client.started_ns) / 1e9, 1)))
        self.on_client("gone", {"remote": client.remote, "reason": reason})
        await client.peer.close()


    def _decode_in_loop(self, receiver: Any) -> None:
        """Swap an audio receiver's decoder queue for `LoopDecoding`, before `receive()` starts the
        thread that reads it (that happens once DTLS is up, after the answer)."""
        names = ("_RTCRtpReceiver__decoder_queue", "_RTCRtpReceiver__decoder_thread", "_RTCRtpReceiver__kind")
        if receiver is None or not all(hasattr(receiver, name) for name in names):
            log.warning(kv("decoding", where="aiortc thread", why="this aiortc's receiver has no decoder queue to swap"))
            return
        if getattr(receiver, names[2]) != "audio" or getattr(receiver, names[1]) is not None:
            return
        if self.decoding is not None:  # the last caller's errors stay in the heartbeat's count
            self._decode_errors_before += self.decoding.decode_errors
        self.decoding = LoopDecoding(receiver.track._queue, self.mic_rate)
        setattr(receiver, names[0], self.decoding)

    @property
    def decode_errors(self) -> int:
        return self._decode_errors_before + (self.decoding.decode_errors if self.decoding else 0)


def _set_prefetch(receiver: Any, frames: int) -> None:
    """aiortc fixes its audio jitter buffer at construction (prefetch 4); replace it before media flows."""
    from aiortc.jitterbuffer import JitterBuffer

    attribute = "_RTCRtpReceiver__jitter_buffer"
    if receiver is not None and getattr(receiver, "_RTCRtpReceiver__kind", "") == "audio" and hasattr(receiver, attribute):
        setattr(receiver, attribute, JitterBuffer(capacity=16, prefetch=frames))
