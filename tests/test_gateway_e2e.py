"""The gateway in a real pipeline (bus, mic --wav, resample, gateway, player) against the simulator."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from common.utterances import compose, speech_pcm
from tests.pipeline import speak, start_stages
from tests.support.rig import MonitorRecorder, follow, player_health

QUESTION = "what is the weather like today"
PREFIXES = ["rt.", "audio.assistant", "player.", "health."]


def _of(client, topic):
    return [m for m in client.seen if m.topic == topic]


@pytest.mark.parametrize("protocol", ["ga", "beta"])
def test_spoken_question_gets_transcript_audio_and_done(procs, client_factory, simulator, tmp_path, protocol):
    sim = simulator("--pace", "fast")
    client = client_factory(PREFIXES)
    model = "gpt-realtime" if protocol == "ga" else "gpt-4o-realtime-preview"
    start_stages(procs, client, sim, gateway_args=("--protocol", protocol, "--model", model),
                 player_args=("--wav", str(tmp_path / "played.wav")))
    speak(procs, speech_pcm(QUESTION, "slt", 48000), 48000, tmp_path, speed=2.0)
    done = client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    transcript = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed")
    assert transcript.data["event"]["transcript"] == QUESTION
    assert transcript.data["protocol"] == protocol
    assert done.data["event"]["response"]["status"] == "completed"
    audio = [m for m in _of(client, "audio.assistant")]
    assert audio and {(m.header.rate, m.header.channels) for m in audio} == {(24000, 1)}
    pcm = np.frombuffer(b"".join(m.payload for m in audio), dtype="<i2")
    assert len(pcm) > 24000 and np.abs(pcm).max() > 1000  # over a second of non-silent speech
    item_ids = {m.header.extra["item_id"] for m in audio}
    assert len(item_ids) == 1
    # GA names on the bus whatever the protocol
    assert _of(client, "rt.response.output_audio.delta") and not _of(client, "rt.response.audio.delta")


@pytest.mark.audio
def test_barge_in_flushes_player_and_truncates_at_played_position(procs, client_factory, simulator, tmp_path,
                                                                   pulse, pulse_rig):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": ".*", "reply": "Once upon a time there was a little robot who lived "
                                  "in a quiet town by the sea and every morning it walked down to the harbour to "
                                  "count the boats and talk to the fishermen about the weather."}]))
    sim = simulator("--pace", "realtime", "--rules", str(rules))
    client = client_factory(PREFIXES)
    start_stages(procs, client, sim, env=pulse)
    recorder = MonitorRecorder(pulse)
    utterance = compose([("say", QUESTION), ("silence", 4.0), ("say", "stop please")], 48000)
    speak(procs, utterance, 48000, tmp_path, tail_s=2.0)
    flush = client.wait_for(lambda m: m.topic == "player.flush", timeout_s=60)
    flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=5)
    truncate = client.wait_for(lambda m: m.topic == "rt.sent.conversation.item.truncate", timeout_s=5)
    client.wait_for(lambda m: m.topic == "rt.conversation.item.truncated", timeout_s=5)
    summary = client.wait_for(lambda m: m.topic == "rt.gateway.truncated", timeout_s=5)
    client.collect(0.5)
    recording = recorder.stop()
    started = [m for m in _of(client, "rt.input_audio_buffer.speech_started")]
    assert len(started) == 2 and flush.header.t_ns >= started[1].header.t_ns
    audio_end_ms = truncate.data["event"]["audio_end_ms"]
    assert abs(audio_end_ms - flushed.data["played_ms"]) <= 40
    assert 500 < audio_end_ms < summary.data["received_ms"]
    # what the speaker actually produced: the item's audio up to audio_end_ms, then silence within 30 ms
    item_id = truncate.data["event"]["item_id"]
    source = np.frombuffer(b"".join(m.payload for m in _of(client, "audio.assistant")
                                    if m.header.extra["item_id"] == item_id), dtype="<i2").astype(float)
    heard = follow(recording, source[:audio_end_ms * 24], 24000)
    print(f"heard: {heard.summary()}; player {player_health(client)}; rig {pulse_rig.state()}")
    # every word up to the cut reached the speaker, in order (a busy machine may slip a little silence in)
    assert heard.clear_fraction() >= 0.8 and heard.added_ms <= 200, \
        (heard.summary(), player_health(client), pulse_rig.state())
    start = int(heard.recording_index(0))
    tail = recording[int(heard.recording_index(audio_end_ms * 24)) + 40 * 24:]
    assert np.abs(tail).max(initial=0) < 300, "item audio after the truncation point reached the speaker"
    last_loud = start + np.flatnonzero(np.abs(recording[start:]) > 300)[-1]
    silent_after_ms = (recorder.time_of(last_loud) - flushed.header.t_ns) / 1e6
    print(f"audio_end_ms={audio_end_ms} played_ms={flushed.data['played_ms']} silent {silent_after_ms:.1f} ms "
          f"after flush; heard {summary.data['transcript_heard']!r}")
    assert silent_after_ms <= 30
    generated = summary.data["transcript_generated"]
    assert summary.data["transcript_heard"] and generated.startswith(summary.data["transcript_heard"])
    assert len(summary.data["transcript_heard"]) < len(generated)
    # the server cancelled its own response (interrupt_response): no client cancel, no error for the user
    assert not _of(client, "rt.sent.response.cancel") and not _of(client, "rt.error")
    assert _of(client, "rt.response.done")[-1].data["event"]["response"]["status"] == "cancelled"


@pytest.mark.parametrize("fault", ["drop_mid_response", "error_event", "unknown_event", "malformed_json"])
def test_gateway_survives_every_fault_and_next_turn_works(procs, client_factory, simulator, tmp_path, fault):
    sim = simulator("--pace", "fast", "--fault", fault, "--fault-count", "1")
    client = client_factory(PREFIXES)
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    gateway = procs.started[-3]
    # room for the reply, the fault and the reconnect before the second question (audio spoken while
    # disconnected is dropped, and counted, by design): 7 s at speed 2, for a recogniser slowed by a busy machine
    utterance = compose([("say", QUESTION), ("silence", 14.0), ("say", "please tell me a short story")], 48000)
    speak(procs, utterance, 48000, tmp_path, speed=2.0, tail_s=2.0)
    second = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed"
                             and "story" in m.data["event"]["transcript"], timeout_s=60)
    done = client.wait_for(lambda m: m.topic == "rt.response.done" and m.header.t_ns > second.header.t_ns,
                           timeout_s=60)
    assert done.data["event"]["response"]["status"] == "completed"
    assert gateway.poll() is None, "the gateway must never exit"
    if fault == "drop_mid_response":
        client.wait_for(lambda m: m.topic == "rt.gateway.disconnected")
        resumed = client.wait_for(lambda m: m.topic == "rt.gateway.connected" and m.data["resumed"])
        assert resumed.data["replayed_items"] >= 1  # the first user turn, restored as text
        beat = client.wait_for(lambda m: m.topic == "health.gateway" and m.data["reconnects"] >= 1
                               and m.header.t_ns > resumed.header.t_ns, timeout_s=5)
        assert beat.data["connected"]
    elif fault == "error_event":
        error = client.wait_for(lambda m: m.topic == "rt.error")
        assert error.data["event"]["error"]["code"] == "simulated_error"
    else:
        unknown = client.wait_for(lambda m: m.topic == "rt.unknown")
        assert unknown.data["reason"] == ("unknown_type" if fault == "unknown_event" else "malformed_json")
        client.wait_for(lambda m: m.topic == "health.gateway" and m.data["unknown_events"] == 1, timeout_s=5)


def test_api_key_never_leaves_the_process(procs, client_factory, simulator, tmp_path):
    fake_key = "sk-voicebus-FAKE-KEY-1234567890-do-not-leak"
    sim = simulator("--pace", "fast")
    env = {"OPENAI_API_KEY": fake_key, "OPENAI_BASE_URL": sim}
    tap_out = open(tmp_path / "tap.jsonl", "wb")  # noqa: SIM115 - closed below
    tap = procs.voicebus("tap", "--json", "--stats", "0", stdout=tap_out.fileno())
    client = client_factory(["rt.", "health."])
    start_stages(procs, client, sim, env=env, gateway_args=("--ws-log", str(tmp_path / "ws.jsonl")),
                 player_args=("--wav", str(tmp_path / "played.wav")))
    speak(procs, speech_pcm(QUESTION, "slt", 48000), 48000, tmp_path, speed=2.0, env=env)
    client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    procs.stop_all()
    tap_out.close()
    assert tap.returncode is not None
    scanned = 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            scanned += 1
            assert fake_key.encode() not in path.read_bytes(), f"API key found in {path}"
    for message in client.seen:
        assert fake_key not in repr(message.header)
    assert scanned >= 8  # process logs, ws log, tap capture, WAVs
    assert (tmp_path / "ws.jsonl").stat().st_size > 0 and (tmp_path / "tap.jsonl").stat().st_size > 0


def test_gateway_without_simulator_keeps_retrying_and_says_why(procs, client_factory, tmp_path):
    client = client_factory(["rt.gateway.", "health.gateway"])
    procs.voicebus("gateway", env={"VOICEBUS_SIM_URL": "http://127.0.0.1:9/v1"})
    first = client.wait_for(lambda m: m.topic == "rt.gateway.disconnected", timeout_s=30)
    assert first.data["reason"].startswith("connect failed")
    client.wait_for(lambda m: m.topic == "rt.gateway.disconnected" and m.data["attempt"] >= 2, timeout_s=10)
    beat = client.wait_for(lambda m: m.topic == "health.gateway", timeout_s=5)
    assert beat.data["connected"] is False


def test_gateway_renews_session_before_the_time_limit_and_resumes(procs, client_factory, simulator, tmp_path):
    sim = simulator("--pace", "fast")
    client = client_factory(PREFIXES)
    start_stages(procs, client, sim, gateway_args=("--max-session-min", "0.15"),  # 9 s instead of 55 min
                 player_args=("--wav", str(tmp_path / "p.wav")))
    speak(procs, speech_pcm(QUESTION, "slt", 48000), 48000, tmp_path, speed=2.0)
    client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    lost = client.wait_for(lambda m: m.topic == "rt.gateway.disconnected", timeout_s=20)
    assert "session time limit" in lost.data["reason"]
    resumed = client.wait_for(lambda m: m.topic == "rt.gateway.connected" and m.data["resumed"], timeout_s=10)
    assert resumed.data["replayed_items"] == 2  # the user's words and the assistant's answer, as text
    sent = [m.data["event"] for m in client.collect(1.0) if m.topic == "rt.sent.conversation.item.create"]
    assert [e["item"]["role"] for e in sent[-2:]] == ["user", "assistant"]
    assert sent[-2]["item"]["content"][0]["text"] == QUESTION


def test_a_backchannel_over_a_reply_resumes_it_and_stop_please_cuts_it_at_the_played_position(
        procs, client_factory, simulator, tmp_path):
    """gateway --false-interruptions: "yeah" (flite spells "mhmm" out letter by letter) spoken a second into a long reply pauses it, then resumes it
    where it paused (no truncate, no new response); "stop please" later pauses it, is judged an
    interruption, and cuts it at the played position as a barge-in does, then gets its own answer.
    Spoken through a cued mic timed from the reply's first audio (as `eval` times a barge-in)."""
    from common.wavio import write_wav
    from services.stages.mic import CUE_STATE_TOPIC, CUE_TOPIC

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "weather", "reply": "Once upon a time there was a little robot who "
                                  "lived in a quiet town by the sea and every morning it walked down to the harbour "
                                  "to count the boats and talk to the fishermen about the weather."},
                                 {"match": ".*", "reply": "I heard: {transcript}"}]))
    client = client_factory([*PREFIXES, "mic.", "session."])
    start_stages(procs, client, simulator("--pace", "realtime", "--rules", str(rules)),
                 gateway_args=("--false-interruptions",), player_args=("--wav", str(tmp_path / "played.wav")))
    procs.voicebus("mic", "--cued", "--rate", "48000")
    client.wait_for(lambda m: m.topic == "health.mic", timeout_s=30)
    wavs = {name: write_wav(tmp_path / f"{name}.wav", speech_pcm(text, rate=48000), 48000)
            for name, text in (("question", QUESTION), ("yeah", "yeah"), ("stop", "stop please"))}

    def say(name: str) -> None:
        client.send_event(CUE_TOPIC, {"cue": name, "path": str(wavs[name])})
        client.wait_for(lambda m: m.topic == CUE_STATE_TOPIC and m.data.get("cue") == name
                        and m.data.get("state") == "ended", timeout_s=20)

    say("question")
    first = client.wait_for(lambda m: m.topic == "audio.assistant", timeout_s=60)
    reply = first.header.extra["item_id"]
    client.collect(1.0)
    say("yeah")
    resumed = client.wait_for(lambda m: m.topic == "rt.gateway.interruption" and m.data["decision"] == "resumed",
                              timeout_s=30)
    client.collect(2.0)
    say("stop")
    cut = client.wait_for(lambda m: m.topic == "rt.gateway.interruption" and m.data["decision"] == "interrupted",
                          timeout_s=30)
    truncate = client.wait_for(lambda m: m.topic == "rt.sent.conversation.item.truncate", timeout_s=10)
    flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=10)
    answer = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done"
                             and m.data["event"]["transcript"] == "I heard: stop please", timeout_s=60)
    decisions = [(m.data["decision"], m.data["item_id"]) for m in _of(client, "rt.gateway.interruption")]
    assert decisions == [("paused", reply), ("resumed", reply), ("paused", reply), ("interrupted", reply)], decisions
    assert resumed.data["transcript"] == "yeah" and resumed.data["speech_s"] < 1.5
    assert "stop" in cut.data["transcript"]
    # nothing was cut for the backchannel: one truncate in all, after the interruption, of the same reply
    truncates = _of(client, "rt.sent.conversation.item.truncate")
    assert len(truncates) == 1 and truncate.header.t_ns > cut.header.t_ns
    assert truncate.data["event"]["item_id"] == reply
    assert abs(truncate.data["event"]["audio_end_ms"] - flushed.data["played_ms"]) <= 40
    # while held nothing played; after "resumed" the reply played on from there
    held = [m.data["played_ms"] for m in _of(client, "player.state") if m.data.get("item_id") == reply
            and m.data.get("held") and m.header.t_ns < resumed.header.t_ns]
    assert len(set(held)) == 1, held  # paused: the position did not move while "yeah" was weighed
    after = [m.data["played_ms"] for m in _of(client, "player.state") if m.data.get("item_id") == reply
             and not m.data.get("held") and resumed.header.t_ns < m.header.t_ns < cut.header.t_ns]
    assert held and after and max(after) > max(held) + 500, (held, after)
    assert answer.header.t_ns > truncate.header.t_ns
    # the server never cancelled or answered on its own: the gateway did (create/interrupt_response off)
    assert _of(client, "rt.sent.response.cancel") or \
        _of(client, "rt.response.done")[0].data["event"]["response"]["status"] != "cancelled"



