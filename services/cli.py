"""`voicebus`: one command per process, plus the tools to run, watch and debug them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shlex
import sys
from pathlib import Path

# One BLAS thread per process: every stage does small per-frame products on one thread; a pool
# would only add idle threads (and their buffers) to each of them. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402

from common.audio_devices import OUTPUT_PERIOD_MS  # noqa: E402
from common.config import bus_config, new_session_id  # noqa: E402
from common.log import setup_logging  # noqa: E402
from services.simulator.faults import FAULT_KINDS  # noqa: E402


class SetupError(click.ClickException):
    """A stage's arguments or files can never work (bad WAV, broken tools module): exit 2, so `up` stops
    instead of restarting it (click's usage errors exit 2 as well)."""

    exit_code = 2


def bus_options(func):
    """--pub/--sub/--curve-dir/--log-level, shared by every command that touches the bus."""

    @click.option("--pub", envvar="VOICEBUS_BUS_PUB", help="Endpoint publishers connect to (proxy's XSUB).")
    @click.option("--sub", envvar="VOICEBUS_BUS_SUB", help="Endpoint subscribers connect to (proxy's XPUB).")
    @click.option("--curve-dir", envvar="VOICEBUS_CURVE_DIR", type=click.Path(file_okay=False),
                  help="Directory from `voicebus keys` (required for tcp:// endpoints).")
    @click.option("--log-level", default="INFO", show_default=True, envvar="VOICEBUS_LOG_LEVEL",
                  type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
    @functools.wraps(func)
    def wrapper(*args, pub, sub, curve_dir, log_level, **kwargs):
        from common.config import RunDirError

        setup_logging(log_level)
        try:
            cfg = bus_config(pub, sub, curve_dir)
        except RunDirError as exc:
            raise SetupError(str(exc)) from None
        return func(*args, cfg=cfg, **kwargs)

    return wrapper


def silence_options(func):
    """--batch-silence-ms/--silence-hold-s/--silence-dbfs for a stage that publishes a microphone."""
    from common import silence

    @click.option("--batch-silence-ms", type=click.IntRange(min=0), default=silence.DEFAULT_BATCH_MS,
                  show_default=True, help="After --silence-hold-s of silence, send the mic's silent frames this many "
                  "ms at a time (fewer wake-ups for every stage on the path); the first frame with sound goes out at "
                  "once with what was held. 0: every frame on its own.")
    @click.option("--silence-hold-s", type=click.FloatRange(min=0), default=silence.DEFAULT_HOLD_S, show_default=True,
                  help="Silence sent frame by frame after sound, before batching starts (keep it above the server "
                  "VAD's silence_duration_ms, so the end of a turn is heard on time).")
    @click.option("--silence-dbfs", type=float, default=silence.DEFAULT_LEVEL_DBFS, show_default=True,
                  help="A frame whose RMS level is at or below this is silence.")
    @functools.wraps(func)
    def wrapper(*args, batch_silence_ms, silence_hold_s, silence_dbfs, **kwargs):
        return func(*args, silence={"batch_ms": batch_silence_ms, "hold_s": silence_hold_s,
                                    "level_dbfs": silence_dbfs}, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120})
def main() -> None:
    """voicebus: a realtime voice assistant where every stage is a process on a ZeroMQ bus.

    Offline by default: with no OPENAI_API_KEY the gateway talks to the local simulator.
    """
    # what voicebus writes (a conversation's audio and words, captures, reports, tokens) is its user's alone
    os.umask(os.umask(0o077) | 0o077)


@main.command()
@bus_options
@click.option("--insecure", is_flag=True, help="Allow a tcp:// bus without CURVE keys.")
def bus(cfg, insecure):
    """Run the XSUB/XPUB proxy that every stage connects to."""
    from services.bus import BusRefused, run_bus

    try:
        sys.exit(run_bus(cfg, insecure))
    except BusRefused as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("-o", "--output", "directory", required=True, type=click.Path(file_okay=False),
              help="Directory for the server and client keypairs.")
def keys(directory):
    """Generate CURVE keypairs for a tcp:// bus."""
    from common.bus import generate_keys

    written = generate_keys(Path(directory))
    for role, path in written.items():
        click.echo(f"{role:<14} {path}")
    click.echo(f"start the bus and every stage with --curve-dir {directory} (or VOICEBUS_CURVE_DIR)")


@main.command()
@bus_options
@click.argument("prefixes", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--count", type=int, help="Exit after this many messages.")
@click.option("--duration", type=float, help="Exit after this many seconds.")
@click.option("--stats", "stats_interval", type=float, default=5.0, show_default=True,
              help="Seconds between rate/gap summaries (0: only at exit).")
@click.option("--quiet", is_flag=True, help="Only the summaries, not each message.")
def tap(cfg, prefixes, as_json, count, duration, stats_interval, quiet):
    """Watch the bus live: topic, src, seq, size; rates, gaps and bad frames per topic."""
    from services.devtools.tap import run_tap

    sys.exit(run_tap(cfg, list(prefixes), as_json, count, duration, stats_interval, quiet))


def _tls_context(cert: str | None, key: str | None):
    """HTTPS for the page (browsers allow the microphone off localhost only over HTTPS), or None."""
    if bool(cert) != bool(key):
        raise click.UsageError("--cert and --key go together")
    if not cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _use_run_dir(_ctx, _param, value: str | None) -> str | None:
    """Parsed before the bus options read it: the run dir decides where the ipc:// bus lives."""
    if value:
        path = Path(value).resolve()
        if len(str(path)) > 80:  # ipc:// socket paths are limited to ~107 bytes
            raise click.BadParameter(f"{path} is too long for ipc:// sockets (keep it under 80 characters)")
        os.environ["VOICEBUS_RUN_DIR"] = str(path)
    return value


@main.command()
@click.option("--run-dir", type=click.Path(file_okay=False), callback=_use_run_dir, is_eager=True,
              envvar="VOICEBUS_RUN_DIR", expose_value=False,
              help="Directory (0700) for this pipeline's ipc:// bus; a second pipeline on one machine needs its own.")
@bus_options
@click.option("--stages", default=None, help="Comma-separated stages to start (default: the whole pipeline).")
@click.option("--arg", "stage_args", multiple=True, metavar="STAGE=ARGS",
              help="Extra arguments for one process, e.g. --arg 'mic=--wav question.wav', "
              "--arg 'simulator=--rules r.json', --arg 'bus=--insecure'. Repeatable.")
@click.option("--session", default=None, help="Conversation name for headers and traces (default: new).")
@click.option("--web", "web_stage", is_flag=True, help="Talk from a browser: start the web stage instead of the local "
              "mic and player (open the URL it logs).")
@click.option("--phone", "phone_stage", is_flag=True, help="Answer a phone line (Twilio Media Streams): the phone stage "
              "instead of the local mic and player, the gateway's session in μ-law (audio/pcmu) end to end.")
def up(cfg, stages, stage_args, session, web_stage, phone_stage):
    """Start the bus and the pipeline's stages; restart any that crash; Ctrl-C stops all.

    A stage that finishes its input (mic --wav) is not restarted; one that cannot start (bad arguments,
    a tools module that does not load) stops `up` with its reason and exit code 2.
    """
    from services.launcher import run_up
    from services.pipeline import (
        BUS,
        PHONE_GATEWAY_ARGS,
        PHONE_STAGES,
        WEB_STAGES,
        canonical_args,
        pipeline_specs,
    )

    extra: dict[str, list[str]] = {}
    for item in stage_args:
        name, _, args = item.partition("=")
        extra.setdefault(name.strip(), []).extend(shlex.split(args))
    names = [s.strip() for s in stages.split(",")] if stages else None
    if web_stage or phone_stage:
        if names or (web_stage and phone_stage):
            raise click.UsageError("--web and --phone choose the stages themselves; use one, or --stages alone")
        names = WEB_STAGES if web_stage else PHONE_STAGES
        if phone_stage:
            extra["gateway"] = [*PHONE_GATEWAY_ARGS, *extra.get("gateway", [])]
    try:
        specs, env_extra = pipeline_specs(names, extra)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    sys.exit(run_up(cfg, specs, session or new_session_id(), env_extra, bus_args=canonical_args(extra).get(BUS, [])))


@main.command()
@bus_options
@click.option("--rate", "rate_out", type=int, default=24_000, show_default=True, help="Output rate (Hz).")
@click.option("--backend", type=click.Choice(["polyphase", "resampy", "soxr"]), default="polyphase",
              show_default=True, help="polyphase: resampy's filter in numpy (same output within 0.01 LSB, ~2 ms "
              "lookahead, no numba); resampy: its numba kernel (+~110 MB RSS); soxr: cheap but holds back "
              "17-38 ms in blocks.")
@click.option("--filter", "filter_name", type=click.Choice(["kaiser_best", "kaiser_fast"]), default="kaiser_best",
              show_default=True, help="resampy's filter, for the polyphase and resampy backends.")
def resample(cfg, rate_out, backend, filter_name):
    """Stage: audio.mic (any rate/channels) -> audio.user (24 kHz mono s16le), seam-free."""
    from common.runner import run_stage
    from services.stages.resampler import ResampleStage

    sys.exit(run_stage(ResampleStage(rate_out, backend, filter_name), cfg))


def _list_devices_and_exit() -> None:
    from common.audio_devices import describe_devices, list_devices, open_pyaudio

    pa = open_pyaudio()
    try:
        click.echo(describe_devices(list_devices(pa)))
    finally:
        pa.terminate()
    sys.exit(0)


@main.command()
@bus_options
@click.option("--device", help="Input device: index or name substring (default: the system default).")
@click.option("--list-devices", is_flag=True, help="Print PortAudio devices and exit.")
@click.option("--rate", type=int, default=None, help="Capture rate (default: 48000 when the device takes it, else its default rate).")
@click.option("--channels", type=int, default=1, show_default=True)
@click.option("--frame-ms", type=int, default=20, show_default=True, help="Audio per frame on the bus.")
@click.option("--wav", "wav_path", type=click.Path(dir_okay=False), help="Read this WAV instead of a device.")
@click.option("--loop", is_flag=True, help="With --wav: start again at the end.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="With --wav: pace (0 = as fast as possible).")
@click.option("--lead-silence", type=float, default=0.0, show_default=True, help="With --wav: seconds of silence first.")
@click.option("--tail-silence", type=float, default=0.0, show_default=True,
              help="With --wav: seconds of silence after (lets server VAD see the end of speech).")
@click.option("--cued", is_flag=True, help="A mic that hears silence until a `mic.play {cue, path}` message on the bus "
              "names a WAV to speak (what `voicebus eval` drives); each cue's start and end go out on `mic.cue`.")
@click.option("--pulse-source", help="PulseAudio source to capture, e.g. voicebus_mic_aec from "
              "scripts/pulse-aec.sh (echo cancellation); sets PULSE_SOURCE for this stage.")
@silence_options
def mic(cfg, device, list_devices, rate, channels, frame_ms, wav_path, loop, speed, lead_silence, tail_silence,
        cued, pulse_source, silence):
    """Stage: capture a device (or a WAV) and publish audio.mic frames."""
    from common.runner import run_stage
    from common.wavio import WavError
    from services.stages.mic import CuedSource, DeviceSource, MicStage, WavSource

    if pulse_source:
        os.environ["PULSE_SOURCE"] = pulse_source
    if list_devices:
        _list_devices_and_exit()
    try:
        if cued and wav_path:
            raise click.UsageError("--cued and --wav are two kinds of mic: choose one")
        source = (CuedSource(rate or 48_000, frame_ms) if cued
                  else WavSource(wav_path, frame_ms, speed, loop, lead_silence, tail_silence) if wav_path
                  else DeviceSource(device, rate, channels, frame_ms))
    except WavError as exc:
        raise SetupError(str(exc)) from exc
    sys.exit(run_stage(MicStage(source, silence=silence), cfg))


@main.command()
@bus_options
@click.option("--device", help="Output device: index or name substring (default: the system default).")
@click.option("--list-devices", is_flag=True, help="Print PortAudio devices and exit.")
@click.option("--rate", type=int, default=24_000, show_default=True, help="Output stream rate.")
@click.option("--jitter-ms", type=int, default=40, show_default=True, help="Audio buffered before playing starts.")
@click.option("--period-ms", type=click.IntRange(min=1), default=OUTPUT_PERIOD_MS, show_default=True,
              help="Output period: shorter periods reach the ear sooner (the device buffers ~2.5 periods) and cost "
              "more callbacks (~1.3 % of a core at 10 ms while a reply plays, ~2.3 % at 5 ms). A flush stops the "
              "stream at once whatever the period.")
@click.option("--idle-pause-s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Stop the device's stream after this long with nothing to play, so that no audio callback runs "
              "while the user talks; it restarts in ~1 ms when audio arrives. 0: keep it running.")
@click.option("--wav", "wav_path", type=click.Path(dir_okay=False), help="Write what would play into this WAV.")
@click.option("--pulse-sink", help="PulseAudio sink to play into, e.g. voicebus_speaker_aec from scripts/pulse-aec.sh; "
              "sets PULSE_SINK for this stage.")
def player(cfg, device, list_devices, rate, jitter_ms, period_ms, idle_pause_s, wav_path, pulse_sink):
    """Stage: play audio.assistant; flush on player.flush; publish player.state."""
    from common.runner import run_stage
    from services.stages.player import DeviceSink, PlayerStage, WavSink

    if pulse_sink:
        os.environ["PULSE_SINK"] = pulse_sink
    if list_devices:
        _list_devices_and_exit()
    sink = WavSink(wav_path, period_ms) if wav_path else DeviceSink(device, period_ms, idle_pause_s)
    sys.exit(run_stage(PlayerStage(sink, rate, jitter_ms), cfg))


@main.command()
@bus_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; 0.0.0.0 for a LAN (browsers allow the microphone off localhost only "
              "over HTTPS: give --cert/--key).")
@click.option("--port", type=int, default=8080, show_default=True, help="HTTP(S) port (0: any free one, logged).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM) for HTTPS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM) for HTTPS.")
@click.option("--jitter-ms", type=int, default=40, show_default=True, help="Assistant audio buffered before sending.")
@click.option("--rx-prefetch", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Browser audio frames (20 ms) held before decoding; aiortc's own default is 4, for lossy paths.")
@click.option("--via-resampler", is_flag=True,
              help="Publish audio.mic at the browser's rate for a `voicebus resample` stage, instead of resampling "
              "to audio.user (24 kHz mono) in this process with the same filter.")
@click.option("--aiortc-encoder", is_flag=True,
              help="Let aiortc Opus-encode the assistant's audio (resampled to 48 kHz stereo, in a worker thread) "
              "instead of the track encoding 24 kHz mono in the loop; for comparison (bench_web_footprint).")
@click.option("--aiortc-decoder", is_flag=True,
              help="Let aiortc decode the browser's Opus (48 kHz stereo, in a worker thread, then resampled to 24 kHz) "
              "instead of decoding 24 kHz mono in the loop; for comparison (bench_web_footprint).")
@silence_options
def web(cfg, host, port, cert, key, jitter_ms, rx_prefetch, via_resampler, aiortc_encoder, aiortc_decoder, silence):
    """Stage: talk from a browser over WebRTC (the mic's and the player's jobs; echo cancelled by the browser)."""
    from common.runner import run_stage
    from services.stages.web.stage import WebStage

    ssl_context = _tls_context(cert, key)
    if ssl_context is None and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("voicebus.web").warning(
            "serving plain HTTP on %s: browsers on other machines will refuse the microphone (getUserMedia needs "
            "HTTPS off localhost); give --cert and --key", host)
    sys.exit(run_stage(WebStage(host, port, ssl_context, jitter_ms=jitter_ms, rx_prefetch=rx_prefetch,
                                via_resampler=via_resampler, aiortc_encoder=aiortc_encoder,
                                aiortc_decoder=aiortc_decoder, silence=silence), cfg))


@main.command()
@bus_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the Media Streams websocket (and the TwiML webhook) listens on.")
@click.option("--port", type=int, default=8090, show_default=True, help="Its port (0: any free one, logged).")
@click.option("--session-format", type=click.Choice(["pcmu", "pcm16"]), default="pcmu", show_default=True,
              help="The gateway's --audio-format: pcmu passes the caller's μ-law through untouched both ways; pcm16 "
              "converts here (decode and 8 -> 24 kHz in, 24 -> 8 kHz and encode out).")
@click.option("--lead-ms", type=click.IntRange(20, 1000), default=100, show_default=True,
              help="Reply audio sent ahead of what the carrier has played: more rides out network jitter, less "
              "leaves less for a barge-in to clear.")
@click.option("--jitter-ms", type=int, default=40, show_default=True, help="Reply audio buffered before sending.")
@click.option("--public-url", default="", help="The wss:// URL a carrier reaches this stage's /media by (TLS "
              "ends at your proxy), for the TwiML that POST /twilio/voice answers. Default: this server's ws:// URL.")
def phone(cfg, host, port, session_format, lead_ms, jitter_ms, public_url):
    """Stage: answer a phone call over Twilio Media Streams (the mic's and the player's jobs for a caller).

    Point a Twilio number's voice webhook at POST /twilio/voice (or your own TwiML's <Connect><Stream> at
    /media); run the gateway with the same --audio-format (pcmu: μ-law end to end, no resampling).
    Barge-in cuts at what the phone played: the last mark the carrier echoed."""
    from common.runner import run_stage
    from services.stages.phone.stage import PhoneStage
    from services.stages.web.placement import OFFER_SECRET_ENV

    sys.exit(run_stage(PhoneStage(host, port, session_format, jitter_ms=jitter_ms, lead_ms=lead_ms,
                                  token=os.environ.get(OFFER_SECRET_ENV, ""), public_url=public_url), cfg))


@main.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address for the page and offers; 0.0.0.0 for a LAN (give --cert/--key: browsers need HTTPS there).")
@click.option("--port", type=int, default=8080, show_default=True, help="HTTP(S) port (0: any free one, logged).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM) for HTTPS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM) for HTTPS.")
@click.option("--ray-address", envvar="RAY_ADDRESS", default=None,
              help="Join this Ray cluster ('auto': the one `ray start` made here). Default: an embedded local Ray.")
@click.option("--slots", type=click.IntRange(1), default=None,
              help="Conversations this machine takes with the embedded Ray (default: from the measured cost of one, "
              "about 4 per core). Cluster nodes declare theirs: ray start --resources '{\"conversation\": N}'.")
@click.option("--idle-timeout", "idle_timeout_s", type=float, default=300.0, show_default=True,
              help="End a conversation after this many seconds without speech or reply (0: never).")
@click.option("--node-host", default=None,
              help="Address each conversation's web stage serves on (offers, media). Default: 127.0.0.1 with the "
              "embedded Ray, each node's own address when joining a cluster.")
@click.option("--prewarm", type=click.IntRange(0), default=2, show_default=True,
              help="Stage sets kept started and idle, so a caller is live in one offer round trip (they hold slots).")
@click.option("--root", envvar="VOICEBUS_TRACE_DIR", help="Session store (default: $XDG_DATA_HOME/voicebus/sessions).")
@click.option("--tools", "tool_modules", multiple=True, metavar="PATH_OR_MODULE",
              help="More tools for every conversation, beside examples/tools.py (repeatable).")
@click.option("--operator-token-file", type=click.Path(dir_okay=False), default=None,
              help="The operator token /status and /drain require (made 0600 at the first start and printed once). "
              "Default: $XDG_CONFIG_HOME/voicebus/operator-token; VOICEBUS_OPERATOR_TOKEN overrides it.")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A host name the control endpoints may be reached by (a proxy's); IP literals, localhost and "
              "this machine's names always may (repeatable).")
@click.option("--client-offers", default="2/30", show_default=True, metavar="AT_ONCE/PER_MINUTE",
              help="Offers one client address may have in flight and make a minute (more: 429 with Retry-After). "
              "Raise it when many callers share one address (a NAT, a load test).")
@click.option("--twilio-auth-token", envvar="TWILIO_AUTH_TOKEN", default="",
              help="Check Twilio's X-Twilio-Signature on POST /twilio/voice (unsigned or wrongly signed: 403). Without "
              "it any caller of the webhook can start a phone conversation.")
@click.option("--twilio-url", default="", metavar="URL",
              help="The base URL Twilio calls (https://voice.example.com) when a proxy is between: the signature "
              "covers it. Default: the URL the request arrived at.")
@click.option("--phone-voice", default=None, metavar="VOICE",
              help="The assistant's voice on phone calls, where a narrowband line favours some voices (offline, "
              "ash/echo/onyx/cedar are flite's rms, the one its recogniser reads best at 8 kHz). Default: as browsers.")
@click.option("--log-level", default="INFO", show_default=True, envvar="VOICEBUS_LOG_LEVEL")
@click.pass_context
def serve(ctx, host, port, cert, key, ray_address, slots, idle_timeout_s, node_host, prewarm, root, tool_modules,
          operator_token_file, allowed_hosts, client_offers, twilio_auth_token, twilio_url, phone_voice, log_level):
    """Serve many callers: every browser and phone call its own stage set, placed on nodes by Ray.

    Phone calls come in at POST /twilio/voice (a Twilio number's voice webhook), μ-law end to end.

    `/status` and `/drain` need the operator token (see --operator-token-file).
    `voicebus serve drain NODE` marks a node draining on a running serve."""
    if ctx.invoked_subcommand:
        return
    from services.serving.serve.operator import OperatorTokenError, load_or_create
    from services.serving.serve.server import run_serve

    setup_logging(log_level)
    ssl_context = _tls_context(cert, key)
    if ssl_context is None and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("voicebus.serve").warning(
            "serving plain HTTP on %s: the operator token and every offer cross the network in clear, and browsers "
            "on other machines refuse the microphone (getUserMedia needs HTTPS off localhost); give --cert and --key",
            host)
    try:
        token, token_file, created = load_or_create(Path(operator_token_file) if operator_token_file else None)
    except OperatorTokenError as exc:
        raise click.ClickException(str(exc)) from None
    if created:
        click.echo(f"operator token (for /status and /drain; kept in {token_file}, 0600): {token}", err=True)
    try:
        at_once, per_minute = (int(part) for part in client_offers.split("/"))
        if at_once < 1 or per_minute < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{client_offers!r}: expected AT_ONCE/PER_MINUTE, two positive numbers (2/30)",
                                 param_hint="--client-offers") from None
    tools_args = [arg for module in tool_modules for arg in ("--module", str(Path(module).resolve()))]
    sys.exit(run_serve(host, port, ssl_context, ray_address, slots, idle_timeout_s, _trace_root(root), tools_args,
                       prewarm, node_host or (None if ray_address else "127.0.0.1"), phone_voice,
                       operator={"token": token, "allowed_hosts": list(allowed_hosts),
                                 "client_offers": (at_once, per_minute),
                                 "twilio": {"auth_token": twilio_auth_token, "url": twilio_url}}))


@serve.command("drain")
@click.argument("node")
@click.option("--url", default="http://127.0.0.1:8080/", show_default=True, help="The running serve's address.")
@click.option("--operator-token-file", type=click.Path(dir_okay=False), default=None,
              help="Where the running serve keeps its operator token (default as serve's; VOICEBUS_OPERATOR_TOKEN wins).")
def serve_drain(node, url, operator_token_file):
    """No new conversations on NODE (an id, or its first digits, from /status); its live ones finish, then Ray
    stops the node."""
    import json
    import os
    import urllib.error
    import urllib.request

    from services.serving.serve.operator import TOKEN_ENV, OperatorTokenError, default_token_file, read_token

    try:
        token = os.environ.get(TOKEN_ENV) or read_token(Path(operator_token_file) if operator_token_file
                                                        else default_token_file())
    except OperatorTokenError as exc:
        raise click.ClickException(f"{exc} (the token `voicebus serve` made at its first start)") from None
    request = urllib.request.Request(url.rstrip("/") + "/drain", data=json.dumps({"node": node}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            click.echo(json.loads(response.read())["message"])
    except urllib.error.HTTPError as error:
        raise click.ClickException(json.loads(error.read() or b"{}").get("error", f"HTTP {error.code}")) from None
    except (urllib.error.URLError, OSError) as error:
        raise click.ClickException(f"no voicebus serve answers at {url}: {getattr(error, 'reason', error)}") from None


@main.command("call")
@click.argument("url")
@click.option("--say", "sentences", multiple=True, help="A sentence to speak (flite; repeatable: one turn each).")
@click.option("--wav", "wav_path", type=click.Path(exists=True, dir_okay=False),
              help="Speak this WAV instead (any rate; mono is taken from the first channel).")
@click.option("--voice", default="slt", show_default=True, help="flite voice for --say.")
@click.option("--turns", type=click.IntRange(1), default=None,
              help="With --wav: replies to wait for (default 1). Each --say waits for its own.")
@click.option("--pause", "pause_s", type=click.FloatRange(0), default=0.5, show_default=True,
              help="Seconds of silence after each reply has played out before the next --say (each sentence "
                   "waits for the reply before it: none barges in).")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Give up after this long.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False), help="Write what the caller heard (WAV).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--take-turns", is_flag=True, hidden=True,
              help="What --say always does now: each sentence once the reply before it has played out, replies "
                   "counted by ear and timed at the caller (heard_ms), so any WebRTC voice endpoint works.")
@click.option("--offer-path", default="offer", show_default=True,
              help="Where the endpoint takes offers (pipecat's SmallWebRTC runner: api/offer).")
@click.option("--dial-at", type=float, default=None, metavar="EPOCH_S",
              help="Get ready (speech, WebRTC), then offer at this wall-clock time (seconds since the epoch, "
                   "`date +%s.%N`): a rig starts many callers ahead so that their start-up is not the endpoint's "
                   "load when they press Connect. A caller not ready by then offers at once (dial_late_ms).")
@click.option("--carrier", type=click.Choice(["webrtc", "twilio"]), default="webrtc", show_default=True,
              help="twilio: be the phone network instead of a browser: URL is a voice webhook (POST, TwiML "
              "<Connect><Stream>) or a Media Streams ws:// URL; μ-law at 8 kHz, marks echoed as played, clear honoured.")
@click.option("--dtmf", default="", metavar="DIGITS", help="--carrier twilio: press these keys after the last turn.")
@click.option("--twilio-auth-token", envvar="TWILIO_AUTH_TOKEN", default="",
              help="--carrier twilio: sign the webhook request with it (X-Twilio-Signature), as Twilio does.")
def call_cmd(url, sentences, wav_path, voice, turns, pause_s, timeout_s, record_path, as_json, take_turns, offer_path,
             dial_at, carrier, dtmf, twilio_auth_token):
    """Call a `web`, `serve` or phone endpoint as a browser (WebRTC) or Twilio would; print each turn as heard.

    --carrier twilio is the phone network: a voice webhook's TwiML followed, or a Media Streams ws:// URL.

    Exit codes: 0 every reply heard; 1 the call failed (timeout, dropped line, refused offer); 3 busy (a full
    serve, a web stage with a caller, too many offers: try again later); 130 Ctrl-C (the turns done are
    printed first)."""
    from services.serving.call.command import run_call, run_carrier_call

    if bool(sentences) == bool(wav_path):
        raise click.UsageError("give --say SENTENCE (repeatable) or --wav FILE")
    del take_turns  # what --say does anyway
    if carrier == "twilio":
        sys.exit(run_carrier_call(url, list(sentences), wav_path, voice, pause_s, timeout_s, record_path, as_json,
                                  dtmf, twilio_auth_token, dial_at))
    sys.exit(run_call(url, list(sentences), wav_path, voice, turns or max(1, len(sentences)), pause_s, timeout_s,
                      record_path, as_json, offer_path=offer_path, dial_at=dial_at))


def _prompt(prompt_id: str | None, version: str | None, variables: tuple[str, ...]) -> dict | None:
    """--prompt-id/--prompt-version/--prompt-var as the GA session's `prompt` object."""
    if not prompt_id:
        if version or variables:
            raise click.UsageError("--prompt-version and --prompt-var need --prompt-id")
        return None
    pairs = [item.partition("=") for item in variables]
    bad = [item for item, (_name, sep, _value) in zip(variables, pairs, strict=True) if not sep]
    if bad:
        raise click.BadParameter(f"{bad[0]!r}: expected NAME=VALUE", param_hint="--prompt-var")
    prompt: dict = {"id": prompt_id}
    if version:
        prompt["version"] = version
    if pairs:
        prompt["variables"] = {name: value for name, _sep, value in pairs}
    return prompt


@main.command()
@bus_options
@click.option("--url", help="Full websocket URL (default: derived from OPENAI_BASE_URL as the openai SDK does, "
              "or the local simulator when OPENAI_API_KEY is unset).")
@click.option("--model", default="gpt-realtime", show_default=True, help="Realtime model (beta: gpt-4o-realtime-preview).")
@click.option("--protocol", type=click.Choice(["ga", "beta"]), default="ga", show_default=True,
              help="GA protocol, or beta (`OpenAI-Beta: realtime=v1`).")
@click.option("--instructions", default=None, help="System instructions for the assistant.")
@click.option("--voice", default="alloy", show_default=True)
@click.option("--audio-format", type=click.Choice(["pcm16", "pcmu", "pcma"]), default="pcm16", show_default=True,
              help="The session's audio both ways: pcm16 (24 kHz; a mic or a browser), or pcmu/pcma (G.711 at 8 kHz, "
              "GA audio/pcmu, beta g711_ulaw: a phone call's bytes go to the server and back untouched). "
              "audio.user must come at the format's rate; s16le at 8 kHz is encoded here.")
@click.option("--transcription-model", default="whisper-1", show_default=True, help="'none' to disable.")
@click.option("--turn-detection", "vad_type", type=click.Choice(["server_vad", "semantic_vad"]), default="server_vad",
              show_default=True, help="server_vad: the end of a turn is silence_duration_ms of quiet; semantic_vad: "
              "the server judges whether the phrase is finished (see --eagerness).")
@click.option("--eagerness", type=click.Choice(["auto", "low", "medium", "high"]), default="auto", show_default=True,
              help="semantic_vad: how soon a turn ends; low lets the user take their time (an unfinished phrase "
              "waits up to 8 s), high answers soonest (2 s); auto is medium (4 s).")
@click.option("--noise-reduction", type=click.Choice(["near_field", "far_field"]), default=None,
              help="The server's input noise reduction: near_field (headset), far_field (laptop, room); default off.")
@click.option("--transcription-logprobs", is_flag=True, help="Ask for the user transcript's log probabilities (GA).")
@click.option("--truncation-retention", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="When the context is full, keep this share of it (GA `truncation: retention_ratio`).")
@click.option("--prompt-id", default=None, help="A stored prompt (GA `prompt`): its id ...")
@click.option("--prompt-version", default=None, help="... its version ...")
@click.option("--prompt-var", "prompt_vars", multiple=True, metavar="NAME=VALUE", help="... and its variables.")
@click.option("--max-output-tokens", type=click.IntRange(1, 4096), default=None,
              help="Cap each response (the server ends it `incomplete`, reason max_output_tokens).")
@click.option("--speed", type=click.FloatRange(0.25, 1.5), default=None, help="The assistant's speaking speed.")
@click.option("--idle-timeout", "idle_timeout_s", type=click.FloatRange(1, min_open=False), default=None,
              help="Seconds of quiet on the line (nobody speaking, nothing playing) before the assistant asks "
              "--idle-prompt; after --idle-prompts unanswered asks the call ends (a web page is hung up). Off by default.")
@click.option("--idle-prompt", default="Are you still there?", show_default=True)
@click.option("--idle-prompts", type=click.IntRange(0), default=2, show_default=True)
@click.option("--greeting", default=None, metavar="TEXT",
              help="Said as each conversation's line goes live (its first audio), before the caller speaks.")
@click.option("--greeting-uninterruptible", is_flag=True,
              help="The greeting is heard whole (a disclaimer): while it plays the caller's audio reaches the server "
              "as silence (counted: muted_frames). Any reply asked for with metadata interruptible=false is too.")
@click.option("--false-interruptions", is_flag=True,
              help="Speech over a reply pauses it; a backchannel (mhmm, yeah, ok; or nothing recognisable, short) "
              "resumes it where it paused, anything else cuts it at the played position. The server's own "
              "interrupt_response and create_response are then off: the gateway decides and answers.")
@click.option("--min-interruption-s", type=click.FloatRange(0, 10), default=0.0, show_default=True,
              help="With --false-interruptions: speech over a reply shorter than this (a cough) never cuts it.")
@click.option("--min-interruption-words", type=click.IntRange(0, 20), default=0, show_default=True,
              help="With --false-interruptions: nor fewer words than this (0: the backchannel list decides).")
@click.option("--dtmf/--no-dtmf", "keys_to_model", default=True, show_default=True,
              help="Keys a phone caller presses (phone.dtmf) are told to the model as their turn (\"The caller "
              "pressed 1 #\"), and the first one cuts a reply that is playing, as speech does.")
@click.option("--dtmf-wait-ms", "keys_wait_ms", type=click.IntRange(100, 10_000), default=1500, show_default=True,
              help="Keys are gathered until # or this long without one, then told as one turn.")
@click.option("--server-mcp", "server_mcp", multiple=True, metavar="LABEL=URL",
              help="A remote MCP server (streamable HTTP) the Realtime server lists and calls itself (GA; repeatable). "
              "It asks before each call: see --mcp-approve. Its calls are traced with the turn.")
@click.option("--mcp-approve", "mcp_approve", multiple=True, metavar="TOOL",
              help="A server-side MCP tool whose calls are approved ('*': all; repeatable). Any other is refused, "
              "and the model is told so.")
@click.option("--vad-threshold", type=float, default=0.3, show_default=True)
@click.option("--vad-prefix-ms", type=int, default=300, show_default=True)
@click.option("--vad-silence-ms", type=int, default=600, show_default=True)
@click.option("--echo-guard", is_flag=True, help="Without headphones: forward mic audio during playback only when "
              "it is louder than the playback (no self-interruption).")
@click.option("--echo-guard-ratio", type=float, default=1.5, show_default=True,
              help="Mic level must exceed the playback level times this (1.5 = 3.5 dB): raise it if the assistant "
              "still interrupts itself, lower it if users cannot interrupt.")
@click.option("--interrupt-response/--no-interrupt-response", default=True, show_default=True,
              help="The server cancels its response when the user speaks (the gateway then only flushes and "
              "truncates); off: the gateway sends response.cancel itself.")
@click.option("--session-file", type=click.Path(exists=True, dir_okay=False),
              help="Session settings from a YAML or JSON file (the fields of an eval scenario's `settings:`: vad_type, "
              "eagerness, false_interruptions, idle_timeout_s, greeting, voice, ...); flags given here win over it.")
@click.option("--ws-log", type=click.Path(dir_okay=False), help="Websocket traffic log (JSON lines, audio elided).")
@click.option("--max-session-min", type=float, default=55.0, show_default=True,
              help="Reconnect before the server's 60-minute session limit.")
@click.option("--tool-timeout", type=float, default=15.0, show_default=True,
              help="Seconds to wait for a tool.result (for tools that announce no timeout of their own) before "
              "the gateway answers the call with an error itself.")
def gateway(cfg, url, model, protocol, instructions, voice, audio_format, transcription_model, vad_type, eagerness, noise_reduction,
            transcription_logprobs, truncation_retention, prompt_id, prompt_version, prompt_vars, max_output_tokens,
            speed, idle_timeout_s, idle_prompt, idle_prompts, greeting, greeting_uninterruptible, false_interruptions,
            min_interruption_s,
            min_interruption_words, keys_to_model, keys_wait_ms,
            server_mcp, mcp_approve, vad_threshold, vad_prefix_ms, vad_silence_ms, echo_guard, echo_guard_ratio,
            interrupt_response, session_file, ws_log, max_session_min, tool_timeout):
    """Stage: audio.user -> OpenAI Realtime websocket -> rt.* events, audio.assistant; barge-in."""
    from common.config import openai_target, realtime_ws_url
    from common.runner import run_stage
    from services.stages.gateway.bargein import EchoGuard
    from services.stages.gateway.session import SessionSettings
    from services.stages.gateway.stage import GatewayStage

    target = openai_target()
    if target.is_simulator and not os.environ.get("VOICEBUS_SESSION_LAUNCHED"):
        click.echo(f"gateway: OPENAI_API_KEY is not set: using the local simulator at {target.base_url} "
                   "(start it with `voicebus simulate`; `voicebus up` does)", err=True)
    headers = [f"Authorization: Bearer {target.api_key}"] + (["OpenAI-Beta: realtime=v1"] if protocol == "beta" else [])
    settings = SessionSettings(model=model, voice=voice, audio_format=audio_format,
                               transcription_model=None if transcription_model == "none" else transcription_model,
                               vad_threshold=vad_threshold, vad_prefix_padding_ms=vad_prefix_ms,
                               vad_silence_duration_ms=vad_silence_ms, interrupt_response=interrupt_response,
                               vad_type=vad_type, eagerness=eagerness, noise_reduction=noise_reduction,
                               transcription_logprobs=transcription_logprobs,
                               truncation_retention=truncation_retention,
                               prompt=_prompt(prompt_id, prompt_version, prompt_vars),
                               max_output_tokens=max_output_tokens, speed=speed, idle_timeout_s=idle_timeout_s,
                               idle_prompt=idle_prompt, idle_prompts=idle_prompts, greeting=greeting,
                               greeting_interruptible=not greeting_uninterruptible,
                               false_interruptions=false_interruptions, min_interruption_s=min_interruption_s,
                               min_interruption_words=min_interruption_words,
                               keys_wait_s=keys_wait_ms / 1000 if keys_to_model else None,
                               server_mcp=_server_mcp(server_mcp, protocol), mcp_approve=frozenset(mcp_approve))
    if instructions:
        settings.instructions = instructions
    if session_file:
        settings = dataclasses.replace(settings, **_session_file_settings(Path(session_file)))
    stage = GatewayStage(url or realtime_ws_url(target.base_url, model), headers, protocol, settings,
                         EchoGuard(echo_guard_ratio) if echo_guard else None, Path(ws_log) if ws_log else None,
                         max_session_min * 60, "simulator" if target.is_simulator else "openai", tool_timeout)
    sys.exit(run_stage(stage, cfg))


@main.command()
@bus_options
@click.option("--module", "modules", multiple=True, metavar="PATH_OR_MODULE",
              help="Python tools: every public function with type hints in this .py file or dotted module "
              "(repeatable).")
@click.option("--mcp", "mcp_commands", multiple=True, metavar="'COMMAND ARGS'",
              help="An MCP server to start over stdio, e.g. --mcp 'mcp-server-time' (repeatable).")
@click.option("--timeout", "default_timeout", type=float, default=10.0, show_default=True,
              help="Seconds a call may take before it is answered with an error.")
@click.option("--tool-timeout", "tool_timeouts", multiple=True, metavar="NAME=SECONDS",
              help="A different timeout for one tool (repeatable).")
@click.option("--max-output-chars", type=int, default=8000, show_default=True,
              help="Longer outputs are cut, and the cut is said in the output.")
def tools(cfg, modules, mcp_commands, default_timeout, tool_timeouts, max_output_chars):
    """Stage: run the functions the model calls (Python modules, MCP servers); tool.call -> tool.result."""
    from common.runner import run_stage
    from common.stage import StageError
    from services.stages.tools.stage import ToolsStage

    timeouts = {}
    for item in tool_timeouts:
        name, _, seconds = item.partition("=")
        try:
            timeouts[name.strip()] = float(seconds)
        except ValueError as exc:
            raise click.BadParameter(f"{item!r}: expected NAME=SECONDS", param_hint="--tool-timeout") from exc
    if not modules and not mcp_commands:
        raise click.UsageError("give at least one --module or --mcp (try --module examples/tools.py)")
    stage = ToolsStage(list(modules), list(mcp_commands), default_timeout, timeouts, max_output_chars)
    try:
        stage.load_modules()  # before waiting for a bus: a module that does not load says so now
    except StageError as exc:
        raise SetupError(str(exc)) from exc
    sys.exit(run_stage(stage, cfg))


@main.command()
@click.option("--question", "questions", multiple=True,
              help="A question to speak (repeatable; default: the weather, the time in Tokyo, a short story).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="voicebus-demo", show_default=True,
              help="Where recordings and logs go (a folder per session).")
@click.option("--voice", default="slt", show_default=True, help="flite voice for the questions (slt, rms, awb, kal16).")
@click.option("--root", envvar="VOICEBUS_TRACE_DIR", help="Session store (default: $XDG_DATA_HOME/voicebus/sessions).")
@click.option("--tools", "tool_modules", multiple=True, metavar="PATH_OR_MODULE",
              help="Your own tools (typed Python functions) instead of examples/tools.py (repeatable).")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False),
              help="Reply rules for the simulator (see `voicebus simulate --help`), e.g. to call your tool when "
              "a question matches. Offline only.")
@click.option("--log-level", default="WARNING", show_default=True, envvar="VOICEBUS_LOG_LEVEL")
def demo(questions, out_dir, voice, root, tool_modules, rules, log_level):
    """The whole pipeline offline: speak questions, hear answers, print the conversation and latency."""
    from services.commands.demo import DEFAULT_QUESTIONS, run_demo

    setup_logging(log_level)
    sys.exit(run_demo(list(questions) or DEFAULT_QUESTIONS, Path(out_dir), voice, _trace_root(root),
                      list(tool_modules), Path(rules) if rules else None))


# a session file's field -> the gateway flag that sets it (where the names differ)
SESSION_FIELD_FLAGS = {"vad_prefix_padding_ms": "vad_prefix_ms", "vad_silence_duration_ms": "vad_silence_ms",
                       "greeting_interruptible": "greeting_uninterruptible"}


def _session_file_settings(path: Path) -> dict[str, object]:
    """The file's settings that no flag on the command line (or in the environment) contradicts."""
    from click.core import ParameterSource

    from services.stages.gateway.session import load_session_file

    try:
        settings = load_session_file(path)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    ctx = click.get_current_context()
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    return {field: value for field, value in settings.items() if SESSION_FIELD_FLAGS.get(field, field) not in given}


def _server_mcp(values: tuple[str, ...], protocol: str) -> tuple[tuple[str, str], ...]:
    """--server-mcp LABEL=URL values, checked: a label each (OpenAI's rule: letters, digits, _ and -), http(s)."""
    servers = []
    for value in values:
        label, _, url = value.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", label) or not url.startswith(("http://", "https://")):
            raise click.BadParameter(f"{value!r}: give LABEL=URL, e.g. docs=https://mcp.example.com/mcp",
                                     param_hint="--server-mcp")
        servers.append((label, url))
    if servers and protocol != "ga":
        raise click.BadParameter("server-side MCP tools are GA only (drop --protocol beta)", param_hint="--server-mcp")
    if len({label for label, _ in servers}) != len(servers):
        raise click.BadParameter("each server needs a label of its own", param_hint="--server-mcp")
    return tuple(servers)


@main.command("eval")
@click.argument("scenarios", nargs=-1, type=click.Path(exists=True))
@click.option("--instructions", type=click.Path(exists=True, dir_okay=False),
              help="A file with the assistant's instructions (the gateway's --instructions).")
@click.option("--tools", "tool_modules", multiple=True, metavar="PATH_OR_MODULE",
              help="Tool modules (typed Python functions) instead of examples/tools.py (repeatable).")
@click.option("--mcp", "mcp_commands", multiple=True, metavar="COMMAND",
              help="An MCP server's command line whose tools are offered too (repeatable).")
@click.option("--repeat", type=click.IntRange(1), default=1, show_default=True,
              help="Run every scenario this many times: pass rates for a flaky agent.")
@click.option("--baseline", metavar="RUN", help="An earlier run (its id, its directory, `latest`: the latest run of the "
              "same scenario files, or `latest-passing`): the report diffs against it, and a check that held there "
              "and fails now is a regression (exit 1).")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False),
              help="Reply rules for the simulator (see `voicebus simulate --help`). Offline only.")
