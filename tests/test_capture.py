"""Capture, replay and inspect: byte-exact round trips, truncation at every offset, replay into the gateway."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from common.capture_file import MAGIC, CaptureError, CaptureWriter, ReadReport, read_capture
from common.stage import Output
from common.utterances import speech_pcm, tone
from common.wavio import read_wav
from tests.helpers import REPO
from tests.pipeline import speak, start_stages


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "inspect", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def _wait_listening(procs, capture, timeout_s: float = 20.0) -> None:
    """capture logs `capturing` once its probe came back on its own SUB: its subscriptions are live."""
    deadline = time.monotonic() + timeout_s
    while "capturing" not in procs.log_of(capture):
        assert time.monotonic() < deadline and capture.poll() is None, procs.log_of(capture)
        time.sleep(0.05)


def test_capture_then_replay_reproduces_payloads_and_timing(procs, client_factory, tmp_path):
    path = tmp_path / "session.vbcap"
    capture = procs.voicebus("capture", "-o", str(path), "audio.", "rt.")
    client = client_factory(["audio.", "rt."])
    _wait_listening(procs, capture)
    out = Output("mic", "s1", client.publisher.send)
    pcm = tone(440, 1.0, 16000)
    gaps_ms = [20, 20, 5, 80, 20, 0, 40, 20, 20, 33] * 5
    for index, gap in enumerate(gaps_ms):
        out.audio("audio.mic", pcm[index * 320:(index + 1) * 320], rate=16000, channels=1, pts=index * 160,
                  t_capture_ns=time.time_ns())
        if index % 7 == 0:
            out.event("rt.response.done", {"event": {"type": "response.done", "n": index}})
        time.sleep(gap / 1000)
    time.sleep(0.5)
    capture.terminate()
    assert capture.wait(timeout=10) == 0
    original = list(read_capture(path))
    assert len(original) == len(gaps_ms) + 8
    # replay at 1x while a second capture records what comes back
    path2 = tmp_path / "replayed.vbcap"
    recapture = procs.voicebus("capture", "-o", str(path2), "audio.", "rt.")
    _wait_listening(procs, recapture)
    replay = procs.voicebus("replay", str(path), "--speed", "1")
    assert replay.wait(timeout=30) == 0
    time.sleep(0.5)
    recapture.terminate()
    recapture.wait(timeout=10)
    again = list(read_capture(path2))
    assert [r.frames[0] for r in again] == [r.frames[0] for r in original]
    assert [r.frames[2:] for r in again] == [r.frames[2:] for r in original]  # payloads byte for byte
    from common.envelope import decode

    first, replayed = decode(original[0].frames), decode(again[0].frames)
    assert replayed.header.src == "replay.mic" and replayed.header.pts == first.header.pts
    assert replayed.header.t_capture_ns == first.header.t_capture_ns
    # pacing error of each message against the replay as a whole (the median offset), so that one
    # late first delivery does not count against every message after it
    offsets = [(a2.t_recv_ns - a1.t_recv_ns) / 1e6 for a1, a2 in zip(original, again, strict=True)]
    median = sorted(offsets)[len(offsets) // 2]
    errors_ms = sorted(abs(o - median) for o in offsets)
    print(f"replay timing error: median {errors_ms[len(errors_ms) // 2]:.2f} ms, max {errors_ms[-1]:.2f} ms")
    # paced as captured: a replay that bursts, or sends at a fixed rate, misses the 0-80 ms gaps by hundreds
    # of ms; scheduling noise on a busy 2-core machine is a few ms, once in a while tens (~1 ms is typical)
    assert errors_ms[len(errors_ms) // 2] <= 3 and errors_ms[-1] <= 40


def test_truncated_capture_opens_at_every_offset_of_its_last_record(tmp_path):
    path = tmp_path / "full.vbcap"
    writer = CaptureWriter(path)
    for index in range(5):
        writer.write(1000 + index, [b"rt.x", b"header-%d" % index, b"payload" * index])
    writer.close()
    data = path.read_bytes()
    last_start = len(data) - (8 + len(__import__("msgpack").packb([1004, [b"rt.x", b"header-4", b"payload" * 4]],
                                                                   use_bin_type=True)))
    for cut in range(last_start, len(data)):
        cut_path = tmp_path / "cut.vbcap"
        cut_path.write_bytes(data[:cut])
        report = ReadReport()
        records = list(read_capture(cut_path, report))
        assert len(records) == 4
        assert report.lost_bytes == cut - last_start
        assert (report.lost_bytes > 0) == (cut > last_start)
    report = ReadReport()
    assert len(list(read_capture(path, report))) == 5 and report.lost_bytes == 0
    cut_path.write_bytes(data[:len(data) - 3])
    result = _inspect(str(cut_path))
    assert result.returncode == 0 and "4 records" in result.stdout and "unreadable" in result.stdout


def test_not_a_capture_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    with pytest.raises(CaptureError):
        list(read_capture(bogus))
    result = _inspect(str(bogus))
    assert result.returncode == 1 and "not a voicebus capture file" in result.stderr
    assert MAGIC.startswith(b"VOICEBUS")


def test_inspect_exports_audio_with_gaps_filled(tmp_path):
    from common.envelope import Stamper, encode

    path = tmp_path / "a.vbcap"
    writer = CaptureWriter(path)
    stamper = Stamper("mic", "s")
    frame = tone(300, 0.02, 16000)
    for index in (0, 1, 3, 4):  # frame 2 lost
        message = stamper.audio("audio.mic", frame, rate=16000, channels=1, pts=index * 320, t_capture_ns=1, t_ns=1)
        writer.write(index, encode(message))
    writer.close()
    out = tmp_path / "mic.wav"
    result = _inspect(str(path), "--wav", "audio.mic", "-o", str(out))
    assert result.returncode == 0 and "20 ms of gaps filled with silence" in result.stdout
    audio = read_wav(out)
    assert audio.rate == 16000 and audio.frames == 5 * 320
    assert audio.pcm[2 * 640:3 * 640] == bytes(640) and audio.pcm[:640] == frame


def test_captured_turn_replayed_into_gateway_gives_same_transcript(procs, client_factory, simulator, tmp_path):
    sim = simulator("--pace", "fast")
    path = tmp_path / "turn.vbcap"
    client = client_factory(["rt.", "health."])
    procs.voicebus("capture", "-o", str(path), "audio.user", "rt.")
    start_stages(procs, client, sim, stages=("gateway", "resample"))
    speak(procs, speech_pcm("turn on the lights in the kitchen", "slt", 48000), 48000, tmp_path, speed=2.0)
    live = client.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed",
                           timeout_s=60)
    client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
    time.sleep(0.5)
    procs.stop_all()
    # a fresh bus, gateway and simulator: only the captured user audio goes in
    sim2 = simulator("--pace", "fast")
    procs.voicebus("bus")
    client2 = client_factory(["rt.", "health."])
    start_stages(procs, client2, sim2, stages=("gateway",))
    assert procs.voicebus("replay", str(path), "--only", "audio.user", "--speed", "max").wait(timeout=60) == 0
    replayed = client2.wait_for(lambda m: m.topic == "rt.conversation.item.input_audio_transcription.completed"
                                and m.header.src == "gateway", timeout_s=60)
    assert replayed.data["event"]["transcript"] == live.data["event"]["transcript"] == \
        "turn on the lights in the kitchen"
