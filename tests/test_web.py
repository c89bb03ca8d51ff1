"""`voicebus web` with Debian's Chromium headless: fake mic from a flite WAV, real WebRTC, real WebAudio."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from common.speech import Transcriber
from common.utterances import compose
from common.wavio import write_wav
from services.stages.player import IDLE_STATE_INTERVAL_S
from tests.support.browser import Chromium
from tests.web import (
    BARGE_IN_AFTER_S,
    dark_pixels,
    page_recording,
    start_web_pipeline,
    where_the_browser_stopped,
)

QUESTION = "what is the weather like today"
STORY = ("Once upon a time there was a little robot who lived in a quiet town by the sea and every morning it "
         "walked down to the harbour to count the boats and talk to the fishermen about the weather.")
STORY_WORDS = {"once", "upon", "time", "there", "little", "robot", "lived", "quiet", "town"}
PREFIXES = ["rt.", "audio.assistant", "player.", "health.", "web.", "session."]
LEAD_S = 1.5  # the fake mic starts with getUserMedia; the call connects in ~0.3 s


def _of(client, topic):
    return [m for m in client.seen if m.topic == topic]


def _story_sim(simulator, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "weather", "reply": STORY}, {"match": ".*", "reply": "All right."}]))
    return simulator("--pace", "realtime", "--rules", str(rules))


def _http(url: str, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_browser_conversation_with_barge_in(procs, client_factory, simulator, tmp_path):
    sim = _story_sim(simulator, tmp_path)
    client = client_factory(PREFIXES)
    url = start_web_pipeline(procs, client, sim, tmp_path / "traces")
    speech = compose([("silence", LEAD_S), ("say", QUESTION), ("silence", BARGE_IN_AFTER_S), ("say", "stop please"),
                      ("silence", 6.0)], 48000)
    wav = write_wav(tmp_path / "mic.wav", speech, 48000)
    with Chromium(url + "?record=1", fake_mic_wav=wav, log_path=tmp_path / "chromium.log") as page:
        page.evaluate("voicebus.connect()")
        transcript = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed",
                                     timeout_s=30)
        # the browser's noise suppression and AGC shape the onset: the server's ASR may miss a first word
        assert "weather like today" in transcript.data["event"]["transcript"]
        flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=30)
        truncate = client.wait_for(lambda m: m.topic == "rt.sent.conversation.item.truncate", timeout_s=5)
        summary = client.wait_for(lambda m: m.topic == "rt.gateway.truncated", timeout_s=5)
        page.wait_for("document.querySelector('.turn.assistant .meta').textContent.includes('interrupted')", 5)
        time.sleep(1.0)  # the recording runs on past the cut
        recording, recording_t0_ns = page_recording(page)
        turns = page.evaluate("Object.values(voicebus.turns).map(t => ({role: t.role, text: t.text, "
                              "rect: t.element.getBoundingClientRect().toJSON()}))")
        shot = page.screenshot(tmp_path / "page.png")
        error = page.evaluate("voicebus.error")

    assert error == ""
    assert flushed.header.src == "web" and flushed.data["item_id"] == truncate.data["event"]["item_id"]
    # the assistant's audio reached the browser: the page's own recording of what it played
    item_id = truncate.data["event"]["item_id"]
    audio_end_ms = truncate.data["event"]["audio_end_ms"]
    source = np.frombuffer(b"".join(m.payload for m in _of(client, "audio.assistant")
                                    if m.header.extra["item_id"] == item_id), dtype="<i2").astype(float)
    placed, heard_until_ms, cut_by_ms = where_the_browser_stopped(recording, source, audio_end_ms)
    offset = int(placed.recording_index(0))
    heard = Transcriber().transcribe(recording[offset:offset + audio_end_ms * 24].astype("<i2").tobytes(), 24000)
    print(f"placed: {placed.summary()}; heard in the browser: {heard!r}")
    assert len(set(heard.split()) & STORY_WORDS) >= 3, heard
    print(f"audio_end_ms {audio_end_ms}; browser played until {heard_until_ms:.0f}..{cut_by_ms:.0f} ms; "
          f"web state {flushed.data}")
    assert heard_until_ms - 60 <= audio_end_ms <= cut_by_ms + 60
    # while it plays, the reported position (sent minus what the browser says it holds) against what
    # the page had played at the moment of each report
    errors = [m.data["played_ms"] - placed.source_index((m.header.t_ns - recording_t0_ns) * 24e-6) / 24
              for m in _of(client, "player.state") if m.data["item_id"] == item_id and not m.data.get("flushed")
              and 200 < m.data["played_ms"] < audio_end_ms - 200]
    print(f"played_ms - heard in the browser over {len(errors)} reports: median {np.median(errors):.1f} ms, "
          f"max |err| {np.max(np.abs(errors)):.1f} ms")
    # measured 48-53 ms ahead: what Chromium buffers between its jitter buffer and WebAudio is in no
    # stat it reports; truncation does not depend on it (the flushed state reports everything sent)
    assert len(errors) >= 10 and abs(np.median(errors)) <= 80
    assert 500 < audio_end_ms < summary.data["received_ms"]
    # the transcripts are on the page, and visible in its screenshot
    user = [t for t in turns if t["role"] == "user"]
    assistant = [t for t in turns if t["role"] == "assistant"]
    assert user and user[0]["text"] == transcript.data["event"]["transcript"]
    assert assistant and STORY.startswith(assistant[0]["text"][:40]) and assistant[0]["text"]
    for turn in (user[0], assistant[0]):
        assert turn["rect"]["height"] > 0 and dark_pixels(shot, turn["rect"]) > 200, turn


def test_browser_that_vanishes_mid_turn_leaves_the_stage_serving(procs, client_factory, simulator, tmp_path):
    sim = _story_sim(simulator, tmp_path)
    client = client_factory(PREFIXES)
    traces = tmp_path / "traces"
    url = start_web_pipeline(procs, client, sim, traces)
    wav = write_wav(tmp_path / "mic.wav", compose([("silence", LEAD_S), ("say", QUESTION), ("silence", 8.0)], 48000),
                    48000)
    page = Chromium(url, fake_mic_wav=wav, log_path=tmp_path / "chromium.log")
    try:
        page.evaluate("voicebus.connect()")
        client.wait_for(lambda m: m.topic == "player.state" and m.header.src == "web" and m.data["played_ms"] > 500,
                        timeout_s=30)
        page.kill()  # no hang-up, no goodbye: as a crashed tab or a closed laptop
    finally:
        page.close()
    gone = client.wait_for(lambda m: m.topic == "web.gone", timeout_s=15)
    assert "no audio from the browser" in gone.data["reason"]
    # the turn in flight is stored: the server finishes its reply and the logger keeps it
    client.wait_for(lambda m: m.topic == "health.logger" and m.data.get("turns_stored", 0) >= 1, timeout_s=30)
    stored = [json.loads(line) for path in traces.glob("*/turns.jsonl") for line in path.read_text().splitlines()]
    assert stored and "weather like today" in stored[0]["user"]["transcript"], stored
    first_session = gone.header.session
    ended = client.wait_for(lambda m: m.topic == "session.end", timeout_s=5)
    assert ended.data["session"] == first_session
    # nobody listens: the stage says so once, it does not go on reporting the old reply ten times a second
    client.collect(2.0)
    after = [m for m in client.seen if m.topic == "player.state" and m.header.src == "web"
             and m.header.t_ns > ended.header.t_ns]
    idle_s = (time.time_ns() - ended.header.t_ns) / 1e9
    # at the idle pace (one a second, and one when the state changed), never the playing pace (ten a second)
    assert len(after) <= idle_s / IDLE_STATE_INTERVAL_S + 2 and all(m.data["item_id"] is None for m in after), \
        (idle_s, [m.data for m in after])
    # the next browser is welcome, and it is a conversation of its own
    status, _ = _http(url)
    assert status == 200
    wav = write_wav(tmp_path / "mic-2.wav", compose([("silence", LEAD_S), ("say", "hello there"), ("silence", 3.5),
                                                     ("say", "good morning to you"), ("silence", 6.0)], 48000), 48000)
    with Chromium(url, fake_mic_wav=wav, log_path=tmp_path / "chromium-2.log") as again:
        again.evaluate("voicebus.connect()")
        again.wait_for("voicebus.state === 'live'", timeout_s=15)
        second_session = again.wait_for("voicebus.session", timeout_s=10)
        assert second_session != first_session
        begun = client.wait_for(lambda m: m.topic == "session.begin" and m.data["session"] == second_session)
        answers = [client.wait_for(lambda m, n=n: m.topic == "rt.response.output_audio_transcript.done"
                                   and m.header.session == second_session and m.header.t_ns > begun.header.t_ns
                                   and len([x for x in client.seen if x.topic == m.topic
                                            and x.header.session == second_session]) >= n, timeout_s=40)
                   for n in (1, 2)]
        assert [a.data["event"]["transcript"] for a in answers] == ["All right.", "All right."]
        client.collect(1.0)
        page_text = again.evaluate("document.getElementById('transcript').innerText")
        again.evaluate("voicebus.hangUp()")
    # the second question came ~1.5 s after the first reply had played out: a new turn, not an interruption
    assert not [m for m in client.seen if m.topic == "rt.gateway.truncated" and m.header.session == second_session]
    assert "interrupted" not in page_text and "robot" not in page_text, page_text  # nothing of the last caller
    hung_up = client.wait_for(lambda m: m.topic == "web.gone" and m.header.t_ns > gone.header.t_ns, timeout_s=10)
    assert hung_up.data["reason"] == "the caller hung up"
    client.wait_for(lambda m: m.topic == "health.logger" and m.data.get("turns_stored", 0) >= 3, timeout_s=30)
    first_turns = [json.loads(line) for line in (traces / first_session / "turns.jsonl").read_text().splitlines()]
    second_turns = [json.loads(line) for line in (traces / second_session / "turns.jsonl").read_text().splitlines()]
    assert len(first_turns) == 1 and [t["assistant"]["transcript_heard"] for t in second_turns] == ["All right."] * 2
    assert not any(t["assistant"]["barge_in"] for t in second_turns)


def test_bad_offers_a_second_browser_and_a_denied_mic_get_clear_errors(procs, client_factory, tmp_path):
    client = client_factory(PREFIXES)
    url = start_web_pipeline(procs, client, None, tmp_path / "traces", stages=())
    status, text = _http(url + "offer", b"{not json")
    assert status == 400 and "malformed offer" in json.loads(text)["error"]
    status, text = _http(url + "offer", json.dumps({"type": "offer", "sdp": "v=0\r\nthis is not sdp"}).encode())
    assert status == 400 and "malformed offer" in json.loads(text)["error"], text
    with Chromium(url, allow_mic=False, log_path=tmp_path / "chromium-denied.log") as denied:
        denied.evaluate("voicebus.connect()")
        message = denied.evaluate("voicebus.error")
        shown = denied.evaluate("document.getElementById('error').hidden === false && "
                                "document.getElementById('error').textContent")
    assert "Microphone access was denied" in message and shown == message
    with Chromium(url, log_path=tmp_path / "chromium-1.log") as first:
        first.evaluate("voicebus.connect()")
        first.wait_for("voicebus.state === 'live'", timeout_s=15)
        status, text = _http(url)
        assert status == 409 and "already in a conversation" in text
        status, text = _http(url + "offer", json.dumps({"type": "offer", "sdp": "v=0"}).encode())
        assert status == 409 and json.loads(text)["error"].startswith("busy")
        assert first.evaluate("voicebus.state") == "live"  # the conversation in progress is untouched
    health = client.wait_for(lambda m: m.topic == "health.web" and m.data.get("busy_refused", 0) >= 2, timeout_s=10)
    assert health.data["bad_offers"] == 2
    web = procs.started[-1]
    assert web.poll() is None
    log_text = procs.log_of(web)
    assert "offer_refused" in log_text and "busy" in log_text


def _decoded_frame(pts: int, value: int, samples: int = 960):
    """What aiortc's Opus decoder hands the web stage: 48 kHz stereo s16, pts on the RTP clock."""
    from fractions import Fraction

    from av import AudioFrame

    decoded = AudioFrame.from_ndarray(np.full((1, samples * 2), value, dtype="<i2"), format="s16", layout="stereo")
    decoded.sample_rate, decoded.pts, decoded.time_base = 48000, pts, Fraction(1, 48000)
    return decoded


