#!/usr/bin/env python
"""Browser path latency with the pipeline benchmark's markers: mouth -> server and server -> ear.

`voicebus up --web` against `voicebus simulate --markers`, Debian's Chromium headless as the person:
its fake mic plays questions that each start with a marker; the page (opened with ?record=1) keeps
what its mic gave it and what it played, with wall-clock times. mouth -> server: the marker's end
in the page's mic recording -> the simulator's arrival of the append that completed it.
server -> ear: the simulator sends the marker that starts every reply -> it comes out of the page's
speaker (AudioContext output time). Same machine, same clock. Prints one table; --json for more.

    .venv/bin/python scripts/bench_web.py --turns 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.ports import free_port  # noqa: E402
from common.speech import synthesize  # noqa: E402
from common.wavio import write_wav  # noqa: E402
from scripts.benchlib import machine, pct  # noqa: E402
from services.simulator import markers  # noqa: E402
from tests.support.browser import Chromium  # noqa: E402

RATE = 48_000
QUESTIONS = ["what is the weather like today", "please tell me a short story", "how far away is the moon",
             "what time is it in tokyo", "turn on the lights in the kitchen"]
LEAD_S, MARKER_GAP_S, TURN_GAP_S = 2.0, 0.3, 6.0


def mic_wav(path: Path, turns: int) -> Path:
    silence = lambda seconds: np.zeros(int(seconds * RATE), dtype="<i2")  # noqa: E731
    marker = np.frombuffer(markers.chirp_pcm(RATE), dtype="<i2")
    parts = [silence(LEAD_S)]
    for turn in range(turns):
        speech = np.frombuffer(synthesize(QUESTIONS[turn % len(QUESTIONS)], "slt", RATE), dtype="<i2")
        parts += [marker, silence(MARKER_GAP_S), speech, silence(TURN_GAP_S)]
    return write_wav(path, np.concatenate(parts).tobytes(), RATE)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def marker_times(samples: np.ndarray, rate: int, t0_ns: float, at_end: bool) -> list[float]:
    size = len(markers.chirp(rate))
    return [t0_ns + (index + (size if at_end else 0)) * 1e9 / rate for index, _ in markers.find(samples, rate)]


def run(turns: int, work: Path, web_args: str = "") -> dict:
    sim_port, web_port = free_port(), free_port()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work / "run"), "VOICEBUS_TRACE_DIR": str(work / "traces"),
           "VOICEBUS_SIM_URL": f"http://127.0.0.1:{sim_port}/v1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("OPENAI_API_KEY", None)
    (work / "run").mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "services.cli"]
    sim_log, up_log = work / "simulator.log", work / "up.log"
    repo = Path(__file__).resolve().parent.parent
    with open(sim_log, "wb") as sim_out, open(up_log, "wb") as up_out:
        procs = [subprocess.Popen([*cli, "simulate", "--port", str(sim_port), "--markers", "--pace", "realtime"],
                                  env=env, cwd=repo, stdout=sim_out, stderr=subprocess.STDOUT),
                 subprocess.Popen([*cli, "up", "--web", "--arg", f"web=--port {web_port} {web_args}"], env=env, cwd=repo,
                                  stdout=up_out, stderr=subprocess.STDOUT)]
    try:
        wait_for(lambda: "serving url=" in up_log.read_text() and "session_start" in sim_log.read_text(), 60,
                 "the pipeline and its simulator session")
        wav = mic_wav(work / "mic.wav", turns)
        print(f"bench_web: {turns} turns through Chromium ({work})", file=sys.stderr)
        with Chromium(f"http://127.0.0.1:{web_port}/?record=1", fake_mic_wav=wav,
                      log_path=work / "chromium.log") as page:
            page.evaluate("voicebus.connect()")
            wait_for(lambda: sim_log.read_text().count("marker_out") >= turns, 60 + turns * 12, "every reply")
            time.sleep(4.0)  # the last reply plays out
            mic, mic_rate, mic_t0 = page.recording("mic")
            played, played_rate, played_t0 = page.recording("played")
            stats = page.evaluate("voicebus.stats")
            latencies = page.evaluate("voicebus.latencies")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)
    log = sim_log.read_text()
    arrivals = [int(t) for t in re.findall(r"marker_in .*end_arrival_ns=(\d+)", log)]
    sends = [int(t) for t in re.findall(r"marker_out .*sent_ns=(\d+)", log)]
    spoken = marker_times(mic, mic_rate, mic_t0, at_end=True)
    heard = marker_times(played, played_rate, played_t0, at_end=False)
    mouth_server = [(a - max(m for m in spoken if m <= a)) / 1e6 for a in arrivals
                    if any(a - 1e9 <= m <= a for m in spoken)]
    server_ear = [(min(h for h in heard if h >= s) - s) / 1e6 for s in sends if any(s <= h <= s + 1e9 for h in heard)]
    return {"turns": turns, "mouth_server_ms": mouth_server, "server_ear_ms": server_ear,
            "turn_latency_ms": latencies, "browser_stats": stats, "markers": {
                "spoken": len(spoken), "arrived": len(arrivals), "sent": len(sends), "heard": len(heard)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--web-args", default="", help="Extra `voicebus web` arguments, e.g. '--jitter-ms 20'.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vb-bench-web-") as tmp:
        result = run(args.turns, Path(tmp), args.web_args)
    result["web_args"] = args.web_args
    result["machine"], result["date"] = machine(), time.strftime("%Y-%m-%d")
    rows = [("mouth -> server", result["mouth_server_ms"]), ("server -> ear", result["server_ear_ms"]),
            ("turn latency shown on the page", result["turn_latency_ms"])]
    print(f"bench_web {result['date']} on {result['machine']}; markers {result['markers']}; "
          f"browser reported {result['browser_stats']}; web args {args.web_args!r}")
    print("| leg (browser path) | n | p50 ms | p99 ms |\n|---|---|---|---|")
    for name, values in rows:
        if values:
            print(f"| {name} | {len(values)} | {pct(values, 50):.0f} | {pct(values, 99):.0f} |")
        else:
            print(f"| {name} | 0 | - | - |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
