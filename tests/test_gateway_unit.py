"""Gateway logic without sockets: event parsing and naming, barge-in arithmetic, echo guard."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest

from common.envelope import Stamper
from common.realtime_types import (
    build_validators,
    client_event_models,
    server_event_models,
    validate_client_event,
)
from common.utterances import tone
from services.stages.gateway.bargein import AudibleTracker, EchoGuard
from services.stages.gateway.events import parse_server_event, strip_audio
from services.stages.gateway.session import SessionSettings, replay_item, session_update


def test_beta_names_become_ga_and_audio_is_stripped():
    pcm = tone(440, 0.1, 24000)
    raw = {"type": "response.audio.delta", "event_id": "e", "response_id": "r", "item_id": "i", "output_index": 0,
           "content_index": 0, "delta": base64.b64encode(pcm).decode()}
    parsed = parse_server_event(json.dumps(raw), "beta")
    assert parsed.type == "response.output_audio.delta"
    assert parsed.audio == pcm
    assert "delta" not in parsed.data and parsed.data["delta_bytes"] == len(pcm)
    ga = parse_server_event(json.dumps({**raw, "type": "response.output_audio.delta"}), "ga")
    assert ga.type == parsed.type and ga.audio == pcm


def test_unknown_malformed_and_invalid_events_become_unknown():
    assert parse_server_event("{nope", "ga").problem == "malformed_json"
    assert parse_server_event(json.dumps({"type": "server.new_thing", "event_id": "e"}), "ga").problem == "unknown_type"
    assert parse_server_event(json.dumps({"type": "response.done", "event_id": "e"}), "ga").problem == "invalid"
    assert parse_server_event(json.dumps([1]), "ga").problem == "not_an_event"
    # a GA-only event is unknown to a beta session
    assert parse_server_event(json.dumps({"type": "conversation.item.done", "event_id": "e", "item": {
        "type": "message", "role": "user", "content": []}}), "beta").problem == "unknown_type"


def test_strip_audio_recurses_into_item_content():
    item = {"type": "message", "content": [{"type": "input_audio", "audio": "QUJD", "transcript": "hi"}]}
    stripped = strip_audio({"type": "conversation.item.retrieved", "item": item})
    assert stripped["item"]["content"][0] == {"type": "input_audio", "audio_bytes": 3, "transcript": "hi"}


def test_outgoing_events_validate_against_sdk_client_types():
    for protocol in ("ga", "beta"):
        validate_client_event(session_update(SessionSettings(), protocol), protocol)
        validate_client_event(replay_item("user", "hello", protocol), protocol)
        validate_client_event(replay_item("assistant", "hi there", protocol), protocol)
        semantic = session_update(SessionSettings(vad_type="semantic_vad", eagerness="low"), protocol)
        validate_client_event(semantic, protocol)
        turn = semantic["session"]["audio"]["input"]["turn_detection"] if protocol == "ga" else \
            semantic["session"]["turn_detection"]
        assert turn == {"type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}


def test_truncate_uses_played_position_capped_by_received_audio():
    tracker = AudibleTracker()
    item = tracker.add_audio("item_1", "resp_1", 0, tone(300, 1.0, 24000))
    assert item.received_ms == 1000
    assert tracker.truncate_at_ms(item, 640.4) == 640
    assert tracker.truncate_at_ms(item, 1500) == 1000  # never past what the server sent
    tracker.on_player_state({"item_id": "item_1", "played_ms": 640, "playing": True, "buffered_ms": 300}, 0.0)
    assert tracker.audible_item() is item
    tracker.on_player_state({"item_id": "item_1", "played_ms": 1000, "playing": False, "buffered_ms": 0}, 1.0)
    assert tracker.audible_item() is None  # fully played: nothing to interrupt
    second = tracker.add_audio("item_2", "resp_2", 0, tone(300, 0.2, 24000))
    assert tracker.audible_item() is second  # received, not yet started by the player


def test_echo_guard_gates_echo_and_passes_louder_user_speech():
    tracker = AudibleTracker()
    tracker.add_audio("item_1", "resp_1", 0, tone(300, 2.0, 24000, amplitude=0.5))
    tracker.on_player_state({"item_id": "item_1", "played_ms": 0, "playing": True}, now=0.0)
    tracker.on_player_state({"item_id": "item_1", "played_ms": 800, "playing": True}, now=0.8)
    guard = EchoGuard()
    echo = (np.frombuffer(tone(300, 0.02, 24000, amplitude=0.15), dtype="<i2")).tobytes()  # -10 dB coupling
    user = tone(180, 0.02, 24000, amplitude=0.9)
    assert not guard.admit(echo, tracker, now=1.0)
    assert guard.admit(user, tracker, now=1.0)
    tracker.on_player_state({"item_id": "item_1", "played_ms": 2000, "playing": False}, now=2.5)
    assert not guard.admit(echo, tracker, now=2.6)  # the echo tail is still arriving
    assert guard.admit(echo, tracker, now=3.0)  # nothing playing any more: everything passes
    assert (guard.gated_frames, guard.passed_frames) == (2, 1)  # counted only while an echo is possible


def test_echo_guard_engages_before_the_player_reports():
    tracker = AudibleTracker()
    guard = EchoGuard()
    quiet_user = tone(180, 0.02, 24000, amplitude=0.02)
    assert guard.admit(quiet_user, tracker, now=0.0)  # nothing received: no echo possible
    tracker.add_audio("item_1", "resp_1", 0, tone(300, 1.0, 24000, amplitude=0.5))
    echo = tone(300, 0.02, 24000, amplitude=0.2)
    assert not guard.admit(echo, tracker, now=0.05)  # received, the player has not said a word yet


def _gateway(interrupt_response: bool):
    from common.stage import Output
    from services.stages.gateway.stage import GatewayStage

    stage = GatewayStage("ws://127.0.0.1:9/v1/realtime", [], "ga", SessionSettings(interrupt_response=interrupt_response))
    stage.out, published = Output.collecting("gateway")
    sent: list[dict] = []
    stage.socket.connected = True
    stage.socket.send = lambda text: sent.append(json.loads(text)) or True  # the wire, without a server
    return stage, published, sent


def _server(stage, **event) -> None:
    stage._on_server_text(json.dumps({"event_id": "e", **event}), 0)


def _playing_response(stage) -> None:
    _server(stage, type="response.created", response={"id": "resp_1", "object": "realtime.response",
                                                       "status": "in_progress", "output": []})
    _server(stage, type="response.output_audio.delta", response_id="resp_1", item_id="item_1", output_index=0,
            content_index=0, delta=base64.b64encode(tone(300, 0.5, 24000)).decode())
    stage.tracker.on_player_state({"item_id": "item_1", "played_ms": 200, "playing": True, "buffered_ms": 100}, 0.0)


def test_barge_in_leaves_the_cancel_to_the_server_when_it_interrupts_itself():
    stage, published, sent = _gateway(interrupt_response=True)
    _playing_response(stage)
    _server(stage, type="input_audio_buffer.speech_started", audio_start_ms=1000, item_id="item_u")
    assert [m.topic for m in published if m.topic == "player.flush"] == ["player.flush"]
    assert not [e for e in sent if e["type"] == "response.cancel"]
    # without interrupt_response the gateway must cancel itself
    stage, published, sent = _gateway(interrupt_response=False)
    _playing_response(stage)
    _server(stage, type="input_audio_buffer.speech_started", audio_start_ms=1000, item_id="item_u")
    assert [e["type"] for e in sent if e["type"] == "response.cancel"] == ["response.cancel"]


def test_lost_races_are_benign_errors_not_failures():
    stage, published, _ = _gateway(interrupt_response=True)
    for code in ("response_cancel_not_active", "conversation_already_has_active_response", "invalid_value"):
        _server(stage, type="error", error={"type": "invalid_request_error", "code": code, "message": "m"})
    errors = [m.data for m in published if m.topic == "rt.error"]
    assert [e.get("benign", False) for e in errors] == [True, True, False]
    assert stage.counts["benign_errors"] == 2 and stage.counts["server_errors"] == 1


CALL_ITEM = {"id": "item_fc", "object": "realtime.item", "type": "function_call", "status": "completed",
             "name": "get_current_time", "call_id": "call_1", "arguments": '{"timezone": "UTC"}'}


def _function_call_response(stage, response_id="resp_fc", item=None) -> None:
    _server(stage, type="response.created", response={"id": response_id, "object": "realtime.response",
                                                      "status": "in_progress", "output": []})
    _server(stage, type="response.output_item.done", response_id=response_id, output_index=0, item=item or CALL_ITEM)
    _server(stage, type="response.done", response={"id": response_id, "object": "realtime.response",
                                                   "status": "completed", "output": [item or CALL_ITEM]})


def test_function_call_becomes_tool_call_and_its_result_an_output_then_one_response_create():
    stage, published, sent = _gateway(interrupt_response=True)
    stage.handle(Stamper("tools", "s").event("tools.available", {"tools": [
        {"name": "get_current_time", "description": "d", "parameters": {"type": "object"}, "timeout_s": 2}]}, 0))
    assert [e["session"]["tools"][0]["name"] for e in sent if e["type"] == "session.update"] == ["get_current_time"]
    _function_call_response(stage)
    [call] = [m.data for m in published if m.topic == "tool.call"]
    assert call == {"call_id": "call_1", "name": "get_current_time", "arguments": {"timezone": "UTC"},
                    "response_id": "resp_fc", "item_id": "item_fc"}
    stage.handle(Stamper("tools", "s").event("tool.result", {"call_id": "call_1", "name": "get_current_time",
                                                             "output": '{"hour": 13}', "error": None}, 0))
    output, create = sent[-2:]
    assert output == {"type": "conversation.item.create", "item": {"type": "function_call_output",
                                                                    "call_id": "call_1", "output": '{"hour": 13}'}}
    assert create == {"type": "response.create", "response": {"metadata": {"voicebus_followup": "resp_fc"}}}
    for event in (output, create):
        validate_client_event(event, "ga")
    # a second result for the same call (a restarted tools stage, a duplicate) is not sent twice
    stage.handle(Stamper("tools", "s").event("tool.result", {"call_id": "call_1", "output": "again"}, 0))
    assert sent[-1] == create and stage.counts["late_tool_results"] == 1


def test_no_stale_response_create_after_the_user_spoke_and_orphans_are_cancelled():
    stage, published, sent = _gateway(interrupt_response=True)
    _function_call_response(stage)
    _server(stage, type="input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")  # a new turn
    stage.handle(Stamper("tools", "s").event("tool.result", {"call_id": "call_1", "output": "13"}, 0))
    assert sent[-1]["type"] == "conversation.item.create" and not [e for e in sent if e["type"] == "response.create"]
    # a follow-up asked for before the user spoke but created after it is cancelled by id
    stage, published, sent = _gateway(interrupt_response=True)
    _function_call_response(stage, "resp_a")
    stage.handle(Stamper("tools", "s").event("tool.result", {"call_id": "call_1", "output": "13"}, 0))
    assert sent[-1]["type"] == "response.create"
    _server(stage, type="input_audio_buffer.speech_started", audio_start_ms=10, item_id="u3")
    _server(stage, type="response.created", response={"id": "resp_orphan", "object": "realtime.response",
                                                      "status": "in_progress", "output": [],
                                                      "metadata": {"voicebus_followup": "resp_a"}})
    assert sent[-1] == {"type": "response.cancel", "response_id": "resp_orphan"}
    assert stage.calls.counts["orphans_cancelled"] == 1


def test_malformed_arguments_and_a_silent_tools_stage_get_error_outputs_from_the_gateway(monkeypatch):
    stage, published, sent = _gateway(interrupt_response=True)
    _function_call_response(stage, item={**CALL_ITEM, "arguments": '{"timezone": '})
    assert not [m for m in published if m.topic == "tool.call"]
    output = json.loads(sent[-2]["item"]["output"])
    assert "not valid JSON" in output["error"] and sent[-1]["type"] == "response.create"
    stage, published, sent = _gateway(interrupt_response=True)
    _function_call_response(stage, "resp_b", {**CALL_ITEM, "call_id": "call_2"})
    assert [m.data["call_id"] for m in published if m.topic == "tool.call"] == ["call_2"]
    import services.stages.gateway.stage as gateway_stage

    later = gateway_stage.time.monotonic() + 60
    monkeypatch.setattr(gateway_stage.time, "monotonic", lambda: later)
    stage.tick()
    assert "did not answer in time" in json.loads(sent[-2]["item"]["output"])["error"]
    assert sent[-1]["type"] == "response.create" and stage.calls.counts["tool_timeouts"] == 1


def test_appended_audio_goes_on_the_bus_as_runs_published_before_any_later_event():
    """One rt.sent.input_audio_buffer.append per run of contiguous frames (not per 20 ms frame); a
    run is published when it reaches APPEND_RUN_S, at a gap in pts, and before any other event of
    the gateway, so the logger has mapped the server's clock before speech_started refers to it."""
    from common.stage import Output
    from services.stages.gateway.stage import APPEND_RUN_S

    stage, published, sent = _gateway(interrupt_response=True)
    mic = Output.collecting("resample")[0]
    per_run = int(APPEND_RUN_S * 50)
    for index in range(per_run + 3):  # one full run, then 3 frames
        stage.handle(mic.audio("audio.user", bytes(960), rate=24000, channels=1, pts=480 * index, t_capture_ns=1,
                               t_callback_ns=5))
    runs = [m for m in published if m.topic == "rt.sent.input_audio_buffer.append"]
    assert len(sent) == per_run + 3 and len(runs) == 1
    assert runs[0].data["event"]["frames"] == per_run and runs[0].data["event"]["pts"] == 0
    assert len(runs[0].data["event"]["t_sent_ns"]) == per_run and runs[0].data["event"]["t_callback_ns"][0] == 5
    stage.handle(mic.audio("audio.user", bytes(960), rate=24000, channels=1, pts=480 * 1000, t_capture_ns=1))  # gap
    _server(stage, type="input_audio_buffer.speech_started", audio_start_ms=100, item_id="item_u")
    topics = [m.topic for m in published]
    runs = [m.data["event"] for m in published if m.topic == "rt.sent.input_audio_buffer.append"]
    assert [(r["pts"], r["frames"]) for r in runs] == [(0, per_run), (480 * per_run, 3), (480 * 1000, 1)]
    assert topics.index("rt.input_audio_buffer.speech_started") > max(
        i for i, t in enumerate(topics) if t == "rt.sent.input_audio_buffer.append")