@click.option("--out", "evals_root", envvar="VOICEBUS_EVAL_DIR", type=click.Path(file_okay=False),
              help="Where runs are stored (default: $XDG_DATA_HOME/voicebus/evals).")
@click.option("--root", envvar="VOICEBUS_TRACE_DIR", help="Session store that `session:` turns and --from-session "
              "read (default: $XDG_DATA_HOME/voicebus/sessions).")
@click.option("--from-session", "from_session", metavar="SESSION",
              help="Write a scenario file (-o) from a stored conversation (id or directory) instead of running.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="With --from-session: the scenario file to write (its WAVs go beside it).")
@click.option("--phone", is_flag=True, help="Make each scenario a phone call: a fake carrier (Twilio Media Streams, "
              "μ-law 8 kHz) calls a phone stage whose session is audio/pcmu. Needed for `dtmf:` turns.")
@click.option("--no-upload", is_flag=True, help="Store the run only, even when WANDB_API_KEY is set.")
@click.option("--log-level", default="WARNING", show_default=True, envvar="VOICEBUS_LOG_LEVEL")
def eval_cmd(scenarios, instructions, tool_modules, mcp_commands, repeat, baseline, rules, evals_root, root,
             from_session, output, phone, no_upload, log_level):
    """Spoken regression tests: run YAML scenarios through the real pipeline and check every turn.

    Each scenario is a conversation of user turns (spoken by flite, a WAV, or a stored session's
    audio; keys pressed over --phone; a quiet wait), each with expectations: what the reply contains
    or matches, the tools called, the user's transcript within a WER, the latency at the ear, after a
    barge-in that the reply was cut where the player had played it (or, for a backchannel, that it
    was not), how many turns the server made of it, an idle prompt. A scenario's `settings:` are the
    gateway's for it alone (turn detection, eagerness, false interruptions, idle prompts). Offline on the simulator by default; on OpenAI with a key.
    Prints a table, stores the run (run.json, report.html, audio), uploads it as a Weave
    Evaluation when WANDB_API_KEY is set. Exit 0: every check held; 1: a check failed or a
    regression against --baseline; 2: the run could not start (nothing is stored).
    """
    from services.commands.evals.command import default_evals_root, run_eval
    from services.commands.evals.run import Settings

    setup_logging(log_level)
    if from_session:
        from services.commands.evals.from_session import scenario_from_session

        if not output:
            raise click.UsageError("--from-session writes a scenario file: name it with -o FILE.yaml")
        session_dir = Path(from_session) if Path(from_session).is_dir() else _trace_root(root) / from_session
        try:
            written = scenario_from_session(session_dir, Path(output))
        except (ValueError, OSError) as exc:
            raise SetupError(str(exc)) from exc
        click.echo(f"wrote {written} (run it: voicebus eval {written})")
        return
    files = [f for path in map(Path, scenarios) for f in (sorted(path.glob("*.yaml")) if path.is_dir() else [path])]
    if not files:
        raise click.UsageError("name the scenario files (or folders of *.yaml) to run, e.g. examples/evals/")
    settings = Settings(Path(instructions) if instructions else None, list(tool_modules), list(mcp_commands), repeat,
                        Path(rules) if rules else None, _trace_root(root), phone)
    sys.exit(run_eval(files, settings, Path(evals_root) if evals_root else default_evals_root(), baseline,
                      upload=not no_upload))


@main.command()
@bus_options
@click.option("-o", "--output", "path", required=True, type=click.Path(dir_okay=False), help="Capture file (appended).")
@click.argument("prefixes", nargs=-1)
@click.option("--duration", type=float, help="Stop after this many seconds.")
@click.option("--count", type=int, help="Stop after this many messages.")
def capture(cfg, path, prefixes, duration, count):
    """Record bus messages exactly as received (crash-safe, append-only) for replay and inspection."""
    from services.devtools.capture import run_capture

    sys.exit(run_capture(cfg, path, list(prefixes), duration, count))


@main.command()
@bus_options
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("prefixes", nargs=-1)
@click.option("--only", "only", multiple=True, help="Topic prefix to replay (same as PREFIXES; repeatable).")
@click.option("--speed", default="1.0", show_default=True, help="Pacing factor, or 'max' for no pacing.")
@click.option("--loop", is_flag=True, help="Start again at the end.")
@click.option("--from", "from_s", type=float, help="Start this many seconds into the capture.")
@click.option("--to", "to_s", type=float, help="Stop this many seconds into the capture.")
def replay(cfg, path, prefixes, only, speed, loop, from_s, to_s):
    """Publish a capture again with its original pacing, for example only audio.user into a running gateway."""
    from common.capture_file import CaptureError
    from common.config import session_id
    from services.devtools.replay import run_replay

    try:
        pace = None if speed == "max" else float(speed)
    except ValueError as exc:
        raise click.BadParameter("a number or 'max'", param_hint="--speed") from exc
    try:
        sys.exit(run_replay(cfg, path, list(prefixes) + list(only), pace, loop, from_s, to_s, session_id()))
    except CaptureError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--wav", "wav_topic", help="Export this audio topic as a WAV (with -o).")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Where --wav writes.")
