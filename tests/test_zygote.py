"""The zygote that forks the stages: a fork behaves as the `python -m services.cli` it replaces
(exit codes, stderr, niceness, its command line in ps) and nothing outlives the zygote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.processes import command_words, descendants, parent_pid
from services.launcher import PRELOAD_TABLE
from services.zygote import ZYGOTE_LOST, Zygote, ZygoteError
from tests.helpers import REPO, alive, fork_failing_env


@pytest.fixture
def zygote():
    made = Zygote(PRELOAD_TABLE)
    made.start()
    yield made
    made.stop()


def _bus_args(tmp_path) -> list[str]:
    return ["bus", "--pub", f"ipc://{tmp_path}/pub.sock", "--sub", f"ipc://{tmp_path}/sub.sock"]


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_fork_exits_as_the_command_would_with_its_stderr_passed(zygote):
    usage = zygote.spawn(["nosuch"], dict(os.environ), stderr_pipe=True, name="bad")
    assert usage.wait(10) == 2  # click's usage error, as from `python -m services.cli nosuch`
    assert b"No such command 'nosuch'" in usage.stderr.read()
    helped = zygote.spawn(["--help"], dict(os.environ), name="help")
    assert helped.wait(10) == 0
    assert helped.poll() == 0  # asked again: the same answer, the pipe already read


def test_a_fork_shows_its_command_takes_the_callers_niceness_and_reports_its_signal(zygote, tmp_path):
    started = []

    def spawn_niced() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)  # this thread only
        started.append(zygote.spawn(_bus_args(tmp_path), dict(os.environ), name="bus"))

    thread = threading.Thread(target=spawn_niced)
    thread.start()
    thread.join()
    [bus] = started
    assert parent_pid(bus.pid) == zygote.proc.pid
    # as ps shows it, once the fork has named itself (moments after the zygote answered)
    _wait_for(lambda: command_words(bus.pid)[1:] == ["-m", "services.cli", *_bus_args(tmp_path)])
    assert Path(f"/proc/{bus.pid}/comm").read_text().strip() == "vb-bus"
    assert os.getpriority(os.PRIO_PROCESS, bus.pid) == 7
    assert bus.poll() is None
    _wait_for(lambda: (tmp_path / "pub.sock").exists())
    bus.kill()
    assert bus.wait(10) == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):  # a wait with a timeout, as Popen's
        zygote.spawn(_bus_args(tmp_path), dict(os.environ), name="bus").wait(0.2)


def test_when_the_zygote_dies_its_stages_end_and_the_next_spawn_starts_a_new_one(zygote, tmp_path):
    bus = zygote.spawn(_bus_args(tmp_path), dict(os.environ), name="bus")
    first = zygote.proc.pid
    assert bus.pid in descendants(first)
    zygote.proc.kill()
    assert bus.wait(10) == ZYGOTE_LOST  # the exit code could not be passed on: said so, not guessed
    _wait_for(lambda: not alive(bus.pid))  # PR_SET_PDEATHSIG: it got SIGTERM with its zygote
    again = zygote.spawn(["--help"], dict(os.environ), name="help")
    assert zygote.proc.pid != first
    assert again.wait(10) == 0


def test_a_fork_that_fails_fails_that_spawn_only(tmp_path, monkeypatch):
    env, forks_fail = fork_failing_env(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the zygote starts with this process's environment
    made = Zygote(PRELOAD_TABLE)
    made.start()
    try:
        bus = made.spawn(_bus_args(tmp_path), dict(os.environ), name="bus")
        forks_fail.touch()
        with pytest.raises(ZygoteError, match="could not start resample: error: .*Resource temporarily unavailable"):
            made.spawn(["resample", "--help"], dict(os.environ), name="resample")
        first = made.proc.pid
        assert alive(first) and bus.poll() is None  # the zygote and what it forked before run on
        forks_fail.unlink()
        assert made.spawn(["--help"], dict(os.environ), name="help").wait(10) == 0
        assert made.proc.pid == first
        _wait_for(lambda: (tmp_path / "pub.sock").exists())
        bus.terminate()
        assert bus.wait(10) == 0  # it had served all along: a clean stop
    finally:
        made.stop()


# Makes holes in pymalloc's pools (1 in 8 of 40,000 64-byte objects freed), optionally fills them,
# forks, and prints how much private memory (kB) the fork wrote to allocate 5,000 objects of that size.
HOLES_THEN_FORK = """
import gc, os, sys
from common.processes import memory_kb
from services.zygote import fill_allocator_holes

objects = [bytes(31) for _ in range(40_000)]  # 33 + 31 bytes: pymalloc's 64-byte class
del objects[::8]
if sys.argv[1] == "fill":
    fill_allocator_holes()