def test_a_reply_no_player_reported_on_is_not_audible_once_it_would_have_played_out():
    tracker = AudibleTracker()
    item = tracker.add_audio("item_1", "resp_1", 0, tone(300, 1.0, 24000), now=100.0)
    assert tracker.audible_item(now=100.5) is item  # a player may not have reported yet
    assert tracker.audible_item(now=102.5) is None  # 1 s of audio, 1.5 s past it: nobody is hearing it


@pytest.mark.parametrize("status", ["completed", "cancelled"])
def test_speech_after_a_reply_played_to_its_end_sends_no_truncate_unless_the_server_cut_it(status):
    """The player's flushed state says all it was sent was heard: a new turn, not an interruption, if the
    reply had finished. A reply the server cancelled as the user spoke (interrupt_response) stopped where
    it was cut: all of it was heard, and it was still cut there."""
    from common.envelope import Stamper

    stage, published, sent = _gateway(interrupt_response=True)
    now = time.monotonic()
    stage.tracker.add_audio("item_1", "resp_1", 0, tone(300, 1.0, 24000), now=now)
    _server(stage, type="response.done", response={"id": "resp_1", "object": "realtime.response", "status": status,
                                                   "output": []})
    # a player whose reports still lag the end (a browser's buffer): audible by its last report
    stage.tracker.on_player_state({"item_id": "item_1", "played_ms": 908, "playing": False, "buffered_ms": 0}, now)
    stage._barge_in()
    assert [m.topic for m in published] == ["rt.response.done", "player.flush"]
    flushed = Stamper("player", "test").event("player.state", {"item_id": "item_1", "played_ms": 1000.0,
                                                               "flushed": True, "playing": False}, 1)
    stage.handle(flushed)
    truncates = [e for e in sent if e["type"] in ("conversation.item.truncate", "conversation.item.delete")]
    if status == "completed":
        assert not truncates and not [m for m in published if m.topic == "rt.gateway.truncated"]
        assert stage.counts["played_to_end"] == 1 and stage.counts["truncations"] == 0
    else:
        assert [(e["type"], e.get("audio_end_ms")) for e in truncates] == [("conversation.item.truncate", 1000)]
        assert stage.counts["played_to_end"] == 0 and stage.counts["truncations"] == 1


