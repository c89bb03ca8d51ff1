"""Phone calls: G.711 end to end, the Media Streams door, barge-in at what the phone played.

The carrier is `services.serving.call.carrier.FakeCarrier` (what `voicebus call --carrier twilio`
runs): real websockets, real-time pacing, marks echoed as played, `clear` honoured as Twilio does.
"""

from __future__ import annotations

import array
import asyncio
import json
import time
import warnings
from pathlib import Path

import aiohttp
import pytest

from common import g711
from common.ports import free_port
from common.realtime_types import validate_client_event
from common.utterances import speech_pcm
from common.wavio import read_wav
from services.serving.call.carrier import FakeCarrier, Turn
from services.stages.gateway.session import SessionSettings, session_update
from services.stages.phone import media_streams as ms
from services.stages.phone import twiml

FRAME = ms.FRAME_BYTES


# --- units ------------------------------------------------------------------------------------------
def test_g711_is_bit_exact_with_the_reference_coder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # the reference (Sun's g711.c), deprecated and gone in 3.13: only here
    every_sample = array.array("h", range(-32768, 32768)).tobytes()
    every_code = bytes(range(256))
    assert g711.encode(every_sample, "pcmu") == audioop.lin2ulaw(every_sample, 2)
    assert g711.encode(every_sample, "pcma") == audioop.lin2alaw(every_sample, 2)
    assert g711.decode(every_code, "pcmu") == audioop.ulaw2lin(every_code, 2)
    assert g711.decode(every_code, "pcma") == audioop.alaw2lin(every_code, 2)
    # decoding and encoding again gives the codes back, but for μ-law's negative zero
    assert g711.encode(g711.decode(every_code, "pcmu"), "pcmu") == every_code.replace(b"\x7f", b"\xff")


def test_a_bus_frame_says_its_format_and_g711_is_one_byte_a_sample():
    from common.envelope import EnvelopeError, Stamper, decode, encode

    stamper = Stamper("phone", "s1")
    frame = stamper.audio("audio.user", b"\xff" * 161, rate=8000, channels=1, pts=0, t_capture_ns=1, t_ns=1, fmt="pcmu")
    decoded = decode(encode(frame))
    assert (decoded.header.fmt, decoded.samples, decoded.duration_ms) == ("pcmu", 161, 20.125)
    odd_pcm = stamper.audio("audio.user", b"\x00" * 161, rate=8000, channels=1, pts=0, t_capture_ns=1, t_ns=1)
    with pytest.raises(EnvelopeError, match="whole s16le frames"):
        decode(encode(odd_pcm))


def test_the_webhook_signature_is_twilios():
    """Twilio's published example (its helper libraries' tests): token 12345, this URL and these parameters."""
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234", "From": "+14158675309",
              "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twiml.signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twiml.signature_ok("12345", url, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twiml.signature_ok("12345", url, {**params, "Digits": "9999"}, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twiml.signature_ok("54321", url, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


@pytest.mark.parametrize(("text", "reason"), [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"event": "party"}', "unknown_event"),
    ('{"event": "media", "streamSid": "MZ1"}', "bad_fields"),
    ('{"event": "start", "start": {"streamSid": "MZ1"}}', "bad_fields"),
    ('{"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "12"}}', "bad_fields"),
    ('{"event": "media", "streamSid": "MZ1", "media": {"timestamp": "-5", "payload": ""}}', "bad_fields"),
])
def test_malformed_media_streams_messages_are_named(text, reason):
    with pytest.raises(ms.MediaStreamError) as error:
        ms.parse(text)
    assert error.value.reason == reason and str(error.value)


def test_twilios_string_counters_parse():
    media = ms.parse('{"event": "media", "sequenceNumber": "3", "streamSid": "MZ1", "media": {"track": "inbound", '
                     '"chunk": "2", "timestamp": "20", "payload": "/w=="}}')
    assert (media.sequence_number, media.media.chunk, media.media.timestamp, media.codes()) == (3, 2, 20, b"\xff")


