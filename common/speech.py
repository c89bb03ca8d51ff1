"""Real speech without a network: flite speaks (assistant, test questions), pocketsphinx hears.

Both are local (Debian's flite, the pocketsphinx wheel's bundled English model): nothing is
downloaded at run time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import wave
from pathlib import Path

import numpy as np

from common.resample import float_to_pcm, pcm_to_mono_float, resample_oneshot

OUTPUT_RATE = 24_000
ASR_RATE = 16_000
# OpenAI voice names -> flite voices (flite has 4 usable ones; several names share a voice)
FLITE_VOICES = {"alloy": "slt", "ash": "rms", "ballad": "awb", "coral": "slt", "echo": "rms", "sage": "slt",
                "shimmer": "slt", "verse": "awb", "marin": "slt", "cedar": "rms", "fable": "awb", "onyx": "rms",
                "nova": "slt"}
DEFAULT_FLITE_VOICE = "slt"


class SpeechError(RuntimeError):
    pass


def read_wav_mono(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SpeechError(f"{path}: expected 16-bit PCM, got {8 * wav.getsampwidth()}-bit")
        pcm = wav.readframes(wav.getnframes())
        return pcm_to_mono_float(pcm, wav.getnchannels()), wav.getframerate()


def synthesize(text: str, voice: str = "alloy", rate: int = OUTPUT_RATE) -> bytes:
    """Speak `text` with flite (espeak-ng as a fallback); mono s16le at `rate`."""
    text = text.strip() or "."
    with tempfile.TemporaryDirectory(prefix="vb-tts-") as tmp:
        out = Path(tmp) / "speech.wav"
        if shutil.which("flite"):
            command = ["flite", "-voice", FLITE_VOICES.get(voice, voice if voice in FLITE_VOICES.values()
                                                           else DEFAULT_FLITE_VOICE), "-t", text, "-o", str(out)]
        elif shutil.which("espeak-ng"):
            command = ["espeak-ng", "-w", str(out), text]
        else:
            raise SpeechError("no speech synthesizer: install Debian's flite (scripts/setup.sh does)")
        result = subprocess.run(command, capture_output=True, timeout=60)
        if result.returncode != 0 or not out.exists():
            raise SpeechError(f"{command[0]} failed: {result.stderr.decode(errors='replace')[:200]}")
        samples, source_rate = read_wav_mono(out)
    return float_to_pcm(resample_oneshot(samples, source_rate, rate))


class Transcriber:
    """pocketsphinx with the wheel's English model, loaded once, used from one thread at a time."""

    def __init__(self) -> None:
        self._decoder = None
        self._lock = threading.Lock()

    def _load(self):
        if self._decoder is None:
            from pocketsphinx import Decoder

            self._decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
        return self._decoder

    def warm(self) -> None:
        with self._lock:
            self._load()

    def transcribe(self, pcm: bytes, rate: int = OUTPUT_RATE) -> str:
        if len(pcm) < 2:
            return ""
        mono = resample_oneshot(pcm_to_mono_float(pcm, 1), rate, ASR_RATE)
        with self._lock:
            decoder = self._load()
            decoder.start_utt()
            decoder.process_raw(float_to_pcm(mono), full_utt=True)
            decoder.end_utt()
            hypothesis = decoder.hyp()
        return hypothesis.hypstr.strip() if hypothesis is not None else ""


def nearest_sentence(heard: str, sentences: list[str] | tuple[str, ...], max_error: float = 0.5) -> str | None:
    """The sentence a recogniser's reading is nearest to by word error rate, if it is nearer to it than to
    any other and at most `max_error` of its words are wrong: robust to a misheard word, not to hearing
    another sentence."""
    errors = {sentence: word_error_rate(sentence, heard)[0] / len(sentence.split()) for sentence in sentences}
    best = min(errors, key=errors.__getitem__)
    runner_up = min((error for sentence, error in errors.items() if sentence != best), default=float("inf"))
    return best if errors[best] <= max_error and errors[best] < runner_up else None


def word_error_rate(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words): Levenshtein distance over words."""
    ref, hyp = reference.lower().split(), hypothesis.lower().split()
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i]
        for j, hyp_word in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1], len(ref)