def _feed_mic(stage, settings: dict, now_ns: int) -> None:
    """Four 20 ms packets, the third lost."""
    stage._mic_frame(_decoded_frame(0, 100), now_ns, settings)
    stage._mic_frame(_decoded_frame(960, 200), now_ns + 20_000_000, settings)
    stage._mic_frame(_decoded_frame(2880, 300), now_ns + 60_000_000, settings)


@pytest.mark.parametrize("channel_count", [1, 2])
def test_mic_frames_keep_rate_channels_timeline_and_fill_lost_packets(channel_count):
    """--via-resampler: audio.mic as the browser sent it, for a resample stage."""
    from common.stage import Output
    from services.stages.web.stage import WebStage

    stage = WebStage("127.0.0.1", 0, via_resampler=True)
    stage.thread_out, sent = Output.collecting("web")
    samples = 960
    now = time.time_ns()
    _feed_mic(stage, {"channelCount": channel_count}, now)
    assert {m.topic for m in sent} == {"audio.mic"}
    assert [m.header.pts for m in sent] == [0, 960, 1920, 2880]
    assert {(m.header.rate, m.header.channels) for m in sent} == {(48000, channel_count)}
    values = [np.frombuffer(m.payload, dtype="<i2") for m in sent]
    assert [int(v[0]) for v in values] == [100, 200, 0, 300] and all(len(v) == samples * channel_count for v in values)
    # capture times follow the RTP clock, not the arrival jitter
    captures = [m.header.t_capture_ns for m in sent]
    assert np.diff(captures).tolist() == [20_000_000] * 3
    assert stage.mic_gap_fills == 1


