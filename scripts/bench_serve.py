#!/usr/bin/env python
"""Ramp concurrent conversations with `voicebus call` callers until it breaks: voicebus serve (browsers over
WebRTC, and with `--peers voicebus-phone` phone calls through its Twilio door), then
pipecat's SmallWebRTC runner, in one run, against one simulator.

One `voicebus simulate --pace realtime` answers both. voicebus: one `voicebus serve` (embedded
local Ray, `--slots` the largest step, `--prewarm 2`). pipecat: its own development runner
(`pipecat.runner.run`, one bot per connection as a task in one process) with its Realtime bot
(scripts/pipecat_webrtc_peer.py, from `.venv-bench`). Per step, N callers (started together and ready
ahead, as browsers on machines of their own; they press Connect 0.5 s apart, `voicebus call
--dial-at`; `--cold-callers`: each starts as it dials) each take `--turns` turns (`voicebus call --take-turns`: a question, the
reply played out, the next question), the same callers for both. While they talk the script samples
CPU and PSS from /proc, apart for: the conversations (voicebus: each conversation's bus and stages
with what they started, and the node host that runs them; pipecat: the runner's process), voicebus's pool of prewarmed sets and Ray's own processes
(the rest of serve's tree), the callers and the simulator. Per step: CPU % of one core and PSS per
conversation, Connect -> live p50/p99 (offer sent -> first audio frame), turn latency p50/p99 at
the caller (the question's last sample sent -> the reply's first sample received, the same clock
for both), glitches (received frames that did not follow on; for voicebus also the web stage's
underruns and late frames from each session's events.jsonl), failed calls. Each ramp stops after
the first step with a failed call or a glitch, or at the last step.

    .venv/bin/python scripts/bench_serve.py [--steps 1,2,4,8] [--turns 3] [--peers voicebus,pipecat]
                                            [--cold-callers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.processes import parent_pid  # noqa: E402
from scripts.benchlib import (  # noqa: E402
    REPO,
    bench_python,
    cpu_seconds,
    free_port,
    machine,
    pct,
    process_label,
    process_tree,
    pss_mb,
    tree_total,
)

QUESTIONS = ["what is the weather like today", "please turn on the lights in the kitchen", "how far away is the moon",
             "can you help me with my homework", "please tell me a short story", "what time is it in tokyo"]
SAMPLE_INTERVAL_S = 1.0
STAGGER_S = 0.5
CALLER_READY_S = 6.0  # callers start this long before the first Connect (+ CALLER_READY_EACH_S each)
CALLER_READY_EACH_S = 1.0


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


OPERATOR_TOKEN = "bench-serve-operator-" + secrets.token_hex(16)  # handed to the serve this script starts


def status(url: str) -> dict:
    request = urllib.request.Request(url + "status?format=json", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def tree_pss(root: int) -> float:
    return tree_total(root, pss_mb)


def _is_stage(pid: int) -> bool:
    try:
        return b"services.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _is_zygote(pid: int) -> bool:
    try:
        return process_label(pid) == "zygote"
    except OSError:
        return False


class Sampler(threading.Thread):
    """CPU seconds of every process, each with its group at that moment, while the callers talk.

    Groups: `conversations` (voicebus: the live conversations' stage processes and everything under
    them, and the node host process that runs them and its zygote, their own CPU and PSS only; pipecat: the runner's process, where every bot runs), `pool` (voicebus stage processes of
    prewarmed or starting sets), `ray` (the rest of serve's tree: raylet, GCS, idle workers, serve
    itself), `callers`, `simulator`. A process can change group (a prewarmed set becomes a caller's),
    so CPU is summed per interval, each in the group it was in at its end.
    """

    def __init__(self, peer: Peer, simulator_pid: int, callers: list[subprocess.Popen]) -> None:
        super().__init__(daemon=True)
        self.peer, self.simulator_pid, self.callers = peer, simulator_pid, callers
        self.stop = threading.Event()
        self.samples: list[dict] = []

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL_S):
            try:
                live, group, pss_roots = self.peer.groups()
            except OSError:
                continue
            for caller in self.callers:
                group.update({pid: "callers" for pid in [caller.pid, *process_tree(caller.pid)]})
            group.update({pid: "simulator" for pid in [self.simulator_pid, *process_tree(self.simulator_pid)]})
            cpu = {}
            for pid, name in group.items():
                try:
                    cpu[pid] = (name, cpu_seconds(pid))
                except OSError:
                    continue
            try:
                pss = self.peer.pss_sample(pss_roots)
            except OSError:  # a host gone meanwhile
                continue
            self.samples.append({"t": time.monotonic(), "live": live, "cpu": cpu, "pss_mb": pss})

    def cpu_pct(self, window: list[dict]) -> dict[str, float]:
        """% of one core per group over the window."""
        spent: dict[str, float] = {}
        for before, after in zip(window, window[1:], strict=False):
            for pid, (name, seconds) in after["cpu"].items():
                if pid in before["cpu"]:
                    spent[name] = spent.get(name, 0.0) + seconds - before["cpu"][pid][1]
        elapsed = window[-1]["t"] - window[0]["t"] if len(window) >= 2 else float("nan")
        return {name: 100 * seconds / elapsed for name, seconds in spent.items()}


class Peer:
    """One system under test behind a WebRTC offer endpoint."""

    name = ""
    offer_path = "offer"
    proc: subprocess.Popen

    def groups(self) -> tuple[int, dict[int, str], list[int]]:
        """Live conversations, each process's group, and the roots whose trees hold the conversations."""
        raise NotImplementedError

    def pss_sample(self, roots: list[int]) -> list[float]:
        return [round(tree_pss(root), 1) for root in roots]

    def caller_args(self, says: list[str]) -> list[str]:
        return ["call", self.url, *says, "--take-turns", "--offer-path", self.offer_path, "--json"]

    def wait_ready(self) -> None:
        """Until the peer is at rest (the last step's calls gone; for voicebus a full pool)."""

    def dialled(self, count: int) -> None:
        """Every caller of the step has dialled (a peer with no status of its own counts them on the line)."""

    def stage_glitches(self, results: list[dict]) -> dict[str, int] | None:
        """Underruns and late frames the peer's own output stage counted (None: it does not say)."""
        return None

    def answer_times(self, count: int) -> list[float] | None:
        """The step's offers, received -> answered, as the peer timed them (None: it does not say)."""
        return None

    def pss_per_conversation(self, pss: list[float], count: int) -> float:
        return sum(pss) / len(pss) if pss else float("nan")


class VoicebusPeer(Peer):
    name = "voicebus"
    output_stage = "web"  # the stage whose underruns a caller hears
    placed_counter = "placed"

    def __init__(self, env: dict[str, str], work: Path, slots: int, prewarm: int) -> None:
        self.work, self.prewarm = work, min(prewarm, slots)  # a pool never holds more than the slots
        self.hosts: list[int] = []
        self.placed_before = 0  # conversations the front had placed when the step began
        log = work / "serve.log"
        self.proc = voicebus("serve", "--port", "0", "--slots", str(slots), "--prewarm", str(prewarm),
                             "--client-offers", "64/6000",  # every caller of the ramp dials from loopback
                             "--idle-timeout", "120", "--root", str(work / "sessions"), "--log-level", "INFO",
                             env={**env, "VOICEBUS_OPERATOR_TOKEN": OPERATOR_TOKEN}, log=log, stdout_to_log=True)
        self.url = wait_for_line(log, r"serving url=(\S+)", self.proc, 120)

    def groups(self) -> tuple[int, dict[int, str], list[int]]:
        live = status(self.url)["conversations"]
        group = {pid: "ray" for pid in [self.proc.pid, *process_tree(self.proc.pid)]}
        group.update({pid: "pool" for pid in group if _is_stage(pid)})
        # the node host is one process for all a node's sets: counted with the conversations it runs
        # (prewarmed sets' supervision included), its own memory once, not its children's
        hosts = sorted({c["pid"] for c in live if c.get("pid")})
        tops = [pid for c in live for pid in (c.get("stage_pids") or {}).values()]
        # and so is its zygote, that every set of the node forks its stages from
        zygotes = [pid for pid in group if parent_pid(pid) in hosts and _is_zygote(pid)]
        group.update({pid: "conversations" for pid in [*hosts, *zygotes]})
        for top in tops:
            group.update({pid: "conversations" for pid in [top, *process_tree(top)]})
        self.hosts = [*hosts, *zygotes]
        return len(live), group, tops

    def pss_sample(self, roots: list[int]) -> list[float]:
        """One figure per sample: every live conversation's processes, and their hosts' and zygotes' own PSS."""
        return [round(sum(tree_pss(top) for top in roots) + sum(pss_mb(host) for host in self.hosts), 1)]

    def pss_per_conversation(self, pss: list[float], count: int) -> float:
        return sum(pss) / len(pss) / count if pss else float("nan")

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = status(self.url)
            if now["prewarmed"] >= self.prewarm and not now["conversations"]:
                self.placed_before = now["counts"][self.placed_counter]  # the step's placements are the ones after
                return
            time.sleep(0.5)

    def answer_times(self, count: int) -> list[float] | None:
        """The front's own timing of the step's offers: received -> answered (placement, a prewarmed
        set handed over or a set started, the web stage's answer); Connect -> live at the caller adds
        ICE, DTLS and the first audio frame through both jitter buffers. Only this step's (a caller
        the front refused is not among them)."""
        now = status(self.url)
        placed = now["counts"][self.placed_counter] - self.placed_before
        return now["connect_ms"][-placed:] if placed > 0 else []

    def stage_glitches(self, results: list[dict]) -> dict[str, int] | None:
        """Underruns and late frames (sent > 20 ms after due) the web stage of each caller's conversation
        stored, from the rises of its heartbeat counters (`playback_glitch` events)."""
        total = {"underruns": 0, "late_frames": 0}
        for session in (r["session"] for r in results if r.get("session")):
            events = self.work / "sessions" / session / "events.jsonl"
            last = {"underruns": 0, "late_frames": 0}
            for line in events.read_text().splitlines() if events.exists() else []:
                record = json.loads(line)
                if record.get("kind") == "playback_glitch" and record.get("stage") == self.output_stage:
                    last = {"underruns": int(record.get("underruns") or 0),
                            "late_frames": int(record.get("late_callbacks") or 0)}
            for key in total:  # the counters are cumulative: a session's last report is its total
                total[key] += last[key]
        return total


class PhonePeer(VoicebusPeer):
    """The same serve, called as the phone network calls it: the fake carrier posts its Twilio webhook and
    streams μ-law (`voicebus call --carrier twilio`); a stage set is started per call (no prewarmed pool:
    those are browsers'), the phone stage plays out to the carrier's marks."""

    name = "voicebus-phone"
    output_stage = "phone"
    placed_counter = "phone_placed"

    def __init__(self, env: dict[str, str], work: Path, slots: int) -> None:
        super().__init__(env, work, slots, prewarm=0)

    def caller_args(self, says: list[str]) -> list[str]:
        # flite's rms voice: its words survive a phone line's 8 kHz for the offline recogniser
        return ["call", "--carrier", "twilio", self.url + "twilio/voice", *says, "--voice", "rms", "--json"]


class PipecatPeer(Peer):
    name = "pipecat"
    offer_path = "api/offer"

    def __init__(self, env: dict[str, str], work: Path, sim_url: str) -> None:
        port = free_port()
        realtime = sim_url.replace("http://", "ws://").rstrip("/") + "/realtime"
        log = work / "pipecat.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([str(bench_python()), str(REPO / "scripts/pipecat_webrtc_peer.py"),
                                          "--host", "127.0.0.1", "--port", str(port), "-t", "webrtc"],
                                         cwd=REPO, env={**env, "PIPECAT_PEER_REALTIME_URL": realtime},
                                         stdout=out, stderr=out)
        wait_for_line(log, r"(Uvicorn running)", self.proc, 120)
        self.url = f"http://127.0.0.1:{port}/"
        self.live = 0

    def groups(self) -> tuple[int, dict[int, str], list[int]]:
        group = {pid: "conversations" for pid in [self.proc.pid, *process_tree(self.proc.pid)]}
        return self.live, group, [self.proc.pid]

    def wait_ready(self) -> None:
        time.sleep(3)  # the last step's bots cancelled on disconnect

    def dialled(self, count: int) -> None:
        self.live = count  # the runner has no status: every caller is on the line once all have dialled

    def pss_per_conversation(self, pss: list[float], count: int) -> float:
        """The runner's PSS shared out over its conversations (its idle PSS counted in, as voicebus's)."""
        return sum(pss) / len(pss) / count if pss else float("nan")


