"""`voicebus up` as a real process tree: restart after SIGKILL, clean stop on Ctrl-C, no orphans."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from common.config import BusConfig
from common.ports import free_port
from common.processes import command_words, memory_kb, parent_pid
from common.signals import StopFlag
from common.utterances import compose
from common.wavio import write_wav
from tests.helpers import BusClient, alive, children_of, fork_failing_env


def shared_dirty_mb(pid: int) -> float:
    """Anonymous and written pages this process shares with others (its forks or its parent)."""
    return memory_kb(pid, "Shared_Dirty") / 1024


@contextlib.contextmanager
def closing_client(cfg: BusConfig, prefixes: list[str]):
    client = BusClient(cfg, prefixes)
    try:
        yield client
    finally:
        client.close()


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


def test_a_restart_that_cannot_fork_is_tried_again_and_up_lives_on(procs, client_factory_no_bus, tmp_path):
    env, forks_fail = fork_failing_env(tmp_path)
    up = procs.voicebus("up", "--stages", "resample", env=env)
    client = client_factory_no_bus(["health.resample", "launcher."])
    victim = client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30).data["pid"]
    forks_fail.touch()
    os.kill(victim, signal.SIGKILL)
    client.wait_for(lambda m: m.topic == "launcher.restart" and "-9" in m.data["reason"], timeout_s=10)
    failed = client.wait_for(lambda m: m.topic == "launcher.restart" and "could not start" in m.data["reason"],
                             timeout_s=10)
    assert "Resource temporarily unavailable" in failed.data["reason"] and up.poll() is None
    forks_fail.unlink()
    again = client.wait_for(lambda m: m.topic == "launcher.started" and m.data["stage"] == "resample", timeout_s=15)
    client.wait_for(lambda m: m.topic == "health.resample" and m.data["pid"] == again.data["pid"], timeout_s=30)
    assert up.poll() is None


def test_ctrl_c_stops_everything_and_leaves_no_orphan(procs, client_factory_no_bus, run_dir):
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
    # nothing of this pipeline left in the run directory: the bus's sockets, the launcher's lock
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix in (".sock", ".lock")) == []


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


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_stages_fork_from_one_zygote_or_each_run_its_own_python(procs, client_factory_no_bus, zygote):
    up = procs.voicebus("up", "--stages", "resample", env={"VOICEBUS_ZYGOTE": zygote})
    client = client_factory_no_bus(["health.resample"])
    client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
    under_up = {pid: command_words(pid) for pid in children_of(up.pid)}
    zygotes = [pid for pid, words in under_up.items() if "services.zygote" in words]
    stages = {words[3]: pid for pid, words in under_up.items() if words[1:3] == ["-m", "services.cli"]}
    assert set(stages) == {"bus", "resample"}
    if zygote == "1":
        assert len(zygotes) == 1 and parent_pid(zygotes[0]) == up.pid
        assert {parent_pid(pid) for pid in stages.values()} == set(zygotes)
        # forked from the launcher itself: the launcher's imports are the pages it shares with them
        # (tens of MB), not a private copy of its own (a launcher that exec'd its zygote shares ~none)
        assert shared_dirty_mb(up.pid) >= 16, shared_dirty_mb(up.pid)
        # and once they run, it gives back the library pages it touched only to import them (20-30 MB
        # that no other process maps: init code, relocation and symbol tables)
        deadline = time.monotonic() + 20
        while memory_kb(up.pid, "Private_Clean") > 4096 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert memory_kb(up.pid, "Private_Clean") <= 4096, memory_kb(up.pid, "Private_Clean")
    else:
        assert zygotes == []
        assert {parent_pid(pid) for pid in stages.values()} == {up.pid}
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=20) == 0
    assert [pid for pid in under_up if alive(pid)] == []


def test_unknown_stage_is_a_usage_error(procs):
    up = procs.voicebus("up", "--stages", "nosuch")
    assert up.wait(timeout=20) == 2
    assert "unknown stage" in procs.log_of(up)


def test_every_process_up_starts_takes_arg(procs, client_factory_no_bus, tmp_path):
    rules = tmp_path / "r.json"
    rules.write_text('[{"match": ".*", "reply": "ok"}]')
    up = procs.voicebus("up", "--stages", "gateway", "--arg", f"simulate=--rules {rules}",
                        "--arg", "bus=--log-level DEBUG", env={"VOICEBUS_SIM_PORT": str(free_port())})
    client = client_factory_no_bus(["health.gateway", "rt.gateway."])
    client.wait_for(lambda m: m.topic == "health.gateway", timeout_s=30)
    client.wait_for(lambda m: m.topic == "rt.gateway.connected", timeout_s=30)
    # the gateway starts once the simulator listens: no refused first connection, in the log or the trace
    assert "connect_failed" not in procs.log_of(up) and "ConnectionRefusedError" not in procs.log_of(up)
    command_lines = [command_words(pid) for pid in children_of(up.pid)]
    simulator = next(c for c in command_lines if "simulate" in c)
    bus = next(c for c in command_lines if "bus" in c and "services.cli" in c[1:3])
    assert ["--rules", str(rules)] == simulator[simulator.index("--rules"):simulator.index("--rules") + 2]
    assert "--log-level" in bus and "DEBUG" in bus
    wrong = procs.voicebus("up", "--arg", "nosuch=--x", name="up-wrong")
    assert wrong.wait(timeout=20) == 2
    assert "every process `up` starts takes --arg: bus, simulator, mic" in procs.log_of(wrong)


def test_a_second_up_on_the_same_bus_refuses_and_leaves_the_first_alone(procs, client_factory_no_bus, tmp_path):
    first = procs.voicebus("up", "--stages", "resample")
    client = client_factory_no_bus(["health.", "launcher."])
    bus_pid = client.wait_for(lambda m: m.topic == "health.bus", timeout_s=30).data["pid"]
    client.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
    second = procs.voicebus("up", "--stages", "resample", name="up-second")
    assert second.wait(timeout=20) == 2
    said = procs.log_of(second)
    assert "voicebus up: another `voicebus up`" in said and "--run-dir" in said, said
    assert "bus_up" not in said and "started stage=" not in said  # it started nothing
    client.collect(2.0)
    assert first.poll() is None and not [m for m in client.seen if m.topic == "launcher.restart"]
    assert {m.data["pid"] for m in client.seen if m.topic == "health.bus"} == {bus_pid}
    # a second pipeline with a run dir of its own runs beside the first, on its own bus
    other_dir = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    try:
        beside = procs.voicebus("up", "--run-dir", str(other_dir), "--stages", "resample", name="up-beside",
                                env={"VOICEBUS_BUS_PUB": "", "VOICEBUS_BUS_SUB": ""})
        other_cfg = BusConfig(pub=f"ipc://{other_dir}/bus-pub.sock", sub=f"ipc://{other_dir}/bus-sub.sock")
        with closing_client(other_cfg, ["health.resample"]) as watcher:
            beat = watcher.wait_for(lambda m: m.topic == "health.resample", timeout_s=30)
        assert beside.poll() is None and beat.data["pid"] not in children_of(first.pid)
        client.collect(1.0)
        assert not [m for m in client.seen if m.topic == "launcher.restart"] and first.poll() is None
    finally:
        shutil.rmtree(other_dir, ignore_errors=True)


def test_a_stage_given_bad_arguments_stops_up_with_its_reason(procs):
    up = procs.voicebus("up", "--stages", "resample", "--arg", "resample=--bogus")
    assert up.wait(timeout=30) == 2
    said = procs.log_of(up)
    assert "voicebus up: resample cannot start (a usage or configuration error): Error: No such option" in said, said
    assert "Usage: voicebus resample" in said  # the command a user knows, not `python -m services.cli`
    assert "restarting" not in said


def test_a_stage_that_keeps_dying_before_it_starts_stops_up(procs):
    up = procs.voicebus("up", "--stages", "resample", "--arg", "resample=--rate 0")
    assert up.wait(timeout=60) == 2
    said = procs.log_of(up)
    assert "resample cannot start (it exited 5 times in a row before it started): ValueError: bad format" in said


def test_a_broken_tools_module_stops_up_at_once(procs, tmp_path):
    broken = tmp_path / "broken_tools.py"
    broken.write_text("def broken(:\n")
    up = procs.voicebus("up", "--stages", "tools", "--arg", f"tools=--module {broken}")
    assert up.wait(timeout=30) == 2
    assert "tools cannot start (a usage or configuration error): Error: cannot load tools from" in procs.log_of(up)
    assert "SyntaxError" in procs.log_of(up)


def test_a_mic_that_finished_its_wav_is_done_not_restarted(procs, client_factory_no_bus, tmp_path):
    wav = write_wav(tmp_path / "q.wav", compose([("silence", 0.3)], 48000), 48000)
    up = procs.voicebus("up", "--stages", "mic,resample", "--arg", f"mic=--wav {wav} --speed 0")
    client = client_factory_no_bus(["launcher.", "health.mic"])
    finished = client.wait_for(lambda m: m.topic == "launcher.finished", timeout_s=30)
    assert finished.data["stage"] == "mic"
    client.collect(3.0)
    assert not [m for m in client.seen if m.topic == "launcher.restart"]
    assert len([m for m in client.seen if m.topic == "launcher.started" and m.data["stage"] == "mic"]) <= 1
    assert up.poll() is None and "finished stage=mic" in procs.log_of(up)


def test_a_signal_wakes_a_loop_asleep_in_its_poller_instead_of_waiting_out_the_timeout():
    """Stages sleep in zmq poll until their next heartbeat (no 20 Hz wakeups to look at the flag):
    a SIGTERM, even one the kernel hands to another thread, must make that poll return."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopping = StopFlag.install()
    try:
        poller = zmq.Poller()
        poller.register(stopping.wake_fd(), zmq.POLLIN)
        assert poller.poll(0) == []  # nothing to say before a signal
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        ready = dict(poller.poll(30_000))
        assert stopping.wake_fd() in ready and stopping and stopping.signal_name == "SIGTERM"
        stopping.drain_wake()
        assert poller.poll(0) == []  # drained: the next poll sleeps again
    finally:
        stopping.close()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("forked", [True, False], ids=["zygote-fork", "own-python"])
