#!/usr/bin/env python3
"""How long a browser stage set takes to start, and what the start costs, started as `serve`'s node
host starts one: forked by a warm zygote against every stage its own interpreter
(`VOICEBUS_ZYGOTE=0`), interleaved.

Each round runs the same `Supervisor` a conversation runs (bus, web, tools, gateway, logger, in a
run dir of its own) against one `voicebus simulate` started apart, and times from the start to the
moment a caller could talk: every stage's first heartbeat and the Realtime session configured
(`rt.session.updated`, or the gateway's heartbeat saying so when that came first), what `serve` waits for before it hands a prewarmed set to a caller. The CPU
seconds the set's processes spent by then (from /proc) are what each start takes from the
conversations already running on the node. The zygote is started once before the rounds, as a node
host starts it once for all its conversations; its own start is reported apart.

    .venv/bin/python scripts/bench_start.py [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import free_port, machine, offline_env, pct, start_simulator, tree_total  # noqa: E402

from common.bus import Receiver, connect_sub  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.processes import cpu_seconds  # noqa: E402
from services.launcher import Supervisor, terminate  # noqa: E402
from services.pipeline import WEB_STAGES, pipeline_specs  # noqa: E402
from services.zygote import Zygote  # noqa: E402

VARIANTS = ["zygote", "no-zygote"]
READY_TIMEOUT_S = 120.0


def one_start(work: Path, zygote: Zygote | None) -> dict:
    """Start a browser stage set; seconds until every stage beat and the session was configured, and
    the CPU seconds its processes spent by then."""
    run = Path(tempfile.mkdtemp(prefix="start-", dir=work))
    cfg = BusConfig(pub=f"ipc://{run}/pub.sock", sub=f"ipc://{run}/sub.sock")
    specs, env = pipeline_specs(WEB_STAGES, {"web": ["--port", str(free_port())],
                                             "logger": ["--root", str(run / "sessions")]})
    stages = {spec.name for spec in specs}
    started = time.monotonic()
    supervisor = Supervisor(cfg, specs, "bench-start", {**env, "VOICEBUS_RUN_DIR": str(run)}, lock_dir=run,
                            zygote=zygote)
    # subscribed before the bus is there (ZeroMQ connects once it binds): the session's event is seen
    # when it comes, not a heartbeat later
    receiver = Receiver(connect_sub(supervisor.ctx, cfg, ["health.", "rt.session.updated"]), "bench-start")
    try:
        supervisor.start()
        beating: set[str] = set()
        configured = False
        milestones: dict[str, float] = {}  # stage -> its first beat, "session" -> configured; s after the start
        while not (configured and stages <= beating):
            if time.monotonic() - started > READY_TIMEOUT_S or supervisor.fatal:
                raise RuntimeError(f"the stage set did not come up: {supervisor.fatal or sorted(beating)}")
            supervisor.poll()
            message = receiver.recv(timeout_ms=10)
            if message is None:
                continue
            if message.topic.startswith("health."):
                beating.add(message.topic.removeprefix("health."))
                milestones.setdefault(message.topic.removeprefix("health."), time.monotonic() - started)
            # the event, or the gateway's next beat when the event came before this socket did
            configured = configured or message.topic == "rt.session.updated" or \
                bool(message.data.get("session_configured"))
            if configured:
                milestones.setdefault("session", time.monotonic() - started)
        ready_s = time.monotonic() - started
        procs = [supervisor.bus_proc, *(child.proc for child in supervisor.children)]
        cpu_s = sum(tree_total(proc.pid, cpu_seconds) for proc in procs if proc is not None)
    finally:
        receiver.sock.close(linger=0)
        supervisor.stop()
    return {"ready_s": round(ready_s, 3), "cpu_s": round(cpu_s, 2),
            "milestones_s": {name: round(at, 3) for name, at in sorted(milestones.items(), key=lambda kv: kv[1])}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="Starts per variant, interleaved (default 5).")
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vb-start-", dir="/tmp"))
    clean = offline_env()  # offline, quiet: what the stage sets inherit
    os.environ.clear()
    os.environ.update(clean, VOICEBUS_LOG_LEVEL="WARNING")
    simulator, os.environ["VOICEBUS_SIM_URL"] = start_simulator(work, dict(os.environ), ["--pace", "realtime"])
    zygote = Zygote("services.preload")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        began = time.monotonic()
        zygote.start()
        zygote_s = time.monotonic() - began
        for round_no in range(args.rounds):
            for name in VARIANTS:
                print(f"bench_start: {name}, round {round_no + 1} of {args.rounds} ...", file=sys.stderr)
                runs[name].append(one_start(work, zygote if name == "zygote" else None))
    finally:
        zygote.stop()
        terminate([simulator], within_s=10)
    lines = [f"bench_start {time.strftime('%Y-%m-%d')} on {machine()}; a browser stage set started -> every stage "
             f"beating and the Realtime session configured, {args.rounds} starts each, interleaved; the zygote's "
             f"own start (once per node): {zygote_s:.2f} s", "",
             "| variant | ready p50 s | ready max s | CPU s p50 (whole tree) |", "|---|---:|---:|---:|"]
    for name, rounds in runs.items():
        ready = [r["ready_s"] for r in rounds]
        lines.append(f"| {name} | {pct(ready, 50):.2f} | {max(ready):.2f} | {pct([r['cpu_s'] for r in rounds], 50):.2f} |")
    for name, rounds in runs.items():
        steps = sorted({step for r in rounds for step in r["milestones_s"]},
                       key=lambda step: pct([r["milestones_s"].get(step, 0.0) for r in rounds], 50))
        lines.append(f"{name}, p50 s after the start: " + ", ".join(
            f"{step} {pct([r['milestones_s'][step] for r in rounds if step in r['milestones_s']], 50):.2f}"
            for step in steps))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                         "zygote_start_s": round(zygote_s, 2), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
