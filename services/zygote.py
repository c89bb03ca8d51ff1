"""Stage processes forked from one warm process that imported them once (a zygote).

A stage started as `python -m services.cli STAGE` spends a second or more of CPU importing numpy,
pyzmq, pydantic, aiortc and the openai SDK's event types before it does anything (twenty seconds on
a machine busy starting several stage sets), and holds a private copy of every module object it
imported. The zygote imports them once (`PRELOAD`); then each stage is a fork of it: it starts in
milliseconds and shares the imported pages copy-on-write (`gc.freeze()` keeps the collector from
touching, and so copying, them). This is LiveKit's forkserver pattern. It is not multiprocessing's
forkserver: that one re-imports the parent's `__main__` in every child (in a Ray worker: Ray) and
starts a resource tracker beside it.

The launcher and its zygote talk over a Unix socket pair, one request at a time: the request is
JSON (argv, env, cwd, nice, name) with the write end of a status pipe and, optionally, the child's
stderr passed as file descriptors; the answer is the child's pid. The zygote reaps its children and
writes each one's exit code (as `Popen.returncode`: -N for signal N) to its status pipe. A stage
is the zygote's child: it gets SIGTERM when the zygote dies (PR_SET_PDEATHSIG), and the zygote ends
when its launcher does (its socket closes), however the launcher ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import itertools
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import setproctitle

from common.log import kv
from common.processes import memory_kb

# A zygote is handed a table: the name of a module (the launcher's is `services.preload`) with PRELOAD
# (modules every fork should find imported), COMMAND_PRELOAD (command -> modules, for commands only
# some sets start), warm() (build what the forks share) and run(argv) -> exit code (a stage's command
# line, as `python -m services.cli ARGV` would run it). The zygote imports it by name and knows nothing
# else of the stages: the lowest layer never reaches up to the commands it forks.
READY_TIMEOUT_S = 120.0  # its imports, on a machine that is busy starting other stage sets
REQUEST_TIMEOUT_S = 30.0
REPLY_MAX = 512  # a pid, or "error: ..." when it could not fork
EXIT_CODE = struct.Struct("<i")
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
MADV_PAGEOUT = 21
ZYGOTE_LOST = 255  # the status pipe closed without a code: the zygote died (its children get SIGTERM)

log = logging.getLogger("voicebus.zygote")


class ZygoteError(RuntimeError):
    """The zygote could not start or did not answer."""


class ForkedProcess:
    """A stage forked by the zygote, with the part of `subprocess.Popen` the launcher uses."""

    def __init__(self, args: list[str], pid: int, status_fd: int, stderr: Any = None) -> None:
        self.args, self.pid, self.stderr = args, pid, stderr
        self.returncode: int | None = None
        self._status_fd = status_fd
        os.set_blocking(status_fd, False)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                data = os.read(self._status_fd, EXIT_CODE.size)
            except BlockingIOError:
                return None
            self.returncode = EXIT_CODE.unpack(data)[0] if len(data) == EXIT_CODE.size else ZYGOTE_LOST
            os.close(self._status_fd)
        return self.returncode

    def exit_fd(self) -> int | None:
        """A descriptor that turns readable when the stage exits (None once its exit has been read)."""
        return self._status_fd if self.returncode is None else None

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None:
            readable, _, _ = select.select([self._status_fd], [], [], timeout)
            if not readable:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        code = self.poll()
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not a pid that may have been given to another process since
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class DirectChild:
    """The zygote when this process forked it itself: the part of `subprocess.Popen` `Zygote` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                self.returncode = ZYGOTE_LOST
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["services.zygote"], timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _threads() -> int:
    """OS threads of this process (zmq's and PortAudio's included, which `threading` does not see)."""
    return len(os.listdir("/proc/self/task"))


