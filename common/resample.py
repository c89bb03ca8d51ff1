"""Streaming, stateful resampling of s16le PCM to mono at a target rate — with no seams.

Resampling each chunk on its own (as the original notebook did with 300 ms chunks) restarts the
filter at every border: clicks, and near-silence with 10 ms chunks. Here the filter runs over one
continuous input history, so the concatenated output equals one-shot resampling of the whole signal.

Backends:
- `resampy` (default): resampy's own numba kernel (`_resample_loop_s`) with its filter table scaled
  once at construction. Output sample t sits at input time t * rate_in / rate_out exactly as in
  `resampy.resample`; it is emitted once the filter's right wing (~2 ms at 48 kHz) has arrived.
- `soxr`: `soxr.ResampleStream`, ~50x cheaper, compared to one-shot `soxr.resample`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Backend = Literal["resampy", "soxr"]
BACKENDS: tuple[Backend, ...] = ("resampy", "soxr")
S16_SCALE = 32768.0


def pcm_to_mono_float(pcm: bytes, channels: int) -> np.ndarray:
    """s16le interleaved bytes -> float32 mono in [-1, 1) (channels averaged)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / S16_SCALE
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


def float_to_pcm(samples: np.ndarray) -> bytes:
    """float in [-1, 1) -> s16le bytes, rounded and clipped."""
    return np.clip(np.rint(samples * S16_SCALE), -32768, 32767).astype("<i2").tobytes()


class _ResampyStream:
    """resampy's kernel over a sliding window of input, filter prepared once."""

    def __init__(self, rate_in: int, rate_out: int, filter_name: str) -> None:
        from resampy import interpn
        from resampy.filters import get_filter

        # the jitted loop itself: the public gufunc wrapper re-parses its signature on every call,
        # which costs more than the filtering for a 20 ms frame
        self._kernel = getattr(interpn, "_resample_loop_s", interpn.resample_f_s)
        interp_win, self._num_table, _ = get_filter(filter_name)
        ratio = rate_out / rate_in
        if ratio < 1:
            interp_win = ratio * interp_win
        self._win = interp_win
        self._delta = np.diff(interp_win, append=interp_win[-1])
        self._scale = min(1.0, ratio)
        self._step = float(rate_in) / float(rate_out)  # resampy's time_increment, same float
        index_step = int(self._scale * self._num_table)
        self.wing = math.ceil(len(interp_win) / index_step) + 1  # input samples each side
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

    def __init__(self, rate_in: int, rate_out: int = 24_000, channels: int = 1, backend: Backend = "resampy",
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


def resample_oneshot(mono: np.ndarray, rate_in: int, rate_out: int, backend: Backend = "resampy",
                     filter_name: str = "kaiser_best") -> np.ndarray:
    """The whole signal in one call: the reference the stream must reproduce."""
    if rate_in == rate_out:
        return mono.astype(np.float32, copy=True)
    if backend == "soxr":
        import soxr

        return soxr.resample(mono.astype(np.float32), rate_in, rate_out, quality="HQ")
    import resampy

    return resampy.resample(mono.astype(np.float32), rate_in, rate_out, filter=filter_name)
