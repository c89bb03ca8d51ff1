"""Streaming resampler: equals one-shot for any split, filters what must go, carries time through the bus."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.envelope import AudioHeader
from common.resample import BACKENDS, StreamResampler, float_to_pcm, pcm_to_mono_float, resample_oneshot
from common.stage import Output
from common.utterances import tone
from services.stages.resampler import ResampleStage

RATE_PAIRS = [(48000, 24000), (44100, 24000), (16000, 24000), (8000, 24000), (22050, 24000), (96000, 24000),
              (32000, 24000), (47999, 24000)]  # the last needs 24000 phases: weights per frame, no bank


# each backend's reference: the library's own one-shot call (polyphase restates resampy's filter)
REFERENCE = {"polyphase": "resampy", "resampy": "resampy", "soxr": "soxr"}


def _oneshot_pcm(pcm: bytes, rate_in: int, channels: int, backend: str, rate_out: int = 24000) -> np.ndarray:
    mono = pcm_to_mono_float(pcm, channels)
    backend = REFERENCE[backend]
    return np.frombuffer(float_to_pcm(resample_oneshot(mono, rate_in, rate_out, backend)), dtype="<i2")


def _split_points(draw, n: int, rate: int) -> list[int]:
    style = draw(st.sampled_from(["10ms", "20ms", "single", "random"]))
    if style == "10ms":
        return list(range(0, n, rate // 100))
    if style == "20ms":
        return list(range(0, n, rate // 50))
    if style == "single":
        return list(range(0, min(n, 300))) + list(range(300, n, 997))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=40))) | {0})
    return cuts


@st.composite
def signals_and_splits(draw):
    rate_in, rate_out = draw(st.sampled_from(RATE_PAIRS))
    channels = draw(st.sampled_from([1, 2]))
    seconds = draw(st.floats(0.05, 0.4))
    n = int(rate_in * seconds)
    seed = draw(st.integers(0, 2**32 - 1))
    samples = (np.random.default_rng(seed).standard_normal(n * channels) * 6000).clip(-32768, 32767).astype("<i2")
    cuts = _split_points(draw, n, rate_in)
    return rate_in, rate_out, channels, samples.tobytes(), cuts


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=signals_and_splits())
def test_streaming_equals_oneshot_for_any_split(backend, case):
    rate_in, rate_out, channels, pcm, cuts = case
    frame_bytes = 2 * channels
    stream = StreamResampler(rate_in, rate_out, channels, backend)
    bounds = [*cuts, len(pcm) // frame_bytes]
    out = b"".join(stream.feed(pcm[a * frame_bytes:b * frame_bytes]) for a, b in zip(bounds, bounds[1:], strict=False))
    out += stream.flush()
    streamed = np.frombuffer(out, dtype="<i2").astype(int)
    reference = _oneshot_pcm(pcm, rate_in, channels, backend, rate_out).astype(int)
    assert len(streamed) == len(reference)
    assert np.abs(streamed - reference).max(initial=0) <= 1


@pytest.mark.parametrize(("rate_in", "bound_ms"), [(48000, 2.5), (44100, 3.5)])
def test_default_backend_holds_back_only_the_filter_wing(rate_in, bound_ms):
    """Every 20 ms frame in gives (nearly) 20 ms out: what is held back is the filter's right wing
    (~2 ms) and at 44.1 kHz part of one 80-sample block (3.3 ms), never a large block (soxr's stream
    holds back 17-38 ms at these rates)."""
    stream = StreamResampler(rate_in, 24000, 1)
    frame = bytes(2 * rate_in // 50)
    held_ms = []
    for _ in range(50):
        stream.feed(frame)
        held_ms.append(1000 * (stream.samples_in / rate_in - stream.samples_out / 24000))
    assert max(held_ms) <= bound_ms, held_ms


def _snr_db(signal_: np.ndarray, reference: np.ndarray) -> float:
    noise = signal_ - reference
    return 10 * np.log10(np.sum(reference ** 2) / max(np.sum(noise ** 2), 1e-20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_1khz_stereo_44k1_becomes_clean_24k_mono_sine(backend):
    left = pcm_to_mono_float(tone(1000, 1.0, 44100), 1)
    stereo = float_to_pcm(np.stack([left, left], axis=1).reshape(-1))
    stream = StreamResampler(44100, 24000, 2, backend)
    out = b"".join(stream.feed(stereo[i:i + 1764 * 2]) for i in range(0, len(stereo), 1764 * 2)) + stream.flush()
    y = pcm_to_mono_float(out, 1).astype(np.float64)
    t = np.arange(len(y)) / 24000
    ideal = 0.5 * np.sin(2 * np.pi * 1000 * t)
    edge = 2400
    snr = _snr_db(y[edge:-edge], ideal[edge:-edge])
    print(f"{backend}: 1 kHz SNR {snr:.1f} dB")
    assert snr >= 80


@pytest.mark.parametrize("backend", BACKENDS)
def test_15khz_tone_above_new_nyquist_is_removed(backend):
    pcm = tone(15000, 1.0, 48000, amplitude=0.5)
    stream = StreamResampler(48000, 24000, 1, backend)
    out = b"".join(stream.feed(pcm[i:i + 1920]) for i in range(0, len(pcm), 1920)) + stream.flush()
    y = pcm_to_mono_float(out, 1)[2400:-2400]
    attenuation_db = 20 * np.log10(max(float(np.sqrt(np.mean(y ** 2))), 1e-9) / (0.5 / np.sqrt(2)))
    print(f"{backend}: 15 kHz attenuated {attenuation_db:.1f} dB")
    assert attenuation_db <= -60


def _mic_frames(pcm: bytes, rate: int, channels: int, frame_ms: int = 20, pts0: int = 0, t0: int = 10**18):
    samples_per_frame = rate * frame_ms // 1000
    step = samples_per_frame * 2 * channels
    for index, offset in enumerate(range(0, len(pcm), step)):
        pts = pts0 + index * samples_per_frame
        yield pcm[offset:offset + step], pts, t0 + int(pts * 1e9 / rate)


def test_handle_carries_pts_and_capture_time():
    stage = ResampleStage()
    stage.out, sent = Output.collecting("resample")
    out_mic, _ = Output.collecting("mic")
    pcm = tone(440, 1.0, 48000)
    t0 = 1_700_000_000_000_000_000
    for chunk, pts, t_capture in _mic_frames(pcm, 48000, 1, pts0=4800, t0=t0):
        stage.handle(out_mic.audio("audio.mic", chunk, rate=48000, channels=1, pts=pts, t_capture_ns=t_capture))
    stage.stop()
    headers = [m.header for m in sent]
    assert all(isinstance(h, AudioHeader) and h.rate == 24000 and h.channels == 1 for h in headers)
    assert headers[0].pts == 2400  # input pts 4800 at 48 kHz
    for previous, current, message in zip(headers, headers[1:], sent, strict=False):
        assert current.pts == previous.pts + message.samples  # contiguous
    for header in headers:  # output sample p sits at input sample 2p, captured at t0 + 2p / 48 kHz
        assert abs(header.t_capture_ns - (t0 + header.pts * 2 * 1e9 / 48000)) < 1e3
    total = sum(m.samples for m in sent)
    assert total == 24000


@pytest.mark.parametrize("channels", [1, 2])
def test_same_rate_passes_samples_through_and_only_mixes_channels(channels):
    """24 kHz in: mono comes out byte for byte (no float round trip), stereo as the channels' mean."""
    rng = np.random.default_rng(7)
    pcm = rng.integers(-32768, 32768, size=4800 * channels, dtype="<i2").tobytes()
    stream = StreamResampler(24000, 24000, channels)
    out = b"".join(stream.feed(pcm[offset:offset + 960 * channels]) for offset in range(0, len(pcm), 960 * channels))
    out += stream.flush()
    expected = pcm if channels == 1 else float_to_pcm(pcm_to_mono_float(pcm, channels))
    assert out == expected and stream.samples_in == stream.samples_out == 4800


