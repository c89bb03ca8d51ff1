"""`voicebus call`'s command line: speech in, what was said and heard out, an exit code for scripts."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from services.serving.call.client import MIC_RATE, CallRefused, CallResult, CallTimeout, LineDropped, call

BUSY_EXIT_CODE = 3  # the endpoint is full or busy (503 serve, 409 web, 429 too many offers): try again later
BUSY_STATUSES = (409, 429, 503)
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as a shell reports it


def speech(sentences: list[str], wav_path: str | None, voice: str, pause_s: float) -> bytes:
    """48 kHz mono s16le: the sentences with pauses between them (and a lead-in while the call connects)."""
    from common.utterances import compose

    if wav_path:
        from common.resample import float_to_pcm, resample_oneshot
        from common.speech import read_wav_mono

        samples, rate = read_wav_mono(Path(wav_path))
        return bytes(MIC_RATE) + float_to_pcm(resample_oneshot(samples, rate, MIC_RATE))
    parts: list[tuple[str, object]] = [("silence", 1.0)]
    for index, sentence in enumerate(sentences):
        parts += [("say", sentence)] + ([("silence", pause_s)] if index < len(sentences) - 1 else [])
    return compose(parts, MIC_RATE, voice=voice)


def run_call(url: str, sentences: list[str], wav_path: str | None, voice: str, turns: int, pause_s: float,
             timeout_s: float, record_path: str | None, as_json: bool, *, offer_path: str = "offer",
             dial_at: float | None = None) -> int:
    """Sentences are spoken turn by turn (each once the reply before it has played out, then `pause_s`), so
    none barges in; a WAV is spoken as it is, pauses and all."""
    if sentences:  # a second of lead-in, then each sentence when the reply before it has played out
        from common.utterances import speech_pcm

        pcm, utterances = bytes(2 * MIC_RATE), [speech_pcm(s, voice, MIC_RATE) for s in sentences]
    else:
        pcm, utterances = speech(sentences, wav_path, voice, pause_s), None
    result = CallResult()
    try:
        interrupted = asyncio.run(_until_interrupted(call(url, pcm, turns, timeout_s, offer_path=offer_path,
                                                          utterances=utterances, pause_s=pause_s, dial_at=dial_at,
                                                          result=result)))
    except KeyboardInterrupt:  # before the loop ran (a Ctrl-C during start-up)
        interrupted = True
    except CallRefused as exc:
        click.echo(f"voicebus call: {url} refused the call: {exc.message}"
                   + (f" (try again in {exc.retry_after_s:g} s)" if exc.retry_after_s else ""), err=True)
        return BUSY_EXIT_CODE if exc.status in BUSY_STATUSES else 1
    except (CallTimeout, LineDropped) as exc:
        click.echo(f"voicebus call: {url}: {exc}", err=True)
        return 1
    except OSError as exc:
        click.echo(f"voicebus call: cannot reach {url}: {exc}", err=True)
        return 1
    if interrupted:
        _print(result, as_json)
        click.echo(f"voicebus call: interrupted after {len(result.assistant)} repl"
                   f"{'y' if len(result.assistant) == 1 else 'ies'} (hung up)", err=True)
        return INTERRUPTED_EXIT_CODE
    if record_path:
        from common.wavio import write_wav

        write_wav(Path(record_path), bytes(result.received), MIC_RATE)
    _print(result, as_json)
    return 0


async def _until_interrupted(calling: Coroutine[Any, Any, CallResult]) -> bool:
    """Run the call; True when Ctrl-C (SIGINT) ended it. Our own handler, so it holds whatever the
    process inherited (a shell's background job starts with SIGINT ignored) and however the call ends."""
    task = asyncio.ensure_future(calling)
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return interrupted


def _print(result: CallResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"session": result.session, "user": result.user, "assistant": result.assistant,
                               "heard": [result.heard(index)[0] for index in range(len(result.assistant))],
                               "latency_ms": result.latency_ms, "truncated": result.truncated,
                               "connect_ms": result.connect_ms, "dial_late_ms": result.dial_late_ms,
                               "gaps": result.gaps,
                               "heard_ms": result.heard_ms, "page_messages": result.page_messages,
                               "late_frames": result.late_frames, "max_late_ms": result.max_late_ms,
                               "received_s": round(len(result.received) / 2 / MIC_RATE, 2)}))
        return
    click.echo(f"session {result.session or '(not a voicebus endpoint)'}: live in {result.connect_ms:.0f} ms")
    for index, heard_ms in enumerate(result.heard_ms):
        click.echo(f"  reply {index + 1} heard {heard_ms:.0f} ms after the sentence ended")
    for index, answer in enumerate(result.assistant):
        said = result.user[index] if index < len(result.user) else "?"
        latency = f"{result.latency_ms[index]:.0f} ms" if index < len(result.latency_ms) else "n/a"
        heard, cut = result.heard(index)
        reply = f"you heard {heard!r} (cut at {cut.get('audio_end_ms')} ms of {answer!r})" if cut else \
            f"you heard {answer!r}"
        click.echo(f"  turn {index + 1}: you said {said!r}; {reply}; latency {latency}")