gc.collect()
gc.freeze()
pid = os.fork()
if pid == 0:
    before = memory_kb("self", "Private_Dirty")
    made = [bytes(31) for _ in range(5_000)]
    print(memory_kb("self", "Private_Dirty") - before, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def _last_word_printed(script: str, *args: str, timeout_s: float = 120) -> str:
    """Run `script` in a fresh interpreter from the repository root; the last word it printed."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO, check=True)
    return done.stdout.split()[-1]


def _fork_writes_kb(fill: bool) -> int:
    return int(_last_word_printed(HOLES_THEN_FORK, "fill" if fill else "no", timeout_s=60))


def test_a_fork_allocates_in_pools_of_its_own_once_the_zygotes_holes_are_filled():
    """Unfilled, the fork's new objects land in the parent's free slots and copy the pages around them
    (~600 pages); filled, they go into fresh pools (~80 pages of objects)."""
    unfilled_kb = _fork_writes_kb(fill=False)
    filled_kb = _fork_writes_kb(fill=True)
    assert unfilled_kb > 1500, f"the holes did not show: {unfilled_kb} kB written without filling"
    assert filled_kb < unfilled_kb / 2, f"filled: {filled_kb} kB written, unfilled {unfilled_kb} kB"


# Preloads as the zygote does, with or without its rehearsal, forks, and prints how much private
# memory (kB) the fork wrote to do what every stage does first: parse its command line, then stamp,
# encode and decode a bus message.
PRELOAD_THEN_FORK = """
import os, sys
from common.processes import memory_kb
from services import preload, zygote

if sys.argv[1] == "no":
    preload.rehearse = lambda: 0
zygote.preload("services.preload")
pid = os.fork()
if pid == 0:
    from common.envelope import decode, encode
    from common.stage import Output
    from services.cli import main

    before = memory_kb("self", "Private_Dirty")
    with main.make_context("voicebus", ["logger"]) as group:
        main.get_command(group, "logger").make_context("logger", [], parent=group).close()
    out, sent = Output.collecting("logger", "test")
    out.event("health.logger", {"state": "running"})
    decode(encode(sent[0]))
    print(memory_kb("self", "Private_Dirty") - before, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def _stage_start_writes_kb(rehearsed: bool) -> int:
    return int(_last_word_printed(PRELOAD_THEN_FORK, "yes" if rehearsed else "no"))


def test_a_stage_forked_after_the_rehearsal_copies_fewer_pages_to_parse_its_command_line():
    """The first parse and the first message write to click's and the envelope's code and caches:
    unrehearsed, the fork copies those pages (~1.5 MB); rehearsed, the zygote wrote them already."""
    unrehearsed_kb = _stage_start_writes_kb(rehearsed=False)
    rehearsed_kb = _stage_start_writes_kb(rehearsed=True)
    assert unrehearsed_kb > 600, f"the first parse wrote only {unrehearsed_kb} kB unrehearsed"
    assert rehearsed_kb < unrehearsed_kb / 2, f"rehearsed: {rehearsed_kb} kB written, unrehearsed {unrehearsed_kb} kB"


def test_the_rehearsal_parses_every_stage_command_line_the_launcher_gives():
    from services.pipeline import STAGES
    from services.preload import rehearse

    assert rehearse() == len(STAGES) + 1  # and the bus


PRELOADED = """
import sys
from services import zygote

zygote.preload("services.preload", sys.argv[1:])
print("services.simulator.server" in sys.modules)
"""


def test_the_simulator_is_preloaded_only_for_a_stage_set_that_starts_one():
    """It stands in for OpenAI: a conversation with a key, or with the simulator apart, does not carry it."""
    assert _last_word_printed(PRELOADED) == "False"
    assert _last_word_printed(PRELOADED, "services.simulator.server") == "True"
    made = Zygote(PRELOAD_TABLE)
    try:
        made.start(["gateway", "simulate", "logger"])
        assert made.extra_preload == ["services.simulator.server"]
        assert made.spawn(["simulate", "--help"], dict(os.environ), name="simulate").wait(30) == 0
    finally:
        made.stop()


def test_a_zygote_started_apart_gives_back_the_pages_only_its_imports_touched_once_asked(zygote, tmp_path):
    """A serve node's zygote imports PRELOAD itself (its Ray worker has threads: it cannot fork one
    from there); once a stage set runs, the library pages no stage maps are reclaimed, once, and the
    zygote still forks stages that run."""
    from common.processes import memory_kb

    bus = zygote.spawn(_bus_args(tmp_path), dict(os.environ), name="bus")
    time.sleep(1.0)
    # alone on a machine it holds ~20 MB of them (module init code, relocation and symbol tables); fewer
    # where another process has the same libraries mapped (those pages are shared, and stay)
    zygote.release_imports()  # raises ZygoteError unless the zygote answers "released MB"
    assert memory_kb(zygote.proc.pid, "Private_Clean") <= 4096, memory_kb(zygote.proc.pid, "Private_Clean")
    assert zygote.release_imports() == 0.0  # once
    assert bus.poll() is None
    assert zygote.spawn(["--help"], dict(os.environ), name="help").wait(10) == 0
    bus.terminate()
    assert bus.wait(10) == 0
