"""Fixtures that start the real things: a bus process on ipc:// in a private 0700 dir, processes
that are always stopped, and (for audio tests) the PulseAudio rig via scripts/pulse-up.sh.

Also how the suite shares out over pytest-xdist's two workers (pyproject's addopts): the suite mostly
waits on audio played in real time (the cores were 80 % idle over a serial run), so two files run at
once. Each file stays on one worker, in order, with its module fixtures made once; every Ray test is
one group (one local cluster at a time, and `~/.ray/auth_token` is the machine's); each worker has a
PulseAudio rig of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from common.config import BusConfig
from tests.helpers import BusClient, Procs

RAY_FILES = ("tests/test_serve.py", "tests/security/test_ray_auth.py", "tests/security/test_serve_access.py")
# Started first, so that the longest files do not end the run alone (files are shared out in order as
# workers free up). Only the schedule depends on this list; a file missing from it runs later.
LONGEST_FIRST = ("tests/test_eval.py", "ray", "tests/test_tools_e2e.py", "tests/test_gateway_e2e.py",
                 "tests/test_web.py", "tests/test_logger.py")


def _share(nodeid: str) -> str:
    """What goes to one worker whole: a file, or every Ray file together."""
    path = nodeid.split("::", 1)[0]
    return "ray" if path in RAY_FILES else path


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's file scheduling with the Ray files as one share. (Its `xdist_group` marks would say the
    same, but do not work on pytest 9.2, whose node ids xdist 3.8 can no longer suffix.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileShares(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _share(nodeid)

    return FileShares(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        share = _share(item.nodeid)
        return LONGEST_FIRST.index(share) if share in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file (and of the rest) is kept


@pytest.fixture
def run_dir():
    # short path: ipc:// socket paths are limited to ~107 bytes
    path = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bus_cfg(run_dir: Path) -> BusConfig:
    return BusConfig(pub=f"ipc://{run_dir}/pub.sock", sub=f"ipc://{run_dir}/sub.sock")


@pytest.fixture
def base_env(run_dir: Path, bus_cfg: BusConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "OPENAI_", "WANDB_"))}
    env.update(VOICEBUS_RUN_DIR=str(run_dir), VOICEBUS_BUS_PUB=bus_cfg.pub, VOICEBUS_BUS_SUB=bus_cfg.sub,
               VOICEBUS_SESSION="test-session", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def procs(base_env, tmp_path):
    tracker = Procs(base_env, tmp_path)
    yield tracker
    tracker.stop_all()


@pytest.fixture
def bus(procs, bus_cfg) -> BusConfig:
    """A running `voicebus bus` process."""
    procs.voicebus("bus")
    return bus_cfg


@pytest.fixture
def client_factory(bus, client_factory_no_bus):
    """Bus clients (closed after the test) on a bus this test started."""
    return client_factory_no_bus


@pytest.fixture
def client_factory_no_bus(bus_cfg):
    """Bus clients for tests where something else (the launcher) starts the bus."""
    made: list[BusClient] = []

    def make(prefixes: list[str], **kwargs) -> BusClient:
        made.append(BusClient(bus_cfg, prefixes, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def simulator(procs):
    """Start `voicebus simulate --port 0 ARGS...`; returns its base URL (http://127.0.0.1:PORT/v1)."""
    import re
    import select
    import subprocess
    import time

    def start(*args: str, env: dict[str, str] | None = None) -> str:
        proc = procs.voicebus("simulate", "--port", "0", *args, stdout=subprocess.PIPE, env=env, name="simulate")
        deadline = time.monotonic() + 60
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    break
                line += chunk
            elif proc.poll() is not None:
                break
        match = re.search(rb"http://[\d.]+:(\d+)/v1", line)
        assert match, f"simulator did not start: {line!r}\n{procs.log_of(proc)}"
        return match.group(0).decode()

    return start


@pytest.fixture
def remote_mcp(procs):
    """examples/mcp_http_server.py, a real MCP server over streamable HTTP; returns its URL (…/mcp)."""
    import time

    from common.ports import free_port, port_listening

    for _attempt in range(3):  # a port free a moment ago may be taken by the time the server binds it
        port = free_port()
        proc = procs.python("examples/mcp_http_server.py", "--port", str(port), name="mcp-http")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and not port_listening(port):
            time.sleep(0.1)
        if proc.poll() is None and port_listening(port):
            return f"http://127.0.0.1:{port}/mcp"
    raise AssertionError(f"the MCP server did not start:\n{procs.log_of(proc)}")


@pytest.fixture(scope="session")
def pulse_rig():
    """The virtual PulseAudio rig (scripts/pulse-up.sh) in a private runtime dir; torn down after.

    Not skipped when PulseAudio is missing: scripts/setup.sh installs it, and a test that needs
    audio fails loudly rather than passing by omission.
    """
    from tests.support.rig import PulseRig

    rig = PulseRig()
    yield rig
    rig.stop()


@pytest.fixture
def pulse(pulse_rig) -> dict[str, str]:
    """The rig's environment, reset to its baseline first: nothing an earlier test loaded or left
    playing (a loopback, an echo canceller, a stray stream) reaches this one."""
    removed = pulse_rig.reset()
    if removed:
        print(f"rig reset before the test removed: {', '.join(removed)}")
    return pulse_rig.env
