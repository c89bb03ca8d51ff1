"""The simulator driven by real clients: the openai SDK (GA realtime, chat completions) and
websocket-client (beta, raw events). Every event it emits is validated with the SDK's unions."""

from __future__ import annotations

import base64
import io
import json
import re
import time
import wave
from pathlib import Path

import openai
import pytest
import websocket
from openai import OpenAI
from pydantic import TypeAdapter, ValidationError

from common.realtime_names import to_beta
from common.utterances import speech_pcm, with_silence
from tests.realtime_client import RawRealtime

QUESTION = "what is the weather like today"
GA_SESSION = {"type": "realtime", "audio": {"input": {
    "transcription": {"model": "whisper-1"},
    "turn_detection": {"type": "server_vad", "threshold": 0.3, "prefix_padding_ms": 300,
                       "silence_duration_ms": 600}}}}
BETA_SESSION = {"modalities": ["audio", "text"], "input_audio_transcription": {"model": "whisper-1"},
                "turn_detection": {"type": "server_vad", "threshold": 0.3, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 600}}


def _server_event_adapter(beta: bool) -> TypeAdapter:
    if beta:
        from openai.types.beta.realtime import RealtimeServerEvent
    else:
        from openai.types.realtime import RealtimeServerEvent
    return TypeAdapter(RealtimeServerEvent)


def emittable_types() -> set[str]:
    """Every event type the simulator's code can send, read from its source."""
    source = (Path(__file__).parent.parent / "services/simulator/realtime.py").read_text()
    return set(re.findall(r'self\.send\(\s*"([a-z_.]+)"', source)) | {"error"}


def test_sdk_ga_spoken_turn(simulator):
    base_url = simulator("--pace", "fast")
    client = OpenAI(base_url=base_url, api_key="sk-test")
    pcm = with_silence(speech_pcm(QUESTION), 24000)
    events = []
    with client.realtime.connect(model="gpt-realtime") as conn:
        conn.session.update(session=GA_SESSION)
        for offset in range(0, len(pcm), 4800):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[offset:offset + 4800]).decode())
        for event in conn:
            events.append(event)
            if event.type == "response.done":
                break
    by_type = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    assert by_type["session.created"][0].session.model.startswith("voicebus-simulator/")
    started = by_type["input_audio_buffer.speech_started"][0]
    stopped = by_type["input_audio_buffer.speech_stopped"][0]
    # speech begins 0.5 s in (minus flite's own lead-in and the 300 ms prefix padding) and ends
    # 600 ms of silence after the words
    assert 0 <= started.audio_start_ms <= 500
    speech_ms = len(speech_pcm(QUESTION)) / 48
    assert 500 + 600 <= stopped.audio_end_ms <= 500 + speech_ms + 700
    transcript = by_type["conversation.item.input_audio_transcription.completed"][0].transcript
    assert transcript == QUESTION
    audio = b"".join(base64.b64decode(e.delta) for e in by_type["response.output_audio.delta"])
    assert len(audio) > 24000  # over half a second of speech
    assert by_type["response.output_audio_transcript.done"][0].transcript == f"I heard: {QUESTION}"
    done = by_type["response.done"][0]
    assert done.response.status == "completed" and done.response.usage.output_token_details.audio_tokens > 0


TIME_TOOL = {"type": "function", "name": "get_current_time", "description": "The time in a timezone.",
             "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}
TOOL_RULES = [{"match": r"time in (?P<city>\w+)", "call": {"name": "get_current_time",
                                                            "arguments": {"timezone": "Asia/{city}"}},
               "after_call": "It is {datetime:%H} hours in {city}."},
              # server-side MCP tools (examples/mcp_http_server.py)
              {"match": r"forecast for (?P<city>\w+)", "call": {"name": "get_forecast", "arguments": {"city": "{city}"}},
               "after_call": "Tomorrow in {city}: {output}.", "after_error": "No forecast: {error}"},
              {"match": r"table for (?P<people>\w+)", "call": {"name": "book_table", "arguments": {
                  "restaurant": "Luigi", "people": "{people}"}}, "after_call": "Done: {output}.",
               "after_error": "I could not book it: {error}"},
              {"match": ".*", "reply": "I heard: {transcript}"}]


def _say_text(conn: RawRealtime, text: str) -> dict:
    """A typed user turn and a response to it; the response.done."""
    conn.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                            "content": [{"type": "input_text", "text": text}]}})
    conn.send({"type": "response.create"})
    return conn.until("response.done", 60)