MCP_RULES = [{"match": r"forecast for (?P<city>\w+)", "call": {"name": "get_forecast", "arguments": {"city": "{city}"}},
              "after_call": "Tomorrow in {city}: {output}."},
             {"match": r"table for (?P<people>\w+)", "call": {"name": "book_table", "arguments": {
                 "restaurant": "Luigi", "people": "{people}"}}, "after_call": "Done: {output}."},
             {"match": ".*", "reply": "I heard: {transcript}"}]


def test_server_side_mcp_tools_are_called_by_the_server_after_the_allow_list_approves(procs, client_factory, simulator,
                                                                                        tmp_path, remote_mcp):
    """gateway --server-mcp demo=URL --mcp-approve get_forecast: the Realtime server (the simulator, as OpenAI
    does) lists the remote MCP server's tools and asks before each call; the gateway approves get_forecast and
    refuses book_table, the spoken answers say so, and the logger stores the call with the turn that made it."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(MCP_RULES))
    traces = tmp_path / "traces"
    client = client_factory([*PREFIXES, "session."])
    procs.voicebus("logger", "--root", str(traces), "--no-upload", "--no-report")
    start_stages(procs, client, simulator("--rules", str(rules)),
                 gateway_args=("--server-mcp", f"demo={remote_mcp}", "--mcp-approve", "get_forecast"),
                 player_args=("--wav", str(tmp_path / "played.wav")))
    listed = client.wait_for(lambda m: m.topic == "rt.conversation.item.done"
                             and m.data["event"]["item"]["type"] == "mcp_list_tools", timeout_s=30)
    assert {t["name"] for t in listed.data["event"]["item"]["tools"]} == {"get_forecast", "book_table"}
    speak(procs, speech_pcm("what is the forecast for paris", rate=48000), 48000, tmp_path)
    approved = client.wait_for(lambda m: m.topic == "rt.gateway.mcp_approval", timeout_s=60)
    answer = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done", timeout_s=60)
    assert approved.data["name"] == "get_forecast" and approved.data["approve"]
    assert answer.data["event"]["transcript"] == "Tomorrow in paris: light rain, 14 degrees."
    client.collect(4.0)  # the answer plays out
    client.send_event("gateway.send", {"event": {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "a table for 4 please"}]}}})
    client.send_event("gateway.send", {"event": {"type": "response.create"}})
    refused = client.wait_for(lambda m: m.topic == "rt.gateway.mcp_approval" and m.data["name"] == "book_table",
                              timeout_s=30)
    said = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done"
                           and m.header.t_ns > refused.header.t_ns, timeout_s=60)
    assert not refused.data["approve"] and "--mcp-approve" in refused.data["reason"]
    assert said.data["event"]["transcript"] == "I was not allowed to use book_table, so I cannot do that."
    sent = [m.data["event"] for m in client.seen if m.topic == "rt.sent.conversation.item.create"
            and m.data["event"]["item"]["type"] == "mcp_approval_response"]
    assert [e["item"]["approve"] for e in sent] == [True, False]
    health = client.wait_for(lambda m: m.topic == "health.gateway" and m.data.get("mcp_refused") == 1, timeout_s=10)
    assert health.data["mcp_approved"] == 1
    client.collect(4.0)
    client.send_event("session.end", {"session": "test-mcp-over", "reason": "test over"})
    turns = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(turns) < 2:
        turns = [json.loads(line) for path in traces.glob("*/turns.jsonl") for line in path.read_text().splitlines()]
        time.sleep(0.5)
    forecast = next(t for t in turns if t["tools"])
    [call] = forecast["tools"]
    assert call["name"] == "get_forecast" and call["source"] == "server-mcp:demo"
    assert call["output"] == "light rain, 14 degrees" and call["approval_request_id"]
    assert forecast["assistant"]["transcript_heard"] == "Tomorrow in paris: light rain, 14 degrees."
    assert any(e["kind"] == "mcp_approval" and e["approve"] for e in forecast["events"]), forecast["events"]


def test_an_uninterruptible_greeting_is_heard_whole_while_the_caller_talks_over_it(procs, client_factory, simulator,
                                                                                    tmp_path):
    """gateway --greeting TEXT --greeting-uninterruptible: the line goes live (the mic's first audio) and the
    greeting is said; "stop please" spoken over it reaches the server as silence, so nothing is cut and the
    greeting plays to its end; the caller's next words, after it, are heard and answered."""
    greeting = "Thank you for calling. This call may be recorded for quality and training."
    client = client_factory(PREFIXES)
    start_stages(procs, client, simulator(), gateway_args=("--greeting", greeting, "--greeting-uninterruptible"),
                 player_args=("--wav", str(tmp_path / "played.wav")))
    speech = compose([("silence", 1.5), ("say", "stop please"), ("silence", 6.0), ("say", QUESTION)], 48000)
    speak(procs, speech, 48000, tmp_path)
    said = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done", timeout_s=60)
    answer = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed",
                             timeout_s=60)
    assert said.data["event"]["transcript"] == greeting
    assert answer.data["event"]["transcript"] == QUESTION, "the words after the greeting are heard"
    greeting_item = said.data["event"]["item_id"]
    played = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("item_id") == greeting_item
                             and not m.data.get("playing") and m.data["played_ms"] >= m.data["received_ms"] - 1,
                             timeout_s=30)
    assert played.data["played_ms"] > 3000
    transcribed = [m.data["event"]["transcript"] for m in client.seen
                   if m.topic == "rt.conversation.item.input_audio_transcription.completed"]
    assert transcribed == [QUESTION], transcribed  # "stop please" never reached the server
    assert not [m for m in client.seen if m.topic in ("player.flush", "rt.sent.conversation.item.truncate")]
    health = client.wait_for(lambda m: m.topic == "health.gateway" and m.data.get("muted_frames", 0) > 0, timeout_s=10)
    assert health.data["barge_ins"] == 0


def test_a_session_file_sets_the_session_and_a_flag_on_the_command_line_wins_over_it(procs, client_factory, simulator,
                                                                                     tmp_path):
    session_file = tmp_path / "session.yaml"
    session_file.write_text("vad_type: semantic_vad\neagerness: low\nfalse_interruptions: true\nvoice: ash\n"
                            "noise_reduction: far_field\n")
    client = client_factory(PREFIXES)
    start_stages(procs, client, simulator(), gateway_args=("--session-file", str(session_file), "--eagerness", "high"),
                 stages=("gateway",))
    update = client.wait_for(lambda m: m.topic == "rt.sent.session.update", timeout_s=10).data["event"]["session"]
    assert update["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "high",
                                                          "create_response": False, "interrupt_response": False}
    assert update["audio"]["output"]["voice"] == "ash" and update["audio"]["input"]["noise_reduction"] == {
        "type": "far_field"}
    session_file.write_text("eagerness: sometimes\n")
    bad = procs.voicebus("gateway", "--session-file", str(session_file), name="gateway-bad")
    assert bad.wait(timeout=30) == 2
    assert f"{session_file}: eagerness: Input should be 'auto', 'low', 'medium' or 'high'" in procs.log_of(bad)
