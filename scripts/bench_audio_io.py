#!/usr/bin/env python3
"""Audio I/O benchmark on the virtual PulseAudio devices: mic callback -> bus, bus -> device, CPU.

- mic: PortAudio callback time (header `t_callback_ns`) -> message received by a subscriber.
- player: frame received by the player -> its first sample handed to the PortAudio callback
  (audio published at 1x real time in 20 ms frames, so this includes the 40 ms jitter buffer).
- CPU % of one core and RSS of each stage while streaming.

    .venv/bin/python scripts/bench_audio_io.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import sys
import time

import zmq

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from benchlib import Rig, cpu_seconds, machine, pct, rss_mb  # noqa: E402

from common.audio_devices import OUTPUT_PERIOD_MS  # noqa: E402
from common.bus import Publisher, Receiver, connect_pub, connect_sub, wait_for_bus  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.stage import Output  # noqa: E402
from common.utterances import tone  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    rig = Rig(with_pulse=True)
    try:
        cfg = BusConfig(rig.env["VOICEBUS_BUS_PUB"], rig.env["VOICEBUS_BUS_SUB"])
        ctx = zmq.Context()
        assert wait_for_bus(ctx, cfg, 15)
        receiver = Receiver(connect_sub(ctx, cfg, ["audio.mic", "health.player"]), "bench")
        publisher = Publisher(connect_pub(ctx, cfg))
        mic = rig.start("mic", "--rate", "48000")
        player = rig.start("player")
        deadline = time.monotonic() + 30
        ready = set()
        while time.monotonic() < deadline and ready != {"mic", "player"}:
            message = receiver.recv(100)
            if message is not None:
                ready.add("mic" if message.topic == "audio.mic" else "player")
        out = Output("bench", "bench", publisher.send)
        pcm = tone(440, args.seconds, 24000, 0.2)
        step = 960
        mic_latency_ms, last_beat = [], None
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in (mic, player)}
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), step)):
            due = started + index * 0.02
            while time.monotonic() < due:
                message = receiver.recv(1)
                if message is None:
                    continue
                if message.topic == "audio.mic":
                    mic_latency_ms.append((time.time_ns() - message.header.extra["t_callback_ns"]) / 1e6)
                else:
                    last_beat = message.data
            out.audio("audio.assistant", pcm[offset:offset + step], rate=24000, channels=1, pts=offset // 2,
                      t_capture_ns=time.time_ns(), item_id="bench", content_index=0, response_id="bench")
        elapsed = time.monotonic() - started
        cpu = {p.pid: 100 * (cpu_seconds(p.pid) - cpu0[p.pid]) / elapsed for p in (mic, player)}
        rss = {p.pid: rss_mb(p.pid) for p in (mic, player)}
        beat_deadline = time.monotonic() + 2.5
        while time.monotonic() < beat_deadline:
            message = receiver.recv(100)
            if message is not None and message.topic == "health.player":
                last_beat = message.data
        receiver.sock.close(0)
        publisher.sock.close(0)
        ctx.term()
        print(f"bench_audio_io {time.strftime('%Y-%m-%d')} on {machine()}; {args.seconds:.0f} s streaming, "
              f"virtual PulseAudio, mic 48 kHz 20 ms frames, player 24 kHz {OUTPUT_PERIOD_MS} ms periods, "
              "40 ms jitter buffer")
        print("| path | p50 ms | p99 ms | budget |")
        print("|---|---:|---:|---|")
        print(f"| mic callback -> message on the bus | {pct(mic_latency_ms, 50):.2f} | {pct(mic_latency_ms, 99):.2f} "
              f"| p99 <= frame + 3 ms (23 ms) |")
        print(f"| bus frame received -> first sample handed to the device | {last_beat.get('handoff_p50_ms')} | "
              f"{last_beat.get('handoff_p99_ms')} | p99 <= 3 ms + jitter buffer (43 ms) |")
        print("| stage | CPU % of one core | RSS MB |")
        print("|---|---:|---:|")
        print(f"| mic (device, 48 kHz) | {cpu[mic.pid]:.1f} | {rss[mic.pid]:.0f} |")
        print(f"| player (device, 24 kHz) | {cpu[player.pid]:.1f} | {rss[player.pid]:.0f} |")
        print(f"player underruns: {last_beat.get('underruns')}, mic frames measured: {len(mic_latency_ms)}")
    finally:
        rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