def _remote_mcp_rounds(conn: RawRealtime, mcp_url: str) -> None:
    """Server-side MCP (GA): two servers listed (one unreachable: failed), a call that needs no approval, one
    approved, one denied, and one the tool itself fails."""
    conn.send({"type": "session.update", "session": {"type": "realtime", "tools": [
        {"type": "mcp", "server_label": "demo", "server_url": mcp_url,
         "require_approval": {"never": {"tool_names": ["get_forecast"]}}},
        {"type": "mcp", "server_label": "gone", "server_url": "http://127.0.0.1:9/mcp", "require_approval": "never"}]}})
    conn.until("session.updated")
    deadline = time.monotonic() + 30  # the two listings end in either order

    def listed() -> list[dict]:
        return [e["item"] for e in conn.of_type("conversation.item.done") if e["item"]["type"] == "mcp_list_tools"]

    while len(listed()) < 2:
        assert time.monotonic() < deadline, "the MCP servers were not listed within 30 s"
        conn.recv(1.0)
    assert conn.of_type("mcp_list_tools.completed") and conn.of_type("mcp_list_tools.failed")
    demo = next(item for item in listed() if item["server_label"] == "demo")
    assert {t["name"] for t in demo["tools"]} == {"get_forecast", "book_table"}
    forecast = _say_text(conn, "what is the forecast for paris")["response"]["output"]
    assert [o["type"] for o in forecast] == ["mcp_call", "message"]
    assert forecast[0]["output"] == "light rain, 14 degrees" and forecast[0]["approval_request_id"] is None
    assert forecast[1]["content"][0]["text"] == "Tomorrow in paris: light rain, 14 degrees."
    [asking] = _say_text(conn, "a table for 4 please")["response"]["output"]
    assert asking["type"] == "mcp_approval_request" and json.loads(asking["arguments"])["people"] == "4"
    conn.send({"type": "conversation.item.create", "item": {"type": "mcp_approval_response", "id": f"mcpresp_{asking['id'][-8:]}",
                                                            "approval_request_id": asking["id"], "approve": True}})
    conn.send({"type": "response.create"})
    booked = conn.until("response.done", 60)["response"]["output"]
    assert booked[0].get("approval_request_id") == asking["id"], booked
    assert booked[0]["approval_request_id"] == asking["id"] and booked[0]["output"] == "booked a table for 4 at Luigi"
    [asking] = _say_text(conn, "a table for many please")["response"]["output"]
    conn.send({"type": "conversation.item.create", "item": {"type": "mcp_approval_response", "id": f"mcpresp_{asking['id'][-8:]}",
                                                            "approval_request_id": asking["id"], "approve": True}})
    conn.send({"type": "response.create"})
    failed = conn.until("response.done", 60)["response"]["output"]
    assert failed[0]["error"]["type"] == "tool_execution_error" and failed[0]["output"] is None
    [asking] = _say_text(conn, "a table for 2 please")["response"]["output"]
    conn.send({"type": "conversation.item.create", "item": {"type": "mcp_approval_response", "id": f"mcpresp_{asking['id'][-8:]}",
                                                            "approval_request_id": asking["id"], "approve": False,
                                                            "reason": "not allowed"}})
    conn.send({"type": "response.create"})
    denied = conn.until("response.done", 60)["response"]["output"]
    assert [o["type"] for o in denied] == ["message"]
    assert denied[0]["content"][0]["text"] == "I was not allowed to use book_table, so I cannot do that."


def _function_call_round(conn: RawRealtime, beta: bool) -> dict:
    """Tools in the session, a question that needs one, the output back: the reply speaks from it."""
    conn.send({"type": "session.update", "session": {"tools": [TIME_TOOL], "tool_choice": "auto"} if beta
               else {"type": "realtime", "tools": [TIME_TOOL], "tool_choice": "auto"}})
    conn.until("session.updated")
    conn.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "what is the time in Tokyo"}]}})
    conn.send({"type": "response.create"})
    done = conn.until("response.done")
    call = done["response"]["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_current_time"
    deltas = "".join(e["delta"] for e in conn.of_type("response.function_call_arguments.delta"))
    assert json.loads(deltas) == json.loads(call["arguments"]) == {"timezone": "Asia/Tokyo"}
    output = json.dumps({"timezone": "Asia/Tokyo", "datetime": "2026-11-28T13:44:47+09:00"})
    conn.send({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": call["call_id"],
                                                            "output": output}})
    conn.send({"type": "response.create", "response": {"metadata": {"asked_by": "test"}}})
    created = conn.until("response.created")
    assert created["response"]["metadata"] == {"asked_by": "test"}
    return conn.until("response.done")