@pytest.mark.parametrize("protocol", ["ga", "beta"])
def test_a_mulaw_session_update_is_valid_for_the_sdk(protocol):
    event = session_update(SessionSettings(audio_format="pcmu"), protocol)
    validate_client_event(event, protocol)
    if protocol == "ga":
        assert event["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert event["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    else:
        assert event["session"]["input_audio_format"] == event["session"]["output_audio_format"] == "g711_ulaw"


def test_a_hold_clears_the_carrier_and_sends_again_what_it_had_not_played():
    """player.hold on a phone line: `clear`, and the frames sent but not yet played (no mark echoed) go back
    to the buffer, so that on resuming the caller hears the reply from where it was heard, nothing skipped."""
    from services.stages.phone.line import PhoneLine
    from services.stages.playback import PlaybackBuffer, Segment

    buffer = PlaybackBuffer(g711.RATE, jitter_ms=0, sample_bytes=1)
    line = PhoneLine("127.0.0.1", 0, buffer, on_audio=lambda *a: None, on_call=lambda *a: None,
                     on_dtmf=lambda d: None, lead_ms=200)
    line.start()
    reply = bytes(i % 200 + 20 for i in range(8000))  # 1 s of distinct codes: where each frame came from shows

    async def carrier() -> tuple[list[bytes], list[str], list[bytes]]:
        async with aiohttp.ClientSession() as session, session.ws_connect(line.url) as ws:
            await ws.send_json({"event": "start", "streamSid": "MZ1", "start": {
                "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"], "customParameters": {},
                "mediaFormat": dict(ms.MULAW)}})
            for _ in range(500):  # once the call has started (a new call empties the buffer), the reply arrives
                if line.call is not None:
                    break
                await asyncio.sleep(0.01)
            buffer.push(Segment("item_1", 0, "resp_1", reply))
            frames: list[bytes] = []
            while len(frames) < 8:  # 160 ms sent; the carrier has played 3 frames of it
                message = json.loads((await ws.receive(timeout=5)).data)
                if message["event"] == "media":
                    frames.append(ms.payload_codes(message["media"]["payload"]))
                elif message["event"] == "mark" and message["mark"]["name"] == "3":
                    await ws.send_json({"event": "mark", "streamSid": "MZ1", "mark": {"name": "3"}})
            await asyncio.sleep(0.1)
            buffer.hold(True)
            taken_ms = line.take_back_unplayed()
            after_hold = []
            while True:
                message = json.loads((await ws.receive(timeout=5)).data)
                after_hold.append(message["event"])
                if message["event"] == "clear":
                    break
            buffer.hold(False)
            resent: list[bytes] = []
            while not resent:
                message = json.loads((await ws.receive(timeout=5)).data)
                if message["event"] == "media":
                    resent.append(ms.payload_codes(message["media"]["payload"]))
            return frames, after_hold, resent, taken_ms

    try:
        frames, after_hold, resent, taken_ms = asyncio.run(carrier())
    finally:
        line.stop()
    assert frames[:3] == [reply[i * FRAME:(i + 1) * FRAME] for i in range(3)]
    assert after_hold[-1] == "clear" and line.counts["hold_clears"] == 1
    assert taken_ms >= 5 * ms.FRAME_MS  # at least the 5 frames sent after the last echoed mark
    assert resent[0] == reply[3 * FRAME:4 * FRAME], "resumed from the first frame the carrier had not played"


# --- end to end ----------------------------------------------------------------------------------
def _start_phone_pipeline(procs, tmp_path: Path, *args: str) -> tuple[object, int, Path, Path]:
    port = free_port()
    traces, ws_log = tmp_path / "traces", tmp_path / "ws.jsonl"
    up = procs.voicebus("up", "--phone", "--arg", f"phone=--port {port}", "--arg", f"gateway=--ws-log {ws_log}",
                        *args, env={"VOICEBUS_TRACE_DIR": str(traces)})
    return up, port, traces, ws_log


