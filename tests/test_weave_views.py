"""A spoken conversation as a Weave user sees it: the Agents view (OTel GenAI spans) and Threads (calls),
timed as it happened, its audio attached, sent live and later exactly once, through the real weave client
against the loopback trace server."""

from __future__ import annotations

import datetime
import io
import json
import shutil
import subprocess
import sys
import time
import wave

from common.utterances import compose
from services.stages.logger.store import load_json, load_turns
from tests.helpers import REPO, net_audit, net_audit_env
from tests.pipeline import speak, start_stages
from tests.support.trace_server import LoopbackTraceServer

TOOL_REPLY = ("It is {datetime:%H} hours in Tokyo. Once upon a time there was a little robot who lived in a quiet "
              "town by the sea and every morning it walked down to the harbour to count the boats.")
RULES = [{"match": "time.*tokyo", "call": {"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}},
          "after_call": TOOL_REPLY},
         {"match": ".*", "reply": "I heard: {transcript}"}]
QUESTION, INTERRUPTION = "what time is it in tokyo", "please tell me a short story"
TIME_SLACK_NS = 100_000_000  # the acceptance: spans and calls within 100 ms of the stored turn times


def _upload(root, env, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "upload", "--root", str(root), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def _calls_posted(server: LoopbackTraceServer) -> int:
    return sum(len(json.loads(r.body).get("batch", [])) for r in server.of("/calls/complete")) + \
        len(server.of("/call/start"))


def _ns(iso: str) -> int:
    moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _parts(attribute: str | None) -> list[dict]:
    return [part for message in json.loads(attribute or "[]") for part in message["parts"]]


def _wav_of_ref(server: LoopbackTraceServer, uri: str) -> bytes:
    """The bytes behind a `weave://` Content ref, as the server stored them (object -> its file)."""
    obj = server.objects[uri.rsplit(":", 1)[1]]
    assert obj["object_id"] == "Content"
    return server.files[obj["val"]["files"]["content"]]["data"]


def assert_conversation_in_weave(server: LoopbackTraceServer, session_dir, flushed_played_ms: float) -> None:
    turns = load_turns(session_dir)
    session = load_json(session_dir / "meta.json")["session"]
    assert len(turns) == 2
    first, second = turns

    # Threads: one thread per session, each turn a turn call of it, under one session call
    calls = list(server.calls.values())
    [root] = [c for c in calls if c["op_name"].endswith("voicebus.session") or "voicebus.session:" in c["op_name"]]
    turn_calls = sorted((c for c in calls if "voicebus.turn" in c["op_name"]), key=lambda c: c["inputs"]["turn"])
    [tool_call] = [c for c in calls if "voicebus.tool" in c["op_name"]]
    assert root.get("thread_id") is None and root.get("turn_id") is None
    assert [c["thread_id"] for c in turn_calls] == [session, session]
    assert [c["turn_id"] for c in turn_calls] == [c["id"] for c in turn_calls]
    assert all(c["parent_id"] == root["id"] for c in turn_calls)
    assert tool_call["parent_id"] == turn_calls[0]["id"] and tool_call["turn_id"] == turn_calls[0]["id"]
    for call, turn in zip(turn_calls, turns, strict=True):
        assert abs(_ns(call["started_at"]) - turn["started_ns"]) <= TIME_SLACK_NS, (call["started_at"], turn)
        assert abs(_ns(call["ended_at"]) - turn["ended_ns"]) <= TIME_SLACK_NS
    [tool] = first["tools"]
    assert abs(_ns(tool_call["started_at"]) - tool["called_ns"]) <= TIME_SLACK_NS
    assert abs(_ns(tool_call["ended_at"]) - tool["answered_ns"]) <= TIME_SLACK_NS
    assert _ns(root["started_at"]) <= _ns(turn_calls[0]["started_at"]) + TIME_SLACK_NS
    # a conversation is seconds long, not the 10 ms blip of calls timed at the upload
    assert _ns(turn_calls[1]["ended_at"]) - _ns(turn_calls[0]["started_at"]) > 3e9

    # Agents: one trace per turn, invoke_agent -> chat per response, execute_tool per call
    spans = list(server.spans.values())
    agents = sorted((s for s in spans if s["name"] == "invoke_agent voicebus"),
                    key=lambda s: s["attributes"]["voicebus.turn"])
    assert [s["attributes"]["gen_ai.conversation.id"] for s in agents] == [session, session]
    assert len({s["trace_id"] for s in agents}) == 2 and all(s["parent_span_id"] is None for s in agents)
    for span, turn in zip(agents, turns, strict=True):
        assert abs(span["start_ns"] - turn["started_ns"]) <= TIME_SLACK_NS
        assert abs(span["end_ns"] - turn["ended_ns"]) <= TIME_SLACK_NS
        children = [s for s in spans if s["parent_span_id"] == span["span_id"]]
        chats = [s for s in children if s["name"].startswith("chat ")]
        for chat in chats:
            assert chat["attributes"]["gen_ai.operation.name"] == "chat"
            assert chat["attributes"]["gen_ai.usage.input_tokens"] > 0
            assert span["start_ns"] - TIME_SLACK_NS <= chat["start_ns"] <= chat["end_ns"] <= span["end_ns"] + \
                TIME_SLACK_NS
        assert len(chats) == len(turn["responses"])
    first_children = [s for s in spans if s["parent_span_id"] == agents[0]["span_id"]]
    [tool_span] = [s for s in first_children if s["name"] == "execute_tool get_current_time"]
    assert json.loads(tool_span["attributes"]["gen_ai.tool.call.arguments"]) == {"timezone": "Asia/Tokyo"}
    assert "Asia/Tokyo" in tool_span["attributes"]["gen_ai.tool.call.result"]
    assert abs(tool_span["start_ns"] - tool["called_ns"]) <= TIME_SLACK_NS
    assert {s["attributes"]["gen_ai.response.finish_reasons"][0] for s in first_children
            if s["name"].startswith("chat ")} == {"completed"} or first["assistant"]["barge_in"]

    # the barge-in: the cut is the player's played position; heard and generated audio both attached
    cut = agents[0]["attributes"]
    assert cut["voicebus.assistant.barge_in"] is True
    assert abs(cut["voicebus.barge_in.audio_end_ms"] - flushed_played_ms) <= 40
    [user_audio] = [p for p in _parts(cut["gen_ai.input.messages"]) if p["type"] == "uri"]
    [heard_audio] = [p for p in _parts(cut["gen_ai.output.messages"]) if p["type"] == "uri"]
    spoken_chat = [s for s in first_children if s["name"].startswith("chat ")
                   and s["attributes"].get("gen_ai.output.type") == "speech"]
    [generated_audio] = [p for s in spoken_chat for p in _parts(s["attributes"]["gen_ai.output.messages"])
                         if p["type"] == "uri"]
    for part, name in ((user_audio, "user"), (heard_audio, "assistant-played"),
                       (generated_audio, "assistant-generated")):
        assert part["mime_type"] == "audio/wav" and part["uri"].startswith("weave:///")
        stored = (session_dir / first["audio_files"][name]).read_bytes()
        assert _wav_of_ref(server, part["uri"]) == stored, name
    with wave.open(io.BytesIO((session_dir / first["audio_files"]["assistant-played"]).read_bytes())) as played:
        assert abs(played.getnframes() / 24 - cut["voicebus.barge_in.audio_end_ms"]) <= 1
    assert second["user"]["transcript"] == INTERRUPTION and not second["assistant"]["barge_in"]


def test_a_spoken_conversation_live_and_uploaded_later_looks_right_in_weave(procs, client_factory, simulator,
                                                                             tmp_path, base_env):
    audit_log = tmp_path / "net-audit.jsonl"
    base_env.update(net_audit_env(audit_log, base_env))  # every process of this test: loopback only
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    sim = simulator("--pace", "realtime", "--rules", str(rules))
    live_server = LoopbackTraceServer().start()
    later_server = LoopbackTraceServer().start()
    try:
        client = client_factory(["rt.", "player.", "health.", "tool"])
        live_root, later_root = tmp_path / "live", tmp_path / "later"
        procs.voicebus("tools", "--module", str(REPO / "examples/tools.py"))
        client.wait_for(lambda m: m.topic == "tools.available" and m.data["tools"], timeout_s=60)
        # two loggers hear the same conversation: one sends it live, one only stores it (uploaded later)
        procs.voicebus("logger", "--root", str(live_root), env=live_server.env(), name="logger-live")
        procs.voicebus("logger", "--root", str(later_root), name="logger-store")
        start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "played.wav")))
        client.wait_for(lambda m: m.topic == "rt.sent.session.update" and m.data["event"]["session"].get("tools"),
                        timeout_s=15)
        utterance = compose([("say", QUESTION), ("silence", 4.0), ("say", INTERRUPTION)], 48000)
        speak(procs, utterance, 48000, tmp_path, tail_s=3.0)
        client.wait_for(lambda m: m.topic == "tool.call", timeout_s=60)
        flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=60)
        client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done"
                        and "I heard" in json.dumps(m.data), timeout_s=60)
        # live: the first turn is in Weave while the conversation still runs, within seconds of being stored
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("voicebus.turn" in c["op_name"]
                                                      for c in live_server.calls.values()):
            time.sleep(0.2)
        live_dir = next(p for p in live_root.iterdir() if p.is_dir())
        assert any("voicebus.turn" in c["op_name"] for c in live_server.calls.values()), \
            (live_dir / "upload.log").read_text(errors="replace")
        assert any(s["name"] == "invoke_agent voicebus" for s in live_server.spans.values())
        client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 2, timeout_s=30)
        procs.stop_all()

        deadline = time.monotonic() + 60  # the live uploader sends the session call once the logger closed it
        while time.monotonic() < deadline and not (load_json(live_dir / "upload.json") or {}).get("confirmed"):
            time.sleep(0.2)
        log = (live_dir / "upload.log").read_text(errors="replace")
        assert (load_json(live_dir / "upload.json") or {}).get("confirmed"), log
        assert "sent live" in log
        print("\n".join(line for line in log.splitlines() if "sent live" in line))
        assert_conversation_in_weave(live_server, live_dir, flushed.data["played_ms"])
        requests_before = len(live_server.requests)
        again = _upload(live_root, {**base_env, **live_server.env()})
        assert again.returncode == 0 and "nothing to upload" in again.stdout, again.stdout + again.stderr
        assert len(live_server.requests) == requests_before  # a turn sent live is never sent again

        # uploaded later, to another trace server: the same conversation, timed as it happened
        later_dir = next(p for p in later_root.iterdir() if p.is_dir())
        assert not (later_dir / "upload.json").exists()
        result = _upload(later_root, {**base_env, **later_server.env()})
        assert result.returncode == 0, result.stdout + result.stderr
        assert_conversation_in_weave(later_server, later_dir, flushed.data["played_ms"])
        counts = (len(later_server.calls), len(later_server.spans), len(later_server.requests))
        again = _upload(later_root, {**base_env, **later_server.env()})
        assert again.returncode == 0 and "nothing to upload" in again.stdout
        assert (len(later_server.calls), len(later_server.spans), len(later_server.requests)) == counts
        # nothing went anywhere but loopback: no lookup, no connection, no live Sentry client (logger,
        # its live uploader, both uploads, every stage)
        audit = net_audit(audit_log)
        assert audit["foreign"] == [] and audit["sentry"] == [], audit
        uploads = [r["argv"] for r in audit["weave"] if r["argv"][:1] == ["upload"]]
        assert any("--follow" in argv for argv in uploads) and any(str(later_root) in argv for argv in uploads), \
            audit["weave"]
    finally:
        live_server.stop()
        later_server.stop()