def test_caller_silence_goes_out_in_batches_and_what_is_held_is_sent_before_the_hang_up():
    """common.silence in the web stage: 2 s of silence, a word, 1.2 s of silence, then the caller hangs up."""
    from common.stage import SESSION_END, Output
    from services.stages.web.stage import WebStage

    stage = WebStage("127.0.0.1", 0, via_resampler=True)
    stage.thread_out, sent = Output.collecting("web")
    stage.out = stage.thread_out
    values = [0] * 100 + [3000] * 5 + [0] * 60
    now = time.time_ns()
    for index, value in enumerate(values):
        stage._mic_frame(_decoded_frame(index * 960, value), now + index * 20_000_000, {"channelCount": 2})
    stage._client_event("disconnected", {"reason": "hung up"})
    audio = [m for m in sent if m.topic == "audio.mic"]
    pcm = b"".join(m.payload for m in audio)
    assert pcm == b"".join(np.full(960 * 2, v, dtype="<i2").tobytes() for v in values)  # every sample, in order
    assert [m.header.pts for m in audio] == [0, *np.cumsum([m.samples for m in audio])[:-1].tolist()]
    # the first second of silence and the word went frame by frame, the rest of the silence 100 ms at a time
    assert len(audio) == 50 + 50 // 5 + 5 + 50 + 2  # the last 10 frames: 5 in a batch, 5 held until the hang-up
    assert all(m.samples == 960 for m in audio if np.frombuffer(m.payload, "<i2").any())
    assert stage.counters()["silence_batched_frames"] == 50 + 10
    topics = [m.topic for m in sent]
    assert topics.index(SESSION_END) > max(i for i, t in enumerate(topics) if t == "audio.mic")


@pytest.mark.parametrize("channel_count", [1, 2])
def test_mic_resampled_in_process_is_what_the_resample_stage_makes(channel_count):
    """The default: the web stage publishes audio.user itself, sample for sample and timestamp for timestamp
    what `voicebus resample` makes of its --via-resampler audio.mic (gap filled, tail flushed at stop)."""
    from common.stage import Output
    from services.stages.resampler import ResampleStage
    from services.stages.web.stage import WebStage

    now = time.time_ns()
    settings = {"channelCount": channel_count}
    via = WebStage("127.0.0.1", 0, via_resampler=True)
    via.thread_out, mic = Output.collecting("web")
    _feed_mic(via, settings, now)
    resample = ResampleStage()
    resample.out, expected = Output.collecting("resample")
    for message in mic:
        resample.handle(message)
    resample.stop()

    stage = WebStage("127.0.0.1", 0)
    stage.thread_out, sent = Output.collecting("web")
    stage.resampler.out = stage.thread_out  # what start() does, without serving
    _feed_mic(stage, settings, now)
    stage.resampler.stop()  # the tail, as stop() flushes it once the web loop has stopped
    assert {m.topic for m in sent} == {"audio.user"} and len(sent) == len(expected) >= 4
    assert {(m.header.rate, m.header.channels) for m in sent} == {(24000, 1)}
    assert [(m.header.pts, m.header.t_capture_ns, m.payload) for m in sent] == \
        [(m.header.pts, m.header.t_capture_ns, m.payload) for m in expected]
    user = np.concatenate([np.frombuffer(m.payload, dtype="<i2") for m in sent])
    assert len(user) == 4 * 480  # nothing lost: 80 ms at 24 kHz, the lost packet's 20 ms as silence
    assert abs(int(user[240]) - 100) <= 2 and abs(int(user[720]) - 200) <= 2 and abs(int(user[1200])) <= 2
    assert abs(int(user[1680]) - 300) <= 2
    assert stage.counters()["resample_resets"] == 0 and stage.mic_gap_fills == 1