@click.option("--events", is_flag=True, help="Print the rt.* event timeline.")
def inspect_cmd(path, wav_topic, out, events):
    """Summarise a capture: topics, counts, duration, gaps, bad records; export audio; list events."""
    from common.capture_file import CaptureError
    from services.devtools.inspect_capture import export_wav, print_events, summarize

    try:
        if wav_topic:
            if not out:
                raise click.UsageError("--wav needs -o OUT.wav")
            sys.exit(export_wav(path, wav_topic, out))
        sys.exit(print_events(path) if events else summarize(path))
    except CaptureError as exc:
        raise click.ClickException(str(exc)) from exc


def _trace_root(root: str | None) -> Path:
    from services.stages.logger.store import default_root

    return Path(root) if root else default_root()


@main.command()
@bus_options
@click.option("--root", envvar="VOICEBUS_TRACE_DIR", help="Session store (default: $XDG_DATA_HOME/voicebus/sessions).")
@click.option("--project", default="voicebus", show_default=True, envvar="WEAVE_PROJECT", help="Weave project.")
@click.option("--prices", type=click.Path(exists=True, dir_okay=False),
              help="JSON USD per 1M tokens: audio_in, audio_in_cached, text_in, text_in_cached, audio_out, text_out.")
@click.option("--no-upload", is_flag=True, help="Only store locally, even when WANDB_API_KEY is set.")
@click.option("--no-report", is_flag=True, help="Do not write report.html into a session's directory as it closes "
              "(`voicebus report` writes one later).")
