"""Function calling end to end: a spoken question, the simulator calls a tool, the tools stage runs it
(a real MCP server or a Python module), the answer is spoken from its output and traced."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from common.ports import free_port
from common.speech import Transcriber, synthesize, word_error_rate
from common.utterances import compose, speech_pcm
from common.wavio import read_wav
from services.stages.logger.store import load_turns
from tests.clock import zone_env
from tests.helpers import REPO
from tests.pipeline import speak, start_stages
from tests.support.rig import align
from tests.support.trace_server import LoopbackTraceServer

MCP_TIME = f"{Path(sys.executable).parent / 'mcp-server-time'} --local-timezone UTC"
EXAMPLES = str(REPO / "examples/tools.py")
FIXTURES = str(REPO / "tests/tool_fixtures.py")
PREFIXES = ["rt.", "tool.", "tools.", "health.", "player."]
TIME_RULE = {"match": "time.*tokyo", "call": {"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}},
             "after_call": "It is {datetime:%H} hours in Tokyo.", "after_error": "Sorry, that did not work."}
# what each misbehaving tool is asked, by the user's words
FAULT_RULES = [{"match": "weather", "call": {"name": "explode", "arguments": {"reason": "no weather today"}},
                "after_error": "Sorry, that did not work."},
               {"match": "homework", "call": {"name": "crash", "arguments": {}},
                "after_error": "Sorry, that tool fell over."},
               {"match": "story", "call": {"name": "hang", "arguments": {"seconds": 30}},
                "after_error": "Sorry, that took too long."},
               {"match": "moon", "call": {"name": "echo", "arguments": {"text": 5, "extra": True}},
                "after_error": "Sorry, that did not work."},
               {"match": "time.*tokyo", **{k: v for k, v in TIME_RULE.items() if k != "match"}},
               {"match": "lights", "call": {"name": "echo", "arguments": {"text": "the lights are on"}},
                "after_call": "Done, {output}."},
               {"match": ".*", "reply": "I heard: {transcript}"}]


# Tokyo is moved (tests/clock.py) to hours pocketsphinx once misheard with the slt voice ("era for
# hours", "airline hours", "there a few hours", "ninety two hours"), so the suite meets them every run
SPOKEN_HOUR_CASES = [("mcp", "ga", 4), ("python", "beta", 22), ("mcp", "beta", 1), ("python", "ga", 2)]
SIMULATOR_VOICE = "alloy"  # the gateway's default voice: what the simulator speaks with
TRANSCRIBER = Transcriber()


MIN_SENTENCE_NCC = 0.9


@functools.cache
def _spoken(sentence: str) -> bytes:
    """`sentence` as the simulator speaks it (same synthesizer, voice and rate): 24 kHz s16le."""
    return synthesize(sentence, SIMULATOR_VOICE, 24000)


def _hour_played(played_pcm: bytes, sentence_of_hour) -> tuple[int, dict[int, float], bytes]:
    """Which hour's sentence is in what the player produced: (hour, NCC per hour, the matching segment).

    Each hour's sentence is found by cross-correlation; the recogniser then hears exactly that
    segment, so what it reads does not depend on the silence around the reply.
    """
    played = np.frombuffer(played_pcm, "<i2").astype(np.float64)
    matches = {}
    for hour in range(24):
        reference = np.frombuffer(_spoken(sentence_of_hour(hour)), "<i2").astype(np.float64)
        matches[hour] = align(played, reference)
    best = max(matches, key=lambda hour: matches[hour][1])
    offset = matches[best][0]
    segment = played_pcm[2 * offset:2 * offset + len(_spoken(sentence_of_hour(best)))]
    return best, {hour: round(ncc, 3) for hour, (_, ncc) in matches.items()}, segment


def _rules(tmp_path, rules) -> str:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    return str(path)


def _of(client, topic):
    return [m for m in client.seen if m.topic == topic]


@pytest.mark.parametrize(("source", "protocol", "tokyo_hour"), SPOKEN_HOUR_CASES)
def test_spoken_question_calls_a_tool_and_the_answer_speaks_its_output(procs, client_factory, simulator, tmp_path,
                                                                       base_env, source, protocol, tokyo_hour):
    sim = simulator("--pace", "fast", "--rules", _rules(tmp_path, [TIME_RULE]))
    client = client_factory(PREFIXES)
    root = tmp_path / "sessions"
    moved_clock = zone_env(tmp_path / "zoneinfo", "Asia/Tokyo", tokyo_hour)
    procs.voicebus("tools", *(["--mcp", MCP_TIME] if source == "mcp" else ["--module", EXAMPLES]), env=moved_clock)
    client.wait_for(lambda m: m.topic == "tools.available" and m.data["tools"], timeout_s=60)
    procs.voicebus("logger", "--root", str(root))
    played = tmp_path / "played.wav"
    model = "gpt-realtime" if protocol == "ga" else "gpt-4o-realtime-preview"
    start_stages(procs, client, sim, player_args=("--wav", str(played)),
                 gateway_args=("--protocol", protocol, "--model", model))
    client.wait_for(lambda m: m.topic == "rt.sent.session.update" and m.data["event"]["session"].get("tools"),
                    timeout_s=15)
    speak(procs, speech_pcm("what time is it in tokyo", "slt", 48000), 48000, tmp_path, speed=2.0, tail_s=2.0)
    call = client.wait_for(lambda m: m.topic == "tool.call", timeout_s=60)
    assert call.data["name"] == "get_current_time" and call.data["arguments"] == {"timezone": "Asia/Tokyo"}
    output = client.wait_for(lambda m: m.topic == "rt.gateway.tool_output", timeout_s=30)
    assert output.data["error"] is None
    assert output.data["source"].startswith("mcp:" if source == "mcp" else "python:")
    hour = int(json.loads(output.data["output"])["datetime"][11:13])
    assert hour == tokyo_hour, f"the tool did not read the test's clock: {output.data['output']}"
    answer = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done", timeout_s=30)
    assert answer.data["event"]["transcript"] == f"It is {hour:02d} hours in Tokyo."
    client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 1, timeout_s=30)
    procs.stop_all()
    sentence_of_hour = "It is {:02d} hours in Tokyo.".format
    played_hour, ncc, segment = _hour_played(read_wav(played).pcm, sentence_of_hour)
    heard = TRANSCRIBER.transcribe(segment, 24000)
    reference = TRANSCRIBER.transcribe(_spoken(sentence_of_hour(hour)), 24000)
    runner_up = max(value for other, value in ncc.items() if other != played_hour)
    print(f"tool said {hour}; the player produced hour {played_hour} (NCC {ncc[played_hour]}, next best {runner_up}); "
          f"heard {heard!r}; the same sentence alone is heard as {reference!r}")
    # the hour that reached the ear is the tool's, spoken whole, and no other hour's sentence fits as well
    assert played_hour == hour and ncc[hour] >= MIN_SENTENCE_NCC, (played_hour, ncc)
    assert word_error_rate(reference, heard)[0] == 0, f"heard {heard!r}, the sentence alone is {reference!r}"
    # the trace: the tool call is a child of its turn, uploaded through the real weave client
    [turn] = load_turns(next(p for p in root.iterdir() if p.is_dir()))
    [tool] = turn["tools"]
    assert tool["name"] == "get_current_time" and tool["error"] is None and turn["timing"]["tool_ms"] > 0
    assert turn["assistant"]["transcript_heard"] == f"It is {hour:02d} hours in Tokyo."
    server = LoopbackTraceServer().start()
    try:
        import subprocess

        result = subprocess.run([sys.executable, "-m", "services.cli", "upload", "--root", str(root)], cwd=REPO,
                                env={**base_env, **server.env()}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        calls = list(server.calls.values())
        [turn_call] = [c for c in calls if "voicebus.turn" in c["op_name"]]
        [tool_call] = [c for c in calls if "voicebus.tool" in c["op_name"]]
        assert tool_call["parent_id"] == turn_call["id"]
        assert tool_call["inputs"]["name"] == "get_current_time"
        assert json.loads(tool_call["output"]["output"])["datetime"][11:13] == f"{hour:02d}"
    finally:
        server.stop()


FAULTS = {  # case: (user question, simulator fault, what the model is told)
    "tool raises": ("what is the weather like today", None, "no weather today"),
    "tool hangs past its timeout": ("please tell me a short story", None, "did not finish within 2 s"),
    "invalid arguments": ("how far away is the moon", None, "invalid arguments for echo"),
    "unknown tool": ("what time is it in tokyo", "unknown_tool", "no tool named 'no_such_tool'"),
    "malformed arguments JSON": ("what time is it in tokyo", "bad_arguments", "not valid JSON"),
    "MCP server exits mid-call": ("can you help me with my homework", None, "went away mid-call"),
    "server answers on its own after the output": ("turn on the lights in the kitchen", "auto_response", None),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_each_tool_fault_gets_an_error_output_a_spoken_reply_and_a_next_turn(procs, client_factory, simulator,
                                                                           tmp_path, case):
    question, fault, told = FAULTS[case]
    sim = simulator("--pace", "fast", "--rules", _rules(tmp_path, FAULT_RULES),
                    *(["--fault", fault, "--fault-count", "1"] if fault else []))
    client = client_factory(PREFIXES)
    procs.voicebus("tools", "--module", FIXTURES, "--module", EXAMPLES, "--timeout", "2",
                   "--mcp", f"{sys.executable} {REPO / 'tests/mcp_crasher.py'}")
    client.wait_for(lambda m: m.topic == "tools.available" and "crash" in {t["name"] for t in m.data["tools"]},
                    timeout_s=60)
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    client.wait_for(lambda m: m.topic == "rt.sent.session.update" and m.data["event"]["session"].get("tools"),
                    timeout_s=15)
    follow = ("say", "turn on the lights in the kitchen") if "lights" not in question else ("say", "what is two")
    speak(procs, compose([("say", question), ("silence", 7.0), follow], 48000), 48000, tmp_path, speed=2.0,
          tail_s=3.0)
    output = client.wait_for(lambda m: m.topic == "rt.gateway.tool_output", timeout_s=60)
    if told is None:
        assert output.data["error"] is None
    else:
        assert told in (output.data["error"] or ""), output.data
    spoken = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done", timeout_s=30)
    assert spoken.data["event"]["transcript"]  # the model speaks about it
    # the next turn works
    second = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed"
                             and m.data["event"]["transcript"] != question, timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done"
                    and m.header.t_ns > second.header.t_ns, timeout_s=60)
    client.collect(1.0)
    errors = [m.data for m in _of(client, "rt.error") if not m.data.get("benign")]
    assert not errors, f"an error reached the user: {errors}"
    beat = client.wait_for(lambda m: m.topic == "health.gateway" and m.header.t_ns > second.header.t_ns, timeout_s=5)
    assert beat.data["server_errors"] == 0 and beat.data["tool_calls"] >= 1
    if fault == "auto_response":  # the race: our response.create found the server's own response active
        assert beat.data["benign_errors"] + beat.data["followups_skipped"] >= 1
    print(f"{case}: told {output.data['error'] or output.data['output']!r}; said "
          f"{spoken.data['event']['transcript']!r}; gateway {dict((k, beat.data[k]) for k in ('tool_calls', 'tool_timeouts', 'followups', 'followups_skipped', 'orphans_cancelled', 'benign_errors'))}")


def test_tools_stage_killed_mid_call_is_restarted_and_the_gateway_answers_in_time(procs, client_factory_no_bus,
                                                                                  tmp_path):
    rules = _rules(tmp_path, FAULT_RULES)
    env = {"VOICEBUS_SIM_PORT": str(free_port())}
    procs.voicebus("up", "--stages", "resample,gateway,player,tools", "--arg", f"simulator=--pace fast --rules {rules}",
                   "--arg", f"player=--wav {tmp_path / 'p.wav'}", "--arg", f"tools=--module {FIXTURES} --timeout 20",
                   env=env)
    client = client_factory_no_bus(PREFIXES + ["launcher."])
    client.wait_for(lambda m: m.topic == "rt.sent.session.update" and m.data["event"]["session"].get("tools"),
                    timeout_s=60)
    speak(procs, compose([("say", "please tell me a short story"), ("silence", 9.0),
                          ("say", "turn on the lights in the kitchen")], 48000), 48000, tmp_path, speed=2.0,
          tail_s=3.0)
    call = client.wait_for(lambda m: m.topic == "tool.call", timeout_s=60)
    victim = client.wait_for(lambda m: m.topic == "health.tools", timeout_s=5).data["pid"]
    os.kill(victim, signal.SIGKILL)
    output = client.wait_for(lambda m: m.topic == "rt.gateway.tool_output" and m.data["call_id"] ==
                             call.data["call_id"], timeout_s=15)
    # answered as soon as the restarted stage announces itself, long before the tool's own 20 s
    assert "the tools stage restarted" in output.data["error"] and output.data["source"] == "gateway"
    assert (output.header.t_ns - call.header.t_ns) / 1e9 < 8.0
    client.wait_for(lambda m: m.topic == "launcher.restart" and m.data["stage"] == "tools", timeout_s=10)
    client.wait_for(lambda m: m.topic == "health.tools" and m.data["pid"] != victim, timeout_s=30)
    lights = client.wait_for(lambda m: m.topic == "rt.gateway.tool_output" and m.data.get("output") ==
                             "the lights are on", timeout_s=60)
    said = client.wait_for(lambda m: m.topic == "rt.response.output_audio_transcript.done"
                           and m.header.t_ns > lights.header.t_ns, timeout_s=30)
    assert said.data["event"]["transcript"] == "Done, the lights are on."


def test_follow_up_created_after_the_user_spoke_is_cancelled_and_the_users_turn_is_answered(
        procs, client_factory, simulator, tmp_path):
    """The orphan race: response.create sent, the user starts talking, the server creates it anyway."""
    sim = simulator("--pace", "realtime", "--rules", _rules(tmp_path, FAULT_RULES), "--fault", "late_response",
                    "--fault-count", "1")
    client = client_factory(PREFIXES)
    procs.voicebus("tools", "--module", FIXTURES)
    client.wait_for(lambda m: m.topic == "tools.available" and m.data["tools"], timeout_s=60)
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    client.wait_for(lambda m: m.topic == "rt.sent.session.update" and m.data["event"]["session"].get("tools"),
                    timeout_s=15)
    # the follow-up is asked for ~1 s after the question; the user speaks again 2.5 s after it ends,
    # the server creates the follow-up 3 s after it was asked for: in the middle of the user's words
    speak(procs, compose([("say", "turn on the lights in the kitchen"), ("silence", 2.5),
                          ("say", "please tell me a short story please")], 48000), 48000, tmp_path, tail_s=3.0)
    asked = client.wait_for(lambda m: m.topic == "rt.sent.response.create", timeout_s=60)
    cancel = client.wait_for(lambda m: m.topic == "rt.sent.response.cancel", timeout_s=15)
    orphan = cancel.data["event"]["response_id"]
    created = client.wait_for(lambda m: m.topic == "rt.response.created"
                              and m.data["event"]["response"]["id"] == orphan)
    assert created.data["event"]["response"]["metadata"] == asked.data["event"]["response"]["metadata"]
    started = [m for m in client.seen if m.topic == "rt.input_audio_buffer.speech_started"]
    assert len(started) == 2 and asked.header.t_ns < started[1].header.t_ns < created.header.t_ns
    done = client.wait_for(lambda m: m.topic == "rt.response.done" and m.data["event"]["response"]["id"] == orphan,
                           timeout_s=15)
    assert done.data["event"]["response"]["status"] == "cancelled"
    # the user's second turn is answered (its tool call goes out), nothing surfaced as an error
    second = client.wait_for(lambda m: m.topic == "tool.call" and m.data["name"] == "hang", timeout_s=60)
    assert second.header.t_ns > created.header.t_ns
    client.collect(0.5)
    assert not [m for m in _of(client, "rt.error") if not m.data.get("benign")]
    beat = client.wait_for(lambda m: m.topic == "health.gateway" and m.data["orphans_cancelled"] == 1, timeout_s=5)
    assert beat.data["server_errors"] == 0
