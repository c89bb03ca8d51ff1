"""Kill -9 every stage (and the bus) in the middle of a conversation under `voicebus up`."""

from __future__ import annotations

import json
import os
import signal
import time

from common.utterances import compose
from common.wavio import write_wav
from services.stages.logger.store import load_turns

QUESTIONS = ["what is the weather like today", "please tell me a short story", "how far away is the moon",
             "turn on the lights in the kitchen", "what time does the train leave", "play some music for me",
             "where is the nearest hospital", "can you help me with my homework"]
VICTIMS = ["resample", "gateway", "player", "logger", "mic", "bus"]


def test_kill_each_stage_mid_turn_conversation_goes_on(procs, client_factory_no_bus, tmp_path, chaos_record):
    parts = []
    for question in QUESTIONS:
        parts += [("say", question), ("silence", 5.0)]
    wav = write_wav(tmp_path / "conversation.wav", compose(parts, 48000), 48000)
    root = tmp_path / "sessions"
    port = 18400 + os.getpid() % 500
    env = {"VOICEBUS_SIM_PORT": str(port)}
    up = procs.voicebus("up", "--arg", f"mic=--wav {wav} --loop", "--arg", f"player=--wav {tmp_path / 'played.wav'}",
                        "--arg", f"logger=--root {root}", "--arg", "simulator=--pace fast", env=env)
    client = client_factory_no_bus(["rt.", "health.", "launcher."])
    client.wait_for(lambda m: m.topic == "health.logger", timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    results = []
    logger_down: list[tuple[int, int]] = []
    for victim in VICTIMS:
        # kill while a turn is in progress: right after the user starts speaking
        started = client.wait_for(lambda m: m.topic == "rt.input_audio_buffer.speech_started"
                                  and m.header.t_ns > time.time_ns() - 1e9, timeout_s=60)
        beat = client.wait_for(lambda m, v=victim, t=started.header.t_ns: m.topic == f"health.{v}"
                               and m.header.t_ns >= t - 2e9, timeout_s=30)
        pid = beat.data["pid"]
        killed_ns = time.time_ns()
        os.kill(pid, signal.SIGKILL)
        healthy = client.wait_for(lambda m, v=victim, p=pid: m.topic == f"health.{v}" and m.data["pid"] != p,
                                  timeout_s=60)
        time_to_healthy_s = (healthy.header.t_ns - killed_ns) / 1e9
        if victim == "logger":
            logger_down.append((killed_ns, healthy.header.t_ns))
        done = client.wait_for(lambda m, k=killed_ns: m.topic == "rt.response.done" and m.header.t_ns > k
                               and m.data["event"]["response"]["status"] == "completed", timeout_s=90)
        results.append({"victim": victim, "time_to_healthy_s": round(time_to_healthy_s, 2),
                        "next_turn_s": round((done.header.t_ns - killed_ns) / 1e9, 2)})
    time.sleep(4)  # the last turn finishes playing and is stored
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=15) == 0
    client.collect(0.2)
    restarts = [m.data["stage"] for m in client.seen if m.topic == "launcher.restart"]
    assert sorted(set(restarts)) == sorted(VICTIMS) or set(VICTIMS) - {"bus"} <= set(restarts)
    sessions = [p for p in root.iterdir() if p.is_dir()]
    assert len(sessions) == 1
    turns = load_turns(sessions[0])
    keys = [t["key"] for t in turns]
    assert len(keys) == len(set(keys)), "a turn was stored twice"
    completed = {m.data["event"]["response"]["id"]: m.header.t_ns for m in client.seen
                 if m.topic == "rt.response.done" and m.data["event"]["response"]["status"] == "completed"}
    expected = {rid for rid, t in completed.items()
                if not any(a - 3e9 <= t <= b + 1e9 for a, b in logger_down)}  # the logger was not listening
    missing = expected - set(keys)
    events = (sessions[0] / "events.jsonl").read_text()
    # the interruptions are visible in the record: every stage restarted while the logger was up
    recorded = {json.loads(line).get("stage") for line in events.splitlines()
                if json.loads(line)["kind"] == "stage_restarted"}
    assert {"resample", "gateway", "player", "mic"} <= recorded, f"the interruptions are not in the record: {events}"
    chaos_record(case="kill -9 each stage mid-turn under voicebus up", tried=len(VICTIMS),
                 survived=len(results), lost=len(missing), details=results)
    print(json.dumps(results, indent=1))
    assert not missing, f"completed turns missing from the record: {missing}"
