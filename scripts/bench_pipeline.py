#!/usr/bin/env python3
"""Each leg of a spoken turn, measured where the sound is: voicebus against the notebook's design,
pipecat and LiveKit Agents, with the virtual devices' own latency as the floor. One run.

Every system gets its own virtual PulseAudio (same recipe, same settings) and its own connection
to one shared simulator (fast pacing, no think delay, a short reply); all run at once, idle but for
the one being asked, and for each turn the order of the systems is shuffled. Each question is a
flite WAV with a timing marker (a 30 ms chirp, services/simulator/markers.py) in its lead-in; the simulator
starts every spoken reply with the same marker. Per turn and system:

    mouth -> server   the marker's last sample at the virtual mic (a recording of the mic, stamped on
                      arrival) -> the simulator receiving the append that completes it
    server -> ear     the simulator sending the delta that starts with the marker -> the marker at the
                      virtual speaker (a recording of its monitor)
    user-perceived    the question's last sample at the mic -> the reply's first sample at the speaker
                      (its marker, the first after the question ended); compared on the turns every
                      replying system measured, and every turn not measured is listed with why (a
                      speaker already playing when the question ended is not a 0 ms reply)
    barge-in          (separate turns: the user talks over a long reply, 3.5 s into it) the simulator
                      sending speech_started -> the assistant silent at the speaker (start of the first
                      100 ms of silence); a system that does not stop plays on to the end of its reply
    rig floor         both legs for scripts/rig_floor.py, a PyAudio passthrough with voicebus's device
                      settings and no processing; each system is shown raw and above it (p50 - p50)

plus CPU % of one core for all of each system's processes while listening (nobody speaking, all
systems measured over the same window) and while talking (over its own turns), RSS and PSS. For
voicebus that is everything `voicebus up` starts (launcher included; the simulator is the test
peer). Writes bench-results/bench_pipeline.{md,json,png} and the table into docs/benchmarks.md.

pipecat and LiveKit come from the `bench` extra, installed into .venv-bench on first use.

    .venv/bin/python scripts/bench_pipeline.py [--turns 12] [--systems voicebus,notebook,pipecat,livekit,floor]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import (  # noqa: E402
    REPO,
    bench_python,
    cpu_seconds,
    machine,
    pct,
    process_label,
    process_tree,
    pss_mb,
    rss_mb,
)

from common.speech import synthesize  # noqa: E402
from common.utterances import SENTENCES  # noqa: E402
from common.wavio import write_wav  # noqa: E402
from services.simulator import markers  # noqa: E402
from tests.support.rig import MonitorRecorder, PulseRig  # noqa: E402

SYSTEMS = ["voicebus", "notebook", "pipecat", "livekit", "floor"]
LABELS = {"voicebus": "voicebus", "notebook": "notebook design", "pipecat": "pipecat", "livekit": "LiveKit Agents",
          "floor": "rig floor (PyAudio passthrough)"}
PEERS = ("pipecat", "livekit")  # from .venv-bench
LOUD = 300
QUIET_AFTER_ANSWER_S = 1.0
TURN_TIMEOUT_S = 20.0
LISTEN_S = 20.0
CONNECT_TIMEOUT_S = 120.0
MIC_RATE = 48_000
LEAD_S, MARKER_GAP_S, TAIL_S = 0.3, 0.5, 0.3
STORY = ("Once upon a time there was a little robot who lived in a quiet town by the sea, and every morning it "
         "walked down to the harbour to count the boats and to talk with the fishermen about the weather.")
INTERRUPT_AFTER_S = 3.5  # into the reply: past LiveKit console's 3 s "AEC warm-up" without interruptions
SILENCE_GAP_S = 0.1
README_START, README_END = "<!-- bench_pipeline:start -->", "<!-- bench_pipeline:end -->"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "WANDB_", "VOICEBUS_", "PULSE_"))}


@dataclass
class Contender:
    """One system under test, on its own virtual audio devices."""

    name: str
    rig: PulseRig
    work: Path
    proc: subprocess.Popen | None = None
    speaker: MonitorRecorder | None = None
    mic: MonitorRecorder | None = None
    windows: list[tuple[int, int]] = field(default_factory=list)
    barge_windows: list[tuple[int, int]] = field(default_factory=list)
    talk_cpu_s: float = 0.0
    talk_s: float = 0.0
    listen_cpu_pct: float = float("nan")
    rss: float = 0.0
    pss: float = 0.0
    processes: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**CLEAN_ENV, **self.rig.env}

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}.log"

    def pids(self) -> list[int]:
        return [self.proc.pid, *process_tree(self.proc.pid)] if self.proc else []

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                total += cpu_seconds(pid)
            except OSError:
                continue
        return total


def start(contender: Contender, sim_http: str, sim_ws: str) -> None:
    env, log = contender.env, open(contender.log, "ab")  # noqa: SIM115 - lives as long as the child
    name = contender.name
    if name == "voicebus":
        run = contender.work / "voicebus"
        run.mkdir()
        env.update(VOICEBUS_RUN_DIR=str(run), VOICEBUS_BUS_PUB=f"ipc://{run}/pub.sock",
                   VOICEBUS_BUS_SUB=f"ipc://{run}/sub.sock", VOICEBUS_SIM_URL=sim_http, VOICEBUS_LOG_LEVEL="WARNING")
        argv = [sys.executable, "-m", "services.cli", "up", "--arg", f"logger=--root {run / 'sessions'}"]
    elif name == "notebook":
        argv = [sys.executable, str(REPO / "scripts/baseline_notebook.py"), "--devices", "--url", sim_ws]
    elif name == "pipecat":
        argv = [str(bench_python()), str(REPO / "scripts/pipecat_peer.py"), sim_ws.split("?")[0]]
    elif name == "livekit":
        argv = [str(bench_python()), str(REPO / "scripts/livekit_peer.py"), sim_http, "console"]
        env["LIVEKIT_LOG_LEVEL"] = "info"
    else:
        argv = [sys.executable, str(REPO / "scripts/rig_floor.py")]
    contender.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def question_wav(path: Path, text: str, voice: str) -> Path:
    speech = np.frombuffer(synthesize(text, voice, MIC_RATE), dtype="<i2")
    silence = lambda seconds: np.zeros(int(seconds * MIC_RATE), dtype="<i2")  # noqa: E731
    marker = np.frombuffer(markers.chirp_pcm(MIC_RATE), dtype="<i2")
    return write_wav(path, np.concatenate([silence(LEAD_S), marker, silence(MARKER_GAP_S), speech,
                                           silence(TAIL_S)]).tobytes(), MIC_RATE)


def wait_connected(contenders: list[Contender], sim_log: Path) -> None:
    """Until every system has a session at the simulator (the floor: until it says ready)."""
    sessions_needed = sum(c.name != "floor" for c in contenders)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while time.monotonic() < deadline:
        sessions = sim_log.read_text().count("session_start") if sim_log.exists() else 0
        floor_ready = all('"ready"' in c.log.read_text() for c in contenders if c.name == "floor" and c.log.exists())
        dead = [c.name for c in contenders if c.proc and c.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"exited before connecting: {', '.join(dead)}; see the logs in {contenders[0].work}")
        if sessions >= sessions_needed and floor_ready:
            return
        time.sleep(0.5)
    raise RuntimeError(f"not all systems connected to the simulator in {CONNECT_TIMEOUT_S:.0f} s")


def ask(contender: Contender, wav: Path, interruption: Path | None = None) -> None:
    """Play one question into this system's mic and wait until its answer has played out; with
    `interruption`, play that over the answer once it has been audible for INTERRUPT_AFTER_S."""
    cpu0, start_ns = contender.cpu(), time.time_ns()
    subprocess.run(["paplay", "--device=voicebus_mic_in", str(wav)], env=contender.env, check=True)
    deadline = time.monotonic() + TURN_TIMEOUT_S
    if interruption is not None:
        while time.monotonic() < deadline and np.abs(np.frombuffer(
                bytes(contender.speaker.data[-4800:]), dtype="<i2")).max(initial=0) <= LOUD:
            time.sleep(0.02)
        time.sleep(INTERRUPT_AFTER_S)
        subprocess.run(["paplay", "--device=voicebus_mic_in", str(interruption)], env=contender.env, check=True)
    heard_any = False
    while time.monotonic() < deadline:
        time.sleep(0.1)
        tail = np.frombuffer(bytes(contender.speaker.data[-int(QUIET_AFTER_ANSWER_S * 24000) * 2:]), dtype="<i2")
        recent_loud = np.abs(tail).max(initial=0) > LOUD
        heard_any = heard_any or recent_loud
        if heard_any and not recent_loud:
            break
    end_ns = time.time_ns()
    (contender.barge_windows if interruption is not None else contender.windows).append((start_ns, end_ns))
    contender.talk_cpu_s += contender.cpu() - cpu0
    contender.talk_s += (end_ns - start_ns) / 1e9


def server_events(contender: Contender, sim_log: str) -> tuple[list[int], list[int]]:
    """(marker end arrivals, marker sends) in ns: the floor's own, or the simulator's for this system's
    session (the one whose input carried a marker inside this system's first turn: replies a peer
    makes on its own, or late, must not land in another system's window)."""
    if contender.name == "floor":
        lines = [json.loads(line) for line in contender.log.read_text().splitlines() if line.startswith("{")]
        return ([e["end_arrival_ns"] for e in lines if e["event"] == "marker_in"],
                [e["sent_ns"] for e in lines if e["event"] == "marker_out"])
    arrivals = [(m[0], int(m[1])) for m in re.findall(r"marker_in session=(\S+) .*end_arrival_ns=(\d+)", sim_log)]
    sends = [(m[0], int(m[1])) for m in re.findall(r"marker_out session=(\S+) .*sent_ns=(\d+)", sim_log)]
    sessions = {session for session, t in arrivals if any(a <= t <= b for a, b in contender.windows)}
    return [t for s, t in arrivals if s in sessions], [t for s, t in sends if s in sessions]


def speech_end(mic: np.ndarray, after: int) -> int | None:
    """Index of the question's last loud sample (after the marker and its gap)."""
    loud = np.flatnonzero(np.abs(mic[after:]) > LOUD)
    return after + int(loud[-1]) if len(loud) else None


def analyse(contender: Contender, speaker_pcm: np.ndarray, mic_pcm: np.ndarray, sim_log: str) -> list[dict]:
    """Each turn's legs; a leg that cannot be measured is None and the turn says why (`unmeasured`).

    User-perceived: the question's last loud sample at the mic -> the first sample of the reply to it
    at the speaker, that is the first reply marker (every simulator reply starts with one) after the
    question ended. A turn in which the speaker was already playing when the question ended (the
    system answered the lead-in, or a reply of its own, early) is not measured: whatever came first
    was heard before the user finished, and a loud-sample search there reads 0 ms.
    """
    arrivals, sends = server_events(contender, sim_log)
    size_mic = len(markers.chirp(contender.mic.rate))
    turns = []
    for start_ns, end_ns in contender.windows:
        turn: dict = {"mouth_server_ms": None, "server_ear_ms": None, "perceived_ms": None, "unmeasured": None}
        m0, m1 = int(contender.mic.index_at(start_ns)), int(contender.mic.index_at(end_ns))
        found = markers.find(mic_pcm[m0:m1], contender.mic.rate)
        speech_end_ns = None
        if found:
            marker_end = m0 + found[0][0] + size_mic
            mic_end_ns = contender.mic.time_of(marker_end)
            arrival = next((t for t in arrivals if start_ns <= t <= end_ns), None)
            if arrival is not None:
                turn["mouth_server_ms"] = (arrival - mic_end_ns) / 1e6
            last = speech_end(mic_pcm[:m1], marker_end + int(0.1 * contender.mic.rate))
            speech_end_ns = contender.mic.time_of(last) if last is not None else None
        s0, s1 = int(contender.speaker.index_at(start_ns)), int(contender.speaker.index_at(end_ns))
        heard = markers.find(speaker_pcm[s0:s1], contender.speaker.rate)
        sent = next((t for t in sends if start_ns <= t <= end_ns), None)
        if heard and sent is not None:
            turn["server_ear_ms"] = (contender.speaker.time_of(s0 + heard[0][0]) - sent) / 1e6
        if contender.name == "floor":
            turn["unmeasured"] = "the floor does not reply"
        elif speech_end_ns is None:
            turn["unmeasured"] = "the question's marker or speech was not found at the mic"
        else:
            s_end = int(contender.speaker.index_at(speech_end_ns))
            rate = contender.speaker.rate
            already = np.abs(speaker_pcm[max(s0, s_end - rate // 20):s_end]).max(initial=0) > LOUD
            after = [s0 + index for index, _ in heard if s0 + index >= s_end]
            if already:
                early = [s0 + index for index, _ in heard if s0 + index < s_end]
                began = f" (a reply began {(s_end - early[-1]) * 1000 // rate} ms before)" if early else ""
                turn["unmeasured"] = f"the speaker was already playing when the question ended{began}"
            elif not after:
                turn["unmeasured"] = "no reply marker at the speaker after the question ended"
            else:
                turn["perceived_ms"] = (contender.speaker.time_of(after[0]) - speech_end_ns) / 1e6
        turns.append(turn)
    return turns


def barge_ins(contender: Contender, speaker_pcm: np.ndarray, sim_log: str) -> list[float]:
    """Per barge-in turn: speech_started sent (the simulator) -> assistant silent at the speaker, ms."""
    starts = [(m[0], int(m[1])) for m in re.findall(r"speech_started session=(\S+) .*t_ns=(\d+)", sim_log)]
    out = []
    gap = int(SILENCE_GAP_S * contender.speaker.rate)
    for start_ns, end_ns in contender.barge_windows:
        s0, s1 = int(contender.speaker.index_at(start_ns)), int(contender.speaker.index_at(end_ns))
        loud = np.flatnonzero(np.abs(speaker_pcm[s0:s1]) > LOUD)
        if not len(loud):
            continue
        reply_ns = contender.speaker.time_of(s0 + loud[0])
        # the interruption's speech_started: the first one after the reply became audible, this session's
        interrupt = next((t for _, t in starts if reply_ns < t <= end_ns), None)
        if interrupt is None:
            continue
        i0 = int(contender.speaker.index_at(interrupt))
        quiet = np.abs(speaker_pcm[i0:s1]) <= LOUD
        # first run of `gap` quiet samples: where the assistant went silent
        run = np.convolve(quiet.astype(np.int32), np.ones(gap, dtype=np.int32), "valid")
        silent = np.flatnonzero(run == gap)
        if len(silent):
            out.append((contender.speaker.time_of(i0 + silent[0]) - interrupt) / 1e6)
    return out


def measure_listening(contenders: list[Contender]) -> None:
    before = {c.name: c.cpu() for c in contenders}
    started = time.monotonic()
    time.sleep(LISTEN_S)
    elapsed = time.monotonic() - started
    for contender in contenders:
        contender.listen_cpu_pct = 100 * (contender.cpu() - before[contender.name]) / elapsed


def measure_memory(contender: Contender) -> None:
    for pid in contender.pids():
        try:
            label, rss, pss = process_label(pid), rss_mb(pid), pss_mb(pid)
        except OSError:
            continue
        if pid == contender.proc.pid and contender.name == "voicebus":
            label = "launcher"
        contender.processes[f"{label} ({pid})"] = round(rss, 1)
        contender.rss += rss
        contender.pss += pss


def run(systems: list[str], turns: int, barge_turns: int, work: Path, seed: int) -> dict[str, dict]:
    contenders = [Contender(name, PulseRig(work / f"pulse-{name}"), work) for name in systems]
    sim_rig = None
    try:
        questions = [question_wav(work / f"q{i}.wav", *SENTENCES[i % len(SENTENCES)]) for i in range(turns)]
        rules = work / "rules.json"
        rules.write_text(json.dumps([{"match": "story", "reply": STORY}, {"match": ".*", "reply": "Okay, done."}]))
        story = question_wav(work / "story.wav", "please tell me a short story", "slt")
        stop = write_wav(work / "stop.wav", synthesize("stop please", "slt", MIC_RATE), MIC_RATE)
        port = 18700 + os.getpid() % 200
        sim_http, sim_ws = f"http://127.0.0.1:{port}/v1", f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        sim_log = work / "simulate.log"
        sim_rig = subprocess.Popen([sys.executable, "-m", "services.cli", "simulate", "--port", str(port), "--pace",
                                    "fast", "--rules", str(rules), "--markers", "--log-level", "INFO"],
                                   cwd=REPO, env=CLEAN_ENV, stdout=subprocess.DEVNULL,
                                   stderr=open(sim_log, "ab"))  # noqa: SIM115
        time.sleep(3)
        for contender in contenders:
            start(contender, sim_http, sim_ws)
        print(f"bench: started {', '.join(systems)}; waiting for each to connect", flush=True)
        wait_connected(contenders, sim_log)
        time.sleep(5)  # past start-up work (imports, device opening, first session.update)
        for contender in contenders:
            contender.speaker = MonitorRecorder(contender.rig.env)
            contender.mic = MonitorRecorder(contender.rig.env, source="voicebus_mic_in.monitor")
            contender.speaker.wait_for_samples(4800)
            contender.mic.wait_for_samples(4800)
        print(f"bench: {LISTEN_S:g} s listening (all systems idle)", flush=True)
        measure_listening(contenders)
        shuffle = random.Random(seed)
        for index, wav in enumerate(questions):
            order = contenders[:]
            shuffle.shuffle(order)
            print(f"bench: turn {index + 1}/{turns}: {' '.join(c.name for c in order)}", flush=True)
            for contender in order:
                ask(contender, wav)
        for index in range(barge_turns):
            order = [c for c in contenders if c.name != "floor"]
            shuffle.shuffle(order)
            print(f"bench: barge-in {index + 1}/{barge_turns}: {' '.join(c.name for c in order)}", flush=True)
            for contender in order:
                ask(contender, story, interruption=stop)
        for contender in contenders:
            measure_memory(contender)
        sim_rig.terminate()
        sim_rig.wait(timeout=10)
        sim_text = sim_log.read_text()
        results = {}
        for contender in contenders:
            speaker_pcm, mic_pcm = contender.speaker.stop(), contender.mic.stop()
            results[contender.name] = {
                "turns": analyse(contender, speaker_pcm, mic_pcm, sim_text),
                "barge_in_ms": barge_ins(contender, speaker_pcm, sim_text) if contender.name != "floor" else [],
                "cpu_listening_pct": round(contender.listen_cpu_pct, 2),
                "cpu_talking_pct": round(100 * contender.talk_cpu_s / max(contender.talk_s, 1e-9), 2),
                "rss_mb": round(contender.rss), "pss_mb": round(contender.pss), "processes": contender.processes}
        return results
    finally:
        for contender in contenders:
            if contender.proc is not None and contender.proc.poll() is None:
                contender.proc.terminate()
        for contender in contenders:
            if contender.proc is not None:
                try:
                    contender.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    contender.proc.kill()
            for recorder in (contender.speaker, contender.mic):
                if recorder is not None and recorder.proc.poll() is None:
                    recorder.proc.kill()
            contender.rig.stop()
        if sim_rig is not None and sim_rig.poll() is None:
            sim_rig.kill()


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Per system: each leg over its measured turns, and user-perceived over the turns every replying
    system measured (the same questions for all), with every unmeasured turn and why."""
    replying = [name for name in results if name != "floor"]
    common = [index for index in range(min((len(results[n]["turns"]) for n in replying), default=0))
              if all(results[n]["turns"][index]["perceived_ms"] is not None for n in replying)]
    rows = {}
    for name, result in results.items():
        legs = {leg: [t[leg] for t in result["turns"] if t[leg] is not None]
                for leg in ("mouth_server_ms", "server_ear_ms", "perceived_ms")}
        rows[name] = {**legs, "barge_in_ms": result["barge_in_ms"], "turns": len(result["turns"]),
                      "perceived_common_ms": [result["turns"][i]["perceived_ms"] for i in common]
                      if name != "floor" else [],
                      "common_turns": [i + 1 for i in common],
                      "unmeasured": {i + 1: t["unmeasured"] for i, t in enumerate(result["turns"])
                                     if t["unmeasured"] and name != "floor"},
                      **{k: result[k] for k in ("cpu_listening_pct", "cpu_talking_pct", "rss_mb", "pss_mb",
                                                "processes")}}
    return rows


def _cell(values: list[float], q: float) -> str:
    return f"{pct(values, q):.0f}" if values else "-"


def render(rows: dict[str, dict], turns: int, barge_turns: int) -> str:
    floor = rows.get("floor", {})
    lines = [f"bench_pipeline {time.strftime('%Y-%m-%d')} on {machine()}; {turns} spoken turns per system, each "
             "system on its own virtual PulseAudio, one shared simulator (fast pacing, no think delay), systems "
             "interleaved in shuffled order per turn. Latency in ms (p50 / p99; \"above floor\" = p50 minus the rig "
             "floor's p50); CPU in % of one core, all of a system's processes.", "",
             "| system | mouth → server | above floor | server → ear | above floor | user-perceived, same turns "
             "| user-perceived, all it measured | barge-in → silence | CPU listening | CPU talking | RSS MB | PSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        above = []
        for leg in ("mouth_server_ms", "server_ear_ms"):
            base = floor.get(leg)
            above.append(f"{pct(row[leg], 50) - pct(base, 50):+.0f}" if row[leg] and base and name != "floor"
                         else "-")
        lines.append(
            f"| {LABELS[name]} | {_cell(row['mouth_server_ms'], 50)} / {_cell(row['mouth_server_ms'], 99)} | "
            f"{above[0]} | {_cell(row['server_ear_ms'], 50)} / {_cell(row['server_ear_ms'], 99)} | {above[1]} | "
            f"{_cell(row['perceived_common_ms'], 50)} / {_cell(row['perceived_common_ms'], 99)} | "
            f"{_cell(row['perceived_ms'], 50)} / {_cell(row['perceived_ms'], 99)} ({len(row['perceived_ms'])}) | "
            f"{_cell(row['barge_in_ms'], 50)} / {_cell(row['barge_in_ms'], 99)} | {row['cpu_listening_pct']:.1f} | "
            f"{row['cpu_talking_pct']:.1f} | {row['rss_mb']} | {row['pss_mb']} |")
    counts = ", ".join(f"{LABELS[n]} {len(r['mouth_server_ms'])}/{len(r['server_ear_ms'])}/{len(r['perceived_ms'])}"
                       for n, r in rows.items())
    barges = ", ".join(f"{LABELS[n]} {len(r['barge_in_ms'])}" for n, r in rows.items() if n != "floor")
    common = next((r["common_turns"] for n, r in rows.items() if n != "floor"), [])
    lines += ["", f"Turns measured (mouth → server / server → ear / user-perceived) of {turns}: {counts}. "
              f"Barge-ins measured of {barge_turns}: {barges}. User-perceived on the same turns: the "
              f"{len(common)} turns every replying system measured ({', '.join(map(str, common)) or 'none'}); "
              "not measured:"]
    for name, row in rows.items():
        for index, why in row["unmeasured"].items():
            lines.append(f"- {LABELS[name]}, turn {index}: {why}")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legs = [("mouth_server_ms", "mouth → server"), ("server_ear_ms", "server → ear"),
            ("perceived_ms", "user-perceived"), ("barge_in_ms", "barge-in → silence")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=100)
    for ax, (leg, title) in zip(axes, legs, strict=True):
        names = [n for n in rows if rows[n][leg]]
        ax.boxplot([rows[n][leg] for n in names], tick_labels=[LABELS[n].split(" (")[0] for n in names])
        ax.set_title(title)
        ax.set_ylabel("ms")
        if leg == "barge_in_ms":
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("bench_pipeline: each leg per turn, outside-in (markers at the virtual mic and speaker)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--barge-ins", type=int, default=4, help="barge-in turns per system (after the others)")
    parser.add_argument("--seed", type=int, default=7, help="for the per-turn shuffle of the systems")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, recordings' sources)")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if any(s in PEERS for s in systems):
        bench_python()
    work = Path(tempfile.mkdtemp(prefix="vb-bench-pipeline-", dir="/tmp"))
    try:
        rows = summarize(run(systems, args.turns, args.barge_ins, work, args.seed))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench: work dir kept: {work}")
    table = render(rows, args.turns, args.barge_ins)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pipeline.md").write_text(table + "\n")
    (args.out / "bench_pipeline.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                                              "turns": args.turns, "barge_ins": args.barge_ins, "rows": rows}, indent=1))
    plot(rows, args.out / "bench_pipeline.png")
    if not args.no_readme:
        readme = REPO / "docs" / "benchmarks.md"
        text = readme.read_text()
        if README_START in text:
            head, rest = text.split(README_START, 1)
            readme.write_text(head + README_START + "\n" + table + "\n" + README_END + rest.split(README_END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
