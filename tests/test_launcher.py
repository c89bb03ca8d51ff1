"""`voicebus up` as a real process tree: restart after SIGKILL, clean stop on Ctrl-C, no orphans."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.helpers import alive, children_of


def test_sigkilled_stage_is_restarted(procs, bus_cfg, client_factory_no_bus):
    up = procs.voicebus("up", "--stages", "resample")
    client = client_factory_no_bus(["health.resample", "launcher."])
    first = client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
    victim = first.data["pid"]
    os.kill(victim, signal.SIGKILL)
    restart = client.wait_for(lambda m: m.topic == "launcher.restart", timeout_s=10)
    assert restart.data["stage"] == "resample" and "-9" in restart.data["reason"]
    again = client.wait_for(lambda m: m.topic == "launcher.started" and m.data["pid"] != victim, timeout_s=10)
    beat = client.wait_for(lambda m: m.topic == "health.resample" and m.data["pid"] == again.data["pid"], timeout_s=30)
    assert again.data["restarts"] == 1 and beat.data["state"] == "running"
    assert first.data["state"] == "running"
    assert up.poll() is None


def test_ctrl_c_stops_everything_and_leaves_no_orphan(procs, client_factory_no_bus):
    up = procs.voicebus("up", "--stages", "resample")
    client = client_factory_no_bus(["health.resample"])
    client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
    descendants = children_of(up.pid)
    assert len(descendants) >= 2  # bus + resample
    started = time.monotonic()
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=8) == 0
    stopped_in = time.monotonic() - started
    time.sleep(0.2)
    assert [pid for pid in descendants if alive(pid)] == []
    assert stopped_in < 6.0, f"stop took {stopped_in:.1f}s"


def test_sigkill_of_launcher_takes_children_down(procs, client_factory_no_bus):
    up = procs.voicebus("up", "--stages", "resample")
    client = client_factory_no_bus(["health.resample"])
    client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
    descendants = children_of(up.pid)
    up.kill()
    up.wait()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and any(alive(pid) for pid in descendants):
        time.sleep(0.1)
    assert [pid for pid in descendants if alive(pid)] == []


def test_unknown_stage_is_a_usage_error(procs):
    up = procs.voicebus("up", "--stages", "nosuch")
    assert up.wait(timeout=20) == 2
    assert "unknown stage" in procs.log_of(up)


def test_every_process_up_starts_takes_arg(procs, client_factory_no_bus, tmp_path):
    rules = tmp_path / "r.json"
    rules.write_text('[{"match": ".*", "reply": "ok"}]')
    up = procs.voicebus("up", "--stages", "gateway", "--arg", f"simulate=--rules {rules}",
                        "--arg", "bus=--log-level DEBUG", env={"VOICEBUS_SIM_PORT": str(18900 + os.getpid() % 90)})
    client = client_factory_no_bus(["health.gateway"])
    client.wait_for(lambda m: m.topic == "health.gateway", timeout_s=30)
    command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children_of(up.pid)]
    simulator = next(c for c in command_lines if b"simulate" in c)
    bus = next(c for c in command_lines if b"bus" in c and b"services.cli" in c[1:3])
    assert [b"--rules", str(rules).encode()] == simulator[simulator.index(b"--rules"):simulator.index(b"--rules") + 2]
    assert b"--log-level" in bus and b"DEBUG" in bus
    wrong = procs.voicebus("up", "--arg", "nosuch=--x", name="up-wrong")
    assert wrong.wait(timeout=20) == 2
    assert "every process `up` starts takes --arg: bus, simulator, mic" in procs.log_of(wrong)
