"""Test helpers: start real `voicebus` processes, read the real bus, wait for events (never sleep-and-hope)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from common.bus import Publisher, Receiver, connect_pub, connect_sub, wait_for_bus
from common.config import BusConfig
from common.envelope import Message, Stamper
from common.processes import descendants

REPO = Path(__file__).resolve().parent.parent


class Procs:
    """Every process a test starts, stopped (TERM, then KILL) at teardown."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def voicebus(self, *args: str, env: dict[str, str] | None = None, name: str | None = None,
                 stdout: int | None = None, sigint_ignored: bool = False) -> subprocess.Popen:
        """`voicebus ARGS`; `sigint_ignored`: started as a shell starts a background job (SIGINT ignored)."""
        return self.python("-m", "services.cli", *args, env=env, name=name or args[0], stdout=stdout,
                           sigint_ignored=sigint_ignored)

    def python(self, *args: str, name: str, env: dict[str, str] | None = None, stdout: int | None = None,
               sigint_ignored: bool = False) -> subprocess.Popen:
        """`python ARGS` with the project's interpreter, logged as `name`."""
        log_file = open(self.log_dir / f"{name}-{len(self.started)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO,
                                env={**self.env, **(env or {})}, stdout=stdout if stdout is not None else log_file,
                                stderr=log_file,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
                                else None)
        proc.log_path = log_file.name  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def log_of(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class BusClient:
    """A test's own publisher and subscriber on the real bus."""

    def __init__(self, cfg: BusConfig, prefixes: list[str], src: str = "test", session: str = "test") -> None:
        self.ctx = zmq.Context()
        self.receiver = Receiver(connect_sub(self.ctx, cfg, prefixes), "test")
        self.publisher = Publisher(connect_pub(self.ctx, cfg))
        self.stamper = Stamper(src, session)
        # both sockets: a probe back on our own SUB proves its subscriptions reached the proxy too
        assert wait_for_bus(self.ctx, cfg, timeout_s=10, pub=self.publisher.sock, sub=self.receiver.sock), \
            "bus did not answer"
        self.seen: list[Message] = []

    def send_event(self, topic: str, data: dict | None = None) -> None:
        self.publisher.send(self.stamper.event(topic, data or {}, time.time_ns()))

    def wait_for(self, predicate: Callable[[Message], bool], timeout_s: float = 10.0) -> Message:
        """The first message (seen before or arriving now) that matches, or AssertionError."""
        for message in self.seen:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self.receiver.recv(timeout_ms=50)
            if message is None:
                continue
            self.seen.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no matching message within {timeout_s}s; saw topics "
                             f"{sorted({m.topic for m in self.seen})}")

    def collect(self, duration_s: float) -> list[Message]:
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            message = self.receiver.recv(timeout_ms=20)
            if message is not None:
                self.seen.append(message)
        return self.seen

    def close(self) -> None:
        self.receiver.sock.close(0)
        self.publisher.sock.close(0)
        self.ctx.term()


def children_of(pid: int) -> set[int]:
    """All descendants of `pid`, read from /proc."""
    return set(descendants(pid))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


_FAILING_FORK = '''\
"""Loaded by every Python this test starts: os.fork fails (EAGAIN, as at a process limit) while
the flag file exists. subprocess does not use os.fork; the stage zygote does."""
import errno
import os

_flag = os.environ.get("VOICEBUS_TEST_FORK_FAILS_WHILE")
if _flag:
    _fork = os.fork

    def _fork_unless_flagged():
        if os.path.exists(_flag):
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return _fork()

    os.fork = _fork_unless_flagged
'''


def fork_failing_env(directory: Path) -> tuple[dict[str, str], Path]:
    """Environment under which a zygote's fork fails while the returned flag file exists (as it does
    when a machine is out of processes or memory, which a test cannot arrange for root)."""
    site = directory / "failing-fork-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_FAILING_FORK)
    flag = directory / "forks-fail"
    return {"PYTHONPATH": f"{site}:{REPO}", "VOICEBUS_TEST_FORK_FAILS_WHILE": str(flag)}, flag


NET_AUDIT_DIR = REPO / "tests" / "netaudit"


def net_audit_env(log: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes whose every lookup and connection is audited (tests/netaudit)."""
    path = str(NET_AUDIT_DIR) + (os.pathsep + env["PYTHONPATH"] if env and env.get("PYTHONPATH") else "")
    return {"PYTHONPATH": path, "VOICEBUS_NET_AUDIT": str(log)}


def net_audit(log: Path) -> dict[str, list[dict]]:
    """What the audited processes did: {"foreign": lookups/connections refused, "runs": starts,
    "weave": exits of processes that imported weave, "sentry": those whose weave Sentry client was live}."""
    import json

    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    exits = [r for r in records if r["event"] == "exit"]
    return {"foreign": [r for r in records if r["event"] in ("lookup", "connect")],
            "runs": [r for r in records if r["event"] == "start"],
            "weave": [r for r in exits if r["weave"]],
            "sentry": [r for r in exits if r["sentry_enabled"]]}
