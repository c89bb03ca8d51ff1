"""Websocket faults 20x each, 10 000 fuzzed frames during a conversation, broken disks and files."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import msgpack
import pytest

from common.envelope import EnvelopeError, decode
from common.utterances import speech_pcm
from tests.helpers import REPO
from tests.pipeline import speak, start_stages

REPEATS = 20
TEXT_TURN = [{"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                         "content": [{"type": "input_text", "text": "hello"}]}},
             {"type": "response.create"}]


@pytest.mark.parametrize("fault", ["drop_mid_response", "error_event", "unknown_event", "malformed_json", "slow"])
def test_websocket_fault_twenty_times(procs, client_factory, simulator, tmp_path, fault, chaos_record):
    sim = simulator("--pace", "fast", "--fault", fault, "--fault-after", "1", "--fault-delay-ms", "20")
    client = client_factory(["rt.", "health.gateway"])
    start_stages(procs, client, sim, stages=("gateway",))
    gateway = procs.started[-1]
    started = time.monotonic()
    reconnect_s = []
    for attempt in range(REPEATS):
        since = time.time_ns()
        for event in TEXT_TURN:
            client.send_event("gateway.send", {"event": event})
        if fault == "drop_mid_response":
            lost = client.wait_for(lambda m, s=since: m.topic == "rt.gateway.disconnected" and m.header.t_ns > s,
                                   timeout_s=30)
            back = client.wait_for(lambda m, s=since: m.topic == "rt.session.updated" and m.header.t_ns > s,
                                   timeout_s=30)
            reconnect_s.append((back.header.t_ns - lost.header.t_ns) / 1e9)
        else:
            client.wait_for(lambda m, s=since: m.topic == "rt.response.done" and m.header.t_ns > s, timeout_s=30)
        assert gateway.poll() is None, f"gateway exited at attempt {attempt}"
    counter = {"drop_mid_response": "reconnects", "unknown_event": "unknown_events",
               "malformed_json": "unknown_events", "error_event": "server_errors"}.get(fault)
    if counter:  # the next heartbeat that has counted them all; never more than there were
        beat = client.wait_for(lambda m: m.topic == "health.gateway" and m.data[counter] >= REPEATS, timeout_s=5)
        assert beat.data[counter] == REPEATS
    figures = {"seconds": round(time.monotonic() - started, 1)}
    if reconnect_s:
        figures.update(reconnect_p50_s=round(sorted(reconnect_s)[len(reconnect_s) // 2], 2),
                       reconnect_max_s=round(max(reconnect_s), 2))
    chaos_record(case=f"websocket fault {fault}", tried=REPEATS, survived=REPEATS, lost=0, **figures)


def _bad_frames(seed: int, topics: list[str], count: int) -> list[list[bytes]]:
    """Frames that are not valid messages, on the given topics (checked against the real codec)."""
    rng = random.Random(seed)
    header = {"v": 1, "src": "fuzz", "seq": 0, "t_ns": 1, "session": "s"}
    makers = [
        lambda t: [t.encode(), bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))],
        lambda t: [t.encode(), msgpack.packb({**header, "seq": -rng.randint(1, 9)})],
        lambda t: [t.encode(), msgpack.packb({**header, "v": 7})],
        lambda t: [t.encode(), msgpack.packb(header), b"\x01"],  # odd payload / unexpected payload
        lambda t: [t.encode(), msgpack.packb({**header, "rate": "fast", "channels": 1, "pts": 0,
                                              "t_capture_ns": 1})],
        lambda t: [t.encode(), msgpack.packb(header), b"x", b"y"],
    ]
    frames = []
    while len(frames) < count:
        candidate = rng.choice(makers)(rng.choice(topics))
        try:
            decode(candidate)
        except EnvelopeError:
            frames.append(candidate)
    return frames


def test_ten_thousand_fuzzed_frames_during_a_conversation(procs, client_factory, simulator, tmp_path, chaos_record):
    sim = simulator("--pace", "fast")
    client = client_factory(["rt.", "health."])
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    stage_topics = {"gateway": ["audio.user", "player.state", "gateway.send"], "resample": ["audio.mic"],
                    "player": ["audio.assistant", "player.flush"]}
    topics = sorted({t for ts in stage_topics.values() for t in ts})
    frames = _bad_frames(7, topics, 10_000)
    before = {s: client.wait_for(lambda m, s=s: m.topic == f"health.{s}", timeout_s=10).data["bad"]
              for s in stage_topics}
    speak(procs, speech_pcm("what is the weather like today", "slt", 48000), 48000, tmp_path, speed=1.0)
    for index, frame in enumerate(frames):
        client.publisher.sock.send_multipart(frame)
        if index % 500 == 0:
            time.sleep(0.02)
    transcript = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed",
                                 timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    assert transcript.data["event"]["transcript"] == "what is the weather like today"
    time.sleep(1.5)
    counted = {}
    for stage, prefixes in stage_topics.items():
        expected = sum(1 for f in frames if any(f[0].decode().startswith(p) for p in prefixes))
        asked = time.time_ns()
        beat = client.wait_for(lambda m, s=stage, t=asked: m.topic == f"health.{s}" and m.header.t_ns > t,
                               timeout_s=5)
        counted[stage] = beat.data["bad"] - before[stage]
        assert counted[stage] == expected, (stage, counted[stage], expected)
    assert all(p.poll() is None for p in procs.started if "mic" not in p.args)
    chaos_record(case="10 000 fuzzed frames on every stage topic during a spoken turn", tried=len(frames),
                 survived=len(frames), lost=0, counted_bad=counted)


def test_unwritable_trace_dir_and_capture_keep_the_audio_path_running(procs, client_factory, simulator, tmp_path,
                                                                      chaos_record):
    sim = simulator("--pace", "fast")
    client = client_factory(["rt.", "health."])
    logger = procs.voicebus("logger", "--root", "/proc/voicebus-cannot-write-here")
    capture = procs.voicebus("capture", "-o", "/dev/full", "rt.")
    start_stages(procs, client, sim, player_args=("--wav", str(tmp_path / "p.wav")))
    speak(procs, speech_pcm("what is the weather like today", "slt", 48000), 48000, tmp_path, speed=2.0)
    client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    beat = client.wait_for(lambda m: m.topic == "health.logger" and m.data["store_errors"] > 0, timeout_s=10)
    assert logger.poll() is None and beat.data["turns_stored"] == 0
    assert capture.wait(timeout=10) == 1
    log = procs.log_of(logger)
    assert "store_unavailable" in log and "Traceback" not in log
    assert "cannot write /dev/full" in procs.log_of(capture) or "write_failed" in procs.log_of(capture)
    chaos_record(case="trace dir unwritable, capture on a full disk", tried=2, survived=2, lost=0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("not audio at all"), "not a WAV file"),
    (lambda p: subprocess.run(["sox", "-n", "-r", "16000", "-e", "floating-point", "-b", "32", str(p), "synth",
                               "0.1", "sine", "440"], check=True), "floating-point WAV is not supported"),
    (lambda p: subprocess.run(["sox", "-n", "-r", "8000", "-b", "16", str(p), "trim", "0", "0"], check=True),
     "contains no audio frames"),
    (lambda p: p.write_bytes(_wav_bytes()[:30]), "unreadable WAV"),
])
def test_bad_wav_inputs_give_clear_errors(tmp_path, make, message, chaos_record):
    path = tmp_path / "input.wav"
    make(path)
    result = subprocess.run([sys.executable, "-m", "services.cli", "mic", "--wav", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    # exit 2: a setup error, which `up` reports and stops on instead of restarting the mic forever
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    chaos_record(case=f"bad WAV: {message}", tried=1, survived=1, lost=0)


def _wav_bytes() -> bytes:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x01" * 1600)
    return buffer.getvalue()


def test_eight_bit_wav_is_converted_not_refused(tmp_path):
    from common.wavio import read_wav

    path = tmp_path / "u8.wav"
    subprocess.run(["sox", "-n", "-r", "8000", "-b", "8", "-e", "unsigned-integer", str(path), "synth", "0.1", "sine",
                    "440"], check=True)
    audio = read_wav(path)
    assert audio.rate == 8000 and audio.frames == 800
