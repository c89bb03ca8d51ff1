"""`voicebus up`: start the bus, then the stages; restart what dies or goes silent; stop it all.

Children are ordinary `voicebus <stage>` processes (the same commands the Procfile lists for
honcho), forked by the launcher's zygote (`services.zygote`: imported once, started in milliseconds,
pages shared), or each its own `python -m services.cli` with `VOICEBUS_ZYGOTE=0`. Either way a
SIGKILL of the launcher leaves no orphan behind (PR_SET_PDEATHSIG, through the zygote when forked).

What is restarted and what is not (as LiveKit's supervised job processes, a child has a lifecycle):
a stage that crashes after it started (its first heartbeat, or its port listening) is restarted with
backoff; one that exits 0 has finished its input (a WAV mic) and is done; one that exits 2 before it
started was given arguments or a configuration it can never run with, and so is one that keeps
dying before it starts: `up` stops with that stage's own last words instead of looping.
One bus, one launcher: a lock beside the bus endpoints refuses a second `up` on the same bus.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from common.bus import Publisher, Receiver, bus_may_answer, connect_pub, connect_sub, wait_for_bus
from common.config import BusConfig, run_dir
from common.envelope import Stamper
from common.log import kv
from common.ports import port_answers
from common.signals import StopFlag
from services.zygote import ForkedProcess, Zygote, ZygoteError

HEARTBEAT_TIMEOUT_S = 5.0  # five missed beats
STARTUP_GRACE_S = 20.0  # a stage may load models before its first beat
# ... and longer while it visibly works at it (its CPU time rises): on a machine busy starting many
# stage sets at once, importing the openai SDK alone took a gateway over 20 s; killing it then only
# starts the same import again. A stage that is silent and idle past the grace is hung.
STARTUP_LIMIT_S = 120.0
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0
HEALTHY_RESET_S = 30.0  # a run this long resets the backoff
STOP_STAGES_S = 3.0
STOP_BUS_S = 1.5
PR_SET_PDEATHSIG = 1
USAGE_EXIT_CODE = 2  # click's usage errors and StageError: arguments or set-up the stage can never run with
MAX_FAILED_STARTS = 5  # exits in a row without ever starting: a crash loop, not bad luck
PORT_READY_TIMEOUT_S = 30.0
# how often the loop reads heartbeats, checks ports and start-up deadlines; an exit wakes it at once
POLL_INTERVAL_S = 0.5
PIDFD_FALLBACK_S = 0.1  # how often to look when a process cannot be watched through a pidfd
STDERR_TAIL_LINES = 20

log = logging.getLogger("voicebus.launcher")


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: get SIGTERM when the launcher dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


Process = subprocess.Popen | ForkedProcess  # a stage, started either way


class LauncherError(RuntimeError):
    """`up` cannot run (or go on): one line for the user, exit code 2."""


@dataclass
class ProcessSpec:
    name: str
    args: list[str]  # arguments to `voicebus`
    heartbeat: bool = True  # bus stages beat on health.<name>; the simulator does not
    ready_port: int | None = None  # started = listening here (the simulator); later stages wait for it
    # a listening socket the launcher bound for it and keeps across restarts (the simulator's port: no
    # check-then-bind window in which another process takes it); passed by descriptor, so not forked
    listener: socket.socket | None = None


@dataclass
class Child:
    spec: ProcessSpec
    proc: Process | None = None
    started_at: float = 0.0
    last_beat: float | None = None
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    start_due: float = 0.0
    started: bool = False  # this run beat (or listened) at least once
    cpu_ticks: int = -1  # its CPU time when last looked at, while it starts
    working_at: float = 0.0  # monotonic: when its CPU time last rose
    failed_starts: int = 0  # exits in a row before starting
    finished: bool = False  # exited 0: its input is done
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))

    def last_words(self) -> str:
        """The line that says why the child stopped: its last error line, else its last line."""
        lines = [line for line in self.stderr_tail if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["(it printed nothing)"])[-1].strip()


def child_env(cfg: BusConfig, session: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VOICEBUS_BUS_PUB=cfg.pub, VOICEBUS_BUS_SUB=cfg.sub, VOICEBUS_SESSION=session, PYTHONUNBUFFERED="1",
               VOICEBUS_SESSION_LAUNCHED="1")
    if cfg.curve_dir is not None:
        env["VOICEBUS_CURVE_DIR"] = str(cfg.curve_dir)
    env.update(extra or {})
    return env


# what the zygote preloads and how it runs a stage: a table handed to it by name (services/preload.py)
PRELOAD_TABLE = "services.preload"


def zygote_enabled() -> bool:
    """Stages forked from a zygote unless VOICEBUS_ZYGOTE=0 (each then imports for itself, as under honcho)."""
    return os.environ.get("VOICEBUS_ZYGOTE", "1").strip().lower() not in ("0", "false", "no", "off")


def default_zygote(fork_here: bool = False) -> Zygote | None:
    """This process's shared zygote, or None when VOICEBUS_ZYGOTE turns it off. `fork_here`: forked
    from this process itself if it has no other thread at the zygote's first start (`up`'s launcher)."""
    if not zygote_enabled():
        return None
    zygote = Zygote.shared(PRELOAD_TABLE)
    zygote.fork_here = zygote.fork_here or fork_here
    return zygote


def release_zygote_imports(zygote: Zygote) -> None:
    """`Zygote.release_imports`, said in the log; a zygote gone meanwhile is the next spawn's to report."""
    try:
        log.info(kv("import_pages_released", mb=round(zygote.release_imports(), 1)))
    except (OSError, ZygoteError) as exc:
        log.warning(kv("import_pages_kept", error=repr(str(exc)[:200])))