def test_the_launcher_sleeps_until_a_stage_exits_not_until_its_next_look(forked, tmp_path):
    """The loop looks at its stages every POLL_INTERVAL_S, and an exit must wake it at once (a crash
    restarted without waiting out the interval), whichever way the stage was started; something
    readable in `wake` (Ctrl-C's pipe, the serve thread's bus socket) wakes it too, saying so."""
    from services.launcher import PRELOAD_TABLE, sleep_until_exit, spawn
    from services.zygote import Zygote

    zygote = Zygote(PRELOAD_TABLE) if forked else None
    if zygote is not None:
        zygote.start()
    bus = spawn(["bus", "--pub", f"ipc://{tmp_path}/pub.sock", "--sub", f"ipc://{tmp_path}/sub.sock"],
                dict(os.environ), zygote=zygote)
    read_end, write_end = os.pipe()
    try:
        time.sleep(0.5)
        assert bus.poll() is None
        threading.Timer(0.3, os.write, (write_end, b"x")).start()
        open_fds = len(os.listdir("/proc/self/fd"))
        began = time.monotonic()
        assert sleep_until_exit([bus], 60.0, wake=(read_end,)) is False  # the pipe, not an exit
        assert time.monotonic() - began < 30 and bus.poll() is None
        assert len(os.listdir("/proc/self/fd")) == open_fds  # a pidfd it opened to watch is closed
        threading.Timer(0.3, os.kill, (bus.pid, signal.SIGKILL)).start()
        began = time.monotonic()
        assert sleep_until_exit([bus], 60.0) is True
        assert time.monotonic() - began < 30  # not the 60 s timeout
        assert bus.wait(5) == -signal.SIGKILL
        began = time.monotonic()
        assert sleep_until_exit([bus], 0.3) is True  # nothing left to watch: it sleeps, it does not spin
        assert time.monotonic() - began >= 0.25
    finally:
        os.close(read_end)
        os.close(write_end)
        if bus.poll() is None:
            bus.kill()
        if zygote is not None:
            zygote.stop()


