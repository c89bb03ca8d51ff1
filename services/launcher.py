"""`voicebus up`: start the bus, then the stages; restart what dies or goes silent; stop it all.

Children are ordinary `voicebus <stage>` processes (the same ones the Procfile lists for honcho).
Each gets PR_SET_PDEATHSIG so that even a SIGKILL of the launcher leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import zmq

from common.bus import Publisher, Receiver, connect_pub, connect_sub, wait_for_bus
from common.config import BusConfig
from common.envelope import Stamper
from common.log import kv
from common.signals import StopFlag

HEARTBEAT_TIMEOUT_S = 5.0  # five missed beats
STARTUP_GRACE_S = 20.0  # a stage may load models before its first beat
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0
HEALTHY_RESET_S = 30.0  # a run this long resets the backoff
STOP_STAGES_S = 3.0
STOP_BUS_S = 1.5
PR_SET_PDEATHSIG = 1

log = logging.getLogger("voicebus.launcher")


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: get SIGTERM when the launcher dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ProcessSpec:
    name: str
    args: list[str]  # arguments to `voicebus`
    heartbeat: bool = True  # bus stages beat on health.<name>; the simulator does not


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    last_beat: float | None = None
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    start_due: float = 0.0
    history: list[str] = field(default_factory=list)


def child_env(cfg: BusConfig, session: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VOICEBUS_BUS_PUB=cfg.pub, VOICEBUS_BUS_SUB=cfg.sub, VOICEBUS_SESSION=session, PYTHONUNBUFFERED="1",
               VOICEBUS_SESSION_LAUNCHED="1")
    if cfg.curve_dir is not None:
        env["VOICEBUS_CURVE_DIR"] = str(cfg.curve_dir)
    env.update(extra or {})
    return env


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, preexec_fn=_die_with_parent)


def terminate(procs: list[subprocess.Popen], within_s: float) -> None:
    """SIGTERM all, wait up to `within_s` in total, SIGKILL whatever is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + within_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(kv("kill", pid=proc.pid, reason="did not stop in time"))
            proc.kill()
            proc.wait()


class Supervisor:
    """Owns the bus process and the stage processes of one pipeline."""

    def __init__(self, cfg: BusConfig, specs: list[ProcessSpec], session: str,
                 env_extra: dict[str, str] | None = None, bus_args: list[str] | None = None) -> None:
        self.cfg = cfg
        self.bus_args = ["bus", "--pub", cfg.pub, "--sub", cfg.sub, *(bus_args or [])]
        self.env = child_env(cfg, session, env_extra)
        self.children = [Child(spec) for spec in specs]
        self.bus_proc: subprocess.Popen | None = None
        self.ctx = zmq.Context()
        self.receiver: Receiver | None = None
        self.events: Publisher | None = None
        self.stamper = Stamper("launcher", session)

    def start(self, bus_timeout_s: float = 15.0) -> None:
        self.bus_proc = spawn(self.bus_args, self.env)
        if not wait_for_bus(self.ctx, self.cfg, timeout_s=bus_timeout_s):
            raise RuntimeError(f"the bus did not answer within {bus_timeout_s:.0f}s (see its log above)")
        log.info(kv("bus_up", pub=self.cfg.pub, sub=self.cfg.sub, pid=self.bus_proc.pid))
        self.receiver = Receiver(connect_sub(self.ctx, self.cfg, ["health."]), "launcher")
        self.events = Publisher(connect_pub(self.ctx, self.cfg))
        wait_for_bus(self.ctx, self.cfg, timeout_s=5.0, pub=self.events.sock)
        for child in self.children:
            self._start(child)

    def _start(self, child: Child) -> None:
        child.proc = spawn(child.spec.args, self.env)
        child.started_at = time.monotonic()
        child.last_beat = None
        log.info(kv("started", stage=child.spec.name, pid=child.proc.pid))
        self._announce("launcher.started", stage=child.spec.name, pid=child.proc.pid, restarts=child.restarts)

    def _announce(self, topic: str, **data: object) -> None:
        if self.events is not None:
            self.events.send(self.stamper.event(topic, dict(data), time.time_ns()))

    def _read_heartbeats(self) -> None:
        assert self.receiver is not None
        while (message := self.receiver.recv(timeout_ms=0)) is not None:
            name = message.topic.removeprefix("health.")
            for child in self.children:
                if child.spec.name == name:
                    child.last_beat = time.monotonic()

    def poll(self) -> None:
        """Check every child once: restart the dead and the silent, with backoff."""
        self._read_heartbeats()
        now = time.monotonic()
        if self.bus_proc is not None and self.bus_proc.poll() is not None:
            code = self.bus_proc.returncode
            log.error(kv("bus_exited", code=code, action="restarting bus"))
            self.bus_proc = spawn(self.bus_args, self.env)
            self._announce("launcher.restart", stage="bus", reason=f"exited with code {code}", backoff_s=0,
                           restarts=None)
        for child in self.children:
            proc = child.proc
            if proc is None:
                if now >= child.start_due:
                    self._start(child)
                continue
            reason = None
            if proc.poll() is not None:
                reason = f"exited with code {proc.returncode}"
            elif child.spec.heartbeat:
                since = child.last_beat if child.last_beat is not None else child.started_at
                limit = HEARTBEAT_TIMEOUT_S if child.last_beat is not None else STARTUP_GRACE_S
                if now - since > limit:
                    reason = f"no heartbeat for {now - since:.1f}s"
            if reason is None:
                continue
            if proc.poll() is None:
                terminate([proc], within_s=1.0)
            if now - child.started_at > HEALTHY_RESET_S:
                child.backoff_s = BACKOFF_START_S
            child.restarts += 1
            child.proc = None
            child.start_due = now + child.backoff_s
            log.warning(kv("restarting", stage=child.spec.name, reason=repr(reason), in_s=child.backoff_s,
                           restarts=child.restarts))
            self._announce("launcher.restart", stage=child.spec.name, reason=reason, backoff_s=child.backoff_s,
                           restarts=child.restarts)
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """Stages in reverse order of start, then the bus; everything gone within ~5 s."""
        stage_procs = [c.proc for c in reversed(self.children) if c.proc is not None]
        terminate(stage_procs, within_s=STOP_STAGES_S)
        for sock in (self.receiver.sock if self.receiver else None, self.events.sock if self.events else None):
            if sock is not None:
                sock.close(linger=0)
        if self.bus_proc is not None:
            terminate([self.bus_proc], within_s=STOP_BUS_S)
        self.ctx.term()
        log.info(kv("stopped_all"))


def run_up(cfg: BusConfig, specs: list[ProcessSpec], session: str, env_extra: dict[str, str] | None = None,
           bus_args: list[str] | None = None) -> int:
    stopping = StopFlag.install()
    supervisor = Supervisor(cfg, specs, session, env_extra, bus_args)
    try:
        supervisor.start()
        log.info(kv("pipeline_up", stages=",".join(s.name for s in specs), session=session))
        while not stopping:
            supervisor.poll()
            time.sleep(0.1)
    finally:
        supervisor.stop()
    return 0