def _wait_ready(client_factory_no_bus, up, procs) -> object:
    health = client_factory_no_bus(["health."])
    seen: set[str] = set()

    def ready(message) -> bool:
        seen.add(message.topic)
        if up.poll() is not None:
            raise AssertionError(f"up exited {up.returncode}:\n{procs.log_of(up)[-3000:]}")
        return {"health.phone", "health.logger", "health.tools"} <= seen and \
            message.topic == "health.gateway" and bool(message.data.get("session_configured"))

    health.wait_for(ready, timeout_s=90)
    return health


def _stop(up) -> None:
    up.send_signal(2)
    up.wait(timeout=30)


def _turns(traces: Path) -> list[dict]:
    [session] = [path for path in traces.iterdir() if (path / "turns.jsonl").exists()]
    return [json.loads(line) for line in (session / "turns.jsonl").read_text().splitlines()], session


@pytest.mark.timeout(240)
def test_a_phone_calls_mulaw_goes_to_the_server_and_back_untouched(procs, tmp_path, client_factory_no_bus):
    """The simulator's --echo plays the caller's turn back as it came: with the session in audio/pcmu, the
    codes the carrier hears are the codes it sent, bit for bit, and nothing on the way decoded them."""
    up, port, traces, ws_log = _start_phone_pipeline(procs, tmp_path, "--arg", "simulator=--echo")
    health = _wait_ready(client_factory_no_bus, up, procs)
    questions = [speech_pcm("please repeat what i am saying now", "slt", g711.RATE),
                 speech_pcm("and now say this one back to me", "rms", g711.RATE)]
    result = asyncio.run(FakeCarrier(f"ws://127.0.0.1:{port}/media", [Turn(q) for q in questions],
                                     timeout_s=90).run())

    assert len(result.replies) == 2, f"the carrier heard {len(result.replies)} replies to two turns"
    for reply in result.replies:  # each turn came back as it was sent, in order
        echoed = bytes(reply.codes)
        echoed = echoed[:len(echoed) - FRAME]  # the last frame may be padded with silence to 20 ms
        assert len(echoed) >= 8 * 1000, f"only {len(echoed) / 8:.0f} ms came back"
        assert bytes(result.sent).find(echoed) >= 0, "what came back is not what was sent, bit for bit"
    assert len(result.heard_ms()) == 2 and all(ms_ > 0 for ms_ in result.heard_ms()), result.heard_ms()

    phone = health.wait_for(lambda m: m.topic == "health.phone" and m.data.get("audio_passed_out", 0) > 0)
    gateway = health.wait_for(lambda m: m.topic == "health.gateway")
    assert phone.data["audio_converted_in"] == phone.data["audio_converted_out"] == 0
    assert phone.data["audio_passed_in"] > 0 and phone.data["bad_messages"] == 0
    assert gateway.data["audio_converted"] == 0
    sent = [record["event"] for record in map(json.loads, ws_log.read_text().splitlines()) if record["dir"] == "out"]
    update = next(e for e in sent if e.get("type") == "session.update")
    audio = update["session"]["audio"]
    assert audio["input"]["format"] == audio["output"]["format"] == {"type": "audio/pcmu"}
    appends = [e for e in sent if e.get("type") == "input_audio_buffer.append"]
    assert appends and all(e["audio_bytes"] == FRAME for e in appends[:50]), "20 ms of μ-law is 160 bytes"
    _stop(up)
    turns, _ = _turns(traces)
    assert turns[0]["audio_rate"] == 8000