def test_a_conversation_that_ends_closes_its_server_session_and_the_next_starts_clean():
    from common.stage import SESSION_BEGIN, SESSION_END

    stage, published, sent = _gateway(interrupt_response=True)
    stage.tracker.add_audio("item_1", "resp_1", 0, tone(300, 0.5, 24000))
    stage._remember("item_u", "user", "my secret question")
    stage.socket.connects = 1
    stage.on_session(SESSION_END, "first", "first")
    assert stage.socket.paused and not stage.conversation and not stage.tracker.items
    stage.on_session(SESSION_BEGIN, "second", "first")
    assert not stage.socket.paused and stage.counts["conversations"] == 2
    stage.socket.connects = 2
    stage._on_connected(attempt=1)  # the new server session: nothing of the first is replayed into it
    [connected] = [m for m in published if m.topic == "rt.gateway.connected"]
    assert connected.data["replayed_items"] == 0 and connected.data["resumed"] is False
    assert [e["type"] for e in sent] == ["session.update"]


def test_the_heartbeat_says_whether_the_server_session_is_configured_and_with_which_tools():
    """A watcher that subscribed after the one `session.updated` went by (a stage set forked in
    milliseconds configures its session before `eval` or `serve` has its socket) still learns it."""
    stage, _published, _sent = _gateway(interrupt_response=True)
    stage.socket.connects = 1
    stage._on_connected(attempt=1)
    assert stage.counters()["session_configured"] is False and stage.counters()["session_tools"] == []
    _server(stage, type="session.updated", session={
        "type": "realtime", "object": "realtime.session", "id": "sess_1", "model": "gpt-realtime",
        "tools": [{"type": "function", "name": "get_current_time", "parameters": {"type": "object"}}]})
    assert stage.counters()["session_configured"] is True
    assert stage.counters()["session_tools"] == ["get_current_time"]
    stage._on_closed("server went away", attempt=1)  # the next server session has to confirm its own
    assert stage.counters()["session_configured"] is False


