"""The virtual audio rig for tests, benchmarks and soaks: a private PulseAudio with a virtual mic and
speaker (scripts/pulse-up.sh), kept at its baseline between users; recording the speaker with
wall-clock stamps, playing into the mic, and aligning signals by cross-correlation."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.wavio import write_wav

REPO = Path(__file__).resolve().parents[2]
SETTLE_S = 1.0  # the recipe: give a fresh daemon a second before opening streams
KEEPALIVE_CLIENT = "pacat"  # pulse-up.sh's silent stream into the mic, part of the baseline


class PulseRig:
    """A user-mode PulseAudio in a private runtime dir with voicebus_mic and voicebus_speaker.

    `reset()` puts it back to what pulse-up.sh made: modules loaded since (loopbacks, echo
    cancellers) are unloaded, streams of clients that are gone or forgotten are killed, defaults are
    restored. What one user of the rig leaves behind must not reach the next.
    """

    def __init__(self, runtime: Path | None = None) -> None:
        self.runtime = runtime or Path(tempfile.mkdtemp(prefix="vb-pulse-", dir="/tmp"))
        self._own_runtime = runtime is None
        self.env = {"XDG_RUNTIME_DIR": str(self.runtime), "PULSE_SINK": "voicebus_speaker",
                    "PULSE_SOURCE": "voicebus_mic"}
        result = subprocess.run(["bash", str(REPO / "scripts/pulse-up.sh")], env={**os.environ, **self.env},
                                capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(f"pulse-up.sh failed:\n{result.stdout}\n{result.stderr}")
        time.sleep(SETTLE_S)
        self.baseline_modules = {m.split()[0] for m in self._short("modules")}

    def _pactl(self, *args: str) -> str:
        return subprocess.run(["pactl", *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=10).stdout

    def _short(self, kind: str) -> list[str]:
        return [line for line in self._pactl("list", "short", kind).splitlines() if line.strip()]

    def state(self) -> dict[str, list[str] | str]:
        """Modules, streams and defaults right now (for failure reports)."""
        info = self._pactl("info")
        defaults = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Default S")]
        return {"modules": [" ".join(m.split()[:3]) for m in self._short("modules")],
                "sink_inputs": [" ".join(m.split()[:3]) for m in self._short("sink-inputs")],
                "source_outputs": [" ".join(m.split()[:3]) for m in self._short("source-outputs")],
                "defaults": " ".join(defaults)}

    def reset(self) -> list[str]:
        """Back to the baseline; returns what had to be removed (empty when the rig was clean)."""
        removed = []
        for line in self._short("modules"):
            index, name = line.split()[:2]
            if index not in self.baseline_modules:
                self._pactl("unload-module", index)
                removed.append(f"module {name}")
        keepalive = (self.runtime / "mic-keepalive.pid").read_text().strip() \
            if (self.runtime / "mic-keepalive.pid").exists() else ""
        for kind, kill in (("sink-inputs", "kill-sink-input"), ("source-outputs", "kill-source-output")):
            for index, pid in self._stream_pids(kind):
                if pid != keepalive:
                    self._pactl(kill, index)
                    removed.append(f"{kind[:-1]} {index} of pid {pid or '?'}")
        self._pactl("set-default-sink", "voicebus_speaker")
        self._pactl("set-default-source", "voicebus_mic")
        return removed

    def _stream_pids(self, kind: str) -> list[tuple[str, str]]:
        """(stream index, client process id) for every sink input or source output."""
        streams = []  # [index, pid, owned by a client]
        for line in self._pactl("list", kind).splitlines():
            line = line.strip()
            if line.startswith(("Sink Input #", "Source Output #")):
                streams.append([line.split("#", 1)[1], "", True])
            elif line.startswith("Client:") and streams:
                streams[-1][2] = line.split(":", 1)[1].strip() != "n/a"
            elif line.startswith("application.process.id") and streams:
                streams[-1][1] = line.split("=", 1)[1].strip().strip('"')
        # a module's own stream (the remap source reading the mic's monitor) is part of the rig
        return [(index, pid) for index, pid, client in streams if client]

    def stop(self) -> None:
        subprocess.run(["bash", str(REPO / "scripts/pulse-down.sh")], env={**os.environ, **self.env},
                       capture_output=True, timeout=30)
        if self._own_runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)

CHUNK_BYTES = 480  # 10 ms at 24 kHz


class MonitorRecorder:
    """parec on the speaker's monitor; remembers when each chunk arrived (wall clock, ns)."""

    def __init__(self, env: dict[str, str], rate: int = 24_000, source: str = "voicebus_speaker.monitor") -> None:
        self.rate = rate
        self.proc = subprocess.Popen(["parec", f"--device={source}", f"--rate={rate}", "--channels=1",
                                      "--format=s16le", "--latency-msec=5", "--raw"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.data = bytearray()
        # (samples received so far, t_ns): each chunk's first sample at its arrival less its duration,
        # its last at its arrival
        self.stamps: list[tuple[int, int]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(CHUNK_BYTES)
            if not chunk:
                return
            before = len(self.data) // 2
            self.data += chunk
            self.stamp(before, len(self.data) // 2, time.time_ns())

    def stamp(self, before: int, after: int, arrived_ns: int) -> None:
        """Samples `before`..`after` arrived at `arrived_ns`. A monitor delivers nothing while its sink
        is idle (a player whose stream stopped): the samples after such a gap were played over their
        own duration before they arrived, not spread across the gap, as interpolating between arrivals
        alone would have them."""
        began = arrived_ns - (after - before) * 1_000_000_000 // self.rate
        self.stamps.append((before, max(began, self.stamps[-1][1] if self.stamps else began)))
        self.stamps.append((after, arrived_ns))

    def wait_for_samples(self, samples: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.data) // 2 < samples and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> np.ndarray:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        self._thread.join(timeout=2)
        return np.frombuffer(bytes(self.data[:len(self.data) // 2 * 2]), dtype="<i2").astype(np.float64)

    def index_at(self, t_ns: int) -> float:
        """Capture sample index that was arriving at wall time t_ns (interpolated over chunk arrivals)."""
        counts = np.array([s for s, _ in self.stamps], dtype=np.float64)
        times = np.array([t for _, t in self.stamps], dtype=np.float64)
        return float(np.interp(t_ns, times, counts))

    def time_of(self, index: float) -> float:
        counts = np.array([s for s, _ in self.stamps], dtype=np.float64)
        times = np.array([t for _, t in self.stamps], dtype=np.float64)
        return float(np.interp(index, counts, times))


def play_into_mic(env: dict[str, str], pcm: bytes, rate: int, tmp: Path) -> subprocess.Popen:
    path = write_wav(tmp / "to-mic.wav", pcm, rate)
    return subprocess.Popen(["paplay", "--device=voicebus_mic_in", str(path)], env=env)


def align(recording: np.ndarray, source: np.ndarray) -> tuple[int, float]:
    """(offset of `source` inside `recording`, normalised cross-correlation at that offset)."""
    n = len(recording) + len(source)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(recording, size) * np.conj(np.fft.rfft(source, size)), size)
    offset = int(np.argmax(corr[:len(recording)]))
    segment = recording[offset:offset + len(source)]
    usable = source[:len(segment)]
    ncc = float(np.dot(segment, usable) / (np.linalg.norm(segment) * np.linalg.norm(usable) + 1e-12))
    return offset, ncc


PLACED_NCC = 0.6  # a chunk matched at least this well says where the source is in the recording
LOUD = 1000.0  # a chunk quieter than this at its peak carries too little to be placed


@dataclass(frozen=True)
class Followed:
    """Where each loud chunk of a source was found in a recording, in order.

    One offset for a whole utterance (`align`) scores ~0.5 when a busy machine slips 20 ms of silence
    into the middle of playback, though every word was played. Following the source chunk by chunk
    tells the two apart: the content is there, in order, and `added_ms` says how much the glitches
    delayed it.
    """

    rate: int
    source_at: list[int]  # chunk starts in the source (samples)
    recording_at: list[int]  # where each chunk was found in the recording
    ncc: list[float]

    def clear_fraction(self, min_ncc: float = 0.9) -> float:
        return sum(n >= min_ncc for n in self.ncc) / len(self.ncc) if self.ncc else 0.0

    def _placed(self) -> list[tuple[int, int]]:
        """(source, recording) starts of the chunks placed with confidence: the map between the two."""
        return [(s, r) for s, r, n in zip(self.source_at, self.recording_at, self.ncc, strict=True) if n >= PLACED_NCC]

    @property
    def added_ms(self) -> float:
        """Delay the recording gained from the first placed chunk to the last (gaps minus drops)."""
        placed = self._placed()
        return 1000 * ((placed[-1][1] - placed[-1][0]) - (placed[0][1] - placed[0][0])) / self.rate if placed else 0.0

    def source_index(self, recording_index: float) -> float:
        """The source position being heard at `recording_index` (from the last chunk placed before it)."""
        placed = self._placed() or [(0, 0)]
        s, r = next((pair for pair in reversed(placed) if pair[1] <= recording_index), placed[0])
        return s + (recording_index - r)

    def recording_index(self, source_index: float) -> float:
        placed = self._placed() or [(0, 0)]
        s, r = next((pair for pair in reversed(placed) if pair[0] <= source_index), placed[0])
        return r + (source_index - s)

    def summary(self) -> str:
        worst = min(self.ncc) if self.ncc else 0.0
        return (f"{len(self.ncc)} chunks, {self.clear_fraction():.0%} at NCC>=0.9 (worst {worst:.2f}), "
                f"glitches added {self.added_ms:.0f} ms")


def _best_match(window: np.ndarray, piece: np.ndarray) -> tuple[int, float]:
    """(offset in window, NCC) of the best normalised match of `piece` anywhere in `window`."""
    corr = np.correlate(window, piece, mode="valid")
    energy = np.concatenate(([0.0], np.cumsum(window * window)))
    segment_norms = np.sqrt(np.maximum(energy[len(piece):] - energy[:-len(piece)], 0.0))
    piece_norm = np.linalg.norm(piece)
    audible = segment_norms > 0.01 * piece_norm  # silence matches nothing (and its norm is rounding noise)
    ncc = np.where(audible, corr / np.where(audible, segment_norms * piece_norm, 1.0), 0.0)
    at = int(np.argmax(ncc))
    return at, float(ncc[at])


def follow(recording: np.ndarray, source: np.ndarray, rate: int, chunk_ms: int = 100,
           early_ms: int = 20, late_ms: int = 300) -> Followed:
    """Place each loud `chunk_ms` of `source` in `recording`, each after the one before.

    Each chunk is searched from `early_ms` before to `late_ms` after where the previous lag puts
    it: a glitch only delays what follows (inserted silence), a recorder drop pulls it a little earlier.
    """
    chunk = rate * chunk_ms // 1000
    lag, _ = align(recording, source)
    first_search = rate * 300 // 1000
    source_at, recording_at, nccs = [], [], []
    for start in range(0, len(source) - chunk + 1, chunk):
        piece = source[start:start + chunk]
        if np.abs(piece).max() < LOUD:
            continue
        early = first_search if not nccs else rate * early_ms // 1000
        late = first_search if not nccs else rate * late_ms // 1000
        low = max(start + lag - early, 0)
        window = recording[low:start + lag + late + chunk]
        if len(window) < chunk:
            source_at.append(start)
            recording_at.append(start + lag)
            nccs.append(0.0)
            continue
        at, ncc = _best_match(window, piece)
        source_at.append(start)
        recording_at.append(low + at)
        nccs.append(ncc)
        if ncc >= PLACED_NCC:  # a confident placement moves the lag; a garbled chunk does not
            lag = low + at - start
    return Followed(rate, source_at, recording_at, nccs)


def player_health(client) -> dict:
    """The player's last heartbeat counters that explain glitches (underruns, late audio callbacks)."""
    beats = [m for m in client.seen if m.topic == "health.player"]
    keys = ("underruns", "output_underflows", "late_callbacks", "max_callback_gap_ms", "flushes")
    return {k: beats[-1].data.get(k) for k in keys} if beats else {}


class CpuBurner:
    """One busy-looping process per core at ordinary priority: a machine busy with someone else's work.

    Used as a context manager; `busy_fraction()` says how busy the cores really were meanwhile.
    """

    def __init__(self, processes: int | None = None) -> None:
        self.count = processes or os.cpu_count() or 2
        self.procs: list[subprocess.Popen] = []
        self._start_stat: tuple[int, int] = (0, 0)

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    def __enter__(self) -> CpuBurner:
        import sys

        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        self._start_stat = self._cpu_times()
        return self

    def busy_fraction(self) -> float:
        total, idle = self._cpu_times()
        spent = total - self._start_stat[0]
        return 1.0 - (idle - self._start_stat[1]) / spent if spent else 0.0

    def __exit__(self, *_exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
