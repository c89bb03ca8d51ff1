"""Mic and player on real PortAudio devices (virtual PulseAudio), and their WAV stand-ins."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.envelope import AudioHeader
from common.stage import Output
from common.utterances import speech_pcm, tone
from common.wavio import read_wav, write_wav
from tests.support.rig import MonitorRecorder, align, follow, play_into_mic, player_health

MAX_GLITCH_MS = 200  # silence a loaded machine may insert into 2-3 s of playback; a wrong stream adds far more
ITEM = {"item_id": "item_test", "content_index": 0, "response_id": "resp_test"}


def publish_item(client, pcm: bytes, rate: int = 24_000, frame_ms: int = 20, paced: bool = False,
                 item: dict | None = None) -> None:
    out = Output("gateway", "test", client.publisher.send)
    step = rate * frame_ms // 1000 * 2
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        if paced:  # like the API: a little ahead of real time
            delay = started + index * frame_ms / 1000 * 0.5 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        out.audio("audio.assistant", pcm[offset:offset + step], rate=rate, channels=1, pts=offset // 2,
                  t_capture_ns=time.time_ns(), **(item or ITEM))


def wait_player_ready(client, timeout_s: float = 30) -> None:
    """The player beats and this client's messages reach it: a beat alone does not prove the second, since
    the player's subscriptions reach this client's publisher through the proxy on their own schedule (on a
    busy machine the first frames of an item sent at once could be filtered away before). A flush is
    answered with a flushed player.state; what that exchange left in `client.seen` is dropped."""
    client.wait_for(lambda m: m.topic == "health.player", timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        client.send_event("player.flush", {"reason": "route check"})
        try:
            client.wait_for(lambda m: m.topic == "player.state" and m.data.get("reason") == "route check",
                            timeout_s=0.5)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    client.seen.clear()


def states(client) -> list:
    return [m for m in client.seen if m.topic == "player.state"]


@pytest.mark.audio
def test_mic_captures_spoken_wav_from_virtual_mic(procs, client_factory, pulse, tmp_path):
    procs.voicebus("mic", "--rate", "48000", env=pulse)
    client = client_factory(["audio.mic"])
    client.wait_for(lambda m: m.topic == "audio.mic", timeout_s=30)
    speech = speech_pcm("please tell me a short story", "slt", 48000)
    player = play_into_mic(pulse, speech, 48000, tmp_path)
    player.wait(timeout=20)
    client.collect(1.0)
    frames = [m for m in client.seen if m.topic == "audio.mic"]
    pts = [m.header.pts for m in frames]
    assert all(b == a + m.samples for a, b, m in zip(pts, pts[1:], frames, strict=False)), "pts must be contiguous"
    # 20 ms frames while there is sound; only the silence before it may go out in batches (common.silence)
    loud = [m for m in frames if np.sqrt(np.mean(np.frombuffer(m.payload, "<i2").astype(float) ** 2)) > 1000]
    assert loud and {m.samples for m in loud} == {960}
    assert client.receiver.gaps == 0
    assert {m.header.rate for m in frames} == {48000}
    assert all(m.header.t_capture_ns <= m.header.t_ns for m in frames)
    recording = np.frombuffer(b"".join(m.payload for m in frames), dtype="<i2").astype(float)
    heard = follow(recording, np.frombuffer(speech, dtype="<i2").astype(float), 48000)
    assert heard.clear_fraction() >= 0.8 and heard.added_ms <= MAX_GLITCH_MS, heard.summary()


@pytest.mark.audio
def test_player_plays_item_on_virtual_speaker_and_reports_position(procs, client_factory, pulse, pulse_rig):
    procs.voicebus("player", env=pulse)
    client = client_factory(["player.state", "health.player"])
    wait_player_ready(client)
    recorder = MonitorRecorder(pulse)
    recorder.wait_for_samples(4800)
    speech = speech_pcm("how far away is the moon from the earth", "slt", 24000)
    publish_item(client, speech, paced=True)
    total_ms = len(speech) / 48
    client.wait_for(lambda m: m.topic == "player.state" and m.data["played_ms"] >= total_ms, timeout_s=20)
    client.collect(0.5)
    recording = recorder.stop()
    source = np.frombuffer(speech, dtype="<i2").astype(float)
    heard = follow(recording, source, 24000)
    print(f"heard: {heard.summary()}; player {player_health(client)}; rig {pulse_rig.state()}")
    # every word reached the speaker, in order; a busy machine may slip a few ms of silence in between
    # (the player's late_callbacks count them), which must not make played words count as missing
    assert heard.clear_fraction() >= 0.8 and heard.added_ms <= MAX_GLITCH_MS, \
        (heard.summary(), player_health(client), pulse_rig.state())
    reports = [m for m in states(client) if m.data["item_id"] == "item_test" and 0 < m.data["played_ms"] < total_ms]
    assert len(reports) >= 5  # ~10 a second while playing
    errors = []
    for message in reports:
        heard_ms = heard.source_index(recorder.index_at(message.header.t_ns)) / 24
        errors.append(message.data["played_ms"] - heard_ms)
    print(f"played_ms - heard_ms: median {np.median(errors):.1f} ms, max |err| {np.max(np.abs(errors)):.1f} ms")
    assert np.max(np.abs(errors)) <= 40
    # the device's tail is played out in ~2.5 periods: the state saying so follows at the next tick,
    # not a second later (the idle interval), when the gateway would take the reply for one cut short
    item_states = [m for m in states(client) if m.data["item_id"] == "item_test"]
    done = next(m for m in item_states if m.data["played_ms"] >= total_ms)
    before = [m for m in item_states if m.header.t_ns < done.header.t_ns]
    assert (done.header.t_ns - before[-1].header.t_ns) / 1e9 <= 0.5, [m.data for m in item_states[-4:]]


@pytest.mark.audio
def test_flush_silences_speaker_within_30ms_and_reports_stop_position(procs, client_factory, pulse):
    player = procs.voicebus("player", env=pulse)
    client = client_factory(["player.state", "health.player"])
    wait_player_ready(client)
    recorder = MonitorRecorder(pulse)
    recorder.wait_for_samples(4800)
    long_tone = tone(440, 4.0, 24000, amplitude=0.3)
    publish_item(client, long_tone)
    client.wait_for(lambda m: m.topic == "player.state" and m.data["played_ms"] >= 1500, timeout_s=20)
    client.send_event("player.flush", {"reason": "test"})
    flushed = client.wait_for(lambda m: m.topic == "player.state" and m.data.get("flushed"), timeout_s=5)
    client.collect(0.5)
    recording = recorder.stop()
    loud = np.flatnonzero(np.abs(recording) > 300)
    onset, last = loud[0], loud[-1]
    silent_after_ms = (recorder.time_of(last) - flushed.header.t_ns) / 1e6
    # heard: the tone's own 5 ms blocks between onset and end, not the span: a loaded machine may slip
    # silence in between (an underrun plays none of the item), which the span would count as played
    blocks = recording[onset:last + 1][:(last + 1 - onset) // 120 * 120].astype(np.float64).reshape(-1, 120)
    heard_ms = 5.0 * int(np.count_nonzero(np.sqrt((blocks ** 2).mean(axis=1)) > 1000))
    gaps_ms = (last - onset) / 24 - heard_ms
    print(f"audible {silent_after_ms:.1f} ms after flush; played_ms {flushed.data['played_ms']} vs heard {heard_ms:.1f}"
          f" (silence slipped in: {gaps_ms:.0f} ms)")
    assert silent_after_ms <= 30
    assert abs(flushed.data["played_ms"] - heard_ms) <= 40
    assert flushed.data["item_id"] == "item_test" and flushed.data["dropped_ms"] > 1000
    # PortAudio probes JACK at start; its noise stays off the stage's stderr, our own lines stay on it
    log_text = procs.log_of(player)
    assert "device_open" in log_text and "jack" not in log_text.lower(), log_text


@pytest.mark.audio
def test_an_idle_player_stops_its_stream_and_plays_the_next_item_whole(procs, client_factory, pulse):
    """Listening, the player runs no audio callback (each takes the GIL, 200 a second); the next reply
    starts the stream again and is heard from its first word, with its position still right."""
    procs.voicebus("player", "--idle-pause-s", "0.3", env=pulse)
    client = client_factory(["player.state", "health.player"])
    wait_player_ready(client)

    def paused_beat():
        return client.wait_for(lambda m: m.topic == "health.player" and m.data["output_paused"], timeout_s=10)

    first = paused_beat()
    client.seen.clear()
    second = paused_beat()
    assert second.header.seq > first.header.seq
    assert second.data["output_callbacks"] == first.data["output_callbacks"], "a paused stream has no callbacks"
    recorder = MonitorRecorder(pulse)
    speech = speech_pcm("what is the weather like today", "slt", 24000)
    publish_item(client, speech, paced=True)
    total_ms = len(speech) / 48
    done = client.wait_for(lambda m: m.topic == "player.state" and m.data["played_ms"] >= total_ms, timeout_s=20)
    client.collect(0.3)
    recording = recorder.stop()
    heard = follow(recording, np.frombuffer(speech, dtype="<i2").astype(float), 24000)
    assert heard.clear_fraction() >= 0.8 and heard.added_ms <= MAX_GLITCH_MS, (heard.summary(), player_health(client))
    assert heard.ncc[0] >= 0.9 and heard.ncc[-1] >= 0.9, ("first and last words heard", heard.summary())
    assert done.data["played_ms"] == pytest.approx(total_ms, abs=1)
    reports = [m for m in states(client) if m.data["item_id"] == "item_test" and 0 < m.data["played_ms"] < total_ms]
    errors = [m.data["played_ms"] - heard.source_index(recorder.index_at(m.header.t_ns)) / 24 for m in reports]
    print(f"after a resume, played_ms - heard_ms: median {np.median(errors):.1f} ms, max |err| {np.max(np.abs(errors)):.1f}")
    assert len(reports) >= 5 and np.max(np.abs(errors)) <= 40  # as for a stream that never stopped
    client.seen.clear()
    again = paused_beat()  # and stops once more after it
    assert again.data["output_pauses"] > second.data["output_pauses"]
    assert again.data["output_callbacks"] > second.data["output_callbacks"]


def test_wav_source_and_sink_without_pulseaudio(procs, client_factory, tmp_path):
    speech = speech_pcm("turn on the lights in the kitchen", "rms", 16000)
    source = write_wav(tmp_path / "question.wav", speech, 16000)
    sink = tmp_path / "played.wav"
    procs.voicebus("player", "--wav", str(sink))
    client = client_factory(["audio.mic", "player.state", "health."])
    wait_player_ready(client)
    mic = procs.voicebus("mic", "--wav", str(source), "--speed", "4")
    assert mic.wait(timeout=30) == 0  # a WAV source ends by itself
    client.collect(0.3)
    frames = [m for m in client.seen if m.topic == "audio.mic"]
    assert b"".join(m.payload for m in frames) == speech
    assert [m.header.pts for m in frames] == [i * 320 for i in range(len(frames))]
    answer = speech_pcm("the lights are on", "slt", 24000)
    publish_item(client, answer)
    client.wait_for(lambda m: m.topic == "player.state" and m.data["played_ms"] >= len(answer) / 48, timeout_s=20)
    procs.stop_all()
    played = read_wav(sink)
    assert (played.rate, played.channels) == (24000, 1)
    recording = np.frombuffer(played.pcm, dtype="<i2")
    offset, ncc = align(recording.astype(float), np.frombuffer(answer, dtype="<i2").astype(float))
    assert ncc > 0.999 and np.array_equal(recording[offset:offset + len(answer) // 2], np.frombuffer(answer, "<i2"))


def test_player_converts_other_rates_and_drops_unsupported(procs, client_factory, tmp_path):
    procs.voicebus("player", "--wav", str(tmp_path / "out.wav"))
    client = client_factory(["player.state", "health.player"])
    wait_player_ready(client)
    publish_item(client, tone(300, 0.5, 6000), rate=6000)  # below 8 kHz: dropped and counted
    publish_item(client, tone(300, 0.5, 48000), rate=48000)  # converted to 24 kHz
    beat = client.wait_for(lambda m: m.topic == "health.player" and m.data["dropped_frames"] >= 25, timeout_s=10)
    state = client.wait_for(lambda m: m.topic == "player.state" and m.data["played_ms"] >= 490, timeout_s=10)
    assert beat.data["dropped_frames"] == 25 and state.data["received_ms"] == pytest.approx(500, abs=5)


def test_bad_inputs_give_one_line_errors(procs, tmp_path, pulse):
    float_wav = tmp_path / "float.wav"
    import subprocess

    subprocess.run(["sox", "-n", "-r", "16000", "-e", "floating-point", "-b", "32", str(float_wav), "synth", "0.2",
                    "sine", "440"], check=True)
    proc = procs.voicebus("mic", "--wav", str(float_wav))
    assert proc.wait(timeout=20) == 2  # a setup error (as a missing device below): `up` stops, not restarts
    assert "floating-point WAV is not supported" in procs.log_of(proc)
    not_wav = tmp_path / "notes.txt"
    not_wav.write_text("hello")
    proc = procs.voicebus("mic", "--wav", str(not_wav))
    assert proc.wait(timeout=20) == 2 and "not a WAV file" in procs.log_of(proc)
    proc = procs.voicebus("mic", "--device", "no-such-device", env=pulse)
    # the bus is not running in this test: the stage waits for it; give it one
    procs.voicebus("bus")
    assert proc.wait(timeout=30) == 2
    assert "no input device matches 'no-such-device'" in procs.log_of(proc)
    assert "Traceback" not in procs.log_of(proc)


def test_audio_header_carries_capture_clock(procs, client_factory, tmp_path):
    source = write_wav(tmp_path / "s.wav", tone(440, 0.2, 8000), 8000)
    client = client_factory(["audio.mic"])
    procs.voicebus("mic", "--wav", str(source)).wait(timeout=30)
    client.collect(0.3)
    frames = [m for m in client.seen if m.topic == "audio.mic"]
    assert frames and all(isinstance(m.header, AudioHeader) and m.header.extra["clock"] == "wav"
                          for m in frames)
