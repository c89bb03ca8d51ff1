"""Shared pieces of the benchmark scripts: process CPU from /proc, percentiles, a private bus + pulse."""

from __future__ import annotations

import json
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.ports import free_port  # noqa: E402, F401 - for the bench scripts
from common.processes import command_words, cpu_seconds, descendants, memory_kb, tree_total  # noqa: E402, F401 - for the bench scripts
from tests.support.rig import PulseRig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench"


def offline_env() -> dict[str, str]:
    """This environment without keys or voicebus settings: what a benchmark starts runs offline, on
    its own run dir and simulator."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "WANDB_", "VOICEBUS_"))}


def machine() -> str:
    model = "unknown cpu"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def bench_python() -> Path:
    """.venv-bench with the `bench` extra of pyproject.toml (pipecat, LiveKit Agents); made on first use."""
    python = BENCH_VENV / "bin/python"
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    stamp = BENCH_VENV / "bench-extra.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    print(f"bench: installing the bench extra into {BENCH_VENV} ({', '.join(wanted)}); first run only", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted], check=True)
    stamp.write_text(json.dumps(wanted))
    return python


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes that map them."""
    return memory_kb(pid, "Pss") / 1024


PAGE_PRESENT, PFN_MASK = 1 << 63, (1 << 55) - 1
PAGE = struct.Struct("<Q")


def resident_once_mb(pids: list[int]) -> float | None:
    """Every physical page these processes map, counted once (from /proc/PID/pagemap): what they occupy
    together, whoever else shares their libraries. None without the right to read page frames (root)."""
    frames: set[int] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
                for line in maps:
                    span, *rest = line.split(None, 5)
                    if rest[-1].strip() == "[vsyscall]":
                        continue
                    low, high = (int(edge, 16) for edge in span.split("-"))
                    pagemap.seek(low // mmap.PAGESIZE * PAGE.size)
                    entries = pagemap.read((high - low) // mmap.PAGESIZE * PAGE.size)
                    frames.update(entry & PFN_MASK for (entry,) in PAGE.iter_unpack(entries) if entry & PAGE_PRESENT)
        except OSError:  # gone, or not ours to read
            continue
    if frames == {0}:  # present pages without their frames: not root
        return None
    return len(frames) * mmap.PAGESIZE / 2**20


def process_label(pid: int) -> str:
    """What a process is, from its command line: the `voicebus` command (`services.cli <command>`,
    a stage forked by the zygote too), `zygote`, else the script or program it runs. Raises OSError
    when the process is gone."""
    words = command_words(pid)
    if "services.cli" in words:
        return words[words.index("services.cli") + 1]
    if "services.zygote" in words:
        return "zygote"
    return next((Path(w).name for w in words[1:] if not w.startswith("-")), Path(words[0]).name)


def start_simulator(work: Path, env: dict[str, str], args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """A `voicebus simulate` of its own (its log in `work`), and its URL for `VOICEBUS_SIM_URL`: the
    test peer apart from what is measured (not forked from the pipeline's zygote, whose pages it
    would then share and take its part of)."""
    import re

    log_path = work / "simulator.log"
    with open(log_path, "ab") as log:
        simulator = subprocess.Popen([sys.executable, "-m", "services.cli", "simulate", "--port", "0", *args],
                                     cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and simulator.poll() is None:
        if found := re.search(r"(http://127\.0\.0\.1:\d+/v1)", log_path.read_text(errors="replace")):
            return simulator, found.group(1)
        time.sleep(0.2)
    simulator.kill()
    simulator.wait()
    raise RuntimeError(f"the simulator did not start (see {log_path})")


def process_tree(root: int) -> list[int]:
    """Every descendant of `root` (not root itself)."""
    return descendants(root)


def sample_processes(pids: dict[str, int], seconds: float) -> dict[str, dict]:
    """CPU % of one core over `seconds`, then RSS and PSS, for each named process still alive."""
    before = {}
    for name, pid in pids.items():
        try:
            before[name] = cpu_seconds(pid)
        except OSError:
            pass
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    out = {}
    for name, spent in before.items():
        pid = pids[name]
        try:
            out[name] = {"pid": pid, "cpu_pct": round(100 * (cpu_seconds(pid) - spent) / elapsed, 2),
                         "rss_mb": round(rss_mb(pid), 1), "pss_mb": round(pss_mb(pid), 1)}
        except OSError:
            continue
    return out


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


class Rig:
    """A private run dir with a bus and (optionally) the virtual PulseAudio devices."""

    def __init__(self, with_pulse: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vb-bench-", dir="/tmp"))
        self.env = {**os.environ, "VOICEBUS_RUN_DIR": str(self.dir), "VOICEBUS_BUS_PUB": f"ipc://{self.dir}/pub.sock",
                    "VOICEBUS_BUS_SUB": f"ipc://{self.dir}/sub.sock", "VOICEBUS_LOG_LEVEL": "WARNING"}
        self.procs: list[subprocess.Popen] = []
        self.pulse = PulseRig(self.dir / "pulse") if with_pulse else None
        self.pulse_env: dict[str, str] = self.pulse.env if self.pulse else {}
        self.start("bus")

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=REPO,
                                env={**self.env, **self.pulse_env, **(extra_env or {})},
                                stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{args[0]}.log", "ab"))  # noqa: SIM115
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.pulse is not None:
            self.pulse.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