class Zygote:
    """The launcher's end: starts the zygote process, asks it for stages."""

    _shared: dict[str, Zygote] = {}
    _shared_lock = threading.Lock()

    def __init__(self, table: str, fork_here: bool = False) -> None:
        self.table = table  # the module that says what to preload and how a stage runs (see above)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.proc: subprocess.Popen | DirectChild | None = None
        # the first start forks the zygote from this very process when it is single-threaded then (`up`'s
        # launcher): the launcher then shares the imported pages with it and with every stage instead
        # of holding its own copy of click, zmq and the rest (~9 MB). Otherwise (a Ray worker has
        # threads; a restart after the zygote died) it is a fresh `python -m services.zygote`.
        self.fork_here = fork_here
        self.extra_preload: list[str] = []
        self.imported_here = False  # this process imported PRELOAD only to fork it (`release_imports`)
        self.released = False

    @classmethod
    def shared(cls, table: str) -> Zygote:
        """This process's zygote for `table` (the node host's conversations share one)."""
        with cls._shared_lock:
            if table not in cls._shared:
                cls._shared[table] = cls(table)
            return cls._shared[table]

    def start(self, commands: Iterable[str] = ()) -> None:
        """Start it (if it is not running) and wait until it has imported `PRELOAD`, and what the
        `voicebus` commands it is about to fork import beside (`COMMAND_PRELOAD`)."""
        with self._lock:
            by_command = importlib.import_module(self.table).COMMAND_PRELOAD
            self.extra_preload = sorted({name for command in commands for name in by_command.get(command, [])})
            self._ensure_running()

    def _ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None and self._sock is not None:  # it died; not stopped
            log.warning(kv("zygote_restart", code=self.proc.returncode))
        if self._sock is not None:
            self._sock.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # a Ray worker has it set (for its own titles): setproctitle would then keep a fork's title
        # within the zygote's short command line (`voicebus ga`)
        env.pop("SPT_NOENV", None)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        started = time.monotonic()
        forked = _fork_zygote(theirs, ours, self.table, self.extra_preload) \
            if self.fork_here and self.proc is None else None
        self.imported_here, self.released = forked is not None, False  # a new zygote's imports are new pages
        if forked is not None:
            self.proc = forked
        else:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.zygote", str(theirs.fileno()), self.table,
                                          *self.extra_preload], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         env=env)
        theirs.close()
        self._sock = ours
        ours.settimeout(READY_TIMEOUT_S)
        try:
            if ours.recv(64) != b"ready":
                raise ZygoteError(f"the zygote exited while importing (code {self.proc.wait(5)}; see its log above)")
        except TimeoutError:
            self.proc.kill()
            raise ZygoteError(f"the zygote did not finish its imports within {READY_TIMEOUT_S:.0f} s") from None
        log.info(kv("zygote_ready", pid=self.proc.pid, after_s=round(time.monotonic() - started, 2),
                    forked_here=isinstance(self.proc, DirectChild)))

    def release_imports(self) -> float:
        """Once stages forked from it run (they have faulted in, and share, what they execute): give back
        the library pages touched only to import `PRELOAD`, once. Here, if this process imported them
        and forked the zygote (`up`'s launcher); else in the zygote, which imported them itself (a
        serve node's). MB released (0: again, no zygote, or a kernel without MADV_PAGEOUT)."""
        with self._lock:
            if self.released:
                return 0.0
            self.released = True  # asked once per zygote: one that is gone has nothing to give
            if self.proc is None or self.proc.poll() is not None or self._sock is None:
                return 0.0
            if self.imported_here:
                return page_out_unshared_library_pages()
            self._sock.settimeout(REQUEST_TIMEOUT_S)
            self._sock.sendall(json.dumps({"release": True}).encode())
            answer = self._sock.recv(REPLY_MAX).decode(errors="replace")
        if not answer.startswith("released "):
            raise ZygoteError(f"the zygote did not release its import pages: {answer or 'it exited'}")
        return float(answer.removeprefix("released "))

    def stop(self, within_s: float = 5.0) -> None:
        """End it (its launcher is done with it): it exits when its socket closes; killed if it has not
        within `within_s`. A later `spawn` starts a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self.proc is not None:
                try:
                    self.proc.wait(within_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

    def spawn(self, args: list[str], env: dict[str, str], stderr_pipe: bool = False, name: str = "") -> ForkedProcess:
        """Fork `voicebus ARGS` with this environment, at the calling thread's niceness (as a
        subprocess started from it would be); `stderr_pipe`: its stderr is a pipe read from `.stderr`."""
        status_r, status_w = os.pipe()
        err_r, err_w = os.pipe() if stderr_pipe else (-1, -1)
        request = {"argv": args, "env": env, "cwd": os.getcwd(), "name": name or (args[0] if args else "stage"),
                   "nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}
        try:
            with self._lock:
                self._ensure_running()
                assert self._sock is not None
                self._sock.settimeout(REQUEST_TIMEOUT_S)
                fds = [status_w, *([err_w] if stderr_pipe else [])]
                socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
                answer = self._sock.recv(REPLY_MAX)
            if not answer:
                raise ZygoteError("the zygote exited before it answered")
            if not answer.isdigit():  # it could not fork this one (its other stages run on)
                raise ZygoteError(f"the zygote could not start {request['name']}: {answer.decode(errors='replace')}")
        except (OSError, ZygoteError):
            for fd in (status_r, err_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (status_w, err_w):
                if fd >= 0:
                    os.close(fd)
        stderr = os.fdopen(err_r, "rb") if stderr_pipe else None
        return ForkedProcess(args, int(answer), status_r, stderr)


# --- the zygote process itself ------------------------------------------------------------------
def _serve(control: socket.socket, table: str) -> None:
    """Fork a stage for each request until the launcher's end of `control` closes."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to the wake pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle: it stops the stages
    status_fds: dict[int, int] = {}  # child pid -> the write end of its status pipe
    while True:
        readable, _, _ = select.select([control, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            _reap(status_fds)
        if control not in readable:
            continue
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 2)
        if not message:
            return  # the launcher is gone: our children get SIGTERM as we exit
        try:
            request = json.loads(message)
            if request.get("release"):  # its stages run: what only its imports touched can go
                control.sendall(f"released {page_out_unshared_library_pages():.1f}".encode())
                continue
            pid = os.fork()
        except (OSError, ValueError) as exc:  # EAGAIN/ENOMEM: this one stage fails, not every stage forked
            for fd in fds:
                os.close(fd)
            control.sendall(f"error: {type(exc).__name__}: {exc}".encode()[:REPLY_MAX])
            continue
        if pid == 0:
            _become_stage(request, fds, [control.fileno(), wake_r, wake_w, *status_fds.values()], table)
        status_fds[pid] = fds[0]
        for fd in fds[1:]:
            os.close(fd)
        control.sendall(str(pid).encode())


def _reap(status_fds: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_fds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):  # the launcher stopped waiting for it
                os.write(fd, EXIT_CODE.pack(os.waitstatus_to_exitcode(status)))
            os.close(fd)


def _become_stage(request: dict[str, Any], fds: list[int], inherited: list[int], table: str) -> None:
    """In the fork: become `voicebus ARGV` as a fresh process would be, run it, and exit (never returns)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in [*inherited, fds[0]]:
            with contextlib.suppress(OSError):
                os.close(fd)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        zygote = os.getppid()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != zygote:
            os._exit(ZYGOTE_LOST)  # the zygote died between our fork and the prctl
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, int(request["nice"]))
        if len(fds) > 1:
            os.dup2(fds[1], 2)
            os.close(fds[1])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["voicebus", *request["argv"]]
        # last, so that a process named so is set up: what ps and /proc/PID/cmdline show, the command
        # it would have been started with (not the zygote's); and the short name top shows
        setproctitle.setproctitle(" ".join([sys.executable, "-m", "services.cli", *request["argv"]]))
        libc.prctl(PR_SET_NAME, f"vb-{request['name']}"[:15].encode())
        code = _run(table, request["argv"])
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run(table: str, argv: list[str]) -> int:
    """The table's `run(ARGV)` to its end, as the interpreter would end it: its exit code, then its
    non-daemon threads joined and its atexit functions run (os._exit skips both)."""
    import atexit

    try:
        code = importlib.import_module(table).run(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then exit 1
        import traceback

        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter does at exit
    atexit._run_exitfuncs()
    return code


def _fork_zygote(theirs: socket.socket, ours: socket.socket, table: str, extra: list[str]) -> DirectChild | None:
    """Import `PRELOAD` here, then fork the zygote from this process: both keep the imported pages
    shared. The child keeps only its end of the socket and the standard streams (stdin: /dev/null),
    answers "ready" and serves; it never returns into the caller's frames. None when this process
    has other threads (a fork would hold only the calling one): the caller starts one apart."""
    if _threads() != 1:
        return None
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS would start a pool as it loads
    preload(table, extra)
    if _threads() != 1:
        log.warning(kv("zygote_apart", reason="a preloaded module started a thread here", threads=_threads()))
        return None
    pid = os.fork()
    if pid:
        return DirectChild(pid)
    code = 1
    try:
        ours.close()
        os.closerange(3, theirs.fileno())  # the launcher's lock and pipes are not the stages' to hold
        os.closerange(theirs.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's handler sets the launcher's flag
        setproctitle.setproctitle(f"{sys.executable} -m services.zygote (voicebus stage zygote, forked by "
                                  f"{os.getppid()})")
        theirs.sendall(b"ready")
        _serve(theirs, table)
        code = 0
    finally:
        os._exit(code)


def page_out_unshared_library_pages() -> float:
    """Ask the kernel to reclaim this process's read-only file pages (library code and constants) that no
    other process maps: MADV_PAGEOUT (Linux 5.4) skips shared ones. `up`'s launcher imports numpy,
    aiortc, PyAV, cryptography and the openai SDK only so that its zygote forks with them in place; what
    the imports touched (~20-30 MB: module init code, relocation and symbol tables) it never runs again,
    while the stages fault in and share what they run. Read-only file pages are never lost: one touched
    again is read back from the file. Returns the MB this process's RSS shrank by (0 where the kernel
    lacks MADV_PAGEOUT, or refuses it for a mapping: EINVAL, which leaves those pages as they were)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = memory_kb("self", "Rss")
    with open("/proc/self/maps") as maps:
        mappings = [line.split() for line in maps]
    for fields in mappings:
        # address perms offset dev inode path: a file's read-only mapping (a writable one holds its
        # relocated copy in anonymous pages, which this does not touch)
        if len(fields) >= 6 and fields[5].startswith("/") and "w" not in fields[1]:
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)
    return max(0.0, (before - memory_kb("self", "Rss")) / 1024)


