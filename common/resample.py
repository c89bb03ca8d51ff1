"""Streaming, stateful resampling of s16le PCM to mono at a target rate — with no seams.

Resampling each chunk on its own (as the original notebook did with 300 ms chunks) restarts the
filter at every border: clicks, and near-silence with 10 ms chunks. Here the filter runs over one
continuous input history, so the concatenated output equals one-shot resampling of the whole signal.

Backends:
- `polyphase` (default): resampy's filter (kaiser_best) as a bank of per-phase FIR rows, applied with
  numpy; the same output as `resampy.resample` to within 0.01 LSB, ~20 us per 20 ms frame, no numba
  (resampy's kernel costs ~110 MB of LLVM in every process that imports it). Like resampy it holds
  back only the filter's right wing (~2 ms).
- `resampy`: resampy's own numba kernel (`_resample_loop_s`) with its filter table scaled
  once at construction. Output sample t sits at input time t * rate_in / rate_out exactly as in
  `resampy.resample`; it is emitted once the filter's right wing (~2 ms at 48 kHz) has arrived.
- `soxr`: `soxr.ResampleStream`, compared to one-shot `soxr.resample`. Cheap, but it works in
  blocks: at 48 kHz it emits every other 20 ms frame and holds back 17-38 ms, latency the user
  would hear as a slower answer, so it is not the default.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

Backend = Literal["polyphase", "resampy", "soxr"]
BACKENDS: tuple[Backend, ...] = ("polyphase", "resampy", "soxr")
DEFAULT_BACKEND: Backend = "polyphase"
FILTERS = ("kaiser_best", "kaiser_fast")
S16_SCALE = 32768.0
MAX_PHASE_BANK = 4096  # rates whose ratio needs more phases get their weights per frame instead
# Up to this many phases (L), outputs are computed a block of L at a time as one matrix product
# over a strided view of the input: no gathers, a handful of numpy calls per frame (each costs far
# more from a cold cache, 50 times a second, than its arithmetic). A block is L output samples, so
# this also bounds the extra hold-back: 80 samples = 3.3 ms (44.1 kHz; 48, 32, 16, 8 kHz: L <= 3).
MAX_BLOCK_PHASES = 80
_S16_INVERSE = np.float32(1 / S16_SCALE)


def pcm_to_mono_float(pcm: bytes, channels: int) -> np.ndarray:
    """s16le interleaved bytes -> float32 mono in [-1, 1) (channels averaged)."""
    samples = np.multiply(np.frombuffer(pcm, dtype="<i2"), _S16_INVERSE, dtype=np.float32)  # exact: a power of 2
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


def float_to_pcm(samples: np.ndarray) -> bytes:
    """float in [-1, 1) -> s16le bytes, rounded and clipped (ufuncs in place: np.clip's Python
    wrappers cost more than its arithmetic on a 20 ms frame)."""
    scaled = samples * S16_SCALE  # a new array, in the input's precision
    np.rint(scaled, out=scaled)
    np.maximum(scaled, -32768, out=scaled)
    np.minimum(scaled, 32767, out=scaled)
    return scaled.astype("<i2").tobytes()


@dataclass(frozen=True)
class ScaledFilter:
    """resampy's filter as its kernel uses it for one ratio: the table (scaled by the ratio when
    downsampling), its differences for linear interpolation, the step between taps in the table,
    and W, the input samples each side of an output it reaches. Both resampy-filter backends
    start from this, so they cannot disagree on it."""

    win: np.ndarray
    delta: np.ndarray
    num_table: int
    scale: float
    index_step: int
    wing: int

    @classmethod
    def for_ratio(cls, win: np.ndarray, num_table: int, rate_in: int, rate_out: int) -> ScaledFilter:
        ratio = rate_out / rate_in
        if ratio < 1:
            win = ratio * win
        scale = min(1.0, ratio)
        index_step = int(scale * num_table)
        return cls(win, np.diff(win, append=win[-1]), int(num_table), scale, index_step,
                   math.ceil(len(win) / index_step) + 1)


class _ResampyStream:
    """resampy's kernel over a sliding window of input, filter prepared once."""

    def __init__(self, rate_in: int, rate_out: int, filter_name: str) -> None:
        from resampy import interpn
        from resampy.filters import get_filter

        # the jitted loop itself: the public gufunc wrapper re-parses its signature on every call,
        # which costs more than the filtering for a 20 ms frame
        self._kernel = getattr(interpn, "_resample_loop_s", interpn.resample_f_s)
        interp_win, num_table, _ = get_filter(filter_name)
        scaled = ScaledFilter.for_ratio(interp_win, num_table, rate_in, rate_out)
        self._win, self._delta, self._num_table, self._scale = scaled.win, scaled.delta, scaled.num_table, scaled.scale
        self._step = float(rate_in) / float(rate_out)  # resampy's time_increment, same float
        self.wing = scaled.wing  # input samples each side
        self._rate_in, self._rate_out = rate_in, rate_out
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # absolute input index of _buf[0]
        self._received = 0  # input samples so far
        self._emitted = 0  # output samples so far

    def _run(self, t_end: int) -> np.ndarray:
        if t_end <= self._emitted:
            return np.zeros(0, dtype=np.float32)
        t_out = np.arange(self._emitted, t_end) * self._step - self._buf_start  # exact: integer shift
        y = np.zeros(len(t_out), dtype=np.float32)
        self._kernel(self._buf, t_out, self._win, self._delta, self._num_table, self._scale, y)
        self._emitted = t_end
        keep_from = max(0, int(self._emitted * self._step) - self.wing - 1 - self._buf_start)
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._buf_start += keep_from
        return y

    def feed(self, x: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, x.astype(np.float32, copy=False)])
        self._received += len(x)
        # output t is final once input up to floor(t*step) + wing has arrived
        last_ready = math.floor((self._received - 1 - self.wing) / self._step)
        total = self._received * self._rate_out // self._rate_in
        return self._run(max(self._emitted, min(last_ready + 1, total)))

    def flush(self) -> np.ndarray:
        # one-shot resampy.resample returns int(n * rate_out / rate_in) samples
        return self._run(int(self._received * float(self._rate_out) / float(self._rate_in)))