def test_every_event_validator_can_be_built_before_a_fork():
    """What the zygote builds before forking (the SDK defers each model's build to its first use):
    afterwards no model of either table has one left to build, in any gateway forked from it."""
    build_validators("ga")
    models = [*client_event_models("ga").values(), *server_event_models("ga").values()]
    assert len(models) > 40
    assert all(type(m.__pydantic_validator__).__name__ == "SchemaValidator" for m in models)
    assert build_validators("ga") == 0


def test_the_idle_watch_asks_after_the_quiet_it_was_given_and_ends_after_the_last_ask():
    from services.stages.gateway.idle import IdleWatch

    watch = IdleWatch(timeout_s=2.0, max_prompts=2)
    assert watch.check(True, 0.0) is None and watch.check(True, 1.9) is None
    assert watch.check(True, 2.0) == "prompt" and watch.prompts == 1
    assert watch.check(False, 2.5) is None  # the prompt is being said: not quiet
    assert watch.check(True, 4.0) is None and watch.check(True, 6.0) == "prompt"
    watch.heard_user()  # they answered: the count starts again
    assert watch.prompts == 0
    assert watch.check(True, 7.0) is None and watch.check(True, 9.0) == "prompt"
    assert watch.check(True, 9.1) is None and watch.check(True, 11.1) == "prompt"
    assert watch.check(True, 11.2) is None and watch.check(True, 13.2) == "end"
    assert watch.check(True, 20.0) is None  # once


