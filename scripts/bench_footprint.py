#!/usr/bin/env python3
"""What `voicebus up` costs, process by process: CPU and memory while listening and while talking.

Starts `voicebus up` on the virtual audio rig, offline, against a `voicebus simulate` started apart
(the test peer: shown, not counted, and not forked from `up`'s zygote), waits until every stage is up and warm, then measures for `--seconds` while nobody
speaks (listening) and for `--seconds` while a spoken conversation loops into the virtual mic
(talking). Per process: CPU % of one core (from /proc, user + system), RSS, and PSS (shared pages
split between the processes that map them, so the pipeline's PSS sum is what it really occupies).

    .venv/bin/python scripts/bench_footprint.py [--seconds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    REPO,
    machine,
    offline_env,
    process_label,
    process_tree,
    sample_processes,
    start_simulator,
)

from common.bus import Receiver, connect_sub, wait_for_bus  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.utterances import compose  # noqa: E402
from common.wavio import write_wav  # noqa: E402
from services.launcher import terminate  # noqa: E402
from tests.support.rig import PulseRig  # noqa: E402

WARMUP_S = 10.0
RULES = [{"match": ".*", "reply": "I heard you say {transcript}, and that is fine with me."}]
LOOP = [("say", "what is the weather like today"), ("silence", 5.0),
        ("say", "how far away is the moon"), ("silence", 5.0)]
LOOP_S = 14.0  # about how long one LOOP lasts
SIMULATOR = "simulator"


def start_up(work: Path, rig: PulseRig, extra: list[str]) -> tuple[subprocess.Popen, subprocess.Popen, dict[str, str]]:
    """The simulator, then `up` talking to it."""
    env = offline_env()
    env.update(rig.env, VOICEBUS_RUN_DIR=str(work), VOICEBUS_BUS_PUB=f"ipc://{work}/pub.sock",
               VOICEBUS_BUS_SUB=f"ipc://{work}/sub.sock", VOICEBUS_LOG_LEVEL="WARNING")
    (work / "rules.json").write_text(json.dumps(RULES))
    simulator, sim_url = start_simulator(work, env, ["--pace", "realtime", "--rules", str(work / "rules.json")])
    env["VOICEBUS_SIM_URL"] = sim_url
    log = open(work / "up.log", "ab")  # noqa: SIM115 - lives as long as the child
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--arg", f"logger=--root {work / 'sessions'}",
                           *extra], cwd=REPO, env=env, stdout=log, stderr=log)
    return simulator, up, env


def wait_until_connected(env: dict[str, str], up: subprocess.Popen, timeout_s: float = 120) -> None:
    import zmq

    ctx = zmq.Context()
    cfg = BusConfig(pub=env["VOICEBUS_BUS_PUB"], sub=env["VOICEBUS_BUS_SUB"])
    receiver = Receiver(connect_sub(ctx, cfg, ["health."]), "footprint")
    deadline = time.monotonic() + timeout_s
    try:
        while not wait_for_bus(ctx, cfg, timeout_s=2, sub=receiver.sock):
            if time.monotonic() > deadline or up.poll() is not None:
                raise RuntimeError("voicebus up did not start")
        beats: dict[str, dict] = {}
        while not beats.get("gateway", {}).get("connected") or "logger" not in beats:
            message = receiver.recv(timeout_ms=200)
            if message is not None:
                beats[message.topic.removeprefix("health.")] = message.data
            if time.monotonic() > deadline:
                raise RuntimeError(f"stages did not come up: {sorted(beats)}")
    finally:
        receiver.sock.close(0)
        ctx.term()


def name_of(pid: int, up_pid: int) -> str:
    if pid == up_pid:
        return "launcher"
    return process_label(pid)


def measure(up_pid: int, simulator_pid: int, seconds: float) -> dict[str, dict]:
    pids = {name_of(pid, up_pid): pid for pid in [up_pid, *process_tree(up_pid)]}
    return sample_processes({**pids, SIMULATOR: simulator_pid}, seconds)


def render(result: dict) -> str:
    names = [n for n in result["listening"] if n != SIMULATOR] + [SIMULATOR]
    lines = [f"bench_footprint {result['date']} on {result['machine']}; `voicebus up` offline, virtual PulseAudio; "
             f"{result['seconds']:g} s each", "",
             "| process | CPU % listening | CPU % talking | RSS MB | PSS MB |", "|---|---:|---:|---:|---:|"]
    totals = [0.0, 0.0, 0.0, 0.0]
    for name in names:
        quiet, busy = result["listening"].get(name), result["talking"].get(name)
        if quiet is None or busy is None:
            continue
        cells = [quiet["cpu_pct"], busy["cpu_pct"], busy["rss_mb"], busy["pss_mb"]]
        if name != SIMULATOR:
            totals = [t + c for t, c in zip(totals, cells, strict=True)]
        else:
            lines.append("| **pipeline (everything `up` starts, launcher included)** | " +
                         " | ".join(f"**{t:.1f}**" if i < 2 else f"**{t:.0f}**" for i, t in enumerate(totals)) + " |")
        lines.append(f"| {name}{' (test peer, not counted)' if name == SIMULATOR else ''} | {cells[0]:.1f} | "
                     f"{cells[1]:.1f} | {cells[2]:.0f} | {cells[3]:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--up-arg", action="append", default=[], help="extra `voicebus up` arguments")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vb-footprint-", dir="/tmp"))
    rig = PulseRig(work / "pulse")
    simulator, up, env = start_up(work, rig, args.up_arg)
    feeder = None
    try:
        wait_until_connected(env, up)
        print(f"footprint: pipeline up; warming {WARMUP_S:g} s, then {args.seconds:g} s listening", file=sys.stderr)
        time.sleep(WARMUP_S)
        listening = measure(up.pid, simulator.pid, args.seconds)
        wav = write_wav(work / "conversation.wav", compose(LOOP * (int(args.seconds / LOOP_S) + 2), 48000), 48000)
        feeder = subprocess.Popen(["paplay", "--device=voicebus_mic_in", str(wav)], env={**os.environ, **rig.env})
        print(f"footprint: {args.seconds:g} s talking", file=sys.stderr)
        talking = measure(up.pid, simulator.pid, args.seconds)
    finally:
        if feeder is not None:
            feeder.kill()
        terminate([up, simulator], within_s=15)
        rig.stop()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "seconds": args.seconds,
              "listening": listening, "talking": talking}
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