@pytest.mark.timeout(300)
def test_a_barge_in_over_the_phone_cuts_where_the_carrier_had_played(procs, tmp_path, client_factory_no_bus):
    up, port, traces, _ = _start_phone_pipeline(procs, tmp_path)
    health = _wait_ready(client_factory_no_bus, up, procs)
    turns_said = [Turn(speech_pcm("tell me a story about dragons", "slt", g711.RATE)),
                  Turn(speech_pcm("stop please", "rms", g711.RATE), barge_in_ms=1500),
                  Turn(b"", dtmf="7")]
    result = asyncio.run(FakeCarrier(f"ws://127.0.0.1:{port}/media", turns_said, timeout_s=120).run())
    time.sleep(1.0)
    ended_ns = time.time_ns()
    phone = health.wait_for(lambda m: m.topic == "health.phone" and m.header.t_ns > ended_ns, timeout_s=30)
    _stop(up)
    turns, session = _turns(traces)

    cut_reply = result.replies[0]
    assert cut_reply.cleared and len(result.clears) == 1, result.clears
    story = turns[0]["assistant"]
    assert story["barge_in"] and story["status"] == "cancelled", story
    cut_ms = story["played_ms"]
    # the cut is the last mark the stage had back when it cleared. Marks the carrier echoed as played that
    # were still on their way then (a loaded machine: the stage read them late) come back after the clear,
    # as Twilio's marks of dropped audio do, so they cannot count: the cut is that much short of the
    # carrier's last, never beyond it, and every mark is accounted for
    last_mark_ms = max(ms_ for ms_ in cut_reply.marks_played_ms)
    in_flight = sum(1 for ms_ in cut_reply.marks_played_ms if ms_ > cut_ms + ms.FRAME_MS / 2)
    print(f"cut {cut_ms} ms; the carrier's last echoed mark {last_mark_ms} ms; {in_flight} mark(s) in flight")
    assert cut_ms in cut_reply.marks_played_ms, (cut_ms, cut_reply.marks_played_ms[-5:])
    assert phone.data["marks_stale"] == result.marks_echoed_on_clear + in_flight, (phone.data, in_flight)
    assert abs(cut_ms + in_flight * ms.FRAME_MS - last_mark_ms) <= ms.FRAME_MS / 2, (cut_ms, last_mark_ms)
    # stored as heard: the carrier's codes up to the cut, sample for sample (it heard at most the frame
    # that was playing when the clear came beyond the last mark it echoed)
    stored = read_wav(session / story_file(turns[0], "assistant-played"))
    heard = g711.decode(bytes(cut_reply.codes), "pcmu")
    assert stored.rate == 8000
    assert stored.pcm == heard[:len(stored.pcm)]
    assert 0 <= len(heard) - len(stored.pcm) <= (2 + in_flight) * 2 * FRAME, (len(heard), len(stored.pcm))
    # after the clear the caller heard only the answer to "stop please", from its first sample; then the key
    # pressed was told to the model as the caller's turn, and answered
    assert len(turns) == 3 and turns[1]["user"]["audio_start_ms"] > turns[0]["user"]["audio_end_ms"], turns
    assert turns[2]["user"]["keys"] == "7" and "pressed 7" in turns[2]["assistant"]["transcript_heard"], turns[2]
    answer = read_wav(session / story_file(turns[1], "assistant-generated"))
    after = g711.decode(bytes(result.replies[1].codes), "pcmu")
    assert after[:len(answer.pcm)] == answer.pcm[:len(after)]
    assert result.marks_echoed_on_clear == result.clears[0]["marks"]
    events = [json.loads(line) for line in (session / "events.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "dtmf" and e.get("digit") == "7" for e in events)


def story_file(turn: dict, name: str) -> str:
    return turn["audio_files"][name]


@pytest.mark.timeout(120)
def test_bad_input_on_the_phone_line_is_counted_and_refused_never_a_traceback(procs, bus, client_factory):
    port = free_port()
    stage = procs.voicebus("phone", "--port", str(port), env={"VOICEBUS_OFFER_SECRET": "placed-call-token"})
    health = client_factory(["health.phone", "session."])
    health.wait_for(lambda m: m.topic == "health.phone", timeout_s=30)
    url = f"ws://127.0.0.1:{port}/media"
    start = {"event": "start", "streamSid": "MZgood", "start": {
        "streamSid": "MZgood", "callSid": "CA1", "tracks": ["inbound"], "customParameters": {"token": "placed-call-token"},
        "mediaFormat": dict(ms.MULAW)}}

    async def scenario() -> dict[str, bool]:
        closed = {}
        async with aiohttp.ClientSession() as session:
            # an unplaced call (no token) and a wrong media format: refused, the socket closed
            async with session.ws_connect(url) as ws:
                await ws.send_json({**start, "start": {**start["start"], "customParameters": {}}})
                closed["unplaced"] = (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
            async with session.ws_connect(url) as ws:
                await ws.send_json({**start, "start": {**start["start"], "mediaFormat": {
                    "encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}}})
                closed["bad_format"] = (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
            # garbage, media before start, then a good call with a stranger's streamSid, then gone unannounced
            ws = await session.ws_connect(url)
            await ws.send_str("{not json")
            await ws.send_str('{"event": "weather"}')
            await ws.send_json({"event": "media", "streamSid": "MZgood", "media": {"payload": "/w=="}})
            await ws.send_json(start)
            await ws.send_json({"event": "media", "streamSid": "MZother", "media": {"payload": "/w=="}})
            await ws.send_json({"event": "media", "streamSid": "MZgood", "media": {"payload": "***"}})
            await asyncio.sleep(0.5)
            await ws.close()  # no `stop`: the carrier vanished
        return closed

    closed = asyncio.run(scenario())
    assert closed == {"unplaced": True, "bad_format": True}
    health.wait_for(lambda m: m.topic == "session.end", timeout_s=10)  # the call is over: the slot is free
    counts = health.wait_for(lambda m: m.topic == "health.phone" and m.data.get("calls") == 1 and
                             m.data.get("media_before_start", 0) >= 1, timeout_s=10).data
    assert counts["unplaced_refused"] == 1 and counts["bad_format_refused"] == 1
    assert counts["bad_messages"] >= 3 and counts["unknown_stream"] == 1 and not counts["on_line"]
    assert stage.poll() is None
    log = procs.log_of(stage)
    assert "Traceback" not in log
    for reason in ("unplaced_refused", "bad_format_refused", "media_before_start", "unknown_stream"):
        assert reason in log, f"no log line for {reason}"


@pytest.mark.timeout(60)
def test_the_phone_stage_answers_a_voice_webhook_with_twiml(procs, bus, client_factory):
    port = free_port()
    procs.voicebus("phone", "--port", str(port), "--public-url", "wss://phone.example/media")
    client_factory(["health.phone"]).wait_for(lambda m: m.topic == "health.phone", timeout_s=30)

    async def post() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, \
                session.post(f"http://127.0.0.1:{port}/twilio/voice", data={"CallSid": "CA1"}) as response:
            return response.status, await response.text()

    status, body = asyncio.run(post())
    assert status == 200 and '<Connect><Stream url="wss://phone.example/media">' in body


@pytest.mark.timeout(180)
def test_a_caller_who_goes_quiet_is_asked_then_hung_up_on_and_the_line_is_free(procs, tmp_path, client_factory_no_bus):
    """gateway --idle-timeout 2 --idle-prompts 1 on a phone line: after the answer and 2 s of quiet the caller
    hears the prompt; 2 s more and the phone stage hangs up (`stop` never came from the carrier); the session
    ends, and the next call is taken."""
    up, port, traces, _ = _start_phone_pipeline(
        procs, tmp_path, "--arg", "gateway=--idle-timeout 2 --idle-prompts 1 --idle-prompt 'Are you still there?'")
    _wait_ready(client_factory_no_bus, up, procs)
    url = f"ws://127.0.0.1:{port}/media"
    question = speech_pcm("what is the weather like today", "rms", g711.RATE)
    quiet = asyncio.run(FakeCarrier(url, [Turn(question)], timeout_s=60, tail_s=30).run())
    assert quiet.closed_by == "stage", quiet.closed_by  # hung up on, long before its own 30 s
    assert len(quiet.replies) == 2, [len(r.codes) for r in quiet.replies]  # the answer, then the prompt
    again = asyncio.run(FakeCarrier(url, [Turn(question)], timeout_s=60).run())
    assert again.replies and not again.bad_messages  # the line was free, and the next caller was answered
    _stop(up)
    sessions = sorted(path for path in traces.iterdir() if (path / "turns.jsonl").exists())
    first = [json.loads(line) for line in (sessions[0] / "turns.jsonl").read_text().splitlines()]
    assert [t["assistant"]["transcript_heard"] for t in first][-1] == "Are you still there?"
    events = [json.loads(line) for line in (sessions[0] / "events.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "idle_end" for e in events), events