def test_a_watcher_subscribed_when_the_bus_is_up_hears_every_stage_from_its_first_beat(tmp_path):
    """serve's readiness waits for a heartbeat of each stage: its watcher, subscribed once the stages had
    started, missed first beats and waited for the next (HEARTBEAT_INTERVAL_S, 1 s) on two set starts in
    three. `Supervisor.start(on_bus_up=...)` runs it with the bus up and no stage started yet."""
    from common.bus import Receiver, connect_sub, wait_for_bus
    from services.launcher import Supervisor
    from services.pipeline import pipeline_specs

    cfg = BusConfig(pub=f"ipc://{tmp_path}/pub.sock", sub=f"ipc://{tmp_path}/sub.sock")
    specs, env = pipeline_specs(["tools", "logger"], {"logger": ["--root", str(tmp_path / "sessions")]})
    supervisor = Supervisor(cfg, specs, "s-first-beat", {**env, "VOICEBUS_RUN_DIR": str(tmp_path)}, lock_dir=tmp_path)
    started_at_hook: list[list[object]] = []
    watcher: list[Receiver] = []

    def watch() -> None:
        started_at_hook.append([child.proc for child in supervisor.children])
        watcher.append(Receiver(connect_sub(supervisor.ctx, cfg, ["health."]), "test"))
        assert wait_for_bus(supervisor.ctx, cfg, timeout_s=5.0, sub=watcher[0].sock)

    try:
        supervisor.start(on_bus_up=watch)
        assert started_at_hook == [[None, None]]  # called once, before either stage
        first_beat: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(first_beat) < 2 and time.monotonic() < deadline:
            message = watcher[0].recv(timeout_ms=200)
            if message is not None and message.topic in ("health.tools", "health.logger"):
                first_beat.setdefault(message.topic.removeprefix("health."), message.data["beat"])
        assert first_beat == {"tools": 1, "logger": 1}
    finally:
        for receiver in watcher:
            receiver.sock.close(linger=0)
        supervisor.stop()