def logger(cfg, root, project, prices, no_upload, no_report):
    """Stage: store every conversation locally (turns, audio, timing, cost), then upload it to Weave."""
    import json

    from common.runner import run_stage
    from services.stages.logger.conversation import DEFAULT_PRICES
    from services.stages.logger.stage import LoggerStage

    table = dict(DEFAULT_PRICES)
    if prices:
        table.update(json.loads(Path(prices).read_text()))
    sys.exit(run_stage(LoggerStage(_trace_root(root), table, not no_upload, project, not no_report), cfg))


@main.command()
@click.argument("sessions", nargs=-1)
@click.option("--root", help="Session store (default: $VOICEBUS_TRACE_DIR or $XDG_DATA_HOME/voicebus/sessions); "
              "with --evals the eval runs' folder (default: $VOICEBUS_EVAL_DIR or $XDG_DATA_HOME/voicebus/evals).")
@click.option("--evals", is_flag=True, help="Upload eval runs (`voicebus eval`) as Weave Evaluations, not sessions; "
              "the arguments are run ids.")
@click.option("--project", default="voicebus", show_default=True, envvar="WEAVE_PROJECT", help="Weave project.")
@click.option("--timeout", type=int, default=600, show_default=True,
              help="Give up after this many seconds (what is not confirmed stays pending).")
