"""The Weave logger: durable local store first, then the real weave client against a loopback trace server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import wave

import pytest

from common.utterances import compose, speech_pcm
from services.stages.logger.store import load_json, load_turns
from tests.helpers import REPO
from tests.pipeline import speak, start_stages
from tests.support.trace_server import LoopbackTraceServer

QUESTION = "what is the weather like today"
LONG_REPLY = [{"match": "weather", "reply": "Once upon a time there was a little robot who lived in a quiet town by "
               "the sea and every morning it walked down to the harbour to count the boats."},
              {"match": ".*", "reply": "I heard: {transcript}"}]
FAKE_OPENAI_KEY = "sk-voicebus-FAKE-KEY-logger-0987654321"


def _upload(root, env, *extra, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "upload", "--root", str(root), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _session_dir(root):
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_conversation_stored_then_uploaded_exactly_once(procs, client_factory, simulator, tmp_path, base_env):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(LONG_REPLY))
    sim = simulator("--pace", "realtime", "--rules", str(rules))
    root = tmp_path / "sessions"
    client = client_factory(["rt.", "player.", "health."])
    env = {"OPENAI_API_KEY": FAKE_OPENAI_KEY, "OPENAI_BASE_URL": sim}
    procs.voicebus("logger", "--root", str(root), env=env)  # no WANDB_API_KEY: W&B unreachable, store only
    start_stages(procs, client, sim, env=env, player_args=("--wav", str(tmp_path / "played.wav")))
    client.wait_for(lambda m: m.topic == "health.logger", timeout_s=30)
    utterance = compose([("say", QUESTION), ("silence", 4.0), ("say", "please tell me a short story")], 48000)
    speak(procs, utterance, 48000, tmp_path, tail_s=3.0, env=env)
    flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.response.done" and "story" in json.dumps(m.data), timeout_s=60)
    client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 2, timeout_s=30)
    procs.stop_all()

    session_dir = _session_dir(root)
    turns = load_turns(session_dir)
    assert [t["turn"] for t in turns] == [1, 2]
    first, second = turns
    assert first["user"]["transcript"] == QUESTION and second["user"]["transcript"] == "please tell me a short story"
    assert first["assistant"]["barge_in"] and not second["assistant"]["barge_in"]
    assert abs(first["assistant"]["played_ms"] - flushed.data["played_ms"]) <= 40
    heard, generated = first["assistant"]["transcript_heard"], first["assistant"]["transcript_generated"]
    assert heard and generated.startswith(heard) and len(heard) < len(generated)
    assert second["assistant"]["transcript_heard"] == "I heard: please tell me a short story"
    assert first["usage"]["total_tokens"] > 0 and first["cost_usd"] > 0
    assert second["timing"]["speech_end_to_first_played_ms"] > 0
    with wave.open(str(session_dir / first["audio_files"]["assistant-played"])) as played:
        assert played.getframerate() == 24000
        assert abs(played.getnframes() / 24 - first["assistant"]["played_ms"]) <= 1
    with wave.open(str(session_dir / first["audio_files"]["user"])) as user:
        assert user.getnframes() / 24000 > 1.0  # the spoken question
    assert load_json(session_dir / "meta.json")["ended_ns"]

    server = LoopbackTraceServer().start()
    try:
        wandb_env = {**base_env, **server.env()}
        result = _upload(root, wandb_env)
        assert result.returncode == 0, result.stdout + result.stderr
        calls = list(server.calls.values())
        sessions = [c for c in calls if "voicebus.session" in c["op_name"]]
        turn_calls = [c for c in calls if "voicebus.turn" in c["op_name"]]
        assert len(sessions) == 1 and len(turn_calls) == 2
        assert all(c["parent_id"] == sessions[0]["id"] for c in turn_calls)
        by_turn = {c["inputs"]["turn"]: c for c in turn_calls}
        assert by_turn[1]["inputs"]["user_transcript"] == QUESTION
        assert by_turn[1]["output"]["assistant_transcript"] == heard
        assert by_turn[2]["output"]["usage"]["total_tokens"] > 0
        assert by_turn[2]["output"]["timing"]["speech_end_to_first_played_ms"] > 0
        assert sessions[0]["output"]["barge_ins"] == 1
        wavs = [f for f in server.files.values() if f.get("data", b"")[:4] == b"RIFF"]
        for f in wavs:
            with wave.open(io.BytesIO(f["data"])) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            # weave.Audio on the calls (Threads), WAV Content for the spans (Agents)
            assert (f["filename"], f["content_type"]) in {("audio.wav", "audio/x-wav"), ("audio.wav", "audio/wav"),
                                                          ("content", "application/octet-stream")}
        # every turn's user, played and generated audio arrived as a WAV, byte for byte (identical
        # files are stored once: the server is content-addressed)
        stored = {(session_dir / name).read_bytes() for t in turns for name in t["audio_files"].values()}
        assert {f["data"] for f in wavs} == stored
        sent = len(server.requests)
        again = _upload(root, wandb_env)
        assert again.returncode == 0 and "nothing to upload" in again.stdout
        assert len(server.requests) == sent and len(server.calls) == 3
        # secrets: the OpenAI key reached neither the store nor any request body
        for path in root.rglob("*"):
            if path.is_file():
                assert FAKE_OPENAI_KEY.encode() not in path.read_bytes(), path
        for request in server.requests:
            assert FAKE_OPENAI_KEY.encode() not in request.body
            assert server.env()["WANDB_API_KEY"].encode() not in request.body
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["500", "429", "hang"])
def test_trace_server_failures_lose_nothing_and_upload_later(procs, client_factory, simulator, tmp_path, base_env,
                                                             mode):
    server = LoopbackTraceServer().start()
    server.mode = mode
    try:
        sim = simulator("--pace", "fast")
        root = tmp_path / "sessions"
        client = client_factory(["rt.", "health."])
        wandb_env = server.env()
        logger = procs.voicebus("logger", "--root", str(root), env=wandb_env)
        start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
        client.wait_for(lambda m: m.topic == "health.logger", timeout_s=30)
        speak(procs, speech_pcm(QUESTION, "slt", 48000), 48000, tmp_path, speed=2.0)
        client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 1, timeout_s=60)
        assert logger.poll() is None
        logger.send_signal(signal.SIGTERM)
        assert logger.wait(timeout=10) == 0  # it never waits on the trace server
        session_dir = _session_dir(root)
        deadline = time.monotonic() + 20  # the logger's own upload attempt fails and says why
        while time.monotonic() < deadline and "not reachable" not in (session_dir / "upload.log").read_text(
                errors="replace"):
            time.sleep(0.2)
        assert "not reachable" in (session_dir / "upload.log").read_text(errors="replace")
        assert len(load_turns(session_dir)) == 1 and not (load_json(session_dir / "upload.json") or {}).get("confirmed")
        server.mode = "ok"
        result = _upload(root, {**base_env, **wandb_env})
        assert result.returncode == 0, result.stdout + result.stderr
        assert load_json(session_dir / "upload.json").get("confirmed"), result.stdout + result.stderr
        assert sum("voicebus.turn" in c["op_name"] for c in server.calls.values()) == 1
    finally:
        server.mode = "ok"
        server.stop()


def test_logger_killed_mid_conversation_keeps_completed_turns_once(procs, client_factory, simulator, tmp_path):
    sim = simulator("--pace", "fast")
    root = tmp_path / "sessions"
    client = client_factory(["rt.", "health."])
    logger = procs.voicebus("logger", "--root", str(root))
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    client.wait_for(lambda m: m.topic == "health.logger", timeout_s=30)
    utterance = compose([("say", QUESTION), ("silence", 5.0), ("say", "please tell me a short story"),
                         ("silence", 5.0), ("say", "how far away is the moon")], 48000)
    speak(procs, utterance, 48000, tmp_path, tail_s=3.0)
    client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 1, timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.input_audio_buffer.speech_started"
                    and len([x for x in client.seen if x.topic == "rt.input_audio_buffer.speech_started"]) >= 2,
                    timeout_s=30)
    os.kill(logger.pid, signal.SIGKILL)  # mid turn 2
    logger.wait()
    procs.voicebus("logger", "--root", str(root))
    client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed"
                    and "moon" in m.data["event"]["transcript"], timeout_s=60)
    client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 1
                    and m.data["state"] == "running" and m.header.seq > 3, timeout_s=30)
    procs.stop_all()
    turns = load_turns(_session_dir(root))
    transcripts = [t["user"]["transcript"] for t in turns]
    assert transcripts[0] == QUESTION and transcripts[-1] == "how far away is the moon"
    assert len(transcripts) == len(set(transcripts)) and len({t["key"] for t in turns}) == len(turns)
    assert [t["turn"] for t in turns] == list(range(1, len(turns) + 1))


def test_report_renders_in_headless_chromium(procs, client_factory, simulator, tmp_path):
    import shutil

    sim = simulator("--pace", "fast")
    root = tmp_path / "sessions"
    client = client_factory(["rt.", "health."])
    procs.voicebus("logger", "--root", str(root))
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    client.wait_for(lambda m: m.topic == "health.logger", timeout_s=30)
    speak(procs, speech_pcm(QUESTION, "slt", 48000), 48000, tmp_path, speed=2.0)
    client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 1, timeout_s=60)
    procs.stop_all()
    session_dir = _session_dir(root)
    report = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "services.cli", "report", session_dir.name, "--root", str(root),
                             "-o", str(report)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    page = report.read_text()
    assert QUESTION in page and "data:audio/wav;base64," in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/setup.sh"
    shot = tmp_path / "report.png"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0 and "voicebus session" in dom.stdout and "<audio" in dom.stdout
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,1400",
                    f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=60)
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = os.environ.get("VOICEBUS_KEEP_REPORT")  # for a person to look at the page
    if keep:
        shutil.copy(shot, keep)
