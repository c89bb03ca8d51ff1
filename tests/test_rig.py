"""The audio checks themselves: `follow` must pass what was played with a glitch and fail what was not played."""

from __future__ import annotations

import numpy as np

from common.utterances import speech_pcm
from tests.support.rig import align, follow

RATE = 24_000


def _speech(text: str) -> np.ndarray:
    return np.frombuffer(speech_pcm(text, "slt", RATE), "<i2").astype(np.float64)


def _silence(ms: float) -> np.ndarray:
    return np.zeros(int(RATE * ms / 1000))


def test_follow_places_every_chunk_of_a_clean_recording():
    source = _speech("how far away is the moon from the earth")
    followed = follow(np.concatenate([_silence(700), source, _silence(300)]), source, RATE)
    assert followed.clear_fraction() == 1.0 and abs(followed.added_ms) < 1
    assert abs(followed.recording_index(0) - RATE * 0.7) < 2


def test_follow_sees_through_the_silence_a_busy_machine_slips_in():
    source = _speech("how far away is the moon from the earth")
    third = len(source) // 3
    glitched = np.concatenate([_silence(500), source[:third], _silence(20), source[third:2 * third], _silence(18),
                               source[2 * third:], _silence(300)])
    assert align(glitched, source)[1] < 0.9  # one offset for the whole: the words look half missing
    followed = follow(glitched, source, RATE)
    assert followed.clear_fraction() >= 0.8 and 30 <= followed.added_ms <= 45, followed.summary()
    # positions map across the glitches: the last third is 38 ms later than one offset would put it
    late = 2 * third + RATE // 10
    assert abs(followed.recording_index(late) - (late + RATE * (0.5 + 0.038))) < 2


def test_follow_fails_other_words_noise_and_silence():
    source = _speech("how far away is the moon from the earth")
    for recording in (np.concatenate([_silence(500), _speech("please turn on the lights in the kitchen")]),
                      np.random.default_rng(7).normal(0, 3000, len(source) + RATE),
                      _silence(3000)):
        assert follow(recording, source, RATE).clear_fraction() < 0.3
