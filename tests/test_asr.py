"""Transcript quality of the simulator's ASR on flite speech in several voices (target WER <= 10 %)."""

from __future__ import annotations

from common.speech import Transcriber, word_error_rate
from common.utterances import SENTENCES, speech_pcm


def test_word_error_rate_helper():
    assert word_error_rate("a b c", "a b c") == (0, 3)
    assert word_error_rate("a b c", "a x c d") == (2, 3)
    assert word_error_rate("a b", "") == (2, 2)


def test_pocketsphinx_wer_on_flite_sentences():
    transcriber = Transcriber()
    edits = words = 0
    rows = []
    for text, voice in SENTENCES:
        heard = transcriber.transcribe(speech_pcm(text, voice, 24000), 24000)
        e, n = word_error_rate(text, heard)
        edits, words = edits + e, words + n
        rows.append(f"{voice:6} {e}/{n} {text!r} -> {heard!r}")
    wer = edits / words
    print(f"\nWER {wer:.1%} over {len(SENTENCES)} sentences\n" + "\n".join(rows))
    assert wer <= 0.10, "\n".join(rows)


def test_nearest_sentence_takes_a_misheard_word_but_not_another_sentence():
    from common.speech import nearest_sentence

    questions = ["what is the weather like today", "how far away is the moon"]
    assert nearest_sentence("how far the way the mayor", questions) == questions[1]
    assert nearest_sentence("what is the weather like today", questions) == questions[0]
    assert nearest_sentence("the", questions) is None  # nearer to neither, and mostly wrong
    assert nearest_sentence("please tell me a short story", questions) is None


def test_the_simulators_recogniser_decodes_in_worker_processes_and_a_dead_worker_is_replaced():
    """pocketsphinx holds the GIL while it decodes: the simulator hears in worker processes, so its event
    loop (every session's VAD and pacing) never waits on a turn being decoded. A worker killed with -9 is
    replaced and the audio it lost is heard again; none outlives the pool."""
    import os
    import signal

    from common.speech import TranscriberPool
    from tests.helpers import alive

    text, voice = SENTENCES[0]
    pcm = speech_pcm(text, voice, 24000)
    pool = TranscriberPool(workers=2)
    try:
        pool.warm()
        workers = list(pool._pool._processes)  # the executor's own table of its processes
        assert len(workers) == 2 and os.getpid() not in workers
        assert word_error_rate(text, pool.transcribe(pcm, 24000))[0] <= 1
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(2):  # whether or not the pool noticed the death before this submit: heard either way
            assert word_error_rate(text, pool.transcribe(pcm, 24000))[0] <= 1
        workers += list(pool._pool._processes)
    finally:
        pool.close()
    assert not any(alive(pid) for pid in workers)