def load_filter(name: str) -> tuple[np.ndarray, int]:
    """resampy's precomputed filter (right wing, table precision), read from the file resampy ships
    without importing resampy, whose import compiles numba. Not kept: 3.3 MB for kaiser_best, while
    what a stream filters with is derived from it once per ratio (`phase_tables`)."""
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; choose from {', '.join(FILTERS)}")
    spec = importlib.util.find_spec("resampy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("resampy is not installed: its filter tables are needed (pip install resampy)")
    with np.load(Path(spec.submodule_search_locations[0]) / "data" / f"{name}.npz") as data:
        return data["half_window"].astype(np.float64), int(data["precision"])


@lru_cache(maxsize=8)
def scaled_filter(name: str, rate_in: int, rate_out: int) -> ScaledFilter:
    """The filter for one ratio, kept for the streams that read it at every frame (resampy's kernel,
    and polyphase ratios with too many phases for a bank). Read-only: every stream of that ratio
    reads the same arrays."""
    scaled = ScaledFilter.for_ratio(*load_filter(name), rate_in, rate_out)
    scaled.win.setflags(write=False)
    scaled.delta.setflags(write=False)
    return scaled


def _wing(scaled: ScaledFilter, frac: np.ndarray) -> np.ndarray:
    """One wing's weights for fractional offsets `frac` (scaled), shape (len(frac), W)."""
    index = frac * scaled.num_table
    offset = index.astype(np.int64)
    eta = index - offset
    taps = offset[:, None] + np.arange(scaled.wing)[None, :] * scaled.index_step
    # resampy's loop bound: i < (nwin - offset) // index_step
    valid = np.arange(scaled.wing)[None, :] < ((len(scaled.win) - offset) // scaled.index_step)[:, None]
    taps = np.where(valid, taps, 0)
    return np.where(valid, scaled.win[taps] + eta[:, None] * scaled.delta[taps], 0.0)


def _weights(scaled: ScaledFilter, up: int, phases: np.ndarray) -> np.ndarray:
    """Rows of 2W weights for these phases of L = `up`."""
    frac = scaled.scale * (phases / up)
    left, right = _wing(scaled, frac), _wing(scaled, scaled.scale - frac)
    # left wing tap i weighs x[n - i], right wing tap k weighs x[n + 1 + k]
    return np.concatenate([left[:, ::-1], right], axis=1).astype(np.float32)


@dataclass(frozen=True)
class PhaseTables:
    """What a polyphase stream of one ratio L/M filters with: W, the bank of L rows (None past
    `MAX_PHASE_BANK`: weights per frame instead) and the block matrix (None past `MAX_BLOCK_PHASES`)."""

    wing: int
    bank: np.ndarray | None
    block: np.ndarray | None


@lru_cache(maxsize=8)
def phase_tables(name: str, rate_in: int, rate_out: int) -> PhaseTables:
    """Built once per process and ratio (8-11 ms of numpy) and kept: 1.6 kB for 48 -> 24 kHz, 165 kB for
    44.1 kHz. The scaled table they come from (~10 MB of float64 with its differences) is let go, so a
    browser's web stage, whose Opus arrives at 24 kHz, and the zygote that forks it carry none of it."""
    divisor = math.gcd(rate_in, rate_out)
    up, down = rate_out // divisor, rate_in // divisor
    if up > MAX_PHASE_BANK:  # weights per frame: the stream reads the kept table, built once here
        return PhaseTables(scaled_filter(name, rate_in, rate_out).wing, None, None)
    scaled = ScaledFilter.for_ratio(*load_filter(name), rate_in, rate_out)
    bank = _weights(scaled, up, np.arange(up))
    block = None
    if up <= MAX_BLOCK_PHASES:
        # (span, L): column p weighs the inputs of a block's p-th output (base floor(pM/L))
        offsets = np.arange(up) * down // up
        block = np.zeros((int(offsets[-1]) + 2 * scaled.wing, up), dtype=np.float32)
        for p, offset in enumerate(offsets):
            block[offset:offset + 2 * scaled.wing, p] = bank[(p * down) % up]
    bank.setflags(write=False)
    if block is not None:
        block.setflags(write=False)
    return PhaseTables(scaled.wing, bank, block)


class _PolyphaseStream:
    """resampy's band-limited interpolation, restated for a rational ratio L/M as L fixed FIR rows.

    Output sample k sits at input time k*M/L (resampy's convention): base n = floor(k*M/L), phase
    p = k*M mod L. Row p holds the weights for x[n-W+1 .. n+W], computed with resampy's own table
    lookup and linear interpolation, so each output is one dot product.
    """

    def __init__(self, rate_in: int, rate_out: int, filter_name: str) -> None:
        divisor = math.gcd(rate_in, rate_out)
        self._up, self._down = rate_out // divisor, rate_in // divisor
        self._rate_in, self._rate_out = rate_in, rate_out
        tables = phase_tables(filter_name, rate_in, rate_out)
        self.wing, self._bank, self._block = tables.wing, tables.bank, tables.block  # W: input samples each side
        self._filter = scaled_filter(filter_name, rate_in, rate_out) if self._bank is None else None
        self._buf = np.zeros(self.wing - 1, dtype=np.float32)  # zeros before the first sample
        self._buf_start = -(self.wing - 1)  # absolute input index of _buf[0]
        self._received = 0
        self._emitted = 0

    def _run(self, end: int) -> np.ndarray:
        """Outputs [emitted, end) one by one (phases gathered): for ratios with many phases."""
        if end <= self._emitted:
            return np.zeros(0, dtype=np.float32)
        k = np.arange(self._emitted, end, dtype=np.int64)
        base, phase = np.divmod(k * self._down, self._up)
        rows = self._bank[phase] if self._bank is not None else _weights(self._filter, self._up, phase)
        windows = sliding_window_view(self._buf, 2 * self.wing)[base - self.wing + 1 - self._buf_start]
        out = np.einsum("ij,ij->i", windows, rows, dtype=np.float32)
        self._emitted = end
        self._trim((end * self._down) // self._up - self.wing + 1)
        return out

    def _run_blocks(self, blocks_end: int) -> np.ndarray:
        """Blocks [done, blocks_end): block j is outputs jL..jL+L-1, from inputs jM-W+1 on."""
        first = self._emitted // self._up
        count = blocks_end - first
        if count <= 0:
            return np.zeros(0, dtype=np.float32)
        start = first * self._down - self.wing + 1 - self._buf_start
        view = as_strided(self._buf[start:], shape=(count, self._block.shape[0]),
                          strides=(self._down * self._buf.itemsize, self._buf.itemsize), writeable=False)
        out = np.dot(view, self._block).reshape(-1)  # np.dot: BLAS, ~4x faster than @ on this strided view
        self._emitted = blocks_end * self._up
        self._trim(blocks_end * self._down - self.wing + 1)
        return out

    def _trim(self, first_needed: int) -> None:
        keep_from = first_needed - self._buf_start
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._buf_start += keep_from

    def feed(self, x: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, x.astype(np.float32, copy=False)])
        self._received += len(x)
        if self._block is not None:
            # block j is complete once input jM - W + span - 1 has arrived
            ready = (self._received + self.wing - 1 - self._block.shape[0]) // self._down + 1
            return self._run_blocks(ready) if ready > self._emitted // self._up else np.zeros(0, dtype=np.float32)
        # output k is final once input up to floor(k*M/L) + W has arrived: k*M < (received - W) * L
        ready = max(0, -(-(self._received - self.wing) * self._up // self._down))
        total = self._received * self._rate_out // self._rate_in
        return self._run(max(self._emitted, min(ready, total)))

    def flush(self) -> np.ndarray:
        """The rest, as one-shot resampling would end it (the input's end padded with zeros)."""
        self._buf = np.concatenate([self._buf, np.zeros(2 * self.wing + self._down, dtype=np.float32)])
        total = self._received * self._rate_out // self._rate_in
        if self._block is None:
            return self._run(total)
        already = self._emitted
        out = self._run_blocks(-(-total // self._up)) if total > already else np.zeros(0, dtype=np.float32)
        # blocks may have gone past the one-shot length: `already` was exact or beyond it
        return out[:max(0, total - already)]


class _SoxrStream:
    def __init__(self, rate_in: int, rate_out: int, quality: str = "HQ") -> None:
        import soxr

        self._stream = soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality=quality)

    def feed(self, x: np.ndarray) -> np.ndarray:
        return self._stream.resample_chunk(x.astype(np.float32, copy=False), last=False)

    def flush(self) -> np.ndarray:
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


class StreamResampler:
    """Feed s16le bytes (any rate, any channel count), get mono s16le at `rate_out`; flush at the end."""

    def __init__(self, rate_in: int, rate_out: int = 24_000, channels: int = 1, backend: Backend = DEFAULT_BACKEND,
                 filter_name: str = "kaiser_best") -> None:
        if rate_in <= 0 or rate_out <= 0 or channels <= 0:
            raise ValueError(f"bad format: rate_in={rate_in} rate_out={rate_out} channels={channels}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.rate_in, self.rate_out, self.channels, self.backend = rate_in, rate_out, channels, backend
        self.samples_in = 0
        self.samples_out = 0
        if rate_in == rate_out:
            self._impl = None
        elif backend == "polyphase":
            self._impl = _PolyphaseStream(rate_in, rate_out, filter_name)
        elif backend == "soxr":
            self._impl = _SoxrStream(rate_in, rate_out)
        else:
            self._impl = _ResampyStream(rate_in, rate_out, filter_name)

    def feed_float(self, mono: np.ndarray) -> np.ndarray:
        self.samples_in += len(mono)
        out = mono.astype(np.float32, copy=False) if self._impl is None else self._impl.feed(mono)
        self.samples_out += len(out)
        return out

    def feed(self, pcm: bytes) -> bytes:
        if self._impl is None and self.channels == 1:  # already the output format: s16 -> float -> s16 is exact
            samples = len(pcm) // 2
            self.samples_in += samples
            self.samples_out += samples
            return bytes(pcm[:samples * 2])
        return float_to_pcm(self.feed_float(pcm_to_mono_float(pcm, self.channels)))

    def flush_float(self) -> np.ndarray:
        out = np.zeros(0, dtype=np.float32) if self._impl is None else self._impl.flush()
        self.samples_out += len(out)
        return out

    def flush(self) -> bytes:
        return float_to_pcm(self.flush_float())

    def input_position(self, output_index: int) -> float:
        """Input sample index (fractional) that output sample `output_index` is centred on."""
        return output_index * self.rate_in / self.rate_out


def resample_oneshot(mono: np.ndarray, rate_in: int, rate_out: int, backend: Backend = DEFAULT_BACKEND,
                     filter_name: str = "kaiser_best") -> np.ndarray:
    """The whole signal in one call. For `resampy` and `soxr` this is the library's own one-shot
    function, the reference their streams must reproduce; `polyphase` is its stream fed once
    (its reference is `resampy`)."""
    if rate_in == rate_out:
        return mono.astype(np.float32, copy=True)
    if backend == "polyphase":
        stream = _PolyphaseStream(rate_in, rate_out, filter_name)
        return np.concatenate([stream.feed(mono), stream.flush()])
    if backend == "soxr":
        import soxr

        return soxr.resample(mono.astype(np.float32), rate_in, rate_out, quality="HQ")
    import resampy

    return resampy.resample(mono.astype(np.float32), rate_in, rate_out, filter=filter_name)
