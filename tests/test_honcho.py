"""The Procfile under honcho: every line its own process, started at once, with no launcher to hand out
a session or a free port. One pipeline must still be one conversation (one session id), and a Ctrl-C
must leave nothing behind in the run directory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.ports import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def test_every_process_of_a_procfile_takes_the_bus_session_and_ctrl_c_leaves_no_socket(tmp_path, run_dir):
    voicebus = f"{sys.executable} -m services.cli"
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"bus: {voicebus} bus\n"
                        f"simulator: {voicebus} simulate --log-level WARNING\n"
                        f"tools: {voicebus} tools --module {REPO / 'examples' / 'tools.py'}\n"
                        f"gateway: {voicebus} gateway\n"
                        f"logger: {voicebus} logger --root {tmp_path / 'sessions'} --no-upload\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "OPENAI_", "WANDB_"))}
    env.update(VOICEBUS_RUN_DIR=str(run_dir), VOICEBUS_SIM_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    log = tmp_path / "honcho.log"
    with log.open("wb") as out:
        honcho = subprocess.Popen([str(Path(sys.executable).parent / "honcho"), "-f", str(procfile), "-d", str(REPO),
                                   "start"], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        stages = {"tools", "gateway", "logger"}
        deadline = time.monotonic() + 180  # five interpreters importing at once, on a loaded machine too
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            started = dict(re.findall(r"^\S+ (\w+)\.\d+\s+\|.* started .*session=(\S+)", text, re.M))
            if stages <= set(started) and "bus_ready" in text:
                break
            assert honcho.poll() is None, text
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        bus_session = re.search(r"bus_ready .*session=(\S+)", text)
        assert bus_session and stages <= set(started), text
        assert {started[name] for name in stages} == {bus_session.group(1)}, (started, bus_session.group(1))
        assert list(run_dir.glob("*.sock")), "the bus's sockets are where they should be while it runs"
    finally:
        os.killpg(honcho.pid, signal.SIGINT)
        honcho.wait(timeout=30)
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix in (".sock", ".lock")) == []
