#!/usr/bin/env python3
"""The virtual devices' own latency: the least any system on this rig could do, measured the same way.

A minimal passthrough with the voicebus devices' settings (PyAudio, capture at the device's native
rate in 20 ms frames, playback at 24 kHz in the player's periods) and nothing else. It listens for the
timing marker (services/simulator/markers.py) in its capture; when one arrives it prints `marker_in` with the
wall time of the callback that completed it (the capture floor, what "reaching a server" costs
with zero processing and zero network), and 300 ms later plays the marker, printing `marker_out`
with the wall time the callback handed over its first sample (the playback floor starts there).
One JSON line per event on stdout; scripts/bench_pipeline.py runs it as the "rig floor" row.

    .venv/bin/python scripts/rig_floor.py
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.audio_devices import OUTPUT_PERIOD_MS, open_pyaudio  # noqa: E402
from common.resample import StreamResampler  # noqa: E402
from services.simulator.markers import StreamFinder, chirp_pcm  # noqa: E402

REPLY_DELAY_S = 0.3
OUT_RATE = 24_000
OUT_PERIOD = OUT_RATE * OUTPUT_PERIOD_MS // 1000


def main() -> int:
    import pyaudio

    pa = open_pyaudio()
    in_rate = int(pa.get_default_input_device_info()["defaultSampleRate"])
    to_24k = StreamResampler(in_rate, OUT_RATE)  # the finder works at 24 kHz, like the simulator
    finder = StreamFinder(OUT_RATE)
    lock = threading.Lock()
    pending: list[float] = []  # monotonic times at which to start a reply
    playing = bytearray()
    marker = chirp_pcm(OUT_RATE)

    def say(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    def on_input(in_data: bytes, _count: int, _info: dict, _status: int):
        now_ns = time.time_ns()
        for found in finder.feed(to_24k.feed(in_data), now_ns):
            say("marker_in", end_arrival_ns=found["end_arrival_ns"], ncc=found["ncc"])
            with lock:
                pending.append(time.monotonic() + REPLY_DELAY_S)
        return None, pyaudio.paContinue

    def on_output(_in_data: None, frame_count: int, _info: dict, _status: int):
        with lock:
            if pending and time.monotonic() >= pending[0]:
                pending.pop(0)
                playing.extend(marker)
                say("marker_out", sent_ns=time.time_ns())
            chunk = bytes(playing[:frame_count * 2])
            del playing[:frame_count * 2]
        return chunk + bytes(frame_count * 2 - len(chunk)), pyaudio.paContinue

    streams = [pa.open(format=pyaudio.paInt16, channels=1, rate=in_rate, input=True,
                       frames_per_buffer=in_rate // 50, stream_callback=on_input),
               pa.open(format=pyaudio.paInt16, channels=1, rate=OUT_RATE, output=True,
                       frames_per_buffer=OUT_PERIOD, stream_callback=on_output)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    say("ready", in_rate=in_rate)
    stop.wait()
    for stream in streams:
        stream.stop_stream()
        stream.close()
    pa.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