@click.option("--follow", is_flag=True, help="Live: send each turn of one SESSION as the logger stores it, and "
              "the session call when it has ended (the logger starts this per session when WANDB_API_KEY is set).")
@click.option("--owner-pid", type=int, hidden=True, help="With --follow: stop when this process (the logger) is gone.")
@click.option("--log-level", default="WARNING", show_default=True, envvar="VOICEBUS_LOG_LEVEL")
def upload(sessions, root, evals, project, timeout, follow, owner_pid, log_level):
    """Upload stored sessions (or eval runs) to W&B Weave through the real weave client, each turn exactly once.

    A session's turns appear in Weave's Threads (one thread per session, each turn a turn call) and in
    its Agents view (OpenTelemetry GenAI spans), timed as they happened, with the audio as heard.
    Nothing else leaves the machine: weave's error reporting and version check stay off unless
    VOICEBUS_WEAVE_TELEMETRY=1."""
    import signal

    from services.upload_command import run_upload
    from services.weave_upload import UploadError

    if follow:
        if evals or len(sessions) != 1:
            raise click.UsageError("--follow takes exactly one SESSION (not --evals)")
        from services.stages.logger.live import follow_session

        setup_logging(log_level)
        sys.exit(follow_session(_trace_root(root) / sessions[0], project, owner_pid))

    def give_up(_signum, _frame):
        raise click.ClickException(f"gave up after {timeout}s; unconfirmed sessions stay pending for the next run")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(timeout)
    setup_logging(log_level)
    try:
        if evals:
            from services.commands.evals.command import default_evals_root

            sys.exit(run_upload(Path(root) if root else default_evals_root(), list(sessions), project, evals=True))
        sys.exit(run_upload(_trace_root(root), list(sessions), project))
    except UploadError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("session")