def test_state_reports_heard_position_and_flush_reports_everything_sent():
    from common.stage import Output
    from services.stages.playback import Segment
    from services.stages.web.rtc import BrowserStats
    from services.stages.web.stage import WebStage

    stage = WebStage("127.0.0.1", 0, jitter_ms=0)
    stage.out, published = Output.collecting("web")
    stage.buffer.push(Segment("item_a", 0, "resp_a", bytes(24000 * 2)))  # 1 s
    stage.buffer.pull(12000)  # 500 ms left for the browser
    stage.link.stats = BrowserStats(jitter_buffer_ms=60, output_latency_ms=30, rtt_ms=4)
    state = stage.publish_state()
    assert state["sent_ms"] == 500 and state["played_ms"] == 500 - 92 and state["latency_ms"] == 92
    stage.flush({"reason": "barge_in"})
    flushed = published[-1].data
    assert flushed["flushed"] and flushed["played_ms"] == 500 and flushed["dropped_ms"] == 500


def test_page_messages_cannot_name_bus_topics_and_a_busy_port_is_a_clear_error():
    import socket

    from common.stage import StageError
    from services.stages.web.stage import WebStage

    stage = WebStage("127.0.0.1", 0)
    events = []
    stage.link.on_client = lambda kind, data: events.append(kind)
    for text in ('{"type": "stats", "jitter_buffer_ms": 30, "output_latency_ms": 40, "rtt_ms": 2}',
                 '{"type": "anything.else"}', "not json", '{"no": "type"}'):
        stage.link._page_message(None, text)
    assert stage.link.stats.delay_ms == 71 and events == [] and stage.link.counts["bad_page_messages"] == 3
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = WebStage("127.0.0.1", taken.getsockname()[1])
        with pytest.raises(StageError, match="cannot serve on 127.0.0.1:.*--port 0"):
            busy.link.start()


def test_a_reply_sent_to_its_end_is_played_to_its_end_once_the_browser_drains():
    """What the browser holds drains in real time after the last frame left: the position reaches the end."""
    from common.stage import Output
    from services.stages.playback import Segment
    from services.stages.web.rtc import BrowserStats
    from services.stages.web.stage import WebStage

    stage = WebStage("127.0.0.1", 0, jitter_ms=0)
    stage.out, _ = Output.collecting("web")
    stage.link.stats = BrowserStats(jitter_buffer_ms=60, output_latency_ms=30, rtt_ms=4)  # holds 92 ms
    stage.buffer.push(Segment("item_a", 0, "resp_a", bytes(24000 * 2)))  # 1 s
    stage.buffer.pull(24000)  # all of it left for the browser, and more would still be sent
    assert stage.current_state()["played_ms"] == 1000 - 92  # while sending: the browser holds 92 ms
    stage.buffer.pull(480)  # the next frame finds nothing: the output ran dry
    just_dry = stage.current_state()
    assert 1000 - 92 <= just_dry["played_ms"] <= 1000 - 80 and just_dry["sent_ms"] == 1000
    stage.buffer.ran_dry_at -= 0.2  # 200 ms later: the browser has played what it held
    drained = stage.current_state()
    assert drained["played_ms"] == 1000 and not drained["playing"] and drained["buffered_ms"] == 0


def test_each_browser_is_a_conversation_of_its_own_and_a_hang_up_forgets_the_reply():
    from common.envelope import Stamper
    from common.stage import Output
    from services.stages.playback import Segment
    from services.stages.web.stage import WebStage

    stage = WebStage("127.0.0.1", 0, jitter_ms=0)
    stage.out, published = Output.collecting("web", session="launcher-session")
    stage.thread_out, from_thread = Output.collecting("web", session="launcher-session")
    pages: list[dict] = []
    stage.link.client = object()  # a page is connected: send_page would queue for it
    stage.link.send_page = pages.append
    stage._client_event("connected", {"remote": "a"})
    begin = [m for m in from_thread if m.topic == "session.begin"]
    assert [m.data["session"] for m in begin] == ["launcher-session"]  # the first caller keeps up's session
    stage.buffer.push(Segment("item_a", 0, "resp_a", bytes(24000)))
    stage.buffer.pull(4800)
    stage._client_event("gone", {"remote": "a", "reason": "no audio from the browser for 3 s"})
    assert [m.data["session"] for m in from_thread if m.topic == "session.end"] == ["launcher-session"]
    after = stage.current_state()
    assert after["item_id"] is None and not after["playing"] and after["buffered_ms"] == 0
    stage._client_event("connected", {"remote": "b"})
    second = [m for m in from_thread if m.topic == "session.begin"][-1].data["session"]
    assert second != "launcher-session" and stage.out.stamper.session == second
    assert stage.thread_out.stamper.session == second and stage.link.hello["session"] == second
    # the last caller's reply, still on its way, never reaches the new page or the speaker
    late = Stamper("gateway", "launcher-session").event("rt.response.output_audio_transcript.delta",
                                                         {"event": {"item_id": "item_a", "delta": "old words"}}, 1)
    stage.handle(late)
    assert pages == [] and stage.other_session_dropped == 1
    stage.handle(Stamper("gateway", second).event("rt.response.output_audio_transcript.delta",
                                                  {"event": {"item_id": "item_b", "delta": "new"}}, 2))
    assert [p["text"] for p in pages] == ["new"]
    assert not published or all(m.header.session in ("launcher-session", second) for m in published)


