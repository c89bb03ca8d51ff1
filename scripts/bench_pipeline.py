#!/usr/bin/env python3
"""The whole pipeline as a user meets it: voicebus vs the notebook's design vs pipecat, one run.

All three run on the same virtual PulseAudio mic and speaker against the same simulator (fast
pacing, no think delay, short replies). For each of N spoken turns (flite, several voices) the
question is played into the virtual mic while both the mic input and the speaker are recorded with
arrival timestamps. Outside-in, identically for all three:

    user-perceived = first assistant sample on the speaker - last sample of the question at the mic
    server time    = simulator's first audio delta sent - arrival of the question's last sample
                     (the simulator's VAD wait, ASR and TTS; logged by the simulator)
    added latency  = user-perceived - server time     (what the pipeline itself costs)

Plus CPU % of one core and RSS of each system's processes while talking. Writes a markdown table,
JSON and a PNG of the distributions to --out, and the table into README.md between markers.
pipecat comes from the `bench` extra, installed into .venv-bench (created on first use).

    .venv/bin/python scripts/bench_pipeline.py [--turns 20] [--systems voicebus,notebook,pipecat]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import REPO, Rig, cpu_seconds, machine, pct, rss_mb  # noqa: E402

from common.rig import MonitorRecorder  # noqa: E402
from common.speech import synthesize  # noqa: E402
from common.utterances import SENTENCES  # noqa: E402
from common.wavio import write_wav  # noqa: E402

LOUD = 300
QUIET_AFTER_ANSWER_S = 1.0
TURN_TIMEOUT_S = 25.0
README_START, README_END = "<!-- bench_pipeline:start -->", "<!-- bench_pipeline:end -->"
BENCH_VENV = REPO / ".venv-bench"
PAIRING_SLACK_NS = 500_000_000


def ensure_pipecat() -> Path:
    python = BENCH_VENV / "bin/python"
    if not python.exists():
        print("bench: creating .venv-bench with pipecat (the `bench` extra; first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "pipecat-ai[openai,local]>=1.14"], check=True)
    return python


def loud_regions(signal: np.ndarray, rate: int, min_gap_s: float = 0.8) -> list[tuple[int, int]]:
    idx = np.flatnonzero(np.abs(signal) > LOUD)
    if not len(idx):
        return []
    regions, start, last = [], idx[0], idx[0]
    for i in idx[1:]:
        if i - last > min_gap_s * rate:
            regions.append((start, last))
            start = i
        last = i
    regions.append((start, last))
    return regions


def start_system(rig: Rig, name: str, sim_ws: str, sim_http: str) -> list[subprocess.Popen]:
    if name == "voicebus":
        env = {"VOICEBUS_SIM_URL": sim_http}
        return [rig.start(stage, *args, extra_env=env) for stage, args in
                (("gateway", ()), ("resample", ()), ("player", ()), ("mic", ("--rate", "48000")))]
    if name == "notebook":
        return [subprocess.Popen([sys.executable, str(REPO / "scripts/baseline_notebook.py"), "--devices", "--url",
                                  sim_ws], env={**rig.env, **rig.pulse_env}, stdout=subprocess.DEVNULL,
                                 stderr=open(rig.dir / "notebook.log", "ab"))]  # noqa: SIM115
    python = ensure_pipecat()
    return [subprocess.Popen([str(python), str(REPO / "scripts/pipecat_peer.py"), sim_ws.split("?")[0]],
                             env={**rig.env, **rig.pulse_env}, stdout=subprocess.DEVNULL,
                             stderr=open(rig.dir / "pipecat.log", "ab"))]  # noqa: SIM115


def run_system(rig: Rig, name: str, questions: list[Path], sim_ws: str, sim_http: str) -> dict:
    procs = start_system(rig, name, sim_ws, sim_http)
    time.sleep(6.0)  # connect, session.update, devices open (pipecat imports take a while)
    speaker, mic = MonitorRecorder(rig.pulse_env), MonitorRecorder(rig.pulse_env, source="voicebus_mic_in.monitor")
    speaker.wait_for_samples(4800)
    mic.wait_for_samples(4800)
    pids = [p.pid for p in procs]
    cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    windows = []
    for question in questions:
        start_ns = time.time_ns()
        subprocess.run(["paplay", "--device=voicebus_mic_in", str(question)], env={**os.environ, **rig.pulse_env},
                       check=True)
        asked_ns = time.time_ns()
        deadline = time.monotonic() + TURN_TIMEOUT_S
        heard_any = False
        while time.monotonic() < deadline:  # wait for the answer to play out
            time.sleep(0.2)
            tail = np.frombuffer(bytes(speaker.data[-int(QUIET_AFTER_ANSWER_S * 24000) * 2:]), dtype="<i2")
            recent_loud = np.abs(tail).max(initial=0) > LOUD
            heard_any = heard_any or recent_loud
            if heard_any and not recent_loud:
                break
        windows.append((start_ns, asked_ns, time.time_ns()))
    elapsed = time.monotonic() - t0
    cpu = 100 * (sum(cpu_seconds(p) for p in pids) - cpu0) / elapsed
    rss = sum(rss_mb(p) for p in pids)
    speaker_pcm, mic_pcm = speaker.stop(), mic.stop()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
    turns = []
    for start_ns, _asked_ns, end_ns in windows:
        m0, m1 = int(mic.index_at(start_ns)), int(mic.index_at(end_ns))
        regions = loud_regions(mic_pcm[m0:m1], 24000)
        if not regions:
            continue
        speech_end_ns = mic.time_of(m0 + regions[0][1])
        s0, s1 = int(speaker.index_at(speech_end_ns)), int(speaker.index_at(end_ns))
        answer = np.flatnonzero(np.abs(speaker_pcm[s0:s1]) > LOUD)
        turns.append({"speech_end_ns": speech_end_ns,
                      "heard_ns": speaker.time_of(s0 + answer[0]) if len(answer) else None})
    return {"turns": turns, "cpu_pct": cpu, "rss_mb": rss}


def server_times(log_text: str) -> tuple[list[int], list[int]]:
    """(speech ends received, first audio deltas sent), from the simulator's log, in time order."""
    ends = sorted(int(m) for m in re.findall(r"speech_stopped .*speech_end_received_ns=(\d+)", log_text))
    deltas = sorted(int(m) for m in re.findall(r"first_audio_delta .*t_ns=(\d+)", log_text))
    return ends, deltas