def spawn(args: list[str], env: dict[str, str], stderr_tail: deque[str] | None = None,
          zygote: Zygote | None = None, pass_fds: tuple[int, ...] = ()) -> Process:
    """Start `voicebus ARGS` (forked by `zygote` when given and no descriptor is to be passed); with
    `stderr_tail`, its stderr is passed through and its last lines kept."""
    if zygote is not None and not pass_fds:
        proc: Process = zygote.spawn(args, env, stderr_pipe=stderr_tail is not None)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, preexec_fn=_die_with_parent,
                                stderr=subprocess.PIPE if stderr_tail is not None else None, pass_fds=pass_fds)
    if stderr_tail is not None:
        threading.Thread(target=_pass_stderr, args=(proc, stderr_tail), name=f"stderr-{proc.pid}",
                         daemon=True).start()
    return proc


def _pass_stderr(proc: Process, tail: deque[str]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        sys.stderr.buffer.write(raw)
        sys.stderr.buffer.flush()
        tail.append(raw.decode(errors="replace").rstrip("\n"))


def sleep_until_exit(procs: list[Process], timeout_s: float, wake: tuple[Any, ...] = ()) -> bool:
    """Sleep up to `timeout_s`, waking the moment one of `procs` exits or something in `wake` (zmq
    sockets, descriptors) turns readable. False when only something in `wake` woke it.

    The launcher used to look at its stages ten times a second: ~0.2 % of a core per pipeline (each
    conversation under `serve` has one), and still up to 100 ms late to a crash. A forked stage's
    status pipe turns readable when it exits; a stage run as its own Python is watched by a pidfd.
    """
    poller = zmq.Poller()
    for item in wake:
        poller.register(item, zmq.POLLIN)
    watched: list[int] = []
    opened: list[int] = []
    try:
        for proc in procs:
            if proc.returncode is not None:
                continue
            if isinstance(proc, ForkedProcess):
                fd = proc.exit_fd()
            else:
                try:
                    fd = os.pidfd_open(proc.pid)
                except OSError:  # no pidfds here (Linux < 5.3): look again soon
                    timeout_s = min(timeout_s, PIDFD_FALLBACK_S)
                    continue
                opened.append(fd)
            if fd is not None:
                poller.register(fd, zmq.POLLIN)
                watched.append(fd)
        if not watched and not wake:  # zmq's poll returns at once with nothing to poll
            time.sleep(max(0.0, timeout_s))
            return True
        ready = dict(poller.poll(max(0.0, timeout_s) * 1000))
        return not ready or any(fd in ready for fd in watched)
    finally:
        for fd in opened:
            os.close(fd)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks (-1 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])