@click.option("-o", "--output", "out", default="report.html", show_default=True, type=click.Path(dir_okay=False))
@click.option("--root", envvar="VOICEBUS_TRACE_DIR", help="Session store (default: $XDG_DATA_HOME/voicebus/sessions).")
def report(session, out, root):
    """Write a self-contained HTML page for a stored session: timeline, waveforms, audio, transcripts, cost."""
    from services.stages.logger.report import write_report

    session_dir = Path(session) if Path(session).is_dir() else _trace_root(root) / session
    try:
        click.echo(f"wrote {write_report(session_dir, Path(out))}")
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("prompt")
@click.option("-o", "--output", "out", default="answer.wav", show_default=True, type=click.Path(dir_okay=False))
@click.option("--model", default="gpt-4o-audio-preview", show_default=True)
@click.option("--voice", default="alloy", show_default=True)
@click.option("--system", default=None, help="System prompt.")
@click.option("--play", is_flag=True, help="Also publish the audio on audio.assistant for a running player.")
@click.option("--root", envvar="VOICEBUS_TRACE_DIR", help="Session store (default: $XDG_DATA_HOME/voicebus/sessions).")
@click.option("--no-upload", is_flag=True, help="Store locally only, even when WANDB_API_KEY is set.")
def say(prompt, out, model, voice, system, play, root, no_upload):
    """Stream a chat-completions audio answer into a 24 kHz WAV, print its transcript, trace it to Weave."""
    from services.commands.say import run_say

    setup_logging("WARNING")
    sys.exit(run_say(prompt, Path(out), model, voice, system, play, _trace_root(root), not no_upload))


