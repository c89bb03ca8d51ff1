"""A spoken conversation while both cores are busy with someone else's work: what the speaker
produced still matches what the player was given, or every glitch is counted in health.player and
written into the trace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.utterances import compose
from services.stages.logger.store import load_json, load_turns
from tests.pipeline import speak, start_stages
from tests.support.rig import CpuBurner, MonitorRecorder, align, player_health

REPLY = [{"match": "weather", "reply": "It will be sunny and warm all day with a light breeze from the sea."},
         {"match": ".*", "reply": "The moon is about three hundred and eighty thousand kilometres away."}]


@pytest.mark.audio
def test_conversation_on_a_busy_machine_plays_clean_or_counts_every_glitch(procs, client_factory, simulator,
                                                                           tmp_path, pulse, pulse_rig, chaos_record):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(REPLY))
    root = tmp_path / "sessions"
    sim = simulator("--pace", "realtime", "--rules", str(rules))
    client = client_factory(["rt.", "audio.assistant", "player.", "health."])
    procs.voicebus("logger", "--root", str(root))
    start_stages(procs, client, sim, env=pulse)
    client.wait_for(lambda m: m.topic == "health.logger", timeout_s=30)
    recorder = MonitorRecorder(pulse)
    recorder.wait_for_samples(4800)
    utterance = compose([("say", "what is the weather like today"), ("silence", 6.0),
                         ("say", "how far away is the moon"), ("silence", 1.0)], 48000)
    with CpuBurner() as burner:
        speak(procs, utterance, 48000, tmp_path, tail_s=6.0)
        first = client.wait_for(lambda m: m.topic == "rt.response.done", timeout_s=60)
        client.wait_for(lambda m: m.topic == "rt.response.done" and m.header.t_ns > first.header.t_ns, timeout_s=60)
        client.wait_for(lambda m: m.topic == "health.logger" and m.data["turns_stored"] >= 2, timeout_s=30)
        busy = burner.busy_fraction()
    client.collect(1.2)  # the next heartbeats carry the final counters
    recording = recorder.stop()
    procs.stop_all()
    items: dict[str, bytearray] = {}
    for message in client.seen:
        if message.topic == "audio.assistant":
            items.setdefault(message.header.extra["item_id"], bytearray()).extend(message.payload)
    nccs = [align(recording, np.frombuffer(bytes(pcm), "<i2").astype(float))[1] for pcm in items.values()]
    glitches = player_health(client)
    session = next(p for p in root.iterdir() if p.is_dir())
    traced = [e for e in (json.loads(line) for line in (session / "events.jsonl").read_text().splitlines())
              if e.get("kind") == "playback_glitch"]
    counted = sum(glitches.get(k) or 0 for k in ("underruns", "late_callbacks", "output_underflows"))
    print(f"cores busy {busy:.0%}; ncc per item {[round(n, 3) for n in nccs]}; player {glitches}; "
          f"glitches in the trace {sum(e['count'] for e in traced)}")
    assert busy > 0.9, "the burners must really keep both cores busy"
    assert len(nccs) == 2 and len(load_turns(session)) == 2 and load_json(session / "meta.json")
    clean = all(n >= 0.9 for n in nccs)
    chaos_record(case="spoken conversation with both cores busy (player on the virtual speaker)", tried=len(nccs),
                 survived=sum(n >= 0.9 for n in nccs), lost=0, cores_busy=f"{busy:.0%}",
                 ncc_min=round(min(nccs), 3), glitches_counted=counted,
                 max_callback_gap_ms=glitches.get("max_callback_gap_ms"))
    assert clean or (counted > 0 and sum(e["count"] for e in traced) >= 1), \
        f"the speaker glitched (ncc {nccs}) and nothing counted it: player {glitches}, trace {traced}"
