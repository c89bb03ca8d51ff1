"""`voicebus doctor`: what a user runs first when nothing is heard."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import click
import zmq

from common.bus import Receiver, connect_sub, wait_for_bus
from common.config import BusConfig, openai_target

HEARTBEAT_LISTEN_S = 2.5


def _line(ok: bool | None, what: str, fix: str = "") -> bool:
    mark = {True: "ok  ", False: "FAIL", None: "info"}[ok]
    click.echo(f"[{mark}] {what}" + (f"\n       fix: {fix}" if fix and ok is False else ""))
    return ok is not False


def check_audio() -> bool:
    from common.audio_devices import describe_devices, list_devices, open_pyaudio

    try:
        pa = open_pyaudio()
    except Exception as exc:  # PortAudio missing or broken: say so rather than crash
        return _line(False, f"PortAudio/PyAudio: {exc}", "bash scripts/setup.sh")
    try:
        hosts = [pa.get_host_api_info_by_index(i)["name"] for i in range(pa.get_host_api_count())]
        devices = list_devices(pa)
    finally:
        pa.terminate()
    _line(None, f"PortAudio host APIs: {', '.join(hosts) or 'none'}")
    click.echo("\n".join("       " + row for row in describe_devices(devices).splitlines()))
    has_in = any(d.max_input_channels for d in devices)
    has_out = any(d.max_output_channels for d in devices)
    return _line(has_in and has_out, f"input device: {'yes' if has_in else 'no'}, output device: "
                 f"{'yes' if has_out else 'no'}",
                 "no sound card? start virtual devices: bash scripts/pulse-up.sh, then export the variables it "
                 "prints (or use --wav on mic and player)")


def check_pulse() -> bool:
    if not shutil.which("pactl"):
        return _line(False, "PulseAudio tools not installed", "bash scripts/setup.sh")
    result = subprocess.run(["pactl", "info"], capture_output=True, text=True, timeout=5)
    if result.returncode != 0:
        return _line(False, f"PulseAudio does not answer (XDG_RUNTIME_DIR={os.environ.get('XDG_RUNTIME_DIR', '-')})",
                     "bash scripts/pulse-up.sh and export XDG_RUNTIME_DIR as it prints")
    server = next((line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
                   if line.startswith("Default Sink")), "?")
    return _line(True, f"PulseAudio answers (default sink {server})")


def check_bus(cfg: BusConfig) -> tuple[bool, dict[str, dict]]:
    """Whether the bus answers and its stages beat; the stages seen (name -> last heartbeat)."""
    ctx = zmq.Context()
    try:
        if not wait_for_bus(ctx, cfg, timeout_s=1.5):
            return _line(False, f"no bus at {cfg.pub} / {cfg.sub}", "voicebus up (or voicebus bus)"), {}
        _line(True, f"bus answers at {cfg.sub}")
        receiver = Receiver(connect_sub(ctx, cfg, ["health."]), "doctor")
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + HEARTBEAT_LISTEN_S
        while time.monotonic() < deadline:
            message = receiver.recv(timeout_ms=100)
            if message is not None:
                seen[message.topic.removeprefix("health.")] = message.data
        receiver.sock.close(0)
        for stage, data in sorted(seen.items()):
            _line(True, f"stage {stage}: " + " ".join(f"{k}={v}" for k, v in data.items() if k != "state"))
        return _line(bool(seen), f"{len(seen)} stage(s) sending heartbeats", "voicebus up"), seen
    finally:
        ctx.term()


def check_keys() -> bool:
    target = openai_target()
    _line(None, f"OPENAI_API_KEY {'is set' if not target.is_simulator else 'is not set'}: the gateway talks to "
          f"{'OpenAI at ' + target.base_url if not target.is_simulator else 'the local simulator at ' + target.base_url}")
    wandb = bool(os.environ.get("WANDB_API_KEY"))
    _line(None, f"WANDB_API_KEY {'is set' if wandb else 'is not set'}: traces are stored locally"
          f"{' and uploaded to W&B Weave' if wandb else ' (upload later with voicebus upload)'}")
    return True


def run_doctor(cfg: BusConfig) -> int:
    """Judge the set-up that is running: a browser pipeline (web stage, no mic or player) needs no sound card."""
    bus_ok, stages = check_bus(cfg)
    results = [bus_ok]
    if "web" in stages and not {"mic", "player"} & set(stages):
        _line(True, "audio devices: not needed (the web stage serves a browser; no mic or player stage runs)")
    else:
        results += [check_audio(), check_pulse()]
    results.append(check_keys())
    return 0 if all(results) else 1
