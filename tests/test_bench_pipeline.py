"""bench_pipeline's user-perceived leg on recordings made to order: measured from the question's end to the
first reply marker after it, and every turn it cannot measure is listed with why (never read as 0 ms)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from services.simulator import markers
from tests.support.rig import MonitorRecorder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_pipeline  # noqa: E402

T0_NS = 1_000_000_000_000
RATE_MIC, RATE_SPEAKER = 48_000, 24_000


def _recording(pcm: np.ndarray, rate: int) -> MonitorRecorder:
    """A capture with a steady clock: sample i arrived at T0 + i / rate (no parec behind it)."""
    recorder = MonitorRecorder.__new__(MonitorRecorder)
    recorder.rate = rate
    recorder.stamps = [(0, T0_NS), (len(pcm), T0_NS + int(len(pcm) / rate * 1e9))]
    return recorder


def _at(rate: int, seconds: float) -> int:
    return int(seconds * rate)


def _mic() -> np.ndarray:
    """Marker at 1.0 s, then speech (loud noise) from 1.2 to 2.5 s, in a 6 s window."""
    mic = np.zeros(_at(RATE_MIC, 6.0))
    chirp = markers.chirp(RATE_MIC) * 32767
    mic[_at(RATE_MIC, 1.0):_at(RATE_MIC, 1.0) + len(chirp)] = chirp
    mic[_at(RATE_MIC, 1.2):_at(RATE_MIC, 2.5)] = np.random.default_rng(3).normal(0, 3000, _at(RATE_MIC, 1.3))
    return mic


def _speaker(replies_at: list[float], loud_until: float | None = None) -> np.ndarray:
    """A reply marker (then a loud reply) at each time; `loud_until` extends the last reply's sound."""
    speaker = np.zeros(_at(RATE_SPEAKER, 6.0))
    chirp = markers.chirp(RATE_SPEAKER) * 32767
    for at in replies_at:
        start = _at(RATE_SPEAKER, at)
        speaker[start:start + len(chirp)] = chirp
        end = _at(RATE_SPEAKER, loud_until if loud_until is not None and at == replies_at[-1] else at + 0.5)
        speaker[start + len(chirp):end] = 2000 * np.sin(np.arange(end - start - len(chirp)) * 0.2)
    return speaker


def _analyse(name: str, speaker: np.ndarray, work: Path = Path(".")) -> dict:
    mic = _mic()
    contender = bench_pipeline.Contender(name=name, rig=None, work=work, speaker=_recording(speaker, RATE_SPEAKER),
                                         mic=_recording(mic, RATE_MIC))
    contender.windows = [(T0_NS, T0_NS + 6_000_000_000)]
    [turn] = bench_pipeline.analyse(contender, speaker, mic, sim_log="")
    return turn


def test_user_perceived_is_the_question_end_to_the_first_reply_after_it():
    turn = _analyse("voicebus", _speaker([3.0]))
    speech_end_s = 2.5  # the last loud sample of the question
    assert turn["unmeasured"] is None and abs(turn["perceived_ms"] - (3.0 - speech_end_s) * 1000) < 2, turn


def test_a_speaker_already_playing_when_the_question_ended_is_not_a_0_ms_reply():
    turn = _analyse("pipecat", _speaker([2.3], loud_until=2.8))  # answered the lead-in, still talking at 2.5 s
    assert turn["perceived_ms"] is None, turn
    assert turn["unmeasured"].startswith("the speaker was already playing when the question ended"), turn
    assert "(a reply began 200 ms before)" in turn["unmeasured"], turn
    # an earlier reply that had ended is not in the way: the one after the question is measured
    turn = _analyse("pipecat", _speaker([0.5, 3.2]))
    assert turn["unmeasured"] is None and abs(turn["perceived_ms"] - 700) < 2, turn


def test_a_turn_with_no_reply_or_no_question_found_says_so(tmp_path):
    assert _analyse("livekit", _speaker([]))["unmeasured"] == "no reply marker at the speaker after the question ended"
    (tmp_path / "floor.log").write_text("")  # the floor's own log of its markers: none
    assert _analyse("floor", _speaker([3.0]), tmp_path)["unmeasured"] == "the floor does not reply"
    silent_mic = bench_pipeline.Contender(name="voicebus", rig=None, work=Path("."),
                                          speaker=_recording(_speaker([3.0]), RATE_SPEAKER),
                                          mic=_recording(np.zeros(_at(RATE_MIC, 6.0)), RATE_MIC))
    silent_mic.windows = [(T0_NS, T0_NS + 6_000_000_000)]
    [turn] = bench_pipeline.analyse(silent_mic, _speaker([3.0]), np.zeros(_at(RATE_MIC, 6.0)), sim_log="")
    assert turn["unmeasured"] == "the question's marker or speech was not found at the mic", turn


def test_the_same_turns_are_compared_across_systems_and_the_rest_listed():
    measured = {"mouth_server_ms": None, "server_ear_ms": None, "unmeasured": None}
    results = {name: {"turns": turns, "barge_in_ms": [], "cpu_listening_pct": 1.0, "cpu_talking_pct": 1.0,
                      "rss_mb": 1, "pss_mb": 1, "processes": {}}
               for name, turns in (
                   ("voicebus", [{**measured, "perceived_ms": 500.0}, {**measured, "perceived_ms": 600.0}]),
                   ("pipecat", [{**measured, "perceived_ms": None, "unmeasured": "no reply marker at the speaker "
                                 "after the question ended"}, {**measured, "perceived_ms": 700.0}]),
                   ("floor", [{**measured, "perceived_ms": None, "unmeasured": "the floor does not reply"}] * 2))}
    rows = bench_pipeline.summarize(results)
    assert rows["voicebus"]["perceived_common_ms"] == [600.0] and rows["pipecat"]["perceived_common_ms"] == [700.0]
    assert rows["voicebus"]["common_turns"] == [2] and rows["pipecat"]["unmeasured"] == {
        1: "no reply marker at the speaker after the question ended"}
    table = bench_pipeline.render(rows, 2, 0)
    assert "- pipecat, turn 1: no reply marker at the speaker after the question ended" in table
    assert "the floor does not reply" not in table  # the floor is the rig, not a system that replies


def test_a_recording_that_stopped_while_its_sink_was_idle_keeps_its_clock():
    """An idle sink's monitor delivers nothing (a player that stopped its stream): what arrives after
    the gap is placed just before its arrival, not smeared across the gap."""
    recorder = MonitorRecorder.__new__(MonitorRecorder)
    recorder.rate, recorder.stamps = RATE_SPEAKER, []
    ten_ms = RATE_SPEAKER // 100
    for k in range(1, 11):  # 100 ms arriving steadily, 10 ms at a time
        recorder.stamp((k - 1) * ten_ms, k * ten_ms, T0_NS + k * 10_000_000)
    resumed_ns = T0_NS + 3_100_000_000  # 3 s of nothing, then 10 ms more
    recorder.stamp(10 * ten_ms, 11 * ten_ms, resumed_ns)
    assert abs(recorder.time_of(10 * ten_ms + ten_ms / 2) - (resumed_ns - 5_000_000)) < 1_000
    assert recorder.index_at(T0_NS + 1_500_000_000) == 10 * ten_ms  # the gap holds no samples
    assert abs(recorder.time_of(5 * ten_ms) - (T0_NS + 50_000_000)) < 1_000  # the steady part as before
