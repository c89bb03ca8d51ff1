#!/usr/bin/env python3
"""What one browser conversation costs, process by process, for each way of running the browser path.

Each variant is a `voicebus up --web` called by one `voicebus call --take-turns` (aiortc, as a
browser: Opus both ways) asking questions for the whole window (`--turns`), all answered by one `voicebus simulate --pace
realtime` started apart (`VOICEBUS_SIM_URL`): it is the test peer, not part of any variant, and not
forked from a variant's zygote (whose pages it would then share). Once the caller is on the line, CPU
(% of one core, from /proc), RSS and PSS (shared pages split between the processes that map them,
so the sum is what the conversation occupies) are sampled over `--seconds` for every process `up`
started, its zygote included. The caller must still be on the line when the window closes: a caller
that hung up earlier left the conversation idle for the rest (CPU read low) and stopped sharing
library pages with it (PSS read high); that round fails. Beside PSS, "once" counts every physical
page the conversation's processes map once (from /proc/PID/pagemap, as root): what it occupies with
nothing else on the machine sharing its libraries (a browser is on another machine; the simulator
and the caller here are not). Variants are run in turn, `--rounds` times (A B A B ...), so that the
machine's drift lands on all of them alike:

- `in-process`: the default; stages forked by the zygote, the web stage resamples the browser's mic
  itself (`audio.user`).
- `no-zygote`: `VOICEBUS_ZYGOTE=0`: every stage its own `python -m services.cli` (as under honcho).
- `via-resampler`: `voicebus web --via-resampler` and a `voicebus resample` stage, as before.
- `aiortc-encoder`: `voicebus web --aiortc-encoder`: aiortc Opus-encodes the assistant's audio
  (48 kHz stereo, in its worker thread) instead of the track (24 kHz mono, in the loop), as before.
- `aiortc-decoder`: `voicebus web --aiortc-decoder`: aiortc decodes the browser's Opus (48 kHz
  stereo, in its worker thread, each frame handed back to the loop) instead of `LoopDecoding` (mono,
  on the loop), as before.

    .venv/bin/python scripts/bench_web_footprint.py [--rounds 3] [--seconds 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
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
    pct,
    process_label,
    process_tree,
    resident_once_mb,
    sample_processes,
    start_simulator,
)

from common.ports import free_port  # noqa: E402
from services.launcher import terminate  # noqa: E402

# variant -> (`voicebus up` arguments, `voicebus web` arguments, environment)
VARIANTS = {
    "in-process": (["--web"], "", {}),
    "no-zygote": (["--web"], "", {"VOICEBUS_ZYGOTE": "0"}),
    "via-resampler": (["--stages", "web,resample,tools,gateway,logger"], "--via-resampler", {}),
    "aiortc-encoder": (["--web"], "--aiortc-encoder", {}),
    "aiortc-decoder": (["--web"], "--aiortc-decoder", {}),
}
QUESTIONS = ["what is the weather like today", "how far away is the moon", "tell me a short story please",
             "what time is it", "turn on the lights in the kitchen", "how tall is mount everest"]
CALL_SETTLE_S = 4.0  # the caller connects and its first question starts before sampling
SHORTEST_TURN_S = 3.0  # a question and its reply take longer: enough questions outlast the window


def run_variant(name: str, work: Path, seconds: float, turns: int, sim_url: str) -> dict:
    """One `up --web` and one caller; returns the per-process sample and what the caller heard."""
    run = work / f"{name}-{time.monotonic_ns()}"
    run.mkdir(mode=0o700)
    web_port = free_port()
    up_args, web_args, extra_env = VARIANTS[name]
    env = {**_clean_env(), "VOICEBUS_SIM_URL": sim_url, **extra_env}
    command = [sys.executable, "-m", "services.cli", "up", "--run-dir", str(run), *up_args,
               "--arg", f"web=--port {web_port} {web_args}".strip(), "--arg", f"logger=--root {run / 'sessions'}"]
    with open(run / "up.log", "ab") as log:
        up = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    caller = None
    try:
        _wait_for_page(web_port, up)
        caller_args = [a for q in (QUESTIONS * turns)[:turns] for a in ("--say", q)]
        caller = subprocess.Popen([sys.executable, "-m", "services.cli", "call", f"http://127.0.0.1:{web_port}",
                                   "--take-turns", *caller_args, "--timeout", str(turns * 20 + 60), "--json"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(CALL_SETTLE_S)
        pids = {}
        for pid in [up.pid, *process_tree(up.pid)]:
            try:
                label = "launcher" if pid == up.pid else process_label(pid)
            except OSError:
                continue
            pids[label if label not in pids else f"{label} {pid}"] = pid
        sample = sample_processes(pids, seconds)
        once_mb = resident_once_mb(list(pids.values()))
        if caller.poll() is not None:
            raise RuntimeError(f"the caller hung up before the {seconds:g} s window closed: give it more --turns")
        out, _ = caller.communicate(timeout=turns * 20 + 60)
        heard = json.loads(out.decode() or "{}")
    finally:
        terminate([up] if caller is None else [caller, up], within_s=15)
    return {"processes": sample, "once_mb": once_mb, "heard_ms": heard.get("heard_ms", []), "replies": len(heard.get("assistant", [])),
            "gaps": heard.get("gaps"), "late_frames": heard.get("late_frames")}


def _clean_env() -> dict[str, str]:
    """This environment without keys or voicebus settings: offline, quiet."""
    return {**offline_env(), "VOICEBUS_LOG_LEVEL": "WARNING"}


def _wait_for_page(port: int, up: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """The web stage serves, and the simulator and gateway have had time to connect."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError("voicebus up exited before its web stage served")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                time.sleep(5.0)  # the gateway's session is configured a moment after the page serves
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the web stage did not serve")


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: the conversation's CPU and PSS (everything `up` started), mean of rounds."""
    summary = {}
    for name, rounds in runs.items():
        totals = []
        for one in rounds:
            counted = one["processes"]
            totals.append((sum(v["cpu_pct"] for v in counted.values()), sum(v["pss_mb"] for v in counted.values()),
                           sum(v["rss_mb"] for v in counted.values()), len(counted), one.get("once_mb")))
        summary[name] = {"cpu_pct": round(sum(t[0] for t in totals) / len(totals), 2),
                         "cpu_pct_rounds": [round(t[0], 2) for t in totals],
                         "pss_mb": round(sum(t[1] for t in totals) / len(totals), 1),
                         "rss_mb": round(sum(t[2] for t in totals) / len(totals), 1),
                         "once_mb": _mean([t[4] for t in totals]),
                         "processes": totals[-1][3],
                         "heard_ms": [ms for one in rounds for ms in one["heard_ms"]]}
    return summary