def _walk(conn: RawRealtime, beta: bool, mcp_url: str | None = None) -> None:
    """Drive every behaviour once: spoken turn, truncate, clear, text turn, function call, retrieve/delete,
    errors, cancel."""
    conn.until("session.created")
    conn.send({"type": "session.update", "session": BETA_SESSION if beta else GA_SESSION})
    conn.until("session.updated")
    conn.append(with_silence(speech_pcm(QUESTION), 24000))
    done = conn.until("response.done", 60)
    item_id = done["response"]["output"][0]["id"]
    conn.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 500})
    conn.until("conversation.item.truncated")
    conn.send({"type": "input_audio_buffer.clear"})
    conn.until("input_audio_buffer.cleared")
    conn.send({"type": "conversation.item.create", "event_id": "evt_text",
               "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}})
    text_item = conn.until("conversation.item.created" if beta else "conversation.item.added")["item"]["id"]
    conn.send({"type": "session.update", "session": {"modalities": ["text"]} if beta
               else {"type": "realtime", "output_modalities": ["text"]}})
    conn.until("session.updated")
    conn.send({"type": "response.create"})
    conn.until("response.done")
    answer = _function_call_round(conn, beta)
    assert answer["response"]["output"][0]["content"][0]["text"] == "It is 13 hours in Tokyo."
    if mcp_url is not None:
        _remote_mcp_rounds(conn, mcp_url)
    conn.send({"type": "conversation.item.retrieve", "item_id": text_item})
    conn.until("conversation.item.retrieved")
    conn.send({"type": "conversation.item.delete", "item_id": text_item})
    conn.until("conversation.item.deleted")
    conn.send({"type": "session.update", "session": {"modalities": ["audio", "text"], "turn_detection": None}
               if beta else {"type": "realtime", "output_modalities": ["audio"],
                             "audio": {"input": {"turn_detection": None}}}})
    conn.until("session.updated")
    conn.append(speech_pcm("hello there"))
    conn.send({"type": "input_audio_buffer.commit"})
    conn.until("input_audio_buffer.committed")
    conn.send({"type": "response.create"})
    conn.until("response.created")
    conn.send({"type": "response.cancel"})
    cancelled = conn.until("response.done", 60)
    assert cancelled["response"]["status"] == "cancelled"
    conn.send({"type": "no.such.event", "event_id": "evt_bad"})
    assert conn.until("error")["error"]["event_id"] == "evt_bad"


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
def test_every_emitted_event_validates_against_sdk_union(simulator, tmp_path, beta, remote_mcp):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(TOOL_RULES))
    base_url = simulator("--pace", "fast", "--rules", str(rules))
    conn = RawRealtime(base_url, model="gpt-4o-realtime-preview" if beta else "gpt-realtime", beta=beta)
    try:
        _walk(conn, beta, None if beta else remote_mcp)
    finally:
        conn.close()
    adapter = _server_event_adapter(beta)
    for event in conn.events:
        adapter.validate_python(event)  # raises on any event the SDK would not accept
    seen = {e["type"] for e in conn.events}
    wanted = {t if not beta else to_beta(t) for t in emittable_types()} - {None}
    assert wanted <= seen, f"never exercised: {sorted(wanted - seen)}"
    if beta:
        assert "response.audio.delta" in seen and "response.output_audio.delta" not in seen
    else:
        assert "response.output_audio.delta" in seen and "response.audio.delta" not in seen


def test_beta_spoken_turn_with_websocket_client(simulator):
    conn = RawRealtime(simulator("--pace", "fast"), model="gpt-4o-realtime-preview", beta=True)
    try:
        created = conn.until("session.created")
        assert created["session"]["model"] == "gpt-4o-realtime-preview"
        assert created["session"]["server"].startswith("voicebus-simulator")
        conn.send({"type": "session.update", "session": BETA_SESSION})
        conn.until("session.updated")
        conn.append(with_silence(speech_pcm(QUESTION, "slt"), 24000))
        conn.until("response.done", 60)
    finally:
        conn.close()
    assert conn.of_type("conversation.item.input_audio_transcription.completed")[0]["transcript"] == QUESTION
    assert len(conn.audio("response.audio.delta")) > 24000
    assert conn.of_type("response.audio_transcript.done")[0]["transcript"] == f"I heard: {QUESTION}"


def test_truncate_cuts_transcript_and_rejects_overlong_and_user_items(simulator):
    conn = RawRealtime(simulator("--pace", "fast"))
    try:
        conn.send({"type": "session.update", "session": GA_SESSION})
        conn.append(with_silence(speech_pcm(QUESTION), 24000))
        done = conn.until("response.done", 60)
        item_id = done["response"]["output"][0]["id"]
        user_item_id = conn.of_type("input_audio_buffer.committed")[0]["item_id"]
        sent_ms = len(conn.audio()) / 48
        conn.send({"type": "conversation.item.truncate", "event_id": "evt_long", "item_id": item_id,
                   "content_index": 0, "audio_end_ms": int(sent_ms) + 500})
        error = conn.until("error")["error"]
        assert error["event_id"] == "evt_long" and "already shorter than" in error["message"]
        conn.send({"type": "conversation.item.truncate", "event_id": "evt_user", "item_id": user_item_id,
                   "content_index": 0, "audio_end_ms": 10})
        assert "Only model output audio" in conn.until("error")["error"]["message"]
        conn.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                   "audio_end_ms": int(sent_ms * 0.4)})
        assert conn.until("conversation.item.truncated")["audio_end_ms"] == int(sent_ms * 0.4)
        conn.send({"type": "conversation.item.retrieve", "item_id": item_id})
        transcript = conn.until("conversation.item.retrieved")["item"]["content"][0]["transcript"]
    finally:
        conn.close()
    full = f"I heard: {QUESTION}"
    assert transcript and full.startswith(transcript) and len(transcript) < len(full)


