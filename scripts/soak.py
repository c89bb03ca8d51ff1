#!/usr/bin/env python3
"""Soak: `voicebus up` on the virtual audio rig with a looping spoken conversation, for N minutes.

The conversation (flite questions played into the virtual mic, answered by the simulator through
the virtual speaker) loops for the whole run; every few turns the user talks over a long answer
(a barge-in). Every `--interval-s` it samples, per process: RSS and CPU; and from the heartbeats:
bus gaps and drops, mic overflows, resampler bridged audio, player underruns and late audio
callbacks, gateway reconnects, turns stored. At the end it stops the pipeline and checks the
logger's store (every completed turn exactly once) and an upload to a loopback trace server
(every stored turn sent once, a second upload sends nothing).

    .venv/bin/python scripts/soak.py [--minutes 60] [--interval-s 60] [--readme]

Writes bench-results/soak.{md,json}; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, cpu_seconds, machine, process_tree, rss_mb  # noqa: E402

from common.bus import Receiver, connect_sub, wait_for_bus  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.processes import parent_pid  # noqa: E402
from common.utterances import compose  # noqa: E402
from common.wavio import write_wav  # noqa: E402
from services.stages.logger.store import load_turns  # noqa: E402
from tests.support.rig import PulseRig  # noqa: E402
from tests.support.trace_server import LoopbackTraceServer  # noqa: E402

RULES = [{"match": "story", "reply": "Once upon a time there was a little robot who lived in a quiet town by the "
          "sea and every morning it walked down to the harbour to count the boats and talk to the fishermen."},
         {"match": "stop", "reply": "Okay, I will stop."},
         {"match": ".*", "reply": "I heard: {transcript}"}]
# one loop of the conversation: three plain turns, then a long answer the user talks over
LOOP = [("say", "what is the weather like today"), ("silence", 5.0),
        ("say", "how far away is the moon"), ("silence", 5.0),
        ("say", "what time does the train leave"), ("silence", 5.0),
        ("say", "please tell me a short story"), ("silence", 4.0),
        ("say", "stop please"), ("silence", 5.0)]
WATCH = {"gaps": ("gaps",), "dropped": ("dropped",), "mic_overflows": ("overflows",),
         "bridged_ms": ("bridged_samples",), "underruns": ("underruns",), "late_callbacks": ("late_callbacks",),
         "reconnects": ("reconnects",), "turns_stored": ("turns_stored",)}
WARMUP_MIN = 5  # RSS growth is judged after this
MAX_RSS_GROWTH = 0.05
README_START, README_END = "<!-- soak:start -->", "<!-- soak:end -->"


def stage_pids(beats: dict[str, dict], up_pid: int) -> dict[str, int]:
    pids = {stage: beat["pid"] for stage, beat in beats.items() if "pid" in beat}
    simulators = set()
    for pid in process_tree(up_pid):
        try:
            if b"simulate" in Path(f"/proc/{pid}/cmdline").read_bytes():
                simulators.add(pid)
        except OSError:
            pass
    # the simulator, not one of its ASR workers (forked from it, the same command line)
    for pid in simulators:
        if parent_pid(pid) not in simulators:
            pids["simulator"] = pid
    return pids


def counters(beats: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, keys in WATCH.items():
        out[name] = sum(float(beat.get(key, 0) or 0) for beat in beats.values() for key in keys)
    out["bridged_ms"] = round(out["bridged_ms"] / 24, 1)
    return out


def run(minutes: float, interval_s: float, work: Path) -> dict:
    rig = PulseRig(work / "pulse")
    sim_port = 19000 + os.getpid() % 900
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "WANDB_", "VOICEBUS_"))}
    env.update(rig.env, VOICEBUS_RUN_DIR=str(work), VOICEBUS_BUS_PUB=f"ipc://{work}/pub.sock",
               VOICEBUS_BUS_SUB=f"ipc://{work}/sub.sock", VOICEBUS_SIM_PORT=str(sim_port),
               VOICEBUS_LOG_LEVEL="WARNING", VOICEBUS_SESSION="soak")
    (work / "rules.json").write_text(json.dumps(RULES))
    wav = write_wav(work / "conversation.wav", compose(LOOP, 48000), 48000)
    root = work / "sessions"
    up_log = open(work / "up.log", "ab")  # noqa: SIM115 - closed at the end
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--arg", f"logger=--root {root}",
                           "--arg", f"simulator=--pace realtime --rules {work / 'rules.json'}"],
                          cwd=REPO, env=env, stdout=up_log, stderr=up_log)
    cfg = BusConfig(pub=env["VOICEBUS_BUS_PUB"], sub=env["VOICEBUS_BUS_SUB"])
    import zmq

    ctx = zmq.Context()
    receiver = Receiver(connect_sub(ctx, cfg, ["health.", "rt.response.done", "launcher."]), "soak")
    beats: dict[str, dict] = {}
    done: dict[str, str] = {}
    restarts: list[dict] = []
    samples: list[dict] = []
    feeder: subprocess.Popen | None = None
    try:
        deadline = time.monotonic() + 120
        while not wait_for_bus(ctx, cfg, timeout_s=2, sub=receiver.sock):
            if time.monotonic() > deadline or up.poll() is not None:
                raise RuntimeError(f"voicebus up did not start; see {work / 'up.log'}")
        while "logger" not in beats or "gateway" not in beats or not beats["gateway"].get("connected"):
            message = receiver.recv(timeout_ms=200)
            if message is not None and message.topic.startswith("health."):
                beats[message.topic.removeprefix("health.")] = message.data
            if time.monotonic() > deadline:
                raise RuntimeError(f"stages did not come up: {sorted(beats)}")
        started = time.monotonic()
        end = started + minutes * 60
        next_sample = started
        cpu_before: dict[int, tuple[float, float]] = {}
        print(f"soak: pipeline up, talking for {minutes:g} min (samples every {interval_s:g} s)", file=sys.stderr)
        while time.monotonic() < end:
            if feeder is None or feeder.poll() is not None:  # the conversation loops
                feeder = subprocess.Popen(["paplay", "--device=voicebus_mic_in", str(wav)],
                                          env={**os.environ, **rig.env})
            message = receiver.recv(timeout_ms=100)
            if message is not None:
                if message.topic.startswith("health."):
                    beats[message.topic.removeprefix("health.")] = message.data
                elif message.topic == "rt.response.done":
                    response = message.data["event"]["response"]
                    done[response["id"]] = response["status"]
                elif message.topic == "launcher.restart":
                    restarts.append(message.data)
            now = time.monotonic()
            if now >= next_sample:
                row = {"minute": round((now - started) / 60, 2), "responses_done": len(done),
                       **counters(beats), "rss_mb": {}, "cpu_pct": {}}
                for stage, pid in sorted(stage_pids(beats, up.pid).items()):
                    try:
                        cpu = cpu_seconds(pid)
                        row["rss_mb"][stage] = round(rss_mb(pid), 1)
                    except OSError:
                        continue
                    if pid in cpu_before:
                        spent, at = cpu_before[pid]
                        row["cpu_pct"][stage] = round(100 * (cpu - spent) / (now - at), 2)
                    cpu_before[pid] = (cpu, now)
                samples.append(row)
                print(f"soak: minute {row['minute']:.1f}: turns stored {row['turns_stored']:.0f}, responses "
                      f"{len(done)}, RSS {sum(row['rss_mb'].values()):.0f} MB, underruns {row['underruns']:.0f}, "
                      f"gaps {row['gaps']:.0f}", file=sys.stderr)
                next_sample = now + interval_s
        if feeder is not None:
            feeder.terminate()
            feeder.wait()
        # let the last answer finish and be stored, then stop the way a user does (Ctrl-C)
        quiet_until = time.monotonic() + 12
        while time.monotonic() < quiet_until:
            message = receiver.recv(timeout_ms=100)
            if message is not None and message.topic == "rt.response.done":
                response = message.data["event"]["response"]
                done[response["id"]] = response["status"]
            elif message is not None and message.topic.startswith("health."):
                beats[message.topic.removeprefix("health.")] = message.data
        final = counters(beats)
    finally:
        if feeder is not None and feeder.poll() is None:
            feeder.kill()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=20)
        except subprocess.TimeoutExpired:
            up.kill()
        receiver.sock.close(0)
        ctx.term()
        up_log.close()
        rig.stop()
    return {"samples": samples, "final": final, "done": done, "restarts": restarts,
            **check_store_and_upload(root, done, env)}


def check_store_and_upload(root: Path, done: dict[str, str], env: dict[str, str]) -> dict:
    sessions = [p for p in root.iterdir() if p.is_dir()] if root.exists() else []
    turns = [t for s in sessions for t in load_turns(s)]
    keys = [t["key"] for t in turns]
    stored_twice = len(keys) - len(set(keys))
    answered = set(keys) | {t["assistant"].get("tool_response_id") for t in turns}  # a tool call's response too
    missing = sorted(set(done) - answered)
    server = LoopbackTraceServer().start()
    try:
        upload_env = {**env, **server.env()}
        command = [sys.executable, "-m", "services.cli", "upload", "--root", str(root)]
        first = subprocess.run(command, cwd=REPO, env=upload_env, capture_output=True, text=True, timeout=600)
        turn_calls = [c for c in server.calls.values() if "voicebus.turn" in c["op_name"]]
        sent = len(server.of("/calls/complete"))
        second = subprocess.run(command, cwd=REPO, env=upload_env, capture_output=True, text=True, timeout=600)
        resent = len(server.of("/calls/complete")) - sent
    finally:
        server.stop()
    return {"sessions": len(sessions), "turns_stored": len(keys), "stored_twice": stored_twice,
            "completed_not_stored": missing, "upload_ok": first.returncode == 0 and second.returncode == 0,
            "turn_calls_uploaded": len(turn_calls), "calls_resent": resent,
            "barge_ins": sum(1 for t in turns if t["assistant"]["barge_in"])}


def judge(result: dict, minutes: float) -> list[tuple[str, bool, str]]:
    samples = result["samples"]
    final = result["final"]
    checks = [("every completed turn stored exactly once",
               not result["completed_not_stored"] and result["stored_twice"] == 0,
               f"{result['turns_stored']} stored, {len(result['done'])} responses done, missing "
               f"{len(result['completed_not_stored'])}, twice {result['stored_twice']}"),
              ("upload exact: every stored turn once, nothing on a second run",
               result["upload_ok"] and result["turn_calls_uploaded"] == result["turns_stored"]
               and result["calls_resent"] == 0,
               f"{result['turn_calls_uploaded']} turn calls, {result['calls_resent']} re-sent"),
              ("no message lost on the bus", final["gaps"] == 0 and final["dropped"] == 0,
               f"gaps {final['gaps']:.0f}, dropped {final['dropped']:.0f}"),
              ("no stage restarted", not result["restarts"], f"{len(result['restarts'])} restarts; gateway reconnects "
               f"{final['reconnects']:.0f} (it renews the server session at 55 min by design)"),
              ("barge-ins happened", result["barge_ins"] > 0, f"{result['barge_ins']} barge-ins")]
    later = [s for s in samples if s["minute"] >= WARMUP_MIN]
    if minutes > WARMUP_MIN and len(later) >= 2:
        growth = {stage: later[-1]["rss_mb"].get(stage, 0) / later[0]["rss_mb"][stage] - 1
                  for stage in later[0]["rss_mb"] if later[0]["rss_mb"][stage]}
        pipeline = {stage: g for stage, g in growth.items() if stage != "simulator"}  # the peer is not ours to run
        worst = max(pipeline, key=pipeline.get)
        peer = f"; simulator (test peer) {growth['simulator']:+.1%}" if "simulator" in growth else ""
        checks.append((f"RSS of every pipeline process flat after minute {WARMUP_MIN} (growth <= "
                       f"{MAX_RSS_GROWTH:.0%})", pipeline[worst] <= MAX_RSS_GROWTH,
                       f"worst {worst} {pipeline[worst]:+.1%}{peer}"))
    return checks


def report(result: dict, checks: list[tuple[str, bool, str]], minutes: float) -> str:
    samples = result["samples"]
    lines = [f"soak {time.strftime('%Y-%m-%d')} on {machine()}; {minutes:g} min of looping spoken conversation "
             f"(a barge-in every 4th turn) on the virtual rig; simulator at realtime pace", "",
             "| check | result | figures |", "|---|---|---|"]
    lines += [f"| {name} | {'ok' if ok else 'FAILED'} | {detail} |" for name, ok, detail in checks]
    stages = sorted({s for row in samples for s in row["rss_mb"]})
    lines += ["", "| minute | turns stored | underruns | late callbacks | reconnects | "
              + " | ".join(f"{s} RSS MB / CPU %" for s in stages) + " |",
              "|---:|---:|---:|---:|---:|" + "---:|" * len(stages)]
    step = max(1, len(samples) // 12)
    for row in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        cells = [f"{row['rss_mb'].get(s, '-')} / {row['cpu_pct'].get(s, '-')}" for s in stages]
        lines.append(f"| {row['minute']:.1f} | {row['turns_stored']:.0f} | {row['underruns']:.0f} | "
                     f"{row['late_callbacks']:.0f} | {row['reconnects']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="How long to talk (default 60).")
    parser.add_argument("--interval-s", type=float, default=60.0, help="Seconds between samples (default 60).")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results", help="Where soak.md/json go.")
    parser.add_argument("--readme", action="store_true", help="Also write the table into docs/benchmarks.md.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vb-soak-", dir="/tmp") as tmp:
        result = run(args.minutes, args.interval_s, Path(tmp))
    checks = judge(result, args.minutes)
    table = report(result, checks, args.minutes)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(table + "\n")
    (args.out / "soak.json").write_text(json.dumps({**result, "checks": checks}, indent=1, default=str))
    if args.readme:
        readme = REPO / "docs" / "benchmarks.md"
        text = readme.read_text()
        if README_START in text:
            head, rest = text.split(README_START, 1)
            readme.write_text(head + README_START + "\n" + table + "\n" + README_END + rest.split(README_END, 1)[1])
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