def _mean(values: list[float | None]) -> float | None:
    """None when any round could not read page frames (not root)."""
    return None if not values or None in values else round(sum(values) / len(values), 1)  # type: ignore[arg-type]


def render(result: dict) -> str:
    summary = result["summary"]
    reference = next(iter(summary), "")
    base = summary.get(reference)
    lines = [f"bench_web_footprint {result['date']} on {result['machine']}; `voicebus up --web` offline, one "
             f"`voicebus call --take-turns` caller ({result['turns']} questions), sampled {result['seconds']:g} s "
             f"on the line, {result['rounds']} rounds per variant, interleaved", "",
             f"| variant | processes | CPU % of one core (rounds) | vs {reference} | PSS MB | once MB | RSS MB | "
             "reply heard p50 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        p50 = pct(row["heard_ms"], 50)
        ratio = row["cpu_pct"] / base["cpu_pct"] if base and base["cpu_pct"] else float("nan")
        once = "-" if row["once_mb"] is None else f"{row['once_mb']:.0f}"
        lines.append(f"| {name} | {row['processes']} | {row['cpu_pct']:.1f} "
                     f"({', '.join(f'{c:.1f}' for c in row['cpu_pct_rounds'])}) | {ratio:.2f}x | {row['pss_mb']:.0f} | "
                     f"{once} | {row['rss_mb']:.0f} | {p50:.0f} |")
    lines += ["", "Per process, last round:", "", "| variant | process | CPU % | PSS MB |", "|---|---|---:|---:|"]
    for name, rounds in result["runs"].items():
        for process, figures in rounds[-1]["processes"].items():
            lines.append(f"| {name} | {process} | {figures['cpu_pct']:.1f} | {figures['pss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Times each variant is run, interleaved (default 3).")
    parser.add_argument("--seconds", type=float, default=25.0, help="Sampling window on the line (default 25).")
    parser.add_argument("--turns", type=int, default=0,
                        help="Questions the caller asks (default: enough to talk through the window and its settling).")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma-separated, the first is the reference (default {','.join(VARIANTS)}).")
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    args = parser.parse_args()
    args.turns = args.turns or math.ceil((CALL_SETTLE_S + args.seconds) / SHORTEST_TURN_S)
    chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
    if unknown := [name for name in chosen if name not in VARIANTS]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="vb-webfoot-", dir="/tmp"))
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    simulator, sim_url = start_simulator(work, _clean_env(), ["--pace", "realtime"])
    try:
        for round_no in range(args.rounds):
            for name in chosen:
                print(f"bench_web_footprint: {name}, round {round_no + 1} of {args.rounds} ...", file=sys.stderr)
                runs[name].append(run_variant(name, work, args.seconds, args.turns, sim_url))
    finally:
        terminate([simulator], within_s=10)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "seconds": args.seconds, "turns": args.turns,
              "rounds": args.rounds, "summary": summarize(runs), "runs": runs}
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
