"""`voicebus up` as a real process tree: restart after SIGKILL, clean stop on Ctrl-C, no orphans."""

from __future__ import annotations

import os
import signal
import time

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
