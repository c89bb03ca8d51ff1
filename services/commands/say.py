"""`voicebus say`: a streamed chat-completions audio answer, written to a WAV as it arrives.

The original notebook wrote this 24 kHz pcm16 stream under a 22 050 Hz WAV header; here the header
says what the API sends (24 kHz mono s16le) and the file is valid at every moment (its header is
updated as chunks arrive). The answer is stored like a conversation (see the logger) and traced as
the Weave op `voicebus.say` when uploaded: prompt in, transcript and audio out.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import zmq

from common.config import bus_config, new_session_id, openai_target
from common.wavio import WavWriter
from services.stages.logger.store import SessionStore

RATE = 24_000


class SayError(click.ClickException):
    pass


def _player_publisher(session: str):
    """Publish the answer on audio.assistant for a running player (`--play`)."""
    from common.bus import Publisher, connect_pub, wait_for_bus
    from common.stage import Output

    cfg = bus_config()
    ctx = zmq.Context()
    publisher = Publisher(connect_pub(ctx, cfg))
    if not wait_for_bus(ctx, cfg, timeout_s=5, pub=publisher.sock):
        ctx.destroy(linger=0)
        raise SayError(f"--play: no bus at {cfg.pub}; start the pipeline (voicebus up) or drop --play")
    return ctx, publisher, Output("say", session, publisher.send)


def run_say(prompt: str, out: Path, model: str, voice: str, system: str | None, play: bool, root: Path,
            upload: bool) -> int:
    from openai import OpenAI

    target = openai_target()
    if not target.is_simulator:
        return _say(OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=1), target.base_url, prompt,
                    out, model, voice, system, play, root, upload)
    from services.pipeline import simulator_for

    try:
        with simulator_for(target) as base_url:
            click.echo(f"offline: OPENAI_API_KEY is not set, asking the local simulator at {base_url} "
                       "(flite speaks; it is not OpenAI)", err=True)
            hint = " (VOICEBUS_SIM_URL names it: start it with `voicebus simulate`)" \
                if os.environ.get("VOICEBUS_SIM_URL") else ""
            return _say(OpenAI(base_url=base_url, api_key=target.api_key, max_retries=1), base_url + hint, prompt,
                        out, model, voice, system, play, root, upload)
    except RuntimeError as exc:
        raise SayError(str(exc)) from exc


def _say(client, base_url: str, prompt: str, out: Path, model: str, voice: str, system: str | None, play: bool,
         root: Path, upload: bool) -> int:
    """Stream the answer into `out` (written as `.NAME.partial` until it is complete, so a failure never
    leaves a broken file under the name asked for), then store it."""
    from openai import APIConnectionError, APIError

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    session = new_session_id()
    item_id = f"say_{session}"
    bus = _player_publisher(session) if play else None
    partial = out.with_name(f".{out.name}.partial")
    writer = WavWriter(partial, RATE, 1)
    transcript, samples, usage, started, complete = "", 0, None, time.time_ns(), False
    try:
        stream = client.chat.completions.create(model=model, modalities=["text", "audio"], messages=messages,
                                                audio={"voice": voice, "format": "pcm16"}, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                audio = getattr(choice.delta, "audio", None)
                if audio is None:
                    continue
                data = audio.get("data") if isinstance(audio, dict) else audio.data
                text = audio.get("transcript") if isinstance(audio, dict) else audio.transcript
                if text:
                    transcript += text
                    click.echo(text, nl=False)
                if data:
                    pcm = base64.b64decode(data)
                    writer.write(pcm)
                    writer.flush()
                    if bus is not None:
                        bus[2].audio("audio.assistant", pcm, rate=RATE, channels=1, pts=samples,
                                     t_capture_ns=time.time_ns(), item_id=item_id, response_id=item_id,
                                     content_index=0)
                    samples += len(pcm) // 2
        complete = samples > 0
    except APIConnectionError as exc:
        raise SayError(f"cannot reach {base_url}: {exc}") from exc
    except APIError as exc:
        raise SayError(f"the API refused the request: {exc}") from exc
    finally:
        writer.close()
        if complete:
            partial.replace(out)
        else:
            partial.unlink(missing_ok=True)
        if bus is not None:
            time.sleep(0.2)
            bus[1].sock.close(linger=1000)
            bus[0].term()
    click.echo()
    if samples == 0:
        raise SayError("the answer carried no audio (text only); nothing was written")
    click.echo(f"wrote {out}: {samples / RATE:.2f} s, 24000 Hz mono 16-bit", err=True)
    _store(root, session, prompt, system, model, voice, transcript, out, usage, started)
    if upload and os.environ.get("WANDB_API_KEY"):
        subprocess.Popen([sys.executable, "-m", "services.cli", "upload", session, "--root", str(root)],
                         stdin=subprocess.DEVNULL, start_new_session=True,
                         stdout=open(root / session / "upload.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    return 0


def _store(root: Path, session: str, prompt: str, system: str | None, model: str, voice: str, transcript: str,
           wav: Path, usage, started_ns: int) -> None:
    store = SessionStore(root, session)
    store.write_meta(kind="say", started_ns=started_ns, ended_ns=time.time_ns(), model=model)
    from common.wavio import read_wav

    record = {"key": f"say:{session}", "kind": "say", "prompt": prompt, "system": system, "voice": voice,
              "model": model, "transcript": transcript,
              "usage": json.loads(usage.model_dump_json()) if usage is not None else {}}
    store.write_turn(record, {"answer": read_wav(wav).pcm})
    click.echo(f"stored in {store.dir} (voicebus upload sends it to Weave)", err=True)