def preload(table: str, extra: Iterable[str] = ()) -> None:
    """Import what every stage imports (the table's PRELOAD, and `extra`) and build what they share (the
    table's `warm()`), then keep it out of the collector."""
    spec = importlib.import_module(table)
    for name in [*spec.PRELOAD, *extra]:
        importlib.import_module(name)
    spec.warm()
    gc.collect()
    filled = fill_allocator_holes()
    gc.freeze()  # what is imported is never collected: the collector leaves its pages shared
    log.debug(kv("allocator_holes_filled", slots=filled))


# Small objects live in pymalloc's pools. The imports leave free slots in hundreds of them (~3,500
# here, 16-512 bytes each: temporaries that died). A fork's first new objects would go into those
# slots, each one copying the 4 kB page it lands on; measured, that was ~1.5 MB private per stage
# (8 MB of a browser conversation's 181). Filled with objects kept for good, they leave every fork
# to start pools of its own, packed with what it allocates.
# The first round takes ~90 kB; a later one fills what the round before opened, and also the
# untouched tails of the pools it started (~220 kB a round, shared pages). One round is enough:
# a browser conversation read 149.4 MB PSS with one, 150.2 with two and 150.1 with four
# (bench_web_footprint, 2026-12-05, one round each).
FILL_ROUNDS = 1
_FILLERS: list[Any] = []
_HALF = 0.5


