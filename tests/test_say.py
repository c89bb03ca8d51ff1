"""`voicebus say`: streamed chat-completions audio into a true 24 kHz WAV, traced as a Weave op."""

from __future__ import annotations

import base64
import datetime
import io
import json
import subprocess
import sys
import time
import wave

from openai import OpenAI

from tests.helpers import REPO, net_audit, net_audit_env
from tests.support.trace_server import LoopbackTraceServer


def _say(env, *args, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "say", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_say_writes_24k_wav_prints_transcript_and_traces_op(simulator, base_env, tmp_path):
    sim = simulator()
    audit_log = tmp_path / "net-audit.jsonl"
    env = {**base_env, "VOICEBUS_SIM_URL": sim, **net_audit_env(audit_log, base_env)}
    out = tmp_path / "answer.wav"
    root = tmp_path / "sessions"
    result = _say(env, "tell me about the sea", "-o", str(out), "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "local simulator" in result.stderr
    assert result.stdout.strip() == "I heard: tell me about the sea"
    # the same request through the SDK, to know what was streamed
    stream = OpenAI(base_url=sim, api_key="x").chat.completions.create(
        model="gpt-4o-audio-preview", modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        messages=[{"role": "user", "content": "tell me about the sea"}], stream=True)
    streamed = b"".join(base64.b64decode(c.choices[0].delta.audio.data) for c in stream
                        if c.choices and c.choices[0].delta.audio and c.choices[0].delta.audio.data)
    with wave.open(str(out)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() == len(streamed) // 2
        assert wav.readframes(wav.getnframes()) == streamed
    server = LoopbackTraceServer().start()
    try:
        upload = subprocess.run([sys.executable, "-m", "services.cli", "upload", "--root", str(root)], cwd=REPO,
                                env={**env, **server.env()}, capture_output=True, text=True, timeout=120)
        assert upload.returncode == 0, upload.stdout + upload.stderr
        calls = [c for c in server.calls.values() if "voicebus.say" in c["op_name"]]
        assert len(calls) == 1
        call = calls[0]
        assert call["inputs"]["prompt"] == "tell me about the sea"
        assert call["output"]["transcript"] == "I heard: tell me about the sea"
        audio_ref = json.dumps(call["output"]["audio"])
        assert "Audio" in audio_ref  # stored as a weave Audio object, not base64 text
        wavs = [f["data"] for f in server.files.values() if f.get("data", b"")[:4] == b"RIFF"]
        assert len(wavs) == 1
        with wave.open(io.BytesIO(wavs[0])) as uploaded:
            assert uploaded.getframerate() == 24000 and uploaded.readframes(10**9) == streamed
        # timed as the answer streamed, not at the upload
        meta = json.loads(next(root.iterdir()).joinpath("meta.json").read_text())
        for field, stored in (("started_at", meta["started_ns"]), ("ended_at", meta["ended_ns"])):
            at = datetime.datetime.fromisoformat(call[field].replace("Z", "+00:00"))
            assert abs(at.timestamp() * 1e9 - stored) <= 1e6, (field, call[field], stored)
        sent = len(server.requests)
        again = subprocess.run([sys.executable, "-m", "services.cli", "upload", "--root", str(root)], cwd=REPO,
                               env={**env, **server.env()}, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "nothing to upload" in again.stdout and len(server.requests) == sent
        # with a key, say sends its answer itself (a background upload), also only to the trace server
        again = _say({**env, **server.env()}, "and about the moon", "-o", str(tmp_path / "moon.wav"), "--root",
                     str(root))
        assert again.returncode == 0, again.stderr
        [moon] = [p for p in root.iterdir() if json.loads((p / "meta.json").read_text())["started_ns"] >
                  meta["started_ns"]]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not json.loads(
                (moon / "upload.json").read_text() if (moon / "upload.json").exists() else "{}").get("confirmed"):
            time.sleep(0.2)
        assert len([c for c in server.calls.values() if "voicebus.say" in c["op_name"]]) == 2
        audit = net_audit(audit_log)  # say and its uploads: loopback only, weave's Sentry never live
        assert audit["foreign"] == [] and audit["sentry"] == [] and len(audit["weave"]) >= 1, audit
    finally:
        server.stop()


def test_say_errors_are_clear(simulator, base_env, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "silent", "reply": ""}]))
    sim = simulator("--rules", str(rules))
    env = {**base_env, "VOICEBUS_SIM_URL": sim}
    result = _say(env, "be silent", "-o", str(tmp_path / "a.wav"), "--root", str(tmp_path / "s"))
    assert result.returncode == 1 and "carried no audio" in result.stderr
    assert not (tmp_path / "a.wav").exists()
    down = {**base_env, "VOICEBUS_SIM_URL": "http://127.0.0.1:9/v1"}
    result = _say(down, "hello", "-o", str(tmp_path / "b.wav"), "--root", str(tmp_path / "s"))
    assert result.returncode == 1 and "cannot reach" in result.stderr and "voicebus simulate" in result.stderr
    bad_key = {**base_env, "OPENAI_API_KEY": "sk-wrong", "OPENAI_BASE_URL": simulator("--api-key", "sk-right")}
    result = _say(bad_key, "hello", "-o", str(tmp_path / "c.wav"), "--root", str(tmp_path / "s"))
    assert result.returncode == 1 and "refused" in result.stderr
    assert "sk-wrong" not in result.stderr + result.stdout
