#!/usr/bin/env python3
"""Resampler benchmark, 48 kHz -> 24 kHz mono: CPU per second of audio and seam SNR against one-shot.

Compares, in one run on the same signal: the notebook's per-chunk `resampy.resample` (300 ms and
20 ms chunks), this project's streaming backends - polyphase (the default: resampy's filter as a
numpy polyphase bank), resampy's numba kernel, both with kaiser_best and kaiser_fast - and soxr's
stream. "Held back" is the most input a stream has not yet answered with output after a frame
(latency it adds before the audio can move on). CPU is process time over the whole signal fed in 20 ms frames (chunks for the per-chunk
rows), as % of one core for real-time audio. Seam SNR: the output against one-shot resampling of
the whole signal with the same method ("exact" when identical).

    .venv/bin/python scripts/bench_resample.py [--seconds 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import resampy
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.resample import StreamResampler, float_to_pcm, pcm_to_mono_float  # noqa: E402

RATE_IN, RATE_OUT = 48_000, 24_000


def speechlike(seconds: float) -> bytes:
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * RATE_IN)) / RATE_IN
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate([180, 360, 720, 1500, 3100], 1))
    return float_to_pcm((0.15 * envelope * voiced + 0.02 * rng.standard_normal(len(t))).astype(np.float32))


def per_chunk(pcm: bytes, chunk_ms: int) -> bytes:
    step = RATE_IN * chunk_ms // 1000 * 2
    return b"".join(float_to_pcm(resampy.resample(pcm_to_mono_float(pcm[i:i + step], 1), RATE_IN, RATE_OUT))
                    for i in range(0, len(pcm), step))


HELD_MS: dict[tuple[str, str], float] = {}


def streamed(pcm: bytes, backend: str, filter_name: str = "kaiser_best") -> bytes:
    stream = StreamResampler(RATE_IN, RATE_OUT, 1, backend, filter_name)  # type: ignore[arg-type]
    step = RATE_IN // 50 * 2
    out, held = [], 0.0
    for i in range(0, len(pcm), step):
        out.append(stream.feed(pcm[i:i + step]))
        held = max(held, 1000 * (stream.samples_in / RATE_IN - stream.samples_out / RATE_OUT))
    HELD_MS[(backend, filter_name)] = held
    return b"".join(out) + stream.flush()


def seam_snr(out: bytes, reference: bytes) -> str:
    a = np.frombuffer(out, dtype="<i2").astype(float)
    b = np.frombuffer(reference, dtype="<i2").astype(float)
    n = min(len(a), len(b))
    edge = RATE_OUT // 10
    noise = np.sum((a[edge:n - edge] - b[edge:n - edge]) ** 2)
    if noise == 0:
        return "exact"
    return f"{10 * np.log10(np.sum(b[edge:n - edge] ** 2) / noise):.1f} dB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=3, help="best of N (process time)")
    args = parser.parse_args()
    pcm = speechlike(args.seconds)
    mono = pcm_to_mono_float(pcm, 1)
    oneshot_resampy = float_to_pcm(resampy.resample(mono, RATE_IN, RATE_OUT))
    oneshot_resampy_fast = float_to_pcm(resampy.resample(mono, RATE_IN, RATE_OUT, filter="kaiser_fast"))
    oneshot_soxr = float_to_pcm(soxr.resample(mono, RATE_IN, RATE_OUT, quality="HQ"))
    cases = [
        ("notebook: resampy.resample per 300 ms chunk", lambda: per_chunk(pcm, 300), oneshot_resampy),
        ("notebook-style: resampy.resample per 20 ms chunk", lambda: per_chunk(pcm, 20), oneshot_resampy),
        ("voicebus stream, polyphase kaiser_best (default), 20 ms frames", lambda: streamed(pcm, "polyphase"),
         oneshot_resampy),
        ("voicebus stream, polyphase kaiser_fast, 20 ms frames", lambda: streamed(pcm, "polyphase", "kaiser_fast"),
         oneshot_resampy_fast),
        ("voicebus stream, resampy kaiser_best, 20 ms frames", lambda: streamed(pcm, "resampy"), oneshot_resampy),
        ("voicebus stream, resampy kaiser_fast, 20 ms frames", lambda: streamed(pcm, "resampy", "kaiser_fast"),
         oneshot_resampy_fast),
        ("voicebus stream, soxr HQ, 20 ms frames", lambda: streamed(pcm, "soxr"), oneshot_soxr),
    ]
    streamed(pcm[:96000], "resampy")  # numba compiles on first use: keep that out of the figures
    streamed(pcm[:96000], "resampy", "kaiser_fast")
    rows = []
    held = {"polyphase kaiser_best": ("polyphase", "kaiser_best"), "polyphase kaiser_fast": ("polyphase", "kaiser_fast"),
            "resampy kaiser_best": ("resampy", "kaiser_best"), "resampy kaiser_fast": ("resampy", "kaiser_fast"),
            "soxr": ("soxr", "kaiser_best")}
    for name, run, reference in cases:
        best = float("inf")
        for _ in range(args.repeat):
            started = time.process_time()
            out = run()
            best = min(best, time.process_time() - started)
        key = next((k for label, k in held.items() if label in name), None)
        rows.append((name, 100 * best / args.seconds, seam_snr(out, reference),
                     f"{HELD_MS[key]:.1f}" if key else f"{300 if '300 ms' in name else 20} (whole chunks)"))
    base = rows[2][1]
    print(f"bench_resample {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.seconds:.0f} s of 48 kHz audio -> 24 kHz, best of {args.repeat}")
    print("| method | CPU, % of one core (real time) | vs voicebus default | seam SNR vs one-shot | held back, max ms |")
    print("|---|---:|---:|---|---:|")
    for name, cpu, snr, held_ms in rows:
        print(f"| {name} | {cpu:.3f} | {cpu / base:.2f}x | {snr} | {held_ms} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