def test_the_interruption_policy_knows_a_backchannel_from_an_interruption():
    from services.stages.gateway.interruptions import InterruptionPolicy

    policy = InterruptionPolicy()
    for said in ("mhmm", "Yeah.", "ok ok", "uh huh", "", "  ", "right", "i see", "h m m", "m m"):
        assert policy.is_backchannel(said), said
    for said in ("stop please", "wait", "yes but what about the boats", "no", "tell me more"):
        assert not policy.is_backchannel(said), said
    assert policy.too_long(2.0) and not policy.too_long(0.8)


def test_a_held_reply_is_neither_played_nor_dropped_and_goes_on_from_where_it_was():
    from services.stages.playback import PlaybackBuffer, Segment

    buffer = PlaybackBuffer(24000, jitter_ms=0)
    buffer.push(Segment("item", 0, "resp", bytes(range(200)) * 48))  # 4800 samples
    first = buffer.pull(480)
    buffer.hold(True)
    assert buffer.pull(480) == bytes(960) and buffer.snapshot()["held"]
    assert buffer.snapshot()["played_ms"] == 20.0  # nothing more was played while held
    buffer.hold(False)
    assert buffer.pull(480) == (bytes(range(200)) * 48)[960:1920] and first == (bytes(range(200)) * 48)[:960]
    buffer.hold(True)
    buffer.flush()  # an interruption: what was held is dropped, and the hold with it
    assert not buffer.snapshot()["held"]