def test_speech_during_response_interrupts_it(simulator):
    conn = RawRealtime(simulator("--pace", "realtime"))
    try:
        conn.send({"type": "session.update", "session": GA_SESSION})
        conn.append(with_silence(speech_pcm(QUESTION), 24000, tail_s=0.8))
        conn.until("response.output_audio.delta", 30)
        conn.append(speech_pcm("stop"))
        started = conn.until("input_audio_buffer.speech_started")
        done = conn.until("response.done", 30)
    finally:
        conn.close()
    assert started["type"] == "input_audio_buffer.speech_started"
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"


@pytest.mark.parametrize(("frame", "expect_event_id", "message_part"), [
    ("{not json", None, "invalid JSON"),
    (json.dumps([1, 2]), None, "JSON object"),
    (json.dumps({"type": "no.such", "event_id": "e1"}), "e1", "Invalid value"),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e2"}), "e2", "audio"),  # missing field
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e3", "audio": "!!!notbase64"}), "e3", "base64"),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e4", "audio": "A" * (16 * 1024 * 1024)}), "e4",
     "too large"),
    (json.dumps({"type": "session.update", "event_id": "e5", "session": {"type": "realtime", "audio": {
        "input": {"turn_detection": {"type": "server_vad", "threshold": 7}}}}}), "e5", "threshold"),
    (json.dumps({"type": "response.cancel", "event_id": "e6"}), "e6", "no active response"),
    (json.dumps({"type": "input_audio_buffer.commit", "event_id": "e7"}), "e7", "buffer too small"),
])
def test_bad_client_input_gets_error_and_connection_survives(simulator, frame, expect_event_id, message_part):
    conn = RawRealtime(simulator("--pace", "fast"))
    try:
        conn.until("session.created")
        conn.ws.send(frame)
        error = conn.until("error")["error"]
        conn.send({"type": "session.update", "session": {"type": "realtime"}})
        conn.until("session.updated")  # still alive
    finally:
        conn.close()
    assert error["event_id"] == expect_event_id
    assert message_part.lower() in error["message"].lower()


def test_auth_is_required(simulator):
    base_url = simulator("--api-key", "sk-right")
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        RawRealtime(base_url, key="sk-wrong")
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base_url, api_key="sk-wrong").chat.completions.create(
            model="gpt-4o-audio-preview", messages=[{"role": "user", "content": "hi"}])
    RawRealtime(base_url, key="sk-right").close()


