"""Test speech: flite utterances, cached per test session, at any rate."""

from __future__ import annotations

import functools

import numpy as np

from common.resample import float_to_pcm
from common.speech import synthesize

SENTENCES = [
    ("what is the weather like today", "slt"),
    ("please tell me a short story", "rms"),
    ("how far away is the moon", "awb"),
    ("turn on the lights in the kitchen", "slt"),
    ("what time does the train leave", "rms"),
    ("can you help me with my homework", "awb"),
    ("i would like to order a pizza", "slt"),
    ("where is the nearest hospital", "rms"),
    ("play some music for me", "awb"),
    ("what is the capital of france", "kal16"),
    ("remind me to call my mother tomorrow", "slt"),
    ("how do i make a cup of tea", "rms"),
]


@functools.lru_cache(maxsize=64)
def speech_pcm(text: str, voice: str = "slt", rate: int = 24_000) -> bytes:
    return synthesize(text, voice, rate)


def with_silence(pcm: bytes, rate: int, lead_s: float = 0.5, tail_s: float = 1.0) -> bytes:
    return bytes(int(rate * lead_s) * 2) + pcm + bytes(int(rate * tail_s) * 2)


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return float_to_pcm(amplitude * np.sin(2 * np.pi * freq * t).astype(np.float32))


def compose(parts: list[tuple[str, object]], rate: int, voice: str = "slt") -> bytes:
    """[("say", "text"), ("silence", 1.5), ...] -> one mono s16le utterance at `rate`."""
    out = b""
    for kind, value in parts:
        if kind == "say":
            out += speech_pcm(str(value), voice, rate)
        else:
            out += bytes(int(float(value) * rate) * 2)
    return out
