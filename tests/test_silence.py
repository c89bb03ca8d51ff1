"""Silence batching (common.silence): fewer messages while nobody speaks, the same samples, sound on time."""

from __future__ import annotations

import numpy as np
import pytest

from common.silence import SilenceBatcher
from common.stage import Output
from services.stages.mic import CapturedFrame, MicStage

RATE = 48_000
FRAME = 960  # 20 ms
FRAME_NS = 20_000_000


def tone_frame(amplitude: float, index: int) -> bytes:
    t = (np.arange(FRAME) + index * FRAME) / RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


def script(*parts: tuple[str, float]) -> list[bytes]:
    """("sound"|"silence", seconds) -> 20 ms frames; silence is a faint hiss, not zeros."""
    rng = np.random.default_rng(7)
    frames = []
    for kind, seconds in parts:
        for _ in range(round(seconds * 50)):
            if kind == "sound":
                frames.append(tone_frame(8000, len(frames)))
            else:
                frames.append((rng.normal(0, 20, FRAME)).astype("<i2").tobytes())  # about -64 dBFS
    return frames


def run(batcher: SilenceBatcher, frames: list[bytes]) -> list[tuple[int, list]]:
    """(index of the frame that released them, releases) for every push that released something."""
    out = []
    for index, pcm in enumerate(frames):
        releases = batcher.push(pcm, 10**18 + index * FRAME_NS)
        if releases:
            out.append((index, releases))
    return out


def test_same_samples_and_capture_times_fewer_messages():
    frames = script(("silence", 3.0), ("sound", 1.0), ("silence", 2.5), ("sound", 0.5), ("silence", 0.33))
    batcher = SilenceBatcher(RATE)
    released = run(batcher, frames)
    releases = [r for _, group in released for r in group] + batcher.flush()
    assert b"".join(r.pcm for r in releases) == b"".join(frames)  # nothing lost, nothing reordered
    first = 0
    for release in releases:  # each release is stamped with its first sample's capture time
        assert release.t_capture_ns == 10**18 + first * FRAME_NS
        first += release.frames
    assert first == len(frames)
    # silence: its first second frame by frame, then 100 ms (5 frames) at a time; sound frame by frame
    assert len(frames) == 150 + 50 + 125 + 25 + 16
    assert len(releases) == (50 + 100 // 5) + 50 + (50 + 75 // 5) + 25 + 16
    assert max(r.frames for r in releases) == 5
    assert batcher.counters()["silence_batches"] > 0


def test_sound_and_the_end_of_a_turn_go_out_frame_by_frame_at_once():
    frames = script(("silence", 3.04), ("sound", 1.0), ("silence", 2.0))
    released = dict(run(SilenceBatcher(RATE), frames))
    onset = 152  # the first frame with sound; 2 silent frames are held when it comes
    for index in range(onset, onset + 50 + 50):  # the sound, and the second of silence after it
        assert index in released, f"frame {index} was held"
        assert released[index][-1].frames == 1 and released[index][-1].pcm == frames[index]
    # at the onset, what was held goes out first, as a message of its own (not diluting the sound)
    assert [r.frames for r in released[onset]] == [2, 1]
    assert released[onset][0].pcm == b"".join(frames[onset - 2:onset])
    # the frame before sound came while batching: held, not sent
    assert onset - 1 not in released


def test_levels_and_off_switch():
    batcher = SilenceBatcher(RATE, level_dbfs=-50.0)
    assert batcher.is_silent(bytes(2 * FRAME))
    assert batcher.is_silent(tone_frame(32768 * 10 ** (-55 / 20) * np.sqrt(2), 0))  # -55 dBFS RMS
    assert not batcher.is_silent(tone_frame(32768 * 10 ** (-45 / 20) * np.sqrt(2), 0))  # -45 dBFS RMS
    frames = script(("silence", 3.0))
    off = SilenceBatcher(RATE, batch_ms=0)
    assert [len(group) for _, group in run(off, frames)] == [1] * len(frames)
    with pytest.raises(ValueError):
        SilenceBatcher(RATE, batch_ms=-1)


def test_mic_stage_publishes_batches_with_contiguous_pts():
    class Source:
        rate, channels, clock = RATE, 1, "callback"

        def start(self, put):
            pass

    stage = MicStage(Source())  # type: ignore[arg-type]
    stage.out, sent = Output.collecting("mic")
    stage.start()
    frames = script(("silence", 2.0), ("sound", 0.2), ("silence", 0.1))
    for index, pcm in enumerate(frames):
        stage.publish(CapturedFrame(pcm, 10**18 + index * FRAME_NS, t_callback_ns=10**18 + (index + 1) * FRAME_NS),
                      stage.out)
    stage._release_held(stage.out)  # what the end of a source does
    assert b"".join(m.payload for m in sent) == b"".join(frames)
    pts = [m.header.pts for m in sent]
    assert pts == [0, *np.cumsum([m.samples for m in sent])[:-1].tolist()]
    assert len(sent) < len(frames) and stage.counters()["silence_batched_frames"] > 0
    assert stage.frames == len(frames)
    # a batch is stamped with its first sample's capture time and the callback that released it
    batch = next(m for m in sent if m.samples > FRAME)
    first = batch.header.pts // FRAME
    assert batch.header.t_capture_ns == 10**18 + first * FRAME_NS
    assert batch.header.extra["t_callback_ns"] == 10**18 + (first + batch.samples // FRAME) * FRAME_NS