# --- faults ------------------------------------------------------------------------------------

def _spoken(conn: RawRealtime) -> None:
    conn.send({"type": "session.update", "session": GA_SESSION})
    conn.append(with_silence(speech_pcm(QUESTION), 24000))


def test_fault_drop_mid_response(simulator):
    conn = RawRealtime(simulator("--pace", "fast"), query="fault=drop_mid_response&fault_after=2")
    _spoken(conn)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        for _ in range(500):
            conn.recv(10)
    assert len(conn.of_type("response.output_audio.delta")) == 2
    assert not conn.of_type("response.done")


@pytest.mark.parametrize("kind", ["error_event", "unknown_event", "malformed_json"])
def test_fault_bad_events_then_response_completes(simulator, kind):
    conn = RawRealtime(simulator("--pace", "fast"), query=f"fault={kind}")
    _spoken(conn)
    frames: list[str] = []
    try:
        while True:
            conn.ws.settimeout(30)
            frame = conn.ws.recv()
            frames.append(frame)
            if '"response.done"' in frame:
                break
    finally:
        conn.close()
    parsed, unparseable = [], []
    for frame in frames:
        try:
            parsed.append(json.loads(frame))
        except ValueError:
            unparseable.append(frame)
    types = [e["type"] for e in parsed]
    if kind == "error_event":
        assert any(e["type"] == "error" and e["error"]["code"] == "simulated_error" for e in parsed)
    elif kind == "unknown_event":
        unknown = [e for e in parsed if e["type"] == "simulator.mystery_event"]
        assert unknown
        with pytest.raises(ValidationError):
            _server_event_adapter(False).validate_python(unknown[0])
    else:
        assert len(unparseable) == 1
    assert types[-1] == "response.done"


def test_fault_slow_delays_every_event(simulator):
    base_url = simulator("--fault", "slow", "--fault-delay-ms", "400")
    started = time.monotonic()
    conn = RawRealtime(base_url)
    conn.until("session.created")
    conn.send({"type": "session.update", "session": {"type": "realtime"}})
    conn.until("session.updated")
    conn.close()
    assert time.monotonic() - started >= 0.8  # two events, each held back 400 ms


def test_fault_count_limits_across_connections(simulator):
    base_url = simulator("--pace", "fast")
    query = "fault=drop_mid_response&fault_after=1&fault_count=1"
    first = RawRealtime(base_url, query=query)
    _spoken(first)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        for _ in range(500):
            first.recv(10)
    second = RawRealtime(base_url, query=query)
    _spoken(second)
    second.until("response.done", 60)
    second.close()


# --- chat completions --------------------------------------------------------------------------

def test_chat_completions_streams_pcm16_audio(simulator):
    client = OpenAI(base_url=simulator(), api_key="sk-test")
    stream = client.chat.completions.create(
        model="gpt-4o-audio-preview", modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        messages=[{"role": "user", "content": "tell me a joke"}], stream=True, stream_options={"include_usage": True})
    pcm, transcript, usage = b"", "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            audio = getattr(choice.delta, "audio", None)
            if audio:
                pcm += base64.b64decode(audio.data) if audio.data else b""
                transcript += audio.transcript or ""
    assert transcript == "I heard: tell me a joke"
    assert len(pcm) > 24000 and len(pcm) % 2 == 0
    assert usage is not None and usage.completion_tokens_details.audio_tokens > 0


