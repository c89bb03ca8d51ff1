"""Ctrl-C and SIGTERM as a flag that loops poll, so every process stops the same way: promptly, cleanly."""

from __future__ import annotations

import contextlib
import os
import signal


class StopFlag:
    """`stop = StopFlag.install()`, then `while not stop: ...`; a handler may also be given a callback.

    `wake_fd()` gives a descriptor that turns readable the moment a signal arrives (on any thread), so
    a loop can sleep in its poller until there is work instead of waking every few ms to look at the
    flag: a C-level poll interrupted on another thread would otherwise not notice until its timeout.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._wake: tuple[int, int] | None = None
        self._previous_wake_fd = -1

    @classmethod
    def install(cls, on_signal=None) -> StopFlag:
        flag = cls()

        def handler(signum: int, _frame: object) -> None:
            flag.requested = True
            flag.signal_name = signal.Signals(signum).name
            if on_signal is not None:
                on_signal(flag.signal_name)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        return flag

    def wake_fd(self) -> int:
        """The read end of a pipe Python's signal machinery writes a byte to on every signal (main thread)."""
        if self._wake is None:
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self._previous_wake_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._wake = (read_fd, write_fd)
        return self._wake[0]

    def drain_wake(self) -> None:
        """Empty the wake pipe (its bytes only say "a signal came"; the flag says which)."""
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake[0], 512):
                    pass

    def close(self) -> None:
        """Give the wakeup descriptor back to whoever held it before, and close the pipe."""
        if self._wake is not None:
            signal.set_wakeup_fd(self._previous_wake_fd)
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def __bool__(self) -> bool:
        return self.requested