def test_voicebus_call_takes_turns_by_ear_and_times_each_reply_after_its_question(procs, client_factory, simulator,
                                                                                   tmp_path):
    """`voicebus call --take-turns`: what bench_serve runs against voicebus and pipecat alike. Each question is
    spoken once the reply before it played out; each reply is timed from its question's end (never before it:
    the server's VAD needs its silence first), and what the caller heard is the answer to each, in order."""
    import subprocess

    from common.speech import nearest_sentence
    from common.wavio import read_wav

    questions = ["what is the weather like today", "how far away is the moon"]
    client = client_factory(PREFIXES)
    url = start_web_pipeline(procs, client, simulator("--pace", "realtime"), tmp_path / "traces")
    caller = procs.voicebus("call", url, "--take-turns", *[a for q in questions for a in ("--say", q)], "--json",
                            "--timeout", "90", "--record", str(tmp_path / "heard.wav"), stdout=subprocess.PIPE,
                            name="caller")
    out, _ = caller.communicate(timeout=120)
    assert caller.returncode == 0, procs.log_of(caller)
    result = json.loads(out)
    assert result["assistant"] == [f"I heard: {q}" for q in questions], result
    assert len(result["heard_ms"]) == 2 and all(300 < ms < 15_000 for ms in result["heard_ms"]), result
    assert result["gaps"] == 0 and result["page_messages"] > 0
    # the recording holds two replies apart (each played out before the next question): each one, heard
    # on its own, answers its own question
    pcm = np.frombuffer(read_wav(tmp_path / "heard.wav").pcm, "<i2")
    frame = 960  # 20 ms
    loud = np.abs(pcm[:len(pcm) // frame * frame].reshape(-1, frame).astype(np.int32)).max(axis=1) > 300
    replies, start, quiet = [], None, 0
    for index, is_loud in enumerate(loud):
        if is_loud:
            start = index if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= 50:  # a second of quiet: that reply is over
                replies.append(pcm[start * frame:(index - quiet + 1) * frame])
                start = None
    if start is not None:
        replies.append(pcm[start * frame:])
    transcriber = Transcriber()
    heard = [transcriber.transcribe(reply.tobytes(), 48000) for reply in replies]
    print(f"the caller heard {heard!r}; replies {result['heard_ms']} ms after each question")
    assert [nearest_sentence(h.removeprefix("i heard"), questions) for h in heard] == questions, heard


def test_voicebus_call_by_default_never_barges_in_is_busy_as_serve_is_and_keeps_its_turns_on_ctrl_c(
        procs, client_factory, simulator, tmp_path):
    """`voicebus call` with its defaults against a ~9 s story: the next sentence waits for the story to play
    out (nothing truncated); a second caller meanwhile is told busy with serve's exit code (3); Ctrl-C after
    two turns prints both, as heard, and exits 130 instead of click's bare "Aborted!"."""
    import signal
    import subprocess

    client = client_factory(PREFIXES)
    url = start_web_pipeline(procs, client, _story_sim(simulator, tmp_path), tmp_path / "traces")
    # 8 s after each reply: the Ctrl-C lands in that quiet, however slow the machine, never after the third turn
    caller = procs.voicebus("call", url, "--say", QUESTION, "--say", "thank you", "--say", "goodbye now",
                            "--pause", "8", "--timeout", "120", stdout=subprocess.PIPE, name="caller",
                            sigint_ignored=True)  # as a background job of a script starts: Ctrl-C must still work
    client.wait_for(lambda m: m.topic == "rt.response.created", timeout_s=60)
    busy = procs.voicebus("call", url, "--say", "hello", name="caller-busy")
    assert busy.wait(timeout=60) == 3 and "busy" in procs.log_of(busy), procs.log_of(busy)
    first = client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.response.done" and m is not first, timeout_s=60)
    client.collect(1.5)  # "All right." played out
    caller.send_signal(signal.SIGINT)
    out = caller.communicate(timeout=30)[0].decode()
    assert caller.returncode == 130, procs.log_of(caller)
    assert "Aborted!" not in procs.log_of(caller) and "interrupted after 2 replies" in procs.log_of(caller)
    assert f"turn 1: you said '{QUESTION}'; you heard 'Once upon a time" in out, out
    assert "turn 2: you said 'thank you'; you heard 'All right.'" in out and "cut at" not in out, out
    assert _of(client, "rt.sent.conversation.item.truncate") == [] and _of(client, "rt.gateway.truncated") == []


def test_the_page_shows_each_tool_call_as_it_happens_and_links_the_callers_own_report(procs, client_factory, simulator,
                                                                                     tmp_path):
    """A tool turn in Chromium: the call (name, arguments), then its result and duration, in the transcript;
    after the hang-up the report link opens the report the logger wrote into the session's directory, and
    the same link with another key (or for another session) is a 404."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "what time", "call": {"name": "get_current_time",
                                                                 "arguments": {"timezone": "Asia/Tokyo"}},
                                  "after_call": "It is {datetime:%H} hours in Tokyo."},
                                 {"match": ".*", "reply": "I heard: {transcript}"}]))
    client = client_factory([*PREFIXES, "tool."])
    traces = tmp_path / "traces"
    procs.voicebus("tools", "--module", str(Path(__file__).resolve().parent.parent / "examples" / "tools.py"))
    client.wait_for(lambda m: m.topic == "health.tools", timeout_s=30)
    url = start_web_pipeline(procs, client, simulator("--pace", "realtime", "--rules", str(rules)), traces)
    speech = compose([("silence", LEAD_S), ("say", "what time is it in tokyo"), ("silence", 8.0)], 48000)
    wav = write_wav(tmp_path / "mic.wav", speech, 48000)
    with Chromium(url, fake_mic_wav=wav, log_path=tmp_path / "chromium.log") as page:
        page.evaluate("voicebus.connect()")
        result = client.wait_for(lambda m: m.topic == "tool.result", timeout_s=45)
        page.wait_for("Object.values(voicebus.tools).some(t => t.ms !== null)", 10)
        tools = page.evaluate("Object.values(voicebus.tools).map(t => ({name: t.name, args: t.arguments, "
                              "output: t.output, error: t.error, ms: t.ms, shown: t.element.textContent, "
                              "height: t.element.getBoundingClientRect().height}))")
        client.wait_for(lambda m: m.topic == "rt.response.done" and m.data["event"]["response"]["output"]
                        and m.data["event"]["response"]["output"][0].get("type") == "message", timeout_s=30)
        session = page.evaluate("voicebus.session")
        link = page.evaluate("voicebus.reportUrl")
        page.evaluate("voicebus.hangUp()")
        report_file = traces / session / "report.html"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not report_file.exists():
            time.sleep(0.2)
        opened = page.evaluate(f"fetch({json.dumps(link)}).then(r => r.text().then(t => [r.status, t]))")
    assert len(tools) == 1, tools
    tool = tools[0]
    assert tool["name"] == "get_current_time" and "Asia/Tokyo" in tool["args"] and tool["error"] == ""
    assert "Asia/Tokyo" in tool["output"] and tool["ms"] == result.data["duration_ms"] and tool["height"] > 0
    assert "get_current_time" in tool["shown"] and "→" in tool["shown"] and "ms" in tool["shown"]
    assert link.startswith(f"/report/{session}?key=") and report_file.exists()
    assert opened[0] == 200 and f"voicebus session {session}" in opened[1]
    base = url.rstrip("/")
    assert _http(base + link.split("?")[0] + "?key=" + "0" * 32)[0] == 404
    assert _http(base + "/report/another-session?" + link.split("?")[1])[0] == 404


def test_a_caller_who_goes_quiet_is_asked_whether_they_are_there_and_then_hung_up_on(procs, client_factory,
                                                                                     simulator, tmp_path):
    """gateway --idle-timeout 2 --idle-prompts 1: after the reply has played and 2 s of quiet, the assistant
    says the prompt (a response the gateway asked for); 2 s of quiet after that, the web stage hangs up the
    caller, and the conversation ends with that reason."""
    import subprocess

    client = client_factory(PREFIXES)
    url = start_web_pipeline(procs, client, simulator("--pace", "realtime"), tmp_path / "traces",
                             gateway_args=("--idle-timeout", "2", "--idle-prompts", "1",
                                           "--idle-prompt", "Are you still there?"))
    # a caller who says hello, hears the reply, then says nothing for a minute (its second sentence waits)
    caller = procs.voicebus("call", url, "--say", "hello there", "--say", "goodbye", "--pause", "60",
                            "--timeout", "120", stdout=subprocess.PIPE, name="caller")
    try:
        client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
        prompt = client.wait_for(lambda m: m.topic == "rt.gateway.idle_prompt", timeout_s=30)
        said = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done"
                               and m.data["event"].get("transcript") == "Are you still there?", timeout_s=30)
        ended = client.wait_for(lambda m: m.topic == "rt.gateway.idle_end", timeout_s=30)
        gone = client.wait_for(lambda m: m.topic == "session.end", timeout_s=15)
    finally:
        caller.kill()
    assert prompt.data["count"] == 1 and said.header.t_ns > prompt.header.t_ns
    # each ask came after a full 2 s of quiet: the prompt not before the reply had played out, the end not
    # before the prompt had
    assert ended.header.t_ns - said.header.t_ns > 2e9
    assert gone.data["reason"] == "nobody spoke after 1 prompt"
    # and the gateway lives on for the next caller (its tick had ended what it ticked for: that once killed it)
    gateway = next(proc for proc in procs.started if "/gateway-" in proc.log_path)
    assert gateway.poll() is None, procs.log_of(gateway)


def test_the_track_encodes_each_frame_into_one_packet_on_its_own_clock_that_a_browser_decodes():
    """The assistant's audio leaves as 24 kHz mono Opus made in the track: one packet per 20 ms frame,
    stamped with the frame's pts (converted to RTP's 48 kHz by aiortc), decoding to the same speech."""

    from aiortc.codecs.opus import OpusDecoder, OpusEncoder
    from aiortc.jitterbuffer import JitterFrame

    from services.stages.web.opus import VoiceEncoder

    rate, samples = 24_000, 480
    t = np.arange(rate) / rate
    speech = (np.sin(2 * np.pi * (200 * t + 1400 * t * t)) * 8000).astype("<i2")  # 1 s, 200 -> 3000 Hz
    encoder, packer, decoder = VoiceEncoder(rate), OpusEncoder(), OpusDecoder()
    decoded = []
    for index in range(rate // samples):
        packet = encoder.encode(speech[index * samples:(index + 1) * samples].tobytes(), index * samples)
        assert packet is not None and packet.pts == index * samples
        payloads, timestamp = packer.pack(packet)  # what RTCRtpSender does with a packet from a track
        assert len(payloads) == 1 and timestamp == index * 960
        for out in decoder.decode(JitterFrame(payloads[0], timestamp)):
            decoded.append(out.to_ndarray().reshape(-1, 2)[:, 0])  # the browser's 48 kHz, left channel
    heard = np.concatenate(decoded).astype(float)[::2]  # back to 24 kHz for the comparison
    assert len(heard) == len(speech)
    lag = int(np.argmax(np.correlate(heard[2400:4800], speech[2400:2880].astype(float), "valid")))
    assert lag <= 480  # the codec's own delay, under a frame
    tail = heard[2400 + lag:2400 + lag + 12000]
    assert np.corrcoef(tail, speech[2400:2400 + len(tail)])[0, 1] > 0.95


def test_the_mic_is_decoded_in_the_loop_to_24_khz_mono_and_a_bad_packet_is_a_counted_gap():
    """What a browser sends (48 kHz Opus, aiortc's encoder as the stand-in) comes out of LoopDecoding
    as 24 kHz mono frames on the track's queue (libopus decoding at the stage's rate: no filter after
    it), pts the RTP timestamp counted at 24 kHz, the same speech; an undecodable or empty packet is
    counted and skipped, PCMU still decodes (aiortc's decoder, 8 kHz), and the receiver's stop still
    reaches its decoder thread."""
    import asyncio
    import fractions
    from types import SimpleNamespace

    from aiortc.codecs.opus import OpusEncoder
    from aiortc.jitterbuffer import JitterFrame
    from av import AudioFrame

    from services.stages.web.opus import LoopDecoding, MicFrame

    rate_in, samples = 48_000, 960
    t = np.arange(rate_in) / rate_in
    speech = (np.sin(2 * np.pi * (200 * t + 1400 * t * t)) * 8000).astype("<i2")  # 1 s, 200 -> 3000 Hz
    queue: asyncio.Queue = asyncio.Queue()
    decoding = LoopDecoding(queue, 24_000)
    opus, encoder = SimpleNamespace(name="opus"), OpusEncoder()
    first_timestamp = None
    for index in range(rate_in // samples):
        frame = AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(speech[index * samples:(index + 1) * samples].tobytes())
        frame.pts, frame.sample_rate, frame.time_base = index * samples, rate_in, fractions.Fraction(1, rate_in)
        payloads, timestamp = encoder.encode(frame)
        first_timestamp = timestamp if first_timestamp is None else first_timestamp
        assert len(payloads) == 1
        if index == 10:
            decoding.put((opus, JitterFrame(b"\xff\xff\xff", timestamp)))  # not Opus
        elif index == 20:
            decoding.put((opus, JitterFrame(b"", timestamp)))  # empty: not 120 ms of concealment
        else:
            decoding.put((opus, JitterFrame(payloads[0], timestamp)))
    frames = [queue.get_nowait() for _ in range(queue.qsize())]
    assert decoding.decode_errors == 2 and len(frames) == 48
    assert all(isinstance(f, MicFrame) for f in frames)
    assert {(f.rate, f.channels, f.samples) for f in frames} == {(24_000, 1, 480)}
    assert [f.rtp_timestamp for f in frames] == [first_timestamp + i * 960 for i in range(50) if i not in (10, 20)]
    assert {f.clock_rate for f in frames} == {48_000}  # Opus's RTP clock, whatever the rate it is decoded at
    heard = np.frombuffer(b"".join(f.pcm for f in frames[19:]), "<i2").astype(float)  # after the gaps
    reference = speech.astype(float)[::2][21 * 480 + 2400:21 * 480 + 12000]  # once the decoder has caught up
    fits = [np.corrcoef(heard[2400 + lag:2400 + lag + len(reference)], reference)[0, 1] for lag in range(480)]
    assert max(fits) > 0.95, max(fits)  # the same speech, the codec's own delay (under a frame) later
    decoding.put((SimpleNamespace(name="PCMU", mimeType="audio/PCMU", clockRate=8000, channels=1),
                  JitterFrame(bytes([0xFF]) * 160, 0)))
    pcmu = queue.get_nowait()
    assert (pcmu.sample_rate, pcmu.samples) == (8000, 160)
    decoding.put(None)  # the receiver stopping: its decoder thread's get() returns aiortc's end signal
    assert decoding.get() is None


@pytest.mark.parametrize("decoder", ["libopus", "aiortc"])
def test_the_mic_clock_counts_on_through_the_rtp_timestamp_wrap(decoder):
    """RTP timestamps are 32 bits from a random start: a call that crosses 2**32 keeps a timeline that
    goes on by one frame (not back by a day), whichever decoder made the frames (ours at 24 kHz, or
    aiortc's at 48 kHz for --aiortc-decoder), so capture times and gap filling stay right."""
    import fractions

    from aiortc.codecs.opus import OpusEncoder
    from av import AudioFrame

    from common.stage import Output
    from services.stages.web.opus import VoiceDecoder
    from services.stages.web.stage import WebStage

    frame = AudioFrame(format="s16", layout="mono", samples=960)
    frame.planes[0].update(bytes(1920))
    frame.pts, frame.sample_rate, frame.time_base = 0, 48_000, fractions.Fraction(1, 48_000)
    packet = OpusEncoder().encode(frame)[0][0]
    libopus_decoder = VoiceDecoder(24_000)

    def decoded(timestamp: int):
        return libopus_decoder.decode(packet, timestamp) if decoder == "libopus" else _decoded_frame(timestamp, 100)

    stage = WebStage("127.0.0.1", 0, via_resampler=True)
    stage.thread_out, sent = Output.collecting("web")
    start = (1 << 32) - 2 * 960
    timestamps = [(start + i * 960) % (1 << 32) for i in range(5)]
    assert timestamps[2] == 0  # the third packet is past the wrap
    now = time.time_ns()
    for index, timestamp in enumerate(timestamps):
        stage._mic_frame(decoded(timestamp), now + index * 20_000_000, {"channelCount": 1})
    rate = 24_000 if decoder == "libopus" else 48_000
    assert {m.header.rate for m in sent} == {rate}
    assert np.diff([m.header.t_capture_ns for m in sent]).tolist() == [20_000_000] * 4
    assert [m.header.pts for m in sent] == [i * rate // 50 for i in range(5)]
    assert stage.mic_gap_fills == 0
    stage._mic_frame(decoded(timestamps[1]), now + 100_000_000, {"channelCount": 1})  # late, from before the wrap
    assert sent[-1].header.t_capture_ns == sent[1].header.t_capture_ns and stage.mic_gap_fills == 0


def test_a_missing_libopus_is_a_clear_error_at_start_not_a_count_of_bad_packets(monkeypatch):
    """Without a libopus to load, the web stage refuses to start and says what to do, rather than
    counting every packet of the first caller as undecodable."""
    from common.stage import StageError
    from services.stages.playback import PlaybackBuffer
    from services.stages.web import libopus
    from services.stages.web.rtc import BrowserLink

    monkeypatch.setattr(libopus, "_lib", None)
    monkeypatch.setattr(libopus, "_candidates", lambda: ["/nonexistent/libopus.so.0"])
    with pytest.raises(StageError, match="libopus not found.*--aiortc-decoder"):
        BrowserLink("127.0.0.1", 0, PlaybackBuffer(24_000, 40), on_mic_frame=lambda *a: None,
                    on_client=lambda *a: None)
    link = BrowserLink("127.0.0.1", 0, PlaybackBuffer(24_000, 40), on_mic_frame=lambda *a: None,
                       on_client=lambda *a: None, aiortc_decoder=True)  # which needs none
    link.loop.close()


def test_between_replies_the_track_repeats_the_settled_silence_packet_and_the_browser_hears_the_same():
    """Silence is encoded until the encoder settles, then its packet is repeated without running
    libopus; speech after it is encoded again. What a browser decodes is the same audio as when every
    frame goes through libopus (the encoder's own history differs, so the bytes do after the first
    silence: within -30 dB), silence decodes to silence, and libopus ran for a fraction of the silence."""
    from aiortc.codecs.opus import OpusDecoder
    from aiortc.jitterbuffer import JitterFrame

    from common.utterances import speech_pcm
    from services.stages.web.opus import VoiceEncoder

    rate, samples = 24_000, 480
    speech = speech_pcm("how far away is the moon", "slt", rate)
    silence = bytes(rate * 2 * 2)  # two seconds between replies
    frames = [chunk[i:i + samples * 2] for chunk in (speech, silence, speech, silence[:9600], speech)
              for i in range(0, len(chunk) - samples * 2 + 1, samples * 2)]

    def heard(encoder: VoiceEncoder, skip: bool) -> np.ndarray:
        decoder, out = OpusDecoder(), []  # the browser's side: 48 kHz stereo
        for index, pcm in enumerate(frames):
            if not skip:
                encoder._same_silent_packets = 0  # never settled: every frame through libopus
            packet = encoder.encode(pcm, index * samples)
            assert packet is not None and packet.pts == index * samples
            for frame in decoder.decode(JitterFrame(bytes(packet), index * 960)):
                out.append(frame.to_ndarray().reshape(-1, 2)[:, 0])
        return np.concatenate(out).astype(float)

    every_frame, skipping = VoiceEncoder(rate), VoiceEncoder(rate)
    reference, repeated = heard(every_frame, skip=False), heard(skipping, skip=True)
    assert len(repeated) == len(reference) == len(frames) * 960
    difference_db = 20 * np.log10(np.sqrt(np.mean((repeated - reference) ** 2)) / np.sqrt(np.mean(reference ** 2)))
    assert difference_db < -30, difference_db
    first_silent = len(speech) // (samples * 2)  # frame index; each frame decodes to 960 samples
    assert np.max(np.abs(repeated[(first_silent + 20) * 960:(first_silent + 95) * 960])) <= 2  # -84 dBFS
    assert every_frame.frames_encoded == len(frames) and every_frame.silent_frames_repeated == 0
    silent_frames = sum(pcm == bytes(len(pcm)) for pcm in frames)
    assert skipping.silent_frames_repeated >= silent_frames - 60  # a few dozen frames to settle, each time
    assert skipping.frames_encoded + skipping.silent_frames_repeated == len(frames)


def test_a_backchannel_in_the_browser_resumes_the_reply_and_stop_please_cuts_it(procs, client_factory, simulator,
                                                                                  tmp_path):
    """gateway --false-interruptions through Chromium: "yeah" over the story pauses it at the page and
    resumes it where it paused (nothing truncated); "stop please" later pauses it, is judged an
    interruption, and cuts it at the played position the web stage reported at the flush."""
    sim = _story_sim(simulator, tmp_path)
    client = client_factory([*PREFIXES, "player.hold"])
    url = start_web_pipeline(procs, client, sim, tmp_path / "traces", gateway_args=("--false-interruptions",))
    speech = compose([("silence", LEAD_S), ("say", QUESTION), ("silence", 5.0), ("say", "yeah"), ("silence", 3.0),
                      ("say", "stop please"), ("silence", 6.0)], 48000)
    wav = write_wav(tmp_path / "mic.wav", speech, 48000)
    with Chromium(url, fake_mic_wav=wav, log_path=tmp_path / "chromium.log") as page:
        page.evaluate("voicebus.connect()")
        cut = client.wait_for(lambda m: m.topic == "rt.gateway.interruption" and m.data["decision"] == "interrupted",
                              timeout_s=60)
        truncate = client.wait_for(lambda m: m.topic == "rt.sent.conversation.item.truncate", timeout_s=10)
        flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=10)
        error = page.evaluate("voicebus.error")

    assert error == ""
    reply = truncate.data["event"]["item_id"]
    decisions = [(m.data["decision"], m.data["item_id"]) for m in _of(client, "rt.gateway.interruption")]
    assert decisions == [("paused", reply), ("resumed", reply), ("paused", reply), ("interrupted", reply)], decisions
    resumed = next(m for m in _of(client, "rt.gateway.interruption") if m.data["decision"] == "resumed")
    assert "stop" in cut.data["transcript"], cut.data
    # nothing was cut for the backchannel: the one truncate came after the interruption
    assert len(_of(client, "rt.sent.conversation.item.truncate")) == 1 and truncate.header.t_ns > cut.header.t_ns
    assert flushed.header.src == "web" and abs(truncate.data["event"]["audio_end_ms"] - flushed.data["played_ms"]) <= 40
    # while held the page's position stood still; after "resumed" the reply played on from there
    states = [m for m in _of(client, "player.state") if m.header.src == "web" and m.data.get("item_id") == reply]
    held = [m.data["played_ms"] for m in states if m.data.get("held") and m.header.t_ns < resumed.header.t_ns]
    after = [m.data["played_ms"] for m in states if not m.data.get("held")
             and resumed.header.t_ns < m.header.t_ns < cut.header.t_ns]
    assert held and max(held) - min(held) <= 150, held  # at most what the browser held already drains
    assert after and max(after) > max(held) + 500, (held, after)