def ms(values: list[float], q: float) -> int | None:
    """A percentile in whole ms; None when no call got that far."""
    return round(pct(values, q)) if values else None


def run_step(peer: Peer, count: int, turns: int, simulator_pid: int, env: dict[str, str], work: Path,
             cold_callers: bool = False) -> dict:
    """One step. The callers start together, get ready (imports, speech, WebRTC) and press Connect
    STAGGER_S apart (`voicebus call --dial-at`): a browser's start-up is on its own machine, not the
    endpoint's. `cold_callers`: each caller process starts when it dials, as before 2026-12-04, so
    its start-up lands on the machine while the callers before it connect."""
    callers = []
    first_dial = time.time() + CALLER_READY_S + CALLER_READY_EACH_S * count
    for index in range(count):
        says = [arg for q in range(turns) for arg in ("--say", QUESTIONS[(index + q) % len(QUESTIONS)])]
        dial = [] if cold_callers else ["--dial-at", f"{first_dial + index * STAGGER_S:.3f}"]
        callers.append(voicebus(*peer.caller_args(says), "--timeout", "240", *dial, env=env,
                                log=work / f"{peer.name}-caller-{count}-{index}.log"))
        if cold_callers:
            time.sleep(STAGGER_S)
    if not cold_callers:
        time.sleep(max(0.0, first_dial + (count - 1) * STAGGER_S - time.time()))
    peer.dialled(count)
    answered = None
    sampler = Sampler(peer, simulator_pid, callers)
    sampler.start()
    results, failed = [], 0
    for index, caller in enumerate(callers):
        out, _ = caller.communicate(timeout=400)
        if index == 0:  # every caller has its answer long before the first one hangs up
            answered = peer.answer_times(count)
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
    live_mean = sum(s["live"] for s in window) / len(window) if window else 0.0
    connect = [r["connect_ms"] for r in results]
    latency = [ms for r in results for ms in r["heard_ms"]]
    gaps = sum(r["gaps"] for r in results)
    late = sum(r["late_frames"] for r in results)
    stage = peer.stage_glitches(results)
    pss = [mb for s in window for mb in s["pss_mb"]]
    return {"peer": peer.name, "conversations": count, "ok": len(results), "failed": failed, "window_s": round(
        window[-1]["t"] - window[0]["t"], 1) if len(window) >= 2 else 0.0,
        # over the conversations on the line in the window (all of them, unless some never got on)
        "cpu_pct_per_conversation": round(cpu.get("conversations", 0.0) / max(1.0, live_mean), 1),
        "live_mean": round(live_mean, 1),
        "ray_cpu_pct": round(cpu.get("ray", 0.0), 1), "pool_cpu_pct": round(cpu.get("pool", 0.0), 1),
        "callers_cpu_pct": round(cpu.get("callers", 0.0), 1), "simulator_cpu_pct": round(cpu.get("simulator", 0.0), 1),
        "pss_mb_per_conversation": round(peer.pss_per_conversation(pss, count), 1),
        "connect_ms_p50": ms(connect, 50), "connect_ms_p99": ms(connect, 99),
        "answer_ms_p50": ms(answered, 50) if answered else None, "answer_ms_p99": ms(answered, 99) if answered else None,
        "turn_ms_p50": ms(latency, 50), "turn_ms_p99": ms(latency, 99),
        "turns": len(latency), "gaps": gaps, "late_at_caller": late,
        "max_late_ms": max((r["max_late_ms"] for r in results), default=None),
        "callers_ready": "cold" if cold_callers else "ahead",
        "max_dial_late_ms": max((r.get("dial_late_ms", 0.0) for r in results), default=None),
        "stage_underruns": stage["underruns"] if stage else None, "stage_late_frames": stage["late_frames"] if stage else None,
        "callers": [{key: r[key] for key in ("session", "connect_ms", "heard_ms", "late_frames", "max_late_ms",
                                             "gaps", "page_messages")} for r in results]}