def test_chat_completions_whole_wav_and_bad_requests(simulator):
    client = OpenAI(base_url=simulator(), api_key="sk-test")
    reply = client.chat.completions.create(
        model="gpt-4o-audio-preview", modalities=["text", "audio"], audio={"voice": "ash", "format": "wav"},
        messages=[{"role": "user", "content": "hello"}])
    data = base64.b64decode(reply.choices[0].message.audio.data)
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() > 12000
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-audio-preview", modalities=["text", "audio"],
                                       audio={"voice": "ash", "format": "wav"}, stream=True,
                                       messages=[{"role": "user", "content": "hello"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-audio-preview", messages=[])


def test_sdk_realtime_client_completes_a_tool_round_trip(simulator, tmp_path):
    """The openai SDK's own realtime client: tools in the session, a function call, its output, the answer."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(TOOL_RULES))
    client = OpenAI(base_url=simulator("--pace", "fast", "--rules", str(rules)), api_key="sk-test")
    adapter = _server_event_adapter(beta=False)
    events = []
    with client.realtime.connect(model="gpt-realtime") as conn:
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [TIME_TOOL]})
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "what is the time in Tokyo"}]})
        conn.response.create()
        answers = []
        for event in conn:
            events.append(event)
            if event.type == "response.function_call_arguments.done":
                assert json.loads(event.arguments) == {"timezone": "Asia/Tokyo"}
                conn.conversation.item.create(item={"type": "function_call_output", "call_id": event.call_id,
                                                    "output": json.dumps({"datetime": "2026-11-28T09:15:00+09:00"})})
            elif event.type == "response.done":
                answers.append(event.response)
                if len(answers) == 1:
                    assert answers[0].output[0].type == "function_call"
                    conn.response.create()
                else:
                    break
    assert answers[1].output[0].content[0].text == "It is 09 hours in Tokyo."
    assert {"response.function_call_arguments.delta", "response.output_item.done"} <= {e.type for e in events}
    for event in events:  # typed by the SDK on receipt; and each one round-trips its union
        adapter.validate_python(event.model_dump(exclude_unset=True))


UNFINISHED, REST = "i would like a pizza and", "a large salad please"


def _semantic_turns(base_url: str, eagerness: str, pause_s: float) -> tuple[list[str], list[int]]:
    """Speak an unfinished phrase, pause, finish it, at real-time pace (as a mic does); the user turns the
    server made of it (transcripts) and where each ended (audio_end_ms)."""
    client = RawRealtime(base_url)
    try:
        client.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "semantic_vad", "eagerness": eagerness, "create_response": False}}}}})
        updated = client.until("session.updated")
        assert updated["session"]["audio"]["input"]["turn_detection"] == {
            "type": "semantic_vad", "eagerness": eagerness, "create_response": False, "interrupt_response": True}
        pcm = (bytes(24000) + speech_pcm(UNFINISHED) + bytes(int(48000 * pause_s)) + speech_pcm(REST)
               + bytes(48000 * 10))
        started = time.monotonic()
        for offset in range(0, len(pcm), 4800):  # 100 ms at a time, on the clock
            client.append(pcm[offset:offset + 4800])
            time.sleep(max(0.0, started + (offset + 4800) / 48000 - time.monotonic()))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.recv(0.5)
            except websocket.WebSocketTimeoutException:
                if client.of_type("conversation.item.input_audio_transcription.completed") and \
                        len(client.of_type("conversation.item.input_audio_transcription.completed")) == \
                        len(client.of_type("input_audio_buffer.committed")):
                    break
        transcripts = [e["transcript"] for e in client.of_type("conversation.item.input_audio_transcription.completed")]
        ends = [e["audio_end_ms"] for e in client.of_type("input_audio_buffer.speech_stopped")]
        return transcripts, ends
    finally:
        client.close()


def test_semantic_vad_waits_longer_for_an_unfinished_phrase_when_eagerness_is_low(simulator):
    """The same words, "i would like a pizza and" (unfinished), 3 s of quiet, then the rest: eagerness low
    waits for more (up to 8 s) and hears one turn; high waits at most 2 s, so the first half is a turn of
    its own, ended at the word "and"."""
    base_url = simulator("--pace", "fast")
    low, low_ends = _semantic_turns(base_url, "low", 3.0)
    high, high_ends = _semantic_turns(base_url, "high", 3.0)
    print(f"low: {low} ending at {low_ends} ms; high: {high} ending at {high_ends} ms")
    # (what the recogniser makes of the words matters less than where the turns were cut)
    assert len(low) == 1 and low[0].startswith(UNFINISHED) and low[0].endswith("salad please"), low
    assert len(high) == 2 and high[0] == UNFINISHED and high[1].endswith("salad please"), high
    assert high_ends[0] < low_ends[0]  # the first turn ended later on low: after the whole sentence
    # and a finished phrase is not held: "a large salad please" ended its turn well within a second
    speech_ms = (len(speech_pcm(UNFINISHED)) + len(speech_pcm(REST))) / 48 + 1000 + 3000
    assert high_ends[1] <= speech_ms + 200, (high_ends, speech_ms)


def test_the_rest_of_the_ga_session_is_taken_echoed_and_acted_on(simulator):
    """noise reduction, speed, logprobs, truncation, a stored prompt and max_output_tokens, as the gateway
    sends them (`voicebus gateway --noise-reduction … --max-output-tokens 3`): the simulator echoes each in
    session.updated, adds logprobs to the transcript, and ends a reply past the cap `incomplete`."""
    from services.stages.gateway.session import SessionSettings, session_update

    settings = SessionSettings(noise_reduction="far_field", speed=1.2, transcription_logprobs=True,
                               truncation_retention=0.5, prompt={"id": "pmpt_voicebus", "version": "2",
                                                                  "variables": {"city": "Paris"}},
                               max_output_tokens=3, vad_silence_duration_ms=500)
    adapter = _server_event_adapter(beta=False)
    client = RawRealtime(simulator("--pace", "fast"))
    try:
        client.send(session_update(settings, "ga"))
        session = client.until("session.updated")["session"]
        assert session["audio"]["input"]["noise_reduction"] == {"type": "far_field"}
        assert session["audio"]["output"]["speed"] == 1.2
        assert session["include"] == ["item.input_audio_transcription.logprobs"]
        assert session["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.5}
        assert session["prompt"] == {"id": "pmpt_voicebus", "version": "2", "variables": {"city": "Paris"}}
        assert session["max_output_tokens"] == 3
        client.append(with_silence(speech_pcm(QUESTION), 24000))
        done = client.until("response.done", 60)
        heard = client.of_type("conversation.item.input_audio_transcription.completed")[0]
    finally:
        client.close()
    for event in client.events:
        adapter.validate_python(event)  # every one of them an event the SDK knows
    assert [p["token"] for p in heard["logprobs"]] == QUESTION.split()
    assert done["response"]["status"] == "incomplete"
    assert done["response"]["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["response"]["output"][0]["content"][0]["transcript"] == "I heard: what"


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
def test_a_g711_session_is_heard_and_answered_in_g711_as_openai_does(simulator, beta):
    """audio/pcmu (beta g711_ulaw): μ-law in, μ-law out at 8 kHz (one byte a sample), every event SDK-valid,
    a truncate counted in the μ-law audio's own milliseconds."""
    from common import g711

    conn = RawRealtime(simulator("--pace", "fast"), model="gpt-4o-realtime-preview" if beta else "gpt-realtime",
                       beta=beta)
    try:
        if beta:
            session = {**BETA_SESSION, "input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw"}
        else:
            session = {**GA_SESSION, "audio": {"input": {**GA_SESSION["audio"]["input"], "format": {"type": "audio/pcmu"}},
                                               "output": {"format": {"type": "audio/pcmu"}}}}
        conn.send({"type": "session.update", "session": session})
        updated = conn.until("session.updated")["session"]
        conn.append(g711.encode(with_silence(speech_pcm(QUESTION, "rms", 8000), 8000), "pcmu"))
        done = conn.until("response.done", 60)
        delta_type = "response.audio.delta" if beta else "response.output_audio.delta"
        reply = conn.audio(delta_type)
        item_id = done["response"]["output"][0]["id"]
        conn.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                   "audio_end_ms": len(reply) // 8 // 2})
        truncated = conn.until("conversation.item.truncated")
    finally:
        conn.close()
    if beta:
        assert updated["input_audio_format"] == updated["output_audio_format"] == "g711_ulaw"
    else:
        assert updated["audio"]["input"]["format"] == updated["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    adapter = _server_event_adapter(beta)
    for event in conn.events:
        adapter.validate_python(event)
    heard = conn.of_type("conversation.item.input_audio_transcription.completed")[0]["transcript"]
    from common.speech import Transcriber, word_error_rate

    assert word_error_rate(QUESTION, heard)[0] <= 2, heard  # the recogniser, through a phone line's 8 kHz

    spoken = Transcriber().transcribe(g711.decode(reply, "pcmu"), 8000)
    assert "heard" in spoken or QUESTION.split()[-1] in spoken, spoken  # "I heard: ..." in the telephone band
    assert 1.0 < len(reply) / 8000 < 10.0  # one byte a sample at 8 kHz: seconds, not 3x too short
    assert truncated["audio_end_ms"] == len(reply) // 16