class BusLock:
    """One launcher per bus: an flock held for the launcher's life beside the bus endpoints.

    The kernel drops it when the launcher dies however it dies, so a stale file never blocks.
    """

    def __init__(self, cfg: BusConfig, directory: Path | None = None) -> None:
        digest = hashlib.sha1(f"{cfg.pub} {cfg.sub}".encode()).hexdigest()[:12]
        self.path = (directory or run_dir()) / f"up-{digest}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise LauncherError(f"another `voicebus up` (pid {holder}) runs this bus; stop it, or run this one "
                                    "apart with `voicebus up --run-dir DIR`") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed it as it stopped, after we opened it: lock the file there now
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Removed while still held (so nobody locks a file no longer at the path), then let go."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def terminate(procs: list[Process], within_s: float) -> None:
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
                 env_extra: dict[str, str] | None = None, bus_args: list[str] | None = None,
                 lock_dir: Path | None = None, zygote: Zygote | None = None) -> None:
        self.cfg = cfg
        self.zygote = zygote  # forks the bus and the stages; None: each is its own `python -m services.cli`
        self.bus_args = ["bus", "--pub", cfg.pub, "--sub", cfg.sub, *(bus_args or [])]
        self.env = child_env(cfg, session, env_extra)
        self.children = [Child(spec) for spec in specs]
        self.bus_proc: Process | None = None
        self.ctx = zmq.Context()
        self.receiver: Receiver | None = None
        self.events: Publisher | None = None
        self.stamper = Stamper("launcher", session)
        self.lock = BusLock(cfg, lock_dir)  # beside the bus endpoints (VOICEBUS_RUN_DIR unless given)
        self.fatal: str | None = None  # why `up` must stop, once a child can never start
        self._bus_retry_at = 0.0  # after a failed restart of the bus

    def start(self, bus_timeout_s: float = 15.0, on_bus_up: Callable[[], None] | None = None) -> None:
        """Start the bus, then the stages in order. `on_bus_up` runs in between: a watcher that
        subscribes there hears every stage's first heartbeat (subscribed later, it waits a beat)."""
        self.lock.acquire()
        if bus_may_answer(self.cfg) and wait_for_bus(self.ctx, self.cfg, timeout_s=0.3):
            raise LauncherError(f"a bus already answers at {self.cfg.pub} (another pipeline, or a `voicebus bus` "
                                "started by hand); this `up` would join it: stop it, or run this one apart with "
                                "`voicebus up --run-dir DIR`")
        if self.zygote is not None:
            # its imports, once (the simulator's too, if this set starts one): every start after this is a fork
            self.zygote.start([child.spec.args[0] for child in self.children])
        self.bus_proc = spawn(self.bus_args, self.env, zygote=self.zygote)
        if not wait_for_bus(self.ctx, self.cfg, timeout_s=bus_timeout_s):
            raise RuntimeError(f"the bus did not answer within {bus_timeout_s:.0f}s (see its log above)")
        log.info(kv("bus_up", pub=self.cfg.pub, sub=self.cfg.sub, pid=self.bus_proc.pid))
        self.receiver = Receiver(connect_sub(self.ctx, self.cfg, ["health."]), "launcher")
        self.events = Publisher(connect_pub(self.ctx, self.cfg))
        wait_for_bus(self.ctx, self.cfg, timeout_s=5.0, pub=self.events.sock)
        if on_bus_up is not None:
            on_bus_up()
        for child in self.children:
            self._start(child)
            if child.spec.ready_port is not None:
                self._wait_listening(child)

    def _wait_listening(self, child: Child) -> None:
        """Later stages connect to it (the gateway to the simulator): start them once it listens."""
        assert child.proc is not None and child.spec.ready_port is not None
        deadline = time.monotonic() + PORT_READY_TIMEOUT_S
        while time.monotonic() < deadline and child.proc.poll() is None:
            if port_answers(child.spec.ready_port):
                child.started = True
                return
            time.sleep(0.05)
        if child.proc.poll() is not None:
            raise LauncherError(f"{child.spec.name} could not start: {child.last_words()}")
        log.warning(kv("not_listening", stage=child.spec.name, port=child.spec.ready_port,
                       after_s=PORT_READY_TIMEOUT_S))

    def all_started(self) -> bool:
        """Every child has beat (or listened) once since it last started, or is done."""
        return all(child.started or child.finished for child in self.children)

    def wait(self, timeout_s: float = POLL_INTERVAL_S, wake: tuple[Any, ...] = ()) -> bool:
        """Sleep until the next `poll` is due (True): `timeout_s`, a restart's time, or at once when a
        process exits; or until something in `wake` is readable (False)."""
        now = time.monotonic()
        due = [child.start_due for child in self.children if child.proc is None and not child.finished]
        if self.bus_proc is not None and self.bus_proc.returncode is not None:
            due.append(self._bus_retry_at)
        if due:
            timeout_s = min(timeout_s, min(due) - now)
        procs = [child.proc for child in self.children if child.proc is not None]
        return sleep_until_exit([*procs, *([self.bus_proc] if self.bus_proc else [])], timeout_s, wake)

    def _start(self, child: Child) -> None:
        listener = child.spec.listener
        child.proc = spawn(child.spec.args, self.env, child.stderr_tail, self.zygote,
                           pass_fds=(listener.fileno(),) if listener is not None else ())
        child.started_at = time.monotonic()
        child.last_beat = None
        child.started = False
        child.cpu_ticks, child.working_at = -1, 0.0
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
                if child.spec.name == name and message.data.get("state") == "running":  # not its last "stopped"
                    child.last_beat = time.monotonic()
                    child.started, child.failed_starts = True, 0

    def poll(self) -> None:
        """Check every child once: restart the dead and the silent, with backoff."""
        self._read_heartbeats()
        now = time.monotonic()
        if self.bus_proc is not None and self.bus_proc.poll() is not None and now >= self._bus_retry_at:
            code = self.bus_proc.returncode
            log.error(kv("bus_exited", code=code, action="restarting bus"))
            try:
                self.bus_proc = spawn(self.bus_args, self.env, zygote=self.zygote)
            except (OSError, ZygoteError) as exc:  # the machine cannot start a process now: again shortly
                self._bus_retry_at = now + BACKOFF_START_S
                log.warning(kv("start_failed", stage="bus", reason=repr(str(exc)), in_s=BACKOFF_START_S))
            else:
                self._announce("launcher.restart", stage="bus", reason=f"exited with code {code}", backoff_s=0,
                               restarts=None)
        for child in self.children:
            proc = child.proc
            if child.finished:
                continue
            if proc is None:
                if now >= child.start_due:
                    self._restart(child, now)
                continue
            if child.spec.ready_port is not None and not child.started and proc.poll() is None:
                child.started = port_answers(child.spec.ready_port)
            reason = None
            if proc.poll() is not None:
                if self._ended_for_good(child, proc.returncode):
                    continue
                reason = f"exited with code {proc.returncode}"
            elif child.spec.heartbeat:
                if child.last_beat is not None:
                    if now - child.last_beat > HEARTBEAT_TIMEOUT_S:
                        reason = f"no heartbeat for {now - child.last_beat:.1f}s"
                elif self._silent_at_start(child, now):
                    reason = f"no heartbeat for {now - child.started_at:.1f}s after starting"
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

    def _restart(self, child: Child, now: float) -> None:
        """Start it again; when the machine cannot start a process now (fork's EAGAIN or ENOMEM, the
        zygote's refusal), try later with the backoff instead of ending every other stage with `up`."""
        try:
            self._start(child)
        except (OSError, ZygoteError) as exc:
            child.start_due = now + child.backoff_s
            log.warning(kv("start_failed", stage=child.spec.name, reason=repr(str(exc)), in_s=child.backoff_s))
            self._announce("launcher.restart", stage=child.spec.name, reason=f"could not start: {exc}",
                           backoff_s=child.backoff_s, restarts=child.restarts)
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    @staticmethod
    def _silent_at_start(child: Child, now: float) -> bool:
        """Past the start-up grace with no first beat, and not working on it (or past the hard limit)."""
        assert child.proc is not None
        age = now - child.started_at
        if age <= STARTUP_GRACE_S:
            return False
        ticks = cpu_ticks(child.proc.pid)
        if ticks > child.cpu_ticks:
            child.cpu_ticks, child.working_at = ticks, now
        return age > STARTUP_LIMIT_S or now - max(child.working_at, child.started_at) > HEARTBEAT_TIMEOUT_S

    def _ended_for_good(self, child: Child, code: int) -> bool:
        """True when this exit is not one to restart: finished input, or a stage that can never start."""
        name = child.spec.name
        if code == 0:
            child.finished, child.proc = True, None
            log.info(kv("finished", stage=name, reason="exited 0: its input is done (not restarted)"))
            self._announce("launcher.finished", stage=name)
            return True
        if not child.started:
            child.failed_starts += 1
            if code == USAGE_EXIT_CODE or child.failed_starts >= MAX_FAILED_STARTS:
                why = "a usage or configuration error" if code == USAGE_EXIT_CODE else \
                    f"it exited {child.failed_starts} times in a row before it started"
                self.fatal = f"{name} cannot start ({why}): {child.last_words()}"
                child.finished, child.proc = True, None
                log.error(kv("stage_cannot_start", stage=name, code=code, reason=repr(child.last_words())))
                self._announce("launcher.fatal", stage=name, code=code, reason=self.fatal)
                return True
        return False

    def stop(self) -> None:
        """Stages in reverse order of start, then the bus; everything gone within ~5 s."""
        stage_procs = [c.proc for c in reversed(self.children) if c.proc is not None]
        terminate(stage_procs, within_s=STOP_STAGES_S)
        for sock in (self.receiver.sock if self.receiver else None, self.events.sock if self.events else None):
            if sock is not None:
                sock.close(linger=0)
        if self.bus_proc is not None:
            terminate([self.bus_proc], within_s=STOP_BUS_S)
        for child in self.children:
            if child.spec.listener is not None:
                child.spec.listener.close()
        self.ctx.term()
        self.lock.release()
        if self.bus_proc is not None:  # a refused `up` started nothing, and says only why
            log.info(kv("stopped_all"))


def run_up(cfg: BusConfig, specs: list[ProcessSpec], session: str, env_extra: dict[str, str] | None = None,
           bus_args: list[str] | None = None) -> int:
    """Run the pipeline until Ctrl-C (0), or until a stage can never start (2, with its reason)."""
    stopping = StopFlag.install()
    zygote = default_zygote(fork_here=True)  # before any zmq socket: the launcher shares the stages' pages
    supervisor = Supervisor(cfg, specs, session, env_extra, bus_args, zygote=zygote)
    try:
        supervisor.start()
        log.info(kv("pipeline_up", stages=",".join(s.name for s in specs), session=session))
        wake_fd = stopping.wake_fd()  # Ctrl-C ends the wait at once
        while not stopping and supervisor.fatal is None:
            supervisor.poll()
            if zygote is not None and not zygote.released and supervisor.all_started():
                release_zygote_imports(zygote)  # the stages now map (and share) what they run
            supervisor.wait(wake=(wake_fd,))
            stopping.drain_wake()
    except LauncherError as exc:
        supervisor.fatal = str(exc)
    finally:
        supervisor.stop()
        if zygote is not None:
            zygote.stop()
    if supervisor.fatal is not None:
        print(f"voicebus up: {supervisor.fatal}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return 0
