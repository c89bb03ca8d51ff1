"""Stage processes forked from one that has already imported them (a zygote, as LiveKit's forkserver).

Every stage is its own process, and each used to import numpy, pyzmq, msgspec, the openai SDK's
types, aiortc... for itself: ~1.5 s of CPU and ~35 MB of private memory a process, six times per
stage set. `multiprocessing`'s forkserver imports them once (`PRELOAD`), freezes what it imported
out of the garbage collector's reach (so a child's collections do not copy those pages), and forks
each stage from that state: the children share the imported code and data copy-on-write.

A forked stage is the same `voicebus <stage>` command (the same `services.cli.main`), with its own
environment, its stderr on a pipe to the launcher (whose tail explains an exit), a SIGTERM when
its zygote goes, and exit codes as a process's. `ForkedProcess` offers the part of `Popen` the
launcher uses.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from typing import Any

# what every stage set imports, loaded once in the zygote
PRELOAD = ["services.zygote_preload"]
_context: Any = None
_lock = threading.Lock()


def enabled() -> bool:
    """VOICEBUS_ZYGOTE=1: fork stages from a zygote (measured in scripts/bench_serve.py)."""
    return os.environ.get("VOICEBUS_ZYGOTE", "0") == "1"


def _forkserver():
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
        return _context


def _run_stage(args: list[str], env: dict[str, str], stderr_fd: Any) -> None:
    """In the forked child: become `voicebus ARGS` with `env`, stderr into the launcher's pipe."""
    import setproctitle

    from services.launcher import _die_with_parent

    # ps, /proc/PID/cmdline and whatever finds stages by them see the command, as if it were exec'd
    setproctitle.setproctitle(" ".join([sys.executable, "-m", "services.cli", *args]))
    _die_with_parent()  # the zygote's death (it follows its launcher's) ends the stage too
    if stderr_fd is not None:
        os.dup2(stderr_fd.fileno(), 2)
        stderr_fd.close()
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's stderr
    os.environ.clear()
    os.environ.update(env)
    os.environ.pop("VOICEBUS_ZYGOTE", None)  # what a stage starts itself (an upload, an MCP server) is exec'd
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    from services.cli import main

    sys.argv = ["voicebus", *args]
    main(args=args, prog_name="voicebus")  # exits with the command's code (SystemExit)


class ForkedProcess:
    """A stage forked from the zygote, with the `Popen` surface the launcher uses."""

    def __init__(self, args: list[str], env: dict[str, str], stderr_tail: deque[str] | None) -> None:
        context = _forkserver()
        self.args = args
        reader = writer = None
        if stderr_tail is not None:
            reader, writer = context.Pipe(duplex=False)
        self._process = context.Process(target=_run_stage, args=(args, env, writer), daemon=False,
                                        name=f"voicebus-{args[0]}")
        self._process.start()
        if writer is not None:
            writer.close()
            threading.Thread(target=_pass_stderr, args=(reader, stderr_tail), name=f"stderr-{self.pid}",
                             daemon=True).start()

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _pass_stderr(reader, tail: deque[str]) -> None:
    """As `launcher._pass_stderr`: through to our stderr, the last lines kept for `last_words`."""
    fd = reader.fileno()
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        with contextlib.suppress(OSError):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        tail.extend(line.decode(errors="replace") for line in lines)
    if pending:
        tail.append(pending.decode(errors="replace"))
    reader.close()
