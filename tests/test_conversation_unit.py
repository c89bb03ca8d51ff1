"""The logger's turn builder without sockets: bus messages in, stored turn records out."""

from __future__ import annotations

import time

from common.envelope import Stamper
from common.utterances import tone
from services.stages.logger.conversation import ConversationBuilder

RESPONSE = {"id": "resp_1", "object": "realtime.response", "status": "in_progress", "output": []}


def _feed(builder: ConversationBuilder, stamper: Stamper, topic: str, data: dict) -> None:
    builder.handle(stamper.event(topic, data, time.time_ns()), time.monotonic())


def test_turn_cut_short_by_a_stop_is_stored_with_what_was_said_and_heard_marked_unfinished():
    builder, gateway, player = ConversationBuilder(), Stamper("gateway", "s"), Stamper("player", "s")
    _feed(builder, gateway, "rt.input_audio_buffer.speech_started", {"event": {"item_id": "u1", "audio_start_ms": 0}})
    _feed(builder, gateway, "rt.conversation.item.input_audio_transcription.completed",
          {"event": {"item_id": "u1", "transcript": "tell me a story"}})
    _feed(builder, gateway, "rt.response.created", {"event": {"response": RESPONSE}})
    _feed(builder, gateway, "rt.response.output_item.added", {"event": {"response_id": "resp_1", "item": {"id": "a1"}}})
    words = ["once", "upon", "a", "time", "there", "was", "a", "robot", "who", "lived", "by", "the", "sea"]
    for index, word in enumerate(words):
        _feed(builder, gateway, "rt.response.output_audio_transcript.delta",
              {"event": {"item_id": "a1", "delta": ("" if index == 0 else " ") + word}})
    builder.handle(gateway.audio("audio.assistant", tone(300, 12.0, 24000), rate=24000, channels=1, pts=0,
                                 t_capture_ns=time.time_ns(), t_ns=time.time_ns(), item_id="a1"), time.monotonic())
    _feed(builder, player, "player.state", {"item_id": "a1", "played_ms": 8100.0, "item_started_ns": 1})
    assert builder.tick(time.monotonic()) == []  # not complete: no response.done yet
    [(record, audio)] = builder.tick(time.monotonic(), final=True)  # the pipeline stops
    assistant = record["assistant"]
    assert assistant["status"] == "unfinished" and assistant["unfinished"] is True
    assert assistant["transcript_generated"] == " ".join(words)
    heard = assistant["transcript_heard"]
    assert heard and assistant["transcript_generated"].startswith(heard) and len(heard) < len(" ".join(words))
    assert assistant["played_ms"] == 8100.0 and len(audio["assistant-played"]) == 8100 * 48
    assert record["user"]["transcript"] == "tell me a story"


def test_completed_turn_is_not_marked_unfinished():
    builder, gateway = ConversationBuilder(), Stamper("gateway", "s")
    _feed(builder, gateway, "rt.response.created", {"event": {"response": RESPONSE}})
    _feed(builder, gateway, "rt.response.output_item.added", {"event": {"response_id": "resp_1", "item": {"id": "a1"}}})
    _feed(builder, gateway, "rt.response.output_audio_transcript.done", {"event": {"item_id": "a1", "transcript": "hi"}})
    _feed(builder, gateway, "rt.response.done", {"event": {"response": {**RESPONSE, "status": "completed"}}})
    [(record, _)] = builder.tick(time.monotonic() + 10)
    assert record["assistant"]["status"] == "completed" and record["assistant"]["unfinished"] is False


