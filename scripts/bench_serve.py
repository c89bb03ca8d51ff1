#!/usr/bin/env python
"""Ramp concurrent `voicebus serve` conversations with `voicebus call` callers until it breaks.

One `voicebus serve` (embedded local Ray, `--slots` the largest step, default `--prewarm 2`) against
one `voicebus simulate --pace realtime`; per step, N callers (staggered 0.5 s, as people press
Connect) each speak `--turns` questions with pauses and wait for each reply. While they talk the
script samples CPU and PSS from /proc, apart for: the conversations' stage sets (each conversation
actor's process tree), Ray's own processes (the rest of serve's tree), the callers and the
simulator. Per step: CPU % of one core and PSS per conversation, Connect -> live p50/p99 and turn
latency p50/p99 as the callers saw them (speech end -> first reply sample heard, measured by the web
stage), glitches (received audio frames that did not follow on, failed calls). The ramp stops
after the first step with a failed call or a glitch, or at the last step.

    .venv/bin/python scripts/bench_serve.py [--steps 1,2,4,8] [--turns 3] [--json out.json]

Not yet: the same callers against pipecat's SmallWebRTC runner in the same run (issue 23 stays open).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.benchlib import REPO, cpu_seconds, machine, pct, process_tree, pss_mb  # noqa: E402

QUESTIONS = ["what is the weather like today", "please turn on the lights in the kitchen", "how far away is the moon",
             "can you help me with my homework", "please tell me a short story", "what time is it in tokyo"]
SAMPLE_INTERVAL_S = 1.0
STAGGER_S = 0.5


def voicebus(*args: str, env: dict[str, str], log: Path, stdout_to_log: bool = False) -> subprocess.Popen:
    """A `voicebus` command with its stderr (and stdout, unless it is read) in `log`."""
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env,
                                stdout=out if stdout_to_log else subprocess.PIPE, stderr=out)


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited: {path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"no {pattern!r} within {timeout_s} s in {path}")


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "status?format=json", timeout=10) as response:
        return json.loads(response.read())


def tree_pss(root: int) -> float:
    total = 0.0
    for pid in [root, *process_tree(root)]:
        try:
            total += pss_mb(pid)
        except OSError:
            continue
    return total


def _is_stage(pid: int) -> bool:
    try:
        return b"services.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Sampler(threading.Thread):
    """CPU seconds of every process, each with its group at that moment, while the callers talk.

    Groups: `stage_sets` (the live conversations' actors and everything under them), `pool` (stage
    processes of prewarmed or starting sets), `ray` (the rest of serve's tree: raylet, GCS, idle
    workers, serve itself), `callers`, `simulator`. A process can change group (a prewarmed set
    becomes a caller's), so CPU is summed per interval, each in the group it was in at its end.
    """

    def __init__(self, url: str, serve_pid: int, simulator_pid: int, callers: list[subprocess.Popen]) -> None:
        super().__init__(daemon=True)
        self.url, self.serve_pid, self.simulator_pid, self.callers = url, serve_pid, simulator_pid, callers
        self.stop = threading.Event()
        self.samples: list[dict] = []

    def groups(self, live: list[dict]) -> dict[int, str]:
        group = {pid: "ray" for pid in [self.serve_pid, *process_tree(self.serve_pid)]}
        group.update({pid: "pool" for pid in group if _is_stage(pid)})
        for actor in (c["pid"] for c in live if c.get("pid")):
            group.update({pid: "stage_sets" for pid in [actor, *process_tree(actor)]})
        for caller in self.callers:
            group.update({pid: "callers" for pid in [caller.pid, *process_tree(caller.pid)]})
        group.update({pid: "simulator" for pid in [self.simulator_pid, *process_tree(self.simulator_pid)]})
        return group

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL_S):
            try:
                live = status(self.url)["conversations"]
            except OSError:
                continue
            cpu = {}
            for pid, name in self.groups(live).items():
                try:
                    cpu[pid] = (name, cpu_seconds(pid))
                except OSError:
                    continue
            self.samples.append({"t": time.monotonic(), "live": len(live), "cpu": cpu,
                                 "pss_mb": [round(tree_pss(c["pid"]), 1) for c in live if c.get("pid")]})

    def cpu_pct(self, window: list[dict]) -> dict[str, float]:
        """% of one core per group over the window."""
        spent: dict[str, float] = {}
        for before, after in zip(window, window[1:], strict=False):
            for pid, (name, seconds) in after["cpu"].items():
                if pid in before["cpu"]:
                    spent[name] = spent.get(name, 0.0) + seconds - before["cpu"][pid][1]
        elapsed = window[-1]["t"] - window[0]["t"] if len(window) >= 2 else float("nan")
        return {name: 100 * seconds / elapsed for name, seconds in spent.items()}


def wait_prewarmed(url: str, count: int, timeout_s: float = 180) -> None:
    """Until the pool is full and nobody is on the line (the last step's calls reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = status(url)
        if now["prewarmed"] >= count and not now["conversations"]:
            return
        time.sleep(0.5)


def run_step(url: str, count: int, turns: int, serve_pid: int, simulator_pid: int, env: dict[str, str],
             work: Path) -> dict:
    callers = []
    for index in range(count):
        says = [arg for q in range(turns) for arg in ("--say", QUESTIONS[(index + q) % len(QUESTIONS)])]
        callers.append(voicebus("call", url, *says, "--pause", "3", "--json", "--timeout", "240", env=env,
                                log=work / f"caller-{count}-{index}.log"))
        time.sleep(STAGGER_S)
    sampler = Sampler(url, serve_pid, simulator_pid, callers)
    sampler.start()
    results, failed = [], 0
    for caller in callers:
        out, _ = caller.communicate(timeout=400)
        if caller.returncode == 0:
            results.append(json.loads(out))
        else:
            failed += 1
    sampler.stop.set()
    sampler.join()
    # the talking window: every conversation live at once
    full = [s for s in sampler.samples if s["live"] >= count]
    window = full if len(full) >= 2 else sampler.samples

    cpu = sampler.cpu_pct(window)

    connect = [r["connect_ms"] for r in results]
    latency = [ms for r in results for ms in r["latency_ms"]]
    gaps = sum(r["gaps"] for r in results)
    pss = [mb for s in window for mb in s["pss_mb"]]
    return {"conversations": count, "ok": len(results), "failed": failed, "window_s": round(
        window[-1]["t"] - window[0]["t"], 1) if len(window) >= 2 else 0.0,
        "cpu_pct_per_conversation": round(cpu.get("stage_sets", 0.0) / count, 1),
        "ray_cpu_pct": round(cpu.get("ray", 0.0), 1), "pool_cpu_pct": round(cpu.get("pool", 0.0), 1),
        "callers_cpu_pct": round(cpu.get("callers", 0.0), 1), "simulator_cpu_pct": round(cpu.get("simulator", 0.0), 1),
        "pss_mb_per_conversation": round(sum(pss) / len(pss), 1) if pss else float("nan"),
        "connect_ms_p50": round(pct(connect, 50)), "connect_ms_p99": round(pct(connect, 99)),
        "turn_ms_p50": round(pct(latency, 50)), "turn_ms_p99": round(pct(latency, 99)),
        "turns": len(latency), "gaps": gaps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,2,4,8", help="Concurrent conversations per step (default 1,2,4,8).")
    parser.add_argument("--turns", type=int, default=3, help="Questions each caller asks (default 3).")
    parser.add_argument("--prewarm", type=int, default=2, help="serve --prewarm (default 2, serve's own).")
    parser.add_argument("--json", dest="json_path", help="Write the figures here too.")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    work = Path(tempfile.mkdtemp(prefix="vb-bench-serve-"))
    env = {**os.environ, "VOICEBUS_LOG_LEVEL": "WARNING"}
    env.pop("OPENAI_API_KEY", None)
    simulator_log = work / "simulator.log"
    simulator = voicebus("simulate", "--port", "0", "--pace", "realtime", env=env, log=simulator_log,
                         stdout_to_log=True)
    sim_url = wait_for_line(simulator_log, r"(http://127\.0\.0\.1:\d+/v1)", simulator, 60)
    env = {**env, "VOICEBUS_SIM_URL": sim_url}
    serve_log = work / "serve.log"
    serve = voicebus("serve", "--port", "0", "--slots", str(max(steps)), "--prewarm", str(args.prewarm),
                     "--idle-timeout", "120", "--root", str(work / "sessions"), "--log-level", "INFO", env=env,
                     log=serve_log, stdout_to_log=True)
    rows = []
    try:
        url = wait_for_line(serve_log, r"serving url=(\S+)", serve, 120)
        for count in steps:
            wait_prewarmed(url, args.prewarm)  # each step starts from serve's steady state
            print(f"bench_serve: {count} conversation(s) at once ...", file=sys.stderr)
            row = run_step(url, count, args.turns, serve.pid, simulator.pid, env, work)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            if row["failed"] or row["gaps"]:
                break
            time.sleep(3)  # the reaper frees their slots
    finally:
        for proc in (serve, simulator):
            proc.terminate()
        for proc in (serve, simulator):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    clean = [r["conversations"] for r in rows if not r["failed"] and not r["gaps"]]
    print(f"bench_serve {time.strftime('%Y-%m-%d')} on {machine()}; voicebus serve (embedded Ray, --prewarm "
          f"{args.prewarm}), {args.turns} turns per caller, callers and simulator on the same machine\n")
    print("| conversations | ok | CPU %/conv | PSS MB/conv | Ray CPU % | pool CPU % | callers CPU % | simulator CPU % "
          "| Connect→live p50/p99 ms | turn p50/p99 ms | gaps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['conversations']} | {r['ok']}/{r['ok'] + r['failed']} | {r['cpu_pct_per_conversation']} | "
              f"{r['pss_mb_per_conversation']} | {r['ray_cpu_pct']} | {r['pool_cpu_pct']} | {r['callers_cpu_pct']} | "
              f"{r['simulator_cpu_pct']} | {r['connect_ms_p50']} / {r['connect_ms_p99']} | "
              f"{r['turn_ms_p50']} / {r['turn_ms_p99']} | {r['gaps']} |")
    print(f"\nhighest count with every call answered and no gap: {max(clean) if clean else 0}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