@main.command()
@bus_options
def doctor(cfg):
    """Check audio devices, PulseAudio, the bus, stage heartbeats and API keys; say how to fix problems."""
    from services.devtools.doctor import run_doctor

    sys.exit(run_doctor(cfg))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--port", type=int, default=8765, show_default=True, envvar="VOICEBUS_SIM_PORT",
              help="Port (0: pick a free one and print it).")
@click.option("--api-key", default=None, help="Accept only this bearer key (default: any non-empty key).")
@click.option("--listen-fd", type=int, default=None,
              help="Serve on this inherited listening socket instead of binding --host/--port (how `up`, `eval` and "
              "`demo` start it: they bind the port themselves, so nothing can take it between a check and the bind).")
@click.option("--pace", type=click.Choice(["realtime", "fast"]), default="realtime", show_default=True,
              help="Stream assistant audio at 1x (after a short burst) or as fast as possible.")
@click.option("--chunk-ms", type=int, default=100, show_default=True, help="Audio per response delta.")
@click.option("--burst-ms", type=int, default=300, show_default=True, help="Audio sent ahead of real time.")
@click.option("--think-ms", type=int, default=0, show_default=True, help="Delay before the first audio delta.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False),
              help='JSON reply rules: [{"match": REGEX, "reply": "... {transcript} ..."}], or a tool call: '
              '{"match": REGEX, "call": {"name": ..., "arguments": {...}}, "after_call": "... {field} ..."}.')