def test_a_turn_that_called_tools_is_one_turn_with_both_responses_usage():
    builder, gateway = ConversationBuilder(), Stamper("gateway", "s")
    _feed(builder, gateway, "rt.input_audio_buffer.speech_started", {"event": {"item_id": "u1", "audio_start_ms": 0}})
    _feed(builder, gateway, "rt.response.created", {"event": {"response": RESPONSE}})
    _feed(builder, gateway, "rt.response.output_item.added",
          {"event": {"response_id": "resp_1", "item": {"id": "fc", "type": "function_call"}}})
    _feed(builder, gateway, "tool.call", {"call_id": "c1", "name": "get_current_time", "arguments": {},
                                          "response_id": "resp_1"})
    usage = {"total_tokens": 10, "output_token_details": {"text_tokens": 4}}
    _feed(builder, gateway, "rt.response.done", {"event": {"response": {**RESPONSE, "status": "completed",
                                                                        "usage": usage}}})
    _feed(builder, gateway, "rt.gateway.tool_output", {"call_id": "c1", "name": "get_current_time", "output": "13",
                                                       "error": None, "response_id": "resp_1", "round_trip_ms": 2.5})
    assert builder.tick(time.monotonic() + 10) == []  # waits for the spoken answer
    _feed(builder, gateway, "rt.response.created", {"event": {"response": {**RESPONSE, "id": "resp_2"}}})
    _feed(builder, gateway, "rt.response.output_item.added", {"event": {"response_id": "resp_2", "item": {"id": "a2"}}})
    _feed(builder, gateway, "rt.response.output_audio_transcript.done", {"event": {"item_id": "a2", "transcript": "13"}})
    _feed(builder, gateway, "rt.response.done", {"event": {"response": {**RESPONSE, "id": "resp_2",
                                                                        "status": "completed", "usage": usage}}})
    [(record, _)] = builder.tick(time.monotonic() + 10)
    assert record["key"] == "resp_2" and record["assistant"]["transcript_heard"] == "13"
    assert [t["output"] for t in record["tools"]] == ["13"] and record["timing"]["tool_ms"] == 2.5
    assert record["usage"] == {"total_tokens": 20, "output_token_details": {"text_tokens": 8}}


def test_user_audio_is_cut_through_append_runs_with_silence_for_a_frame_that_never_arrived():
    """The gateway reports appended audio as runs of pts-contiguous frames; the logger maps the
    server's clock through them frame by frame, and a frame it never received becomes silence."""
    builder, resample, gateway = ConversationBuilder(), Stamper("resample", "s"), Stamper("gateway", "s")
    frames = [bytes([index + 1]) * 960 for index in range(10)]  # 10 frames of 480 samples, distinct bytes
    for index, pcm in enumerate(frames):
        if index == 4:
            continue  # lost on the way to the logger (the gateway still sent it)
        builder.handle(resample.audio("audio.user", pcm, rate=24000, channels=1, pts=1000 + 480 * index,
                                      t_capture_ns=1, t_ns=1), time.monotonic())
    # two runs: frames 0-5 and 6-9 (a run is cut at a length, not at a gap here)
    for first, count in ((0, 6), (6, 4)):
        _feed(builder, gateway, "rt.sent.input_audio_buffer.append",
              {"event": {"type": "input_audio_buffer.append", "audio_bytes": 960 * count, "pts": 1000 + 480 * first,
                         "frames": count}})
    # server ms 30..170 = samples 720..4080 = frames 1.5 .. 8.5
    cut = builder.cut_user_audio(30, 170)
    expected = b"".join(frames)[720 * 2:4080 * 2]
    hole = slice((480 * 4 - 720) * 2, (480 * 5 - 720) * 2)
    assert len(cut) == len(expected)
    assert cut[hole] == bytes(960)  # frame 4: silence
    assert cut[:hole.start] == expected[:hole.start] and cut[hole.stop:] == expected[hole.stop:]


