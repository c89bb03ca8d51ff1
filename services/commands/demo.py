"""`voicebus demo`: the whole pipeline offline, one spoken question after another, and what happened.

Bus, simulator (unless OPENAI_API_KEY is set), gateway, resampler, player (into a WAV) and the
mic fed from flite-spoken questions. Prints the conversation, the latency of each turn (user
speech end -> first assistant sample played) and where the recordings went.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import zmq

from common.bus import Receiver, connect_sub
from common.config import BusConfig, new_session_id, openai_target
from common.speech import synthesize
from common.wavio import write_wav
from services.launcher import LauncherError, ProcessSpec, Supervisor, default_zygote, spawn
from services.pipeline import EXAMPLE_TOOLS, simulator_spec

DEFAULT_QUESTIONS = ["what is the weather like today", "what time is it in tokyo", "please tell me a short story"]
TURN_TIMEOUT_S = 60.0
MIC_RATE = 48_000


@dataclass
class Turn:
    question: str
    heard: str = ""
    answer: str = ""
    latency_ms: float | None = None
    server_ms: float | None = None  # speech end -> first audio delta received (the server's share)
    item_id: str = ""
    tools: list[str] | None = None  # "name(arguments) -> output" for each call the model made


def _poll(supervisor: Supervisor) -> None:
    supervisor.poll()
    if supervisor.fatal is not None:
        raise click.ClickException(supervisor.fatal)


def _wait_turn(receiver: Receiver, turn: Turn, supervisor: Supervisor) -> None:
    speech_end_ns = None
    first_delta_ns: dict[str, int] = {}
    deadline = time.monotonic() + TURN_TIMEOUT_S
    done = False
    while time.monotonic() < deadline:
        _poll(supervisor)
        message = receiver.recv(timeout_ms=50)
        if message is None:
            continue
        data = message.data
        event = data.get("event", {})
        if message.topic == "rt.conversation.item.input_audio_transcription.completed":
            turn.heard = event.get("transcript", "")
        elif message.topic == "rt.gateway.speech_end":
            speech_end_ns = data.get("speech_end_capture_ns")
        elif message.topic == "rt.response.output_audio_transcript.done":
            turn.answer, turn.item_id = event.get("transcript", ""), event.get("item_id", "")
        elif message.topic == "rt.response.output_audio.delta":
            first_delta_ns.setdefault(event.get("item_id", ""), data.get("t_recv_ns", 0))
        elif message.topic == "rt.gateway.tool_output":
            result = data.get("output") if data.get("error") is None else f"error: {data.get('error')}"
            turn.tools = (turn.tools or []) + [f"{data.get('name')} -> {str(result)[:120]} "
                                               f"({data.get('round_trip_ms', 0):.0f} ms, {data.get('source')})"]
        elif message.topic == "rt.response.done":
            done = True
        elif message.topic == "rt.error":
            click.echo(f"  server error: {event.get('error', {}).get('message')}", err=True)
        elif message.topic == "player.state" and turn.item_id and data.get("item_id") == turn.item_id:
            if turn.latency_ms is None and speech_end_ns and data.get("item_started_ns"):
                turn.latency_ms = (data["item_started_ns"] - speech_end_ns) / 1e6
                if first_delta_ns.get(turn.item_id):
                    turn.server_ms = (first_delta_ns[turn.item_id] - speech_end_ns) / 1e6
            if done and not data.get("playing") and data.get("played_ms", 0) >= data.get("received_ms", 1) - 1:
                return
    raise click.ClickException(f"no complete answer within {TURN_TIMEOUT_S:.0f}s (is the simulator running? "
                               f"see the logs above)")


def run_demo(questions: list[str], out_dir: Path | None, voice: str, trace_root: Path,
             tool_modules: list[str] | None = None, rules: Path | None = None) -> int:
    session = new_session_id()
    out_dir = (out_dir or Path("voicebus-demo")) / session
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="vb-demo-", dir="/tmp"))
    os.chmod(run, 0o700)
    cfg = BusConfig(pub=f"ipc://{run}/pub.sock", sub=f"ipc://{run}/sub.sock")
    target = openai_target()
    quiet = ["--log-level", "WARNING"]
    env = {"VOICEBUS_LOG_LEVEL": "WARNING"}
    simulator = simulator_spec([*quiet, *(["--rules", str(rules)] if rules else [])], env)
    specs: list[ProcessSpec] = [simulator] if simulator is not None else []
    if simulator is not None:
        click.echo(f"offline: OPENAI_API_KEY is not set, so the local simulator on port {simulator.ready_port} "
                   "answers (flite speaks, pocketsphinx listens; it is not OpenAI)"
                   + (f"; its replies follow {rules}" if rules else ""))
    elif target.is_simulator:
        click.echo(f"offline: the simulator already running at {target.base_url} answers (VOICEBUS_SIM_URL)")
    else:
        click.echo(f"online: talking to {target.base_url} (OPENAI_API_KEY is set)")
    modules = [arg for module in (tool_modules or [str(EXAMPLE_TOOLS)]) for arg in ("--module", module)]
    specs += [ProcessSpec("gateway", ["gateway", "--ws-log", str(out_dir / "websocket.jsonl"), *quiet]),
              ProcessSpec("resample", ["resample", *quiet]),
              ProcessSpec("tools", ["tools", *modules, *quiet]),
              ProcessSpec("player", ["player", "--wav", str(out_dir / "assistant-played.wav"), *quiet]),
              ProcessSpec("logger", ["logger", "--root", str(trace_root), "--no-report", *quiet])]
    click.echo(f"starting bus and {', '.join(s.name for s in specs)} (session {session})")
    supervisor = Supervisor(cfg, specs, session, env, zygote=default_zygote())
    ctx = zmq.Context()
    receiver = Receiver(connect_sub(ctx, cfg, ["rt.", "player.state", "health."]), "demo")
    turns = [Turn(q) for q in questions]
    interrupted = False

    def on_signal(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            supervisor.start()
        except LauncherError as exc:
            raise click.ClickException(str(exc)) from exc
        _wait_ready(receiver, supervisor)
        for index, turn in enumerate(turns, 1):
            wav = write_wav(out_dir / f"question-{index}.wav", synthesize(turn.question, voice, MIC_RATE), MIC_RATE)
            click.echo(f"\n[turn {index}] speaking into the mic: {turn.question!r}")
            mic = spawn(["mic", "--wav", str(wav), "--lead-silence", "0.3", "--tail-silence", "2.5", *quiet],
                        supervisor.env)
            _wait_turn(receiver, turn, supervisor)
            mic.wait(timeout=15)
            latency = f"{turn.latency_ms:.0f} ms" if turn.latency_ms is not None else "n/a"
            if turn.latency_ms is not None and turn.server_ms is not None:
                latency += (f" (server: VAD silence + ASR + TTS {turn.server_ms:.0f} ms; "
                            f"voicebus pipeline {turn.latency_ms - turn.server_ms:.0f} ms)")
            click.echo(f"  you said (as transcribed): {turn.heard!r}")
            for call in turn.tools or []:
                click.echo(f"  tool call:                 {call}")
            click.echo(f"  assistant:                 {turn.answer!r}")
            click.echo(f"  latency, your speech end -> first assistant audio played: {latency}")
    except KeyboardInterrupt:
        interrupted = True
        click.echo("interrupted", err=True)
    finally:
        receiver.sock.close(0)
        ctx.term()
        supervisor.stop()
        shutil.rmtree(run, ignore_errors=True)
    click.echo(f"\nrecordings and logs: {out_dir}/ (question-N.wav, assistant-played.wav, websocket.jsonl)")
    session_dir = trace_root / session
    if (session_dir / "turns.jsonl").exists():
        from services.stages.logger.report import write_report

        report = write_report(session_dir, out_dir / "report.html")
        click.echo(f"trace: {session_dir}/ (turns, audio as played, timing, cost); open {report}")
        click.echo("       upload it to W&B Weave with `voicebus upload` once WANDB_API_KEY is set"
                   if not os.environ.get("WANDB_API_KEY") else "       uploading to W&B Weave in the background")
    return 130 if interrupted else 0


def _wait_ready(receiver: Receiver, supervisor: Supervisor) -> None:
    deadline = time.monotonic() + 60
    seen: set[str] = set()
    tools_offered = False  # the server's session has the tools, as the gateway's heartbeat last said
    while time.monotonic() < deadline:
        _poll(supervisor)
        message = receiver.recv(timeout_ms=100)
        if message is None:
            continue
        if message.topic.startswith("health."):
            seen.add(message.topic.removeprefix("health."))
        if message.topic == "health.gateway":
            tools_offered = bool(message.data.get("session_tools"))
        if tools_offered and {"gateway", "resample", "player", "logger", "tools"} <= seen:
            return
    raise click.ClickException("the pipeline did not come up within 60 s; run `voicebus doctor`")


