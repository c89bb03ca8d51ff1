"""Test-side audio: record the virtual speaker with wall-clock stamps, play into the virtual mic,
and align signals by cross-correlation (never by wall clock alone)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from common.wavio import write_wav

CHUNK_BYTES = 480  # 10 ms at 24 kHz


class MonitorRecorder:
    """parec on the speaker's monitor; remembers when each chunk arrived (wall clock, ns)."""

    def __init__(self, env: dict[str, str], rate: int = 24_000, source: str = "voicebus_speaker.monitor") -> None:
        self.rate = rate
        self.proc = subprocess.Popen(["parec", f"--device={source}", f"--rate={rate}", "--channels=1",
                                      "--format=s16le", "--latency-msec=5", "--raw"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.data = bytearray()
        self.stamps: list[tuple[int, int]] = []  # (samples received so far, arrival t_ns)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(CHUNK_BYTES)
            if not chunk:
                return
            self.data += chunk
            self.stamps.append((len(self.data) // 2, time.time_ns()))

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