def fill_allocator_holes() -> int:
    """Take the free slots of pymalloc's used pools; returns how many were taken. Nothing here may
    free a small object, or it would open a slot again: no temporaries (ints past 256, floats,
    generators), and what the accounting read is kept. What stays free afterwards is the untouched
    tail of the pools the filling itself started (a fork fills those with pages of its own)."""
    taken = 0
    for _ in range(FILL_ROUNDS):
        free_slots, kept = free_allocator_slots()
        _FILLERS.append(kept)
        for size, count in free_slots.items():
            if size == 16:
                filler: list[Any] = [object() for _ in itertools.repeat(None, count)]  # 16 bytes
            elif size == 32:
                filler = [_HALF + 0.0 for _ in itertools.repeat(None, count)]  # 24 bytes
            else:
                length = size - 33  # a bytes object is 33 bytes and its length
                filler = [bytes(length) for _ in itertools.repeat(None, count)]
            _FILLERS.append(filler)
            taken += count
    return taken


def free_allocator_slots() -> tuple[dict[int, int], list[Any]]:
    """Free slots in pymalloc's used pools by size class, from `sys._debugmallocstats()` (CPython's
    own accounting: written to fd 2, read back through a memfd), and what was allocated to read them."""
    out = os.memfd_create("mallocstats")
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to borrow: nothing filled
        os.close(out)
        return {}, []
    try:
        sys.stderr.flush()
        os.dup2(out, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    os.lseek(out, 0, os.SEEK_SET)
    text = os.read(out, 1 << 20)
    os.close(out)
    rows = text.splitlines()
    kept: list[Any] = [text, rows]
    free_slots: dict[int, int] = {}
    kept.append(free_slots)
    for line in rows:  # "class size pools blocks_in_use avail_blocks"
        row = line.split()
        kept.append(row)
        if len(row) == 5 and row[0].isdigit() and row[1].isdigit() and row[4].isdigit():
            free_slots[int(row[1])] = int(row[4])
    return free_slots, kept


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    # now, with its environment still in place: setproctitle takes the argv and environ area for the
    # titles on its first call (after a fork's environment is replaced it finds none)
    setproctitle.setproctitle(f"{sys.executable} -m services.zygote {sys.argv[1]} (voicebus stage zygote)")
    table = sys.argv[2]
    preload(table, sys.argv[3:])
    if threading.active_count() != 1:
        raise SystemExit(f"zygote: a preloaded module started a thread ({threading.enumerate()}); a fork would lose it")
    control.sendall(b"ready")
    _serve(control, table)


if __name__ == "__main__":
    main()