def test_keys_pressed_on_a_phone_cut_the_reply_and_become_one_user_turn_for_the_model():
    from common.envelope import Stamper
    from common.realtime_types import validate_client_event
    from services.stages.gateway.keypad import KeyPad

    pad = KeyPad(wait_s=1.5)
    assert pad.press("1", now=0.0, t_ns=1) is None and pad.due(1.0) is None
    assert pad.press("2", now=1.2, t_ns=2) is None and pad.due(2.6) is None  # 1.4 s since the last key
    assert pad.due(2.8) == "12" and pad.keys == ""
    assert pad.press("9", 3.0, 3) is None and pad.press("#", 3.1, 4) == "9#"  # the end key ends them at once

    stage, published, sent = _gateway(interrupt_response=True)
    _playing_response(stage)
    stamper = Stamper("phone", "s1")

    def key(digit) -> None:
        stage.handle(stamper.event("phone.dtmf", {"digit": digit}, 1_000))

    key("0")  # over a reply that is playing: cut as speech would, but the server heard nothing: we cancel
    assert [m.data["reason"] for m in published if m.topic == "player.flush"] == ["keys"]
    assert [e["type"] for e in sent] == ["response.cancel"]
    key("x")  # not a DTMF key: refused, counted, nothing sent
    key("#")
    assert stage.counts["keys_refused"] == 1 and stage.counts["key_turns"] == 1
    item = next(e for e in sent if e["type"] == "conversation.item.create")
    assert item["item"]["content"] == [{"type": "input_text", "text": "The caller pressed 0 # on the phone keypad."}]
    validate_client_event(item, "ga")
    keys = next(m for m in published if m.topic == "rt.gateway.keys")
    assert keys.data["keys"] == "0#" and keys.data["last_key_ns"] == 1_000
    # the response is asked for once the cut one is done, not over it
    assert not [e for e in sent if e["type"] == "response.create"]
    _server(stage, type="response.done", response={"id": "resp_1", "object": "realtime.response",
                                                    "status": "cancelled", "output": []})
    assert [e["type"] for e in sent][-1] == "response.create"

    stage, published, sent = _gateway(interrupt_response=True)
    stage.settings.keys_wait_s = None  # --no-dtmf: the keys stay on the bus only
    stage.handle(stamper.event("phone.dtmf", {"digit": "5"}, 1_000))
    stage.keypad.last_at -= 10
    stage.tick()
    assert not sent and stage.counts["key_turns"] == 0


