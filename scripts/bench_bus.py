#!/usr/bin/env python3
"""Bus benchmark: throughput and one-hop latency through `voicebus bus`, next to raw PUB->SUB.

Measured in one run on this machine, for 20 ms audio frames (960 samples at 48 kHz, s16) and for
small event messages. Publisher and subscriber are separate processes; the subscriber decodes and
validates every message with the real codec and counts seq gaps.

    .venv/bin/python scripts/bench_bus.py [--messages 100000] [--json out/bench_bus.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.bus import Receiver, wait_for_bus  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.envelope import Stamper, encode  # noqa: E402

AUDIO_BYTES = 960 * 2
LATENCY_RATE_HZ = 2000
LATENCY_SECONDS = 3.0


def make_message(stamper: Stamper, kind: str, mono_ns: int):
    if kind == "audio":
        return stamper.audio("audio.mic", b"\x01\x00" * (AUDIO_BYTES // 2), rate=48000, channels=1,
                             pts=stamper.seqs.get("audio.mic", 0) * 960, t_capture_ns=mono_ns, t_ns=mono_ns)
    return stamper.event("rt.response.output_audio_transcript.delta", {"delta": "hello", "item_id": "item_1"}, mono_ns)


def publisher(endpoint: str, bind: bool, kind: str, count: int, paced_hz: float | None, ready: mp.Event) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.sndhwm = 1_000_000
    sock.bind(endpoint) if bind else sock.connect(endpoint)
    ready.wait()
    stamper = Stamper("bench", "bench")
    period = 1.0 / paced_hz if paced_hz else 0.0
    next_at = time.monotonic()
    for _ in range(count):
        if period:
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # sleeping, not spinning: a spinning publisher steals a core from the proxy
        sock.send_multipart(encode(make_message(stamper, kind, time.monotonic_ns())), copy=False)
    sock.send_multipart(encode(stamper.event("zz.end", {}, time.monotonic_ns())))
    time.sleep(0.5)
    sock.close(linger=1000)
    ctx.term()


def run_case(pub_endpoint: str, sub_endpoint: str, bind_pub: bool, kind: str, count: int,
             paced_hz: float | None) -> dict:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 1_000_000
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    ready = mp.Event()
    proc = mp.Process(target=publisher, args=(pub_endpoint, bind_pub, kind, count, paced_hz, ready))
    proc.start()
    sub.connect(sub_endpoint)
    time.sleep(0.5)  # slow-joiner: let the subscription reach the publisher before the run starts
    receiver = Receiver(sub, "bench")
    ready.set()
    latencies = []
    got = 0
    first = last = None
    while True:
        if not sub.poll(5000):
            break
        message = receiver.accept(sub.recv_multipart())
        now = time.monotonic_ns()
        if message is None or message.header.src != "bench":
            continue
        if message.topic == "zz.end":
            break
        first = first or now
        last = now
        got += 1
        latencies.append(now - message.header.t_ns)
    proc.join()
    sub.close(0)
    ctx.term()
    lat_us = np.array(latencies) / 1000.0
    elapsed = (last - first) / 1e9 if got > 1 else float("nan")
    return {"messages": count, "received": got, "gaps": receiver.gaps, "bad": receiver.bad_total,
            "msgs_per_s": round(got / elapsed) if paced_hz is None else None,
            "p50_us": round(float(np.percentile(lat_us, 50)), 1), "p99_us": round(float(np.percentile(lat_us, 99)), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vb-bench-", dir="/tmp"))
    cfg = BusConfig(pub=f"ipc://{tmp}/pub.sock", sub=f"ipc://{tmp}/sub.sock")
    env = {**os.environ, "VOICEBUS_BUS_PUB": cfg.pub, "VOICEBUS_BUS_SUB": cfg.sub, "VOICEBUS_LOG_LEVEL": "WARNING"}
    bus = subprocess.Popen([sys.executable, "-m", "services.cli", "bus"], env=env,
                           cwd=Path(__file__).resolve().parent.parent)
    results = []
    try:
        ctx = zmq.Context()
        assert wait_for_bus(ctx, cfg, 15), "bus did not start"
        ctx.term()
        for kind in ("audio", "event"):
            for path, (pub_ep, sub_ep, bind) in {
                "proxy": (cfg.pub, cfg.sub, False),
                "raw": (f"ipc://{tmp}/raw-{kind}.sock", f"ipc://{tmp}/raw-{kind}.sock", True),
            }.items():
                throughput = run_case(pub_ep, sub_ep, bind, kind, args.messages, None)
                latency = run_case(pub_ep, sub_ep, bind, kind, int(LATENCY_RATE_HZ * LATENCY_SECONDS), LATENCY_RATE_HZ)
                results.append({"kind": kind, "path": path, "msgs_per_s": throughput["msgs_per_s"],
                                "gaps": throughput["gaps"] + latency["gaps"],
                                "lost": throughput["messages"] - throughput["received"]
                                + latency["messages"] - latency["received"],
                                "p50_us": latency["p50_us"], "p99_us": latency["p99_us"]})
    finally:
        bus.terminate()
        bus.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, pyzmq {zmq.__version__}"
    print(f"bench_bus {time.strftime('%Y-%m-%d')} on {machine}; {args.messages} msgs per throughput run, "
          f"latency paced at {LATENCY_RATE_HZ}/s for {LATENCY_SECONDS:.0f}s")
    print("| message | path | msgs/s | vs raw | one-hop p50 µs | p99 µs | gaps | lost |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in results:
        raw = next(r for r in results if r["kind"] == row["kind"] and r["path"] == "raw")
        ratio = row["msgs_per_s"] / raw["msgs_per_s"] if raw["msgs_per_s"] else float("nan")
        label = "20 ms audio (1920 B)" if row["kind"] == "audio" else "event"
        print(f"| {label} | {row['path']} | {row['msgs_per_s']:,} | {ratio:.2f} | {row['p50_us']} | {row['p99_us']} "
              f"| {row['gaps']} | {row['lost']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