def test_an_upload_cut_short_is_finished_without_sending_a_turn_twice(tmp_path, base_env):
    """The ids are written before anything is sent: a run that died after sending is checked, not repeated."""
    root = tmp_path / "sessions"
    shutil.copytree(REPO / "tests/data/stored-session", root / "stored-session")
    server = LoopbackTraceServer().start()
    try:
        env = {**base_env, **server.env()}
        first = _upload(root, env)
        assert first.returncode == 0, first.stdout + first.stderr
        state = load_json(root / "stored-session/upload.json")
        calls, spans, posted = dict(server.calls), dict(server.spans), _calls_posted(server)
        assert len(calls) == 4 and len(spans) == 6  # session, 2 turns, 1 tool; 2 turns, 3 chats, 1 tool
        # as if the first run had died after the server took everything but before the store said so
        for entry in state["turns"].values():
            entry["calls_confirmed"] = entry["spans_confirmed"] = entry["done"] = False
        state["confirmed"] = False
        (root / "stored-session/upload.json").write_text(json.dumps(state))
        second = _upload(root, env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert server.calls.keys() == calls.keys() and _calls_posted(server) == posted  # no call sent twice
        assert server.spans.keys() == spans.keys()  # spans re-sent carry the same ids: the same spans
        assert load_json(root / "stored-session/upload.json")["confirmed"]
    finally:
        server.stop()


def span_shape(spans: list[dict]) -> dict[str, dict]:
    """Per kind of span (gen_ai.operation.name): how many, which attributes, which message parts."""
    shape: dict[str, dict] = {}
    for span in spans:
        attrs = span["attributes"]
        kind = shape.setdefault(attrs.get("gen_ai.operation.name", span["name"]),
                                {"count": 0, "keys": set(), "parts": set()})
        kind["count"] += 1
        kind["keys"] |= set(attrs)
        for key in ("gen_ai.input.messages", "gen_ai.output.messages"):
            for message in json.loads(attrs.get(key) or "[]"):
                kind["parts"] |= {(key.split(".")[1], message["role"], part["type"]) for part in message["parts"]}
    return shape


def test_side_by_side_with_weaves_own_realtime_integration(procs, simulator, tmp_path, base_env):
    """The notebook's websocket-client session traced by weave's `openai_realtime` integration, and a
    voicebus conversation of the same two questions uploaded: ours carries every kind of span, every
    attribute and every kind of message part theirs does, and what only voicebus knows."""
    from common.utterances import speech_pcm
    from common.wavio import write_wav

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    sim = simulator("--pace", "fast", "--rules", str(rules))
    server = LoopbackTraceServer().start()
    try:
        env = {**base_env, **server.env()}
        wavs = [str(write_wav(tmp_path / f"q{i}.wav", speech_pcm(text, "slt", 24000), 24000))
                for i, text in enumerate((QUESTION, INTERRUPTION))]
        notebook = subprocess.run([sys.executable, str(REPO / "tests/weave_notebook_session.py"), sim,
                                   "tester/notebook", *wavs], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                                  capture_output=True, text=True, timeout=180)
        assert notebook.returncode == 0, notebook.stdout[-3000:] + notebook.stderr[-3000:]
        theirs = span_shape([s for s in server.spans.values() if s["project_id"] == "tester/notebook"])
        assert set(theirs) == {"invoke_agent", "chat", "execute_tool"}, theirs  # their integration did run

        root = tmp_path / "sessions"
        shutil.copytree(REPO / "tests/data/stored-session", root / "stored-session")
        uploaded = _upload(root, {**env, "WEAVE_PROJECT": "voicebus"})
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        ours = span_shape([s for s in server.spans.values() if s["project_id"] == "tester/voicebus"])

        rows = []
        for kind, their in theirs.items():
            assert kind in ours, kind
            missing = their["keys"] - ours[kind]["keys"]
            assert not missing, f"{kind}: weave's integration sends {sorted(missing)}, voicebus does not"
            assert their["parts"] <= ours[kind]["parts"], (kind, their["parts"] - ours[kind]["parts"])
            rows.append(f"| {kind} | {their['count']} | {ours[kind]['count']} | {len(their['keys'])} | "
                        f"{len(ours[kind]['keys'])} | "
                        f"{', '.join(sorted(k.removeprefix('voicebus.') for k in ours[kind]['keys'] - their['keys']))} |")
        print("| span | weave's integration | voicebus | attributes (theirs) | attributes (ours) | only voicebus |")
        print("\n".join(rows))
        # what only voicebus knows: the cut, latency at the ear, audio as heard beside as generated, tool timing
        assert {"voicebus.barge_in.audio_end_ms", "voicebus.latency.speech_end_to_first_played_ms"} <= \
            ours["invoke_agent"]["keys"]
        assert {"gen_ai.tool.call.result", "voicebus.tool.duration_ms"} <= ours["execute_tool"]["keys"]
        assert ("output", "assistant", "uri") in ours["invoke_agent"]["parts"]  # the audio as heard
    finally:
        server.stop()