def glitches(row: dict) -> int:
    """What a listener hears: frames lost or arriving too late at the caller, and the stage running dry."""
    return row["gaps"] + row["late_at_caller"] + (row["stage_underruns"] or 0)


def ramp(peer: Peer, steps: list[int], turns: int, simulator_pid: int, env: dict[str, str], work: Path,
         json_path: str | None, before: list[dict], cold_callers: bool = False) -> list[dict]:
    rows: list[dict] = []
    for count in steps:
        peer.wait_ready()  # each step starts from the peer at rest
        print(f"bench_serve: {peer.name}, {count} conversation(s) at once ...", file=sys.stderr)
        row = run_step(peer, count, turns, simulator_pid, env, work, cold_callers)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
        if json_path:  # as it goes: a ramp that breaks the machine keeps what it measured
            Path(json_path).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                                   "rows": before + rows}, indent=1))
        if row["failed"]:
            break
        time.sleep(3)  # voicebus's reaper frees their slots
    return rows


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,2,4,8", help="Concurrent conversations per step (default 1,2,4,8).")
    parser.add_argument("--turns", type=int, default=3, help="Questions each caller asks (default 3).")
    parser.add_argument("--prewarm", type=int, default=2, help="serve --prewarm (default 2, serve's own).")
    parser.add_argument("--peers", default="voicebus,pipecat",
                        help="Which to ramp, in order: voicebus (browsers over WebRTC), voicebus-phone (phone calls "
                        "through the Twilio door, the fake carrier), pipecat (default voicebus,pipecat).")
    parser.add_argument("--json", dest="json_path", help="Write the figures here too.")
    parser.add_argument("--cold-callers", action="store_true",
                        help="Start each caller's process when it dials (imports and speech synthesis then load the "
                             "machine while the callers before it connect), instead of ready ahead.")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    peers = args.peers.split(",")
    work = Path(tempfile.mkdtemp(prefix="vb-bench-serve-"))
    env = {**os.environ, "VOICEBUS_LOG_LEVEL": "WARNING"}
    env.pop("OPENAI_API_KEY", None)
    simulator_log = work / "simulator.log"
    simulator = voicebus("simulate", "--port", "0", "--pace", "realtime", env=env, log=simulator_log,
                         stdout_to_log=True)
    sim_url = wait_for_line(simulator_log, r"(http://127\.0\.0\.1:\d+/v1)", simulator, 60)
    env = {**env, "VOICEBUS_SIM_URL": sim_url}
    rows: list[dict] = []
    try:
        for name in peers:
            peer: Peer = VoicebusPeer(env, work, max(steps), args.prewarm) if name == "voicebus" \
                else PhonePeer(env, work, max(steps)) if name == "voicebus-phone" else PipecatPeer(env, work, sim_url)
            try:
                rows += ramp(peer, steps, args.turns, simulator.pid, env, work, args.json_path, rows,
                             args.cold_callers)
            finally:
                stop(peer.proc)
    finally:
        stop(simulator)
    print(f"bench_serve {time.strftime('%Y-%m-%d')} on {machine()}; voicebus serve (embedded Ray, --prewarm "
          f"{args.prewarm}) and pipecat's SmallWebRTC runner, the same callers ({args.turns} turns each, "
          "--take-turns) and simulator, all on the same machine\n")
    print("| peer | conversations | ok | CPU %/conv | PSS MB/conv | Ray CPU % | pool CPU % | callers CPU % "
          "| simulator CPU % | Connect→live p50/p99 ms | of which answered p50/p99 ms | turn at caller p50/p99 ms | gaps | late at caller (max ms) "
          "| stage underruns / late frames |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stage = "n/a" if r["stage_underruns"] is None else f"{r['stage_underruns']} / {r['stage_late_frames']}"
        answered = "n/a" if r.get("answer_ms_p50") is None else f"{r['answer_ms_p50']} / {r['answer_ms_p99']}"
        print(f"| {r['peer']} | {r['conversations']} | {r['ok']}/{r['ok'] + r['failed']} | "
              f"{r['cpu_pct_per_conversation']} | {r['pss_mb_per_conversation']} | {r['ray_cpu_pct']} | "
              f"{r['pool_cpu_pct']} | {r['callers_cpu_pct']} | {r['simulator_cpu_pct']} | "
              f"{r['connect_ms_p50']} / {r['connect_ms_p99']} | {answered} | {r['turn_ms_p50']} / {r['turn_ms_p99']} | "
              f"{r['gaps']} | {r['late_at_caller']} ({r['max_late_ms']}) | {stage} |")
    for name in peers:
        clean = [r["conversations"] for r in rows if r["peer"] == name and not r["failed"] and not glitches(r)]
        print(f"\n{name}: highest count with every call answered and no glitch heard (gaps, late at the caller, "
              f"underruns): {max(clean) if clean else 0}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