def test_the_simulators_port_cannot_be_taken_from_it_before_it_listens_or_while_it_restarts(
        procs, client_factory_no_bus):
    """`up` binds the simulator's port itself and hands the socket over: the default port held by another
    process moves it to a free one, and a thief trying the port while the simulator restarts finds it held."""
    import errno
    import re
    import socket

    from common.config import SIMULATOR_DEFAULT_PORT
    from tests.helpers import children_of

    thief = socket.socket()
    try:
        thief.bind(("127.0.0.1", SIMULATOR_DEFAULT_PORT))  # if something else holds it already, so much the same
        thief.listen(1)
    except OSError:
        pass
    try:
        up = procs.voicebus("up", "--stages", "gateway")
        client = client_factory_no_bus(["health.gateway", "launcher."])
        client.wait_for(lambda m: m.topic == "health.gateway", timeout_s=60)
        port = int(re.search(r"local simulator on port (\d+)", procs.log_of(up)).group(1))
        assert port != SIMULATOR_DEFAULT_PORT
        assert _answers_within(port, 30)
        simulator = next(pid for pid in children_of(up.pid) if "simulate" in command_words(pid))
        os.kill(simulator, signal.SIGKILL)
        taker = socket.socket()
        with pytest.raises(OSError) as taken:
            taker.bind(("127.0.0.1", port))
        taker.close()
        assert taken.value.errno == errno.EADDRINUSE
        again = client.wait_for(lambda m: m.topic == "launcher.started" and m.data["stage"] == "simulator"
                                and m.data["pid"] != simulator, timeout_s=20)
        assert _answers_within(port, 30) and again.data["pid"] != simulator and up.poll() is None
    finally:
        thief.close()


def _answers_within(port: int, seconds: float) -> bool:
    from common.ports import port_answers

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_answers(port, timeout_s=1.0):
            return True
        time.sleep(0.1)
    return False