@click.option("--fault", "fault_kinds", multiple=True,
              type=click.Choice(FAULT_KINDS),
              help="Misbehave on purpose (repeatable); per connection also via ?fault=KIND. Function calling: "
              "bad_arguments, unknown_tool, auto_response (a response of its own after a function output), "
              "late_response (response.create honoured ~3 s late).")
@click.option("--fault-count", type=int, default=None, help="Fire each fault this many times in all.")
@click.option("--fault-after", type=int, default=3, show_default=True, help="drop_mid_response: after N deltas.")
@click.option("--fault-delay-ms", type=int, default=200, show_default=True, help="slow: delay per event.")
@click.option("--markers", is_flag=True,
              help="Timing markers (scripts/bench_pipeline.py): log when a chirp arrives in the input audio "
              "(marker_in) and start every spoken reply with one (marker_out, logged as it is sent).")
@click.option("--echo", is_flag=True,
              help="Every reply is the user's last turn played back (its audio exactly as it came when the session's "
              "formats match: a G.711 line's codes return bit for bit); for testing audio paths end to end.")
@click.option("--log-level", default="INFO", show_default=True, envvar="VOICEBUS_LOG_LEVEL")
def simulate(host, port, api_key, listen_fd, pace, chunk_ms, burst_ms, think_ms, rules, fault_kinds, fault_count, fault_after,
             fault_delay_ms, markers, echo, log_level):
    """Local stand-in for the OpenAI Realtime + chat-completions audio APIs (the offline default)."""
    from services.simulator.faults import Fault
    from services.simulator.realtime import Options
    from services.simulator.replies import Replies
    from services.simulator.server import run_simulator

    setup_logging(log_level)
    try:
        replies = Replies.from_file(Path(rules)) if rules else Replies()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rules") from exc
    faults = [Fault(kind, after_deltas=fault_after, delay_ms=fault_delay_ms, count=fault_count) for kind in fault_kinds]
    options = Options(pace=pace, chunk_ms=chunk_ms, burst_ms=burst_ms, think_ms=think_ms, replies=replies,
                      markers=markers, echo=echo)
    sys.exit(run_simulator(host, port, options, faults, api_key, listen_fd))


if __name__ == "__main__":
    main(prog_name="voicebus")  # usage lines name the command the user knows, not `python -m services.cli`