def server_time_ms(speech_end_ns: float, ends: list[int], deltas: list[int]) -> float | None:
    """The simulator's own time for the turn whose speech ended at `speech_end_ns` (matched by time,
    not by position: a peer may cause extra responses)."""
    end = next((e for e in ends if e >= speech_end_ns - PAIRING_SLACK_NS), None)
    delta = next((d for d in deltas if end is not None and d >= end), None)
    return (delta - end) / 1e6 if end is not None and delta is not None else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--systems", default="voicebus,notebook,pipecat")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    systems = args.systems.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    rig = Rig(with_pulse=True)
    results: dict[str, dict] = {}
    try:
        questions = []
        for index in range(args.turns):
            text, voice = SENTENCES[index % len(SENTENCES)]
            questions.append(write_wav(rig.dir / f"q{index}.wav", synthesize(text, voice, 48000), 48000))
        rules = rig.dir / "rules.json"
        rules.write_text(json.dumps([{"match": ".*", "reply": "Okay, done."}]))
        port = 18700 + os.getpid() % 200
        sim_http, sim_ws = f"http://127.0.0.1:{port}/v1", f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        sim_log = rig.dir / "simulate.log"
        rig.start("simulate", "--port", str(port), "--pace", "fast", "--rules", str(rules), "--log-level", "INFO")
        time.sleep(3)
        for name in systems:
            print(f"bench: {name}: {args.turns} turns", flush=True)
            results[name] = run_system(rig, name, questions, sim_ws, sim_http)
            results[name]["server"] = server_times(sim_log.read_text())
    finally:
        rig.close()
    rows = summarize(results)
    table = render(rows, args.turns)
    print(table)
    (args.out / "bench_pipeline.md").write_text(table + "\n")
    (args.out / "bench_pipeline.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "bench_pipeline.png")
    if not args.no_readme:
        readme = REPO / "README.md"
        text = readme.read_text()
        if README_START in text:
            head, rest = text.split(README_START, 1)
            text = head + README_START + "\n" + table + "\n" + README_END + rest.split(README_END, 1)[1]
            readme.write_text(text)
    return 0


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name, result in results.items():
        perceived, added = [], []
        ends, deltas = result["server"]
        for turn in result["turns"]:
            server_ms = server_time_ms(turn["speech_end_ns"], ends, deltas)
            if turn["heard_ns"] is None or server_ms is None:
                continue
            total_ms = (turn["heard_ns"] - turn["speech_end_ns"]) / 1e6
            perceived.append(total_ms)
            added.append(total_ms - server_ms)
        rows[name] = {"turns_measured": len(perceived), "turns_played": len(result["turns"]),
                      "perceived_ms": perceived, "added_ms": added, "cpu_pct": round(result["cpu_pct"], 1),
                      "rss_mb": round(result["rss_mb"])}
    return rows


def render(rows: dict[str, dict], turns: int) -> str:
    base = rows.get("voicebus")
    lines = [f"bench_pipeline {time.strftime('%Y-%m-%d')} on {machine()}; {turns} spoken turns per system, virtual "
             "PulseAudio devices, same simulator (fast pacing, no think delay)",
             "", "| system | turns answered | added latency p50 ms | p95 | p99 | vs voicebus (p50) | user-perceived "
             "p50 ms | CPU % of one core | RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        ratio = pct(row["added_ms"], 50) / pct(base["added_ms"], 50) if base and row["added_ms"] else float("nan")
        lines.append(f"| {name} | {row['turns_measured']}/{turns} | {pct(row['added_ms'], 50):.0f} | "
                     f"{pct(row['added_ms'], 95):.0f} | {pct(row['added_ms'], 99):.0f} | {ratio:.2f}x | "
                     f"{pct(row['perceived_ms'], 50):.0f} | {row['cpu_pct']} | {row['rss_mb']} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if rows[n]["added_ms"]]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.boxplot([rows[n]["added_ms"] for n in names], tick_labels=names, showfliers=True)
    ax.set_ylabel("added latency, ms")
    ax.set_xlabel("speech end → first sample heard, minus the simulator's own time", fontsize=8)
    ax.set_title("pipeline added latency per turn")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
