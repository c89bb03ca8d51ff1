"""Timing markers: a short chirp whose arrival can be found in any recording by correlation.

The pipeline benchmark puts one in the lead-in of every spoken question and the simulator puts one
at the start of every spoken reply, so each leg (mouth -> server, server -> ear) is measured where
the sound is, not inferred from logs. A linear chirp has one sharp correlation peak, survives
resampling (it stays below 6 kHz) and is too short (30 ms) for the server's VAD to call speech.
"""

from __future__ import annotations

import numpy as np

DURATION_S = 0.03
LOW_HZ, HIGH_HZ = 800.0, 5000.0
AMPLITUDE = 0.5
MIN_NCC = 0.6  # below this a correlation peak is not the marker


def chirp(rate: int) -> np.ndarray:
    """The marker at `rate`, float in [-1, 1], Hann-windowed so it has no clicks of its own."""
    t = np.arange(int(DURATION_S * rate)) / rate
    phase = 2 * np.pi * (LOW_HZ * t + (HIGH_HZ - LOW_HZ) * t * t / (2 * DURATION_S))
    return (AMPLITUDE * np.hanning(len(t)) * np.sin(phase)).astype(np.float32)


def chirp_pcm(rate: int) -> bytes:
    return np.clip(np.rint(chirp(rate) * 32768), -32768, 32767).astype("<i2").tobytes()


def find(signal: np.ndarray, rate: int, min_ncc: float = MIN_NCC) -> list[tuple[int, float]]:
    """Every marker in `signal` (float or int samples at `rate`): [(start index, ncc)], in order."""
    template = chirp(rate).astype(np.float64)
    x = np.asarray(signal, dtype=np.float64)
    n = len(template)
    if len(x) < n:
        return []
    size = 1 << (len(x) + n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(template, size)), size)[:len(x) - n + 1]
    energy = np.sqrt(np.maximum(np.convolve(x * x, np.ones(n), "valid"), 1e-12))
    ncc = corr / (energy * np.linalg.norm(template))
    found: list[tuple[int, float]] = []
    for index in np.flatnonzero(ncc >= min_ncc):
        if found and index - found[-1][0] < n:  # same marker: keep its best alignment
            if ncc[index] > found[-1][1]:
                found[-1] = (int(index), float(ncc[index]))
            continue
        found.append((int(index), float(ncc[index])))
    return found


class StreamFinder:
    """Finds markers in audio that arrives in pieces (the simulator's input), with arrival times."""

    def __init__(self, rate: int, keep_s: float = 1.0) -> None:
        self.rate = rate
        self.size = len(chirp(rate))
        self.keep = int(keep_s * rate)
        self.samples = np.zeros(0, dtype=np.float64)
        self.start = 0  # absolute index of samples[0]
        self.arrivals: list[tuple[int, int]] = []  # (absolute end index of a piece, arrival t_ns)
        self.last_found = -10 * self.size

    def feed(self, pcm: bytes, t_ns: int) -> list[dict[str, float]]:
        """Add a piece; returns markers completed by it: start index and the arrival of their end."""
        piece = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768
        self.samples = np.concatenate([self.samples, piece])
        end = self.start + len(self.samples)
        self.arrivals.append((end, t_ns))
        out = []
        # only where a marker could end in this piece: the piece and one marker's length before it
        tail_from = max(0, len(self.samples) - len(piece) - self.size)
        for index, ncc in find(self.samples[tail_from:], self.rate):
            absolute = self.start + tail_from + index
            if absolute - self.last_found < 4 * self.size:
                continue
            marker_end = absolute + self.size
            arrival = next(t for piece_end, t in self.arrivals if piece_end >= marker_end)
            out.append({"index": absolute, "ncc": round(ncc, 3), "end_arrival_ns": arrival})
            self.last_found = absolute
        drop = max(0, len(self.samples) - self.keep)
        if drop:
            self.samples = self.samples[drop:]
            self.start += drop
            self.arrivals = [(e, t) for e, t in self.arrivals if e > self.start]
        return out
