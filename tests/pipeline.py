"""Start the real voicebus stages against a simulator, for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from common.wavio import write_wav
from tests.helpers import BusClient, Procs


def start_stages(procs: Procs, client: BusClient, sim_url: str, *, gateway_args: tuple[str, ...] = (),
                 player_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 stages: tuple[str, ...] = ("gateway", "resample", "player")) -> None:
    env = {"VOICEBUS_SIM_URL": sim_url, **(env or {})}
    args = {"gateway": gateway_args, "player": player_args, "resample": ()}
    for stage in stages:
        procs.voicebus(stage, *args[stage], env=env)
    for stage in stages:
        client.wait_for(lambda m, s=stage: m.topic == f"health.{s}", timeout_s=30)
    client.wait_for(lambda m: m.topic == "rt.session.updated", timeout_s=15)


def speak(procs: Procs, pcm: bytes, rate: int, tmp: Path, *, speed: float = 1.0, tail_s: float = 2.0,
          env: dict[str, str] | None = None):
    path = write_wav(tmp / f"utterance-{len(procs.started)}.wav", pcm, rate)
    return procs.voicebus("mic", "--wav", str(path), "--lead-silence", "0.3", "--tail-silence", str(tail_s),
                          "--speed", str(speed), env=env)
