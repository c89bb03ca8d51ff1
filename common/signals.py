"""Ctrl-C and SIGTERM as a flag that loops poll, so every process stops the same way: promptly, cleanly."""

from __future__ import annotations

import signal


class StopFlag:
    """`stop = StopFlag.install()`, then `while not stop: ...`; a handler may also be given a callback."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

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

    def __bool__(self) -> bool:
        return self.requested