def test_handle_bridges_small_gap_and_resets_on_format_change():
    stage = ResampleStage()
    stage.out, sent = Output.collecting("resample")
    mic, _ = Output.collecting("mic")
    frame = tone(440, 0.02, 48000)
    stage.handle(mic.audio("audio.mic", frame, rate=48000, channels=1, pts=0, t_capture_ns=1))
    stage.handle(mic.audio("audio.mic", frame, rate=48000, channels=1, pts=1920, t_capture_ns=1))  # 960 lost
    assert stage.bridged_samples == 960
    stage.handle(mic.audio("audio.mic", tone(440, 0.02, 16000), rate=16000, channels=1, pts=0, t_capture_ns=1))
    assert stage.resets == 1
    stage.stop()
    assert sum(m.samples for m in sent) == (0.02 * 3 * 24000) + 480  # 3 frames + the bridged 20 ms


def test_resample_stage_through_the_bus(procs, client_factory):
    stage = procs.voicebus("resample")
    client = client_factory(["audio.user", "health.resample"])
    client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
    stereo_rate = 44100
    left = pcm_to_mono_float(tone(700, 1.0, stereo_rate), 1)
    right = pcm_to_mono_float(tone(300, 1.0, stereo_rate), 1)
    pcm = float_to_pcm(np.stack([left, right], axis=1).reshape(-1))
    mic = Output("mic", "test", client.publisher.send)
    for chunk, pts, t_capture in _mic_frames(pcm, stereo_rate, 2, frame_ms=10):
        mic.audio("audio.mic", chunk, rate=stereo_rate, channels=2, pts=pts, t_capture_ns=t_capture)
    client.wait_for(lambda m: m.topic == "audio.user" and m.header.pts + m.samples >= 23000, timeout_s=20)
    stage.send_signal(signal.SIGTERM)  # the stage flushes the filter tail on the way out
    assert stage.wait(timeout=10) == 0
    client.collect(0.5)
    user = [m for m in client.seen if m.topic == "audio.user"]
    assert [m.header.pts for m in user] == list(np.cumsum([0] + [m.samples for m in user[:-1]]))
    streamed = np.frombuffer(b"".join(m.payload for m in user), dtype="<i2").astype(int)
    reference = _oneshot_pcm(pcm, stereo_rate, 2, "resampy").astype(int)
    assert len(streamed) == len(reference)
    assert np.abs(streamed - reference).max() <= 1


def test_a_stream_keeps_only_its_phase_rows_not_the_scaled_filter_table():
    """resampy's table scaled for a ratio, with its differences, is ~10 MB of float64 for kaiser_best;
    once a ratio's phase rows are built it is let go (every stage set carried it, though a browser's
    Opus arrives at 24 kHz). Only ratios with too many phases for a bank keep it, to weigh each frame."""
    from common.resample import phase_tables, scaled_filter

    scaled_filter.cache_clear()
    phase_tables.cache_clear()
    stream = StreamResampler(48_000, 24_000, 1)
    held = [value.nbytes for value in vars(stream._impl).values() if isinstance(value, np.ndarray)]
    assert max(held) < 64_000, held
    assert scaled_filter.cache_info().currsize == 0 and phase_tables.cache_info().currsize == 1
    odd = StreamResampler(44_099, 24_000, 1)  # 24000 phases: weights per frame, from the kept table
    assert odd._impl._bank is None and scaled_filter.cache_info().currsize == 1