def run_carrier_call(url: str, sentences: list[str], wav_path: str | None, voice: str, pause_s: float,
                     timeout_s: float, record_path: str | None, as_json: bool, dtmf: str, auth_token: str,
                     dial_at: float | None = None) -> int:
    """`voicebus call --carrier twilio`: the fake carrier dials a phone door (a voice webhook or a Media
    Streams websocket) and says each sentence once the reply before it has played out."""
    from common import g711
    from common.speech import Transcriber
    from common.utterances import speech_pcm
    from services.serving.call.carrier import CarrierRefused, FakeCarrier, Turn

    if wav_path:
        from common.resample import float_to_pcm, resample_oneshot
        from common.speech import read_wav_mono

        samples, rate = read_wav_mono(Path(wav_path))
        turns = [Turn(float_to_pcm(resample_oneshot(samples, rate, g711.RATE)))]
    else:
        turns = [Turn(speech_pcm(sentence, voice, g711.RATE)) for sentence in sentences]
    turns += [Turn(b"", dtmf=dtmf)] if dtmf else []
    carrier = FakeCarrier(url, turns, pause_s=pause_s, timeout_s=timeout_s, auth_token=auth_token)
    if dial_at is not None:  # ready (speech made, imports done): dial at the agreed moment
        time.sleep(max(0.0, dial_at - time.time()))
    try:
        result = asyncio.run(carrier.run())
    except CarrierRefused as exc:
        click.echo(f"voicebus call: {url} did not connect the call: {exc.message}", err=True)
        return BUSY_EXIT_CODE if exc.status == 200 or exc.status in BUSY_STATUSES else 1
    except TimeoutError:
        click.echo(f"voicebus call: {url}: the call did not finish within {timeout_s:g} s", err=True)
        return 1
    except (OSError, ValueError) as exc:  # aiohttp's connection errors are OSErrors; a bad TwiML a ValueError
        click.echo(f"voicebus call: cannot reach {url}: {exc}", err=True)
        return 1
    if record_path:
        from common.wavio import write_wav

        write_wav(Path(record_path), result.heard_pcm(), g711.RATE)
    transcriber = Transcriber()
    heard = [transcriber.transcribe(g711.decode(bytes(reply.codes), "pcmu"), g711.RATE) for reply in result.replies]
    gaps = [reply.gap_ms for reply in result.replies if reply.gaps]
    summary = {"call_sid": result.call_sid, "stream_sid": result.stream_sid, "said": sentences, "heard": heard,
               "session": result.parameters.get("session", ""), "connect_ms": result.connect_ms,
               "heard_ms": result.heard_ms(), "gaps": sum(reply.gaps for reply in result.replies),
               "late_frames": 0,  # the carrier plays on its own clock: audio that came late is a gap
               "max_late_ms": max(gaps, default=0.0), "page_messages": 0, "dial_late_ms": 0.0,
               "replies_ms": [round(len(reply.codes) / 8) for reply in result.replies],
               "cut": [reply.cleared for reply in result.replies], "clears": result.clears,
               "marks_echoed": result.marks_echoed, "bad_messages": result.bad_messages}
    if as_json:
        click.echo(json.dumps(summary))
        return 0
    click.echo(f"call {result.call_sid}: {len(result.replies)} repl{'y' if len(result.replies) == 1 else 'ies'} heard")
    for index, text in enumerate(heard):
        said = sentences[index] if index < len(sentences) else "-"
        cut = " (cut by a clear)" if result.replies[index].cleared else ""
        click.echo(f"  turn {index + 1}: you said {said!r}; you heard (recognised) {text!r}{cut}")
    return 0
