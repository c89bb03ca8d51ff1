#!/usr/bin/env python3
"""Gateway latency, voicebus next to the notebook's design, against the same simulator in one run.

- mic callback -> input_audio_buffer.append written to the socket: voicebus measures it per frame
  from the mic's `t_callback_ns` (carried through the resampler) to the gateway's publish right
  after ws.send; the notebook design buffers 300 ms and resamples each chunk on its own.
- websocket audio delta received -> audio.assistant published (voicebus), from the gateway's headers.

    .venv/bin/python scripts/bench_gateway.py [--turns 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from baseline_notebook import run_notebook  # noqa: E402
from benchlib import Rig, machine, pct  # noqa: E402

from common.bus import Receiver, connect_sub, wait_for_bus  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.speech import synthesize  # noqa: E402
from common.wavio import write_wav  # noqa: E402

QUESTIONS = ["what is the weather like today", "please tell me a short story", "how far away is the moon",
             "turn on the lights in the kitchen", "what time does the train leave"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()
    rig = Rig(with_pulse=False)
    port = 18900 + (int(time.time()) % 50)
    sim_url = f"http://127.0.0.1:{port}/v1"
    try:
        rig.start("simulate", "--port", str(port), "--pace", "realtime")
        env = {"VOICEBUS_SIM_URL": sim_url}
        cfg = BusConfig(rig.env["VOICEBUS_BUS_PUB"], rig.env["VOICEBUS_BUS_SUB"])
        ctx = zmq.Context()
        assert wait_for_bus(ctx, cfg, 15)
        receiver = Receiver(connect_sub(ctx, cfg, ["rt.sent.input_audio_buffer.append", "audio.assistant",
                                                   "rt.response.done", "rt.session.updated"]), "bench")
        for stage, extra in (("gateway", ()), ("resample", ()), ("player", ("--wav", str(rig.dir / "p.wav")))):
            rig.start(stage, *extra, extra_env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = receiver.recv(100)
            if message is not None and message.topic == "rt.session.updated":
                break
        append_ms, delta_ms, notebook_ms = [], [], []
        for index in range(args.turns):
            question = QUESTIONS[index % len(QUESTIONS)]
            wav = write_wav(rig.dir / f"q{index}.wav", synthesize(question, "slt", 48000), 48000)
            mic = rig.start("mic", "--wav", str(wav), "--tail-silence", "2.0")
            done = False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (done and mic.poll() is not None):
                message = receiver.recv(100)
                if message is None:
                    continue
                if message.topic == "rt.sent.input_audio_buffer.append":
                    event = message.data["event"]  # a run of frames: when each was called back and sent
                    append_ms += [(sent - called) / 1e6 for called, sent in
                                  zip(event.get("t_callback_ns", []), event.get("t_sent_ns", []), strict=False) if called]
                elif message.topic == "audio.assistant":
                    delta_ms.append((message.header.t_ns - message.header.t_capture_ns) / 1e6)
                elif message.topic == "rt.response.done":
                    done = True
            notebook_ms += run_notebook(str(wav), f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime")["append_ms"]
        receiver.sock.close(0)
        ctx.term()
    finally:
        rig.close()
    print(f"bench_gateway {time.strftime('%Y-%m-%d')} on {machine()}; {args.turns} spoken turns, 48 kHz WAV mic "
          f"(20 ms frames) -> resample -> gateway -> simulator on loopback")
    print("| path | voicebus p50 ms | voicebus p99 ms | notebook design p50 ms | notebook p99 ms | budget |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| mic callback -> input_audio_buffer.append on the socket | {pct(append_ms, 50):.2f} | "
          f"{pct(append_ms, 99):.2f} | {pct(notebook_ms, 50):.1f} | {pct(notebook_ms, 99):.1f} | p99 <= 23 ms |")
    print(f"| websocket audio delta received -> audio.assistant published | {pct(delta_ms, 50):.2f} | "
          f"{pct(delta_ms, 99):.2f} | n/a (played in the socket thread) | | p99 <= 3 ms |")
    print(f"samples: {len(append_ms)} appends, {len(delta_ms)} deltas, {len(notebook_ms)} notebook frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
