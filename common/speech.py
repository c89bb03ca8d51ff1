"""Real speech without a network: flite speaks (assistant, test questions), pocketsphinx hears.

Both are local (Debian's flite, the pocketsphinx wheel's bundled English model): nothing is
downloaded at run time.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import shutil
import signal
import subprocess
import tempfile
import threading
import wave
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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


class TranscriberPool:
    """pocketsphinx in worker processes, for a server that hears many sessions at once (the simulator).

    Its decoder holds the GIL while it decodes (~0.4 s per second of speech here): in the server's own
    process one turn froze every session's VAD, pacing and websocket for that long. In workers the
    server's loop never waits, and `workers` turns are decoded at once. `warm()` loads the model once and
    forks the workers from it (its pages shared, not loaded again per worker).
    """

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._broken: list[ProcessPoolExecutor] = []  # replaced after a worker died: reaped by close()
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Load the model and fork the workers from it, from the main thread before any other thread
        starts (a fork is only safe then; with threads running they are spawned, each loading the model).
        Each worker dies with the thread that started it (PR_SET_PDEATHSIG): a server killed with -9
        leaves none behind."""
        global _worker_transcriber
        alone = threading.active_count() == 1
        if alone and _worker_transcriber is None:
            _worker_transcriber = Transcriber()
            _worker_transcriber.warm()
        with self._lock:
            pool = self._started("fork" if alone else "spawn")
        # a forking executor forks all its workers at its first submit, here, before any thread of its own
        if not all(future.result() for future in [pool.submit(_worker_ready) for _ in range(self.workers)]):
            raise SpeechError("an ASR worker has no model loaded")

    def _started(self, start_method: str = "spawn") -> ProcessPoolExecutor:
        """The pool; made anew (after a worker died, or without `warm()`) by spawning: this may be any thread."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(start_method),
                                             initializer=_worker_start)
        return self._pool

    def transcribe(self, pcm: bytes, rate: int = OUTPUT_RATE) -> str:
        """Blocks the calling thread (not the GIL) until a worker has heard it; if a worker died, the pool
        is made anew once and the audio heard again."""
        for attempt in (1, 2):
            with self._lock:
                pool = self._started()
            try:
                return pool.submit(_worker_transcribe, pcm, rate).result()
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                        self._broken.append(pool)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stops every worker, those of a pool broken earlier too: its executor ends its surviving
        workers from a thread of its own, which may not have finished yet (seen on a loaded machine)."""
        with self._lock:
            pool, self._pool = self._pool, None
            broken, self._broken = self._broken, []
        for each in [*broken, *([pool] if pool is not None else [])]:
            each.shutdown(wait=True, cancel_futures=True)


_worker_transcriber: Transcriber | None = None  # loaded before the fork (shared), or in a spawned worker


def _worker_start() -> None:
    global _worker_transcriber
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it closes the pool
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own shutdown still stops the workers
    if _worker_transcriber is None:
        _worker_transcriber = Transcriber()
        _worker_transcriber.warm()


def _worker_ready() -> bool:
    return _worker_transcriber is not None


def _worker_transcribe(pcm: bytes, rate: int) -> str:
    assert _worker_transcriber is not None
    return _worker_transcriber.transcribe(pcm, rate)


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