def test_a_conversation_may_be_given_its_own_turn_taking_and_a_bad_setting_is_refused():
    from common.envelope import Stamper
    from common.stage import SESSION_BEGIN, SESSION_END

    stage, published, sent = _gateway(interrupt_response=True)
    eval_ = Stamper("eval", "s0")
    stage.handle(eval_.event("gateway.configure", {"session": "s1", "settings": {
        "false_interruptions": True, "vad_type": "semantic_vad", "eagerness": "low", "idle_timeout_s": 5}}, 1))
    stage.handle(eval_.event("gateway.configure", {"settings": {"audio_format": "pcmu"}}, 2))  # not a conversation's
    stage.handle(eval_.event("gateway.configure", {"settings": {"eagerness": "sometimes"}}, 3))
    assert stage.counts["configurations_refused"] == 2
    stage.on_session(SESSION_BEGIN, "s1", "s0")  # the same server session, set anew
    assert stage.policy is not None and stage.idle is not None and stage.settings.eagerness == "low"
    update = [e for e in sent if e["type"] == "session.update"][-1]["session"]["audio"]["input"]["turn_detection"]
    assert update == {"type": "semantic_vad", "eagerness": "low", "create_response": False,
                      "interrupt_response": False}
    stage.on_session(SESSION_END, "s1", "s1")
    stage.on_session(SESSION_BEGIN, "s2", "s1")  # given nothing: the command line's settings again
    assert stage.policy is None and stage.idle is None and stage.settings == stage.base_settings


def test_minimum_speech_and_word_gates_come_before_the_backchannel_list():
    from services.stages.gateway.interruptions import InterruptionPolicy

    gated = InterruptionPolicy(min_speech_s=0.4, min_words=2)
    assert gated.judge("stop", 0.9) == (True, "fewer than 2 words")  # one word: the reply goes on
    assert gated.judge("stop now please", 0.3) == (True, "shorter than 0.4 s")  # a cough's length
    assert gated.judge("stop now please", 0.9) == (False, "not a backchannel")
    assert gated.judge("yeah ok", 0.9) == (True, "backchannel")
    plain = InterruptionPolicy()
    assert plain.judge("stop", 0.5) == (False, "not a backchannel") and plain.judge("", 0.2) == (True, "nothing recognisable")


def test_an_uninterruptible_greeting_is_said_once_when_the_line_goes_live_and_heard_whole():
    from common.envelope import Stamper
    from common.stage import SESSION_BEGIN

    stage, published, sent = _gateway(interrupt_response=True)
    stage.settings = stage.base_settings = SessionSettings(greeting="This call may be recorded.",
                                                           greeting_interruptible=False)
    mic = Stamper("resample", "s1")
    speech = tone(300, 0.02, 24000, amplitude=0.5)

    def frame(pts: int) -> None:
        stage.handle(mic.audio("audio.user", speech, rate=24000, channels=1, pts=pts, t_capture_ns=pts, t_ns=pts))

    frame(0)  # the session is not configured yet: no greeting
    assert not [e for e in sent if e["type"] == "response.create"]
    _server(stage, type="session.updated", session={"type": "realtime", "tools": []})
    frame(480)
    frame(960)
    [greet] = [e for e in sent if e["type"] == "response.create"]
    assert greet["response"]["instructions"] == "Say exactly: This call may be recorded."
    assert greet["response"]["metadata"] == {"voicebus": "greeting", "interruptible": "false"}
    _server(stage, type="response.created", response={"id": "resp_g", "object": "realtime.response",
                                                       "status": "in_progress", "output": [],
                                                       "metadata": greet["response"]["metadata"]})
    _server(stage, type="response.output_audio.delta", response_id="resp_g", item_id="item_g", output_index=0,
            content_index=0, delta=base64.b64encode(tone(300, 1.0, 24000)).decode())
    stage.tracker.on_player_state({"item_id": "item_g", "played_ms": 200, "playing": True, "buffered_ms": 100}, 0.0)
    before = len(sent)
    frame(1440)  # the caller talks over it: the server hears silence, and nothing is cut
    _server(stage, type="input_audio_buffer.speech_started", audio_start_ms=60, item_id="item_u")
    [append] = [e for e in sent[before:] if e["type"] == "input_audio_buffer.append"]
    assert base64.b64decode(append["audio"]) == bytes(len(speech)) and stage.counts["muted_frames"] == 1
    assert not [m for m in published if m.topic == "player.flush"] and stage.counts["barge_ins"] == 0
    stage.on_session(SESSION_BEGIN, "s2", "s1")  # the next conversation is greeted again
    assert not stage.greeted