def test_a_turn_is_timed_from_the_users_first_word_to_the_last_sample_played_and_keeps_each_response():
    builder, gateway, player = ConversationBuilder(), Stamper("gateway", "s"), Stamper("player", "s")
    speech_end_ns = 1_800_000_000_000_000_000
    _feed(builder, gateway, "rt.input_audio_buffer.speech_started", {"event": {"item_id": "u1", "audio_start_ms": 500}})
    _feed(builder, gateway, "rt.input_audio_buffer.speech_stopped", {"event": {"item_id": "u1", "audio_end_ms": 2500}})
    _feed(builder, gateway, "rt.gateway.speech_end", {"item_id": "u1", "speech_end_capture_ns": speech_end_ns})
    builder.handle(gateway.event("rt.response.created", {"event": {"response": RESPONSE}}, speech_end_ns + 10**8),
                   time.monotonic())
    _feed(builder, gateway, "rt.response.output_item.added", {"event": {"response_id": "resp_1", "item": {"id": "a1"}}})
    builder.handle(gateway.audio("audio.assistant", tone(300, 3.0, 24000), rate=24000, channels=1, pts=0,
                                 t_capture_ns=time.time_ns(), t_ns=time.time_ns(), item_id="a1"), time.monotonic())
    done = {**RESPONSE, "status": "completed", "usage": {"total_tokens": 7}, "output": [{"type": "message"}]}
    builder.handle(gateway.event("rt.response.done", {"event": {"response": done}}, speech_end_ns + 9 * 10**8),
                   time.monotonic())
    _feed(builder, player, "player.state", {"item_id": "a1", "played_ms": 3000.0, "item_started_ns": speech_end_ns + 10**9})
    [(record, _)] = builder.tick(time.monotonic())
    assert record["started_ns"] == speech_end_ns - 2 * 10**9  # 2 s of speech before its end, on the capture clock
    assert record["ended_ns"] == speech_end_ns + 4 * 10**9  # playing began 1 s after, 3 s of reply played
    [response] = record["responses"]
    assert response == {"id": "resp_1", "created_ns": speech_end_ns + 10**8, "done_ns": speech_end_ns + 9 * 10**8,
                        "status": "completed", "usage": {"total_tokens": 7}, "reason": None, "output": ["message"]}


def test_an_interruption_weighed_and_resumed_is_in_the_turn_and_the_session_events():
    builder, gateway = ConversationBuilder(), Stamper("gateway", "s")
    _feed(builder, gateway, "rt.input_audio_buffer.speech_started", {"event": {"item_id": "u1", "audio_start_ms": 0}})
    _feed(builder, gateway, "rt.response.created", {"event": {"response": RESPONSE}})
    _feed(builder, gateway, "rt.response.output_item.added", {"event": {"response_id": "resp_1", "item": {"id": "a1"}}})
    for decision, said in (("paused", ""), ("resumed", "yeah")):
        _feed(builder, gateway, "rt.gateway.interruption", {"decision": decision, "item_id": "a1", "transcript": said,
                                                            "speech_s": 0.32 if said else None})
    [(record, _audio)] = builder.tick(time.monotonic(), final=True)
    kept = [(e["kind"], e["decision"], e["transcript"]) for e in record["events"] if e["kind"] == "interruption"]
    assert kept == [("interruption", "paused", ""), ("interruption", "resumed", "yeah")]
    assert [e["decision"] for e in builder.session_events if e["kind"] == "interruption"] == ["paused", "resumed"]


def test_an_idle_prompt_and_keys_pressed_are_turns_of_their_own():
    builder, gateway = ConversationBuilder(), Stamper("gateway", "s")
    _feed(builder, gateway, "rt.gateway.idle_prompt", {"count": 1, "prompt": "Are you still there?", "after_s": 5})
    _feed(builder, gateway, "rt.response.created", {"event": {"response": RESPONSE}})
    _feed(builder, gateway, "rt.gateway.keys", {"keys": "1#", "text": "The caller pressed 1 # on the phone keypad.",
                                                 "last_key_ns": 123})
    _feed(builder, gateway, "rt.response.created", {"event": {"response": {**RESPONSE, "id": "resp_2"}}})
    records = [record for record, _audio in builder.tick(time.monotonic(), final=True)]
    prompt, keys = sorted(records, key=lambda r: r["assistant"]["response_id"])
    assert prompt["assistant"]["response_id"] == "resp_1" and not prompt["user"]["transcript"]
    assert [e["kind"] for e in prompt["events"]] == ["idle_prompt"]
    assert keys["assistant"]["response_id"] == "resp_2" and keys["user"]["keys"] == "1#"
    assert keys["user"]["transcript"] == "The caller pressed 1 # on the phone keypad."
    assert keys["timing"]["speech_end_ns"] == 123
