"""Speakers without headphones: the assistant's voice leaks back into the mic (a PulseAudio loopback
from the speaker's monitor into the mic, 40 ms late). Without the echo guard the assistant
interrupts itself; with it, it does not. And PulseAudio's WebRTC canceller, measured on the same rig."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from common.utterances import speech_pcm
from tests.pipeline import start_stages
from tests.support.rig import play_into_mic
from tests.test_audio_io import publish_item

LONG = [{"match": ".*", "reply": "Once upon a time there was a little robot who lived in a quiet town by the sea "
         "and every morning it walked down to the harbour to count the boats and talk to the fishermen."}]


@pytest.fixture
def echo_path(pulse):
    """Whatever the speaker plays reaches the mic ~40 ms later (removed after the test)."""
    result = subprocess.run(["pactl", "load-module", "module-loopback", "source=voicebus_speaker.monitor",
                             "sink=voicebus_mic_in", "latency_msec=40"], env=pulse, capture_output=True, text=True,
                            check=True)
    yield result.stdout.strip()
    subprocess.run(["pactl", "unload-module", result.stdout.strip()], env=pulse, check=False)


@pytest.mark.audio
@pytest.mark.parametrize("guard", [False, True], ids=["no-guard", "echo-guard"])
def test_echo_guard_prevents_self_interruption(procs, client_factory, simulator, tmp_path, pulse, echo_path, guard):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(LONG))
    sim = simulator("--pace", "realtime", "--rules", str(rules))
    client = client_factory(["rt.", "player.", "health."])
    start_stages(procs, client, sim, env=pulse, gateway_args=("--echo-guard", "--log-level", "DEBUG") if guard else (),
                 stages=("gateway", "resample", "player"))
    procs.voicebus("mic", "--rate", "48000", env=pulse)
    client.wait_for(lambda m: m.topic == "health.mic", timeout_s=30)
    # the user speaks once, through the virtual mic, then stays quiet
    play_into_mic(pulse, speech_pcm("what is the weather like today", "slt", 48000), 48000, tmp_path).wait(20)
    first = client.wait_for(lambda m: m.topic == "rt.response.created", timeout_s=30)
    done = client.wait_for(lambda m: m.topic == "rt.response.done" and m.header.t_ns > first.header.t_ns,
                           timeout_s=40)
    client.collect(1.0)
    during = [m for m in client.seen if m.topic == "rt.input_audio_buffer.speech_started"
              and first.header.t_ns < m.header.t_ns < done.header.t_ns]
    flushes = [m for m in client.seen if m.topic == "player.flush"]
    status = done.data["event"]["response"]["status"]
    print(f"guard={guard}: speech_started during the answer {len(during)}, flushes {len(flushes)}, status {status}")
    if guard:
        assert not during and not flushes and status == "completed"
        beat = client.wait_for(lambda m: m.topic == "health.gateway" and m.data.get("echo_gated_frames", 0) > 20,
                               timeout_s=5)
        assert beat.data["echo_gated_frames"] > beat.data["echo_passed_frames"]
    else:  # the failure the guard exists for: the assistant hears itself and stops talking
        assert during and flushes and status == "cancelled"


@pytest.mark.audio
def test_pulseaudio_webrtc_canceller_removes_echo_on_the_rig(procs, client_factory, pulse, echo_path, tmp_path):
    from tests.helpers import REPO

    subprocess.run(["bash", str(REPO / "scripts/pulse-aec.sh"), "load"], env=pulse, check=True, capture_output=True)
    try:
        levels = {}
        for label, sink, source in (("plain", "voicebus_speaker", "voicebus_mic"),
                                    ("aec", "voicebus_speaker_aec", "voicebus_mic_aec")):
            player = procs.voicebus("player", "--pulse-sink", sink, env=pulse, name=f"player-{label}")
            mic = procs.voicebus("mic", "--rate", "48000", "--pulse-source", source, env=pulse, name=f"mic-{label}")
            client = client_factory(["audio.mic", "health."])
            client.wait_for(lambda m: m.topic == "health.player", timeout_s=30)
            client.wait_for(lambda m: m.topic == "audio.mic", timeout_s=30)
            speech = speech_pcm("once upon a time there was a little robot who lived by the sea", "slt", 24000)
            start = len([m for m in client.seen if m.topic == "audio.mic"])
            publish_item(client, speech + speech, paced=True, item={"item_id": f"i_{label}", "content_index": 0,
                                                                    "response_id": "r"})
            client.collect(len(speech) * 2 / 48000 + 1.0)
            frames = [m for m in client.seen if m.topic == "audio.mic"][start:]
            pcm = np.frombuffer(b"".join(m.payload for m in frames), dtype="<i2").astype(float)
            settled = pcm[len(pcm) // 2:]  # the canceller needs a second or so to converge
            levels[label] = float(np.sqrt(np.mean(settled ** 2))) + 1e-9
            for proc in (player, mic):
                proc.terminate()
                proc.wait(timeout=10)
        reduction_db = 20 * np.log10(levels["plain"] / levels["aec"])
        print(f"echo at the mic: plain {levels['plain']:.0f} rms, with WebRTC AEC {levels['aec']:.0f} rms "
              f"({reduction_db:.1f} dB less)")
        assert levels["plain"] > 100  # the echo path is really there
        assert reduction_db >= 10
    finally:
        subprocess.run(["bash", str(REPO / "scripts/pulse-aec.sh"), "unload"], env=pulse, check=False,
                       capture_output=True)
