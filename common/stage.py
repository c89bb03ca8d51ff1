"""What a stage is: a `handle(message)` step plus optional hooks, testable without sockets.

The runner (`common.runner`) owns the sockets and the loop; a stage only reads messages and writes
through `self.out`. Work from other threads (a PortAudio callback, a websocket reader) goes through
`self.inbox`, which wakes the runner's poll so nothing waits for a timeout.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from common.envelope import Message, Stamper

INBOX_LIMIT = 4096
# One conversation after another on one stage set (`voicebus web`: one browser, then the next):
# whoever starts a conversation publishes SESSION_BEGIN {session}, and SESSION_END {session} when it is
# over. The runner hands both to every stage (`on_session`) and re-stamps its headers, so nothing of
# one caller's conversation is carried into the next one's session, trace or Realtime session.
SESSION_BEGIN = "session.begin"
SESSION_END = "session.end"
SESSION_TOPICS = (SESSION_BEGIN, SESSION_END)


class StageError(RuntimeError):
    """A problem the user can fix (no such device, bad file): logged as one line, exit code 2."""


class Inbox:
    """A bounded, thread-safe hand-off to the runner thread, with a pipe the runner can poll."""

    def __init__(self, limit: int = INBOX_LIMIT) -> None:
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._limit = limit
        self.dropped = 0
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def put(self, item: Any) -> bool:
        """Never blocks (safe in an audio callback); drops and counts when full."""
        with self._lock:
            if len(self._items) >= self._limit:
                self.dropped += 1
                return False
            self._items.append(item)
        # a full pipe already holds wake-ups; the runner drains everything anyway
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"\0")
        return True

    def drain(self) -> list[Any]:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Output:
    """Where a stage's messages go: stamps headers, then hands them to a sink (socket or list)."""

    def __init__(self, src: str, session: str, sink: Callable[[Message], object]) -> None:
        self.stamper = Stamper(src, session)
        self._sink = sink
        self.count = 0

    @classmethod
    def collecting(cls, src: str = "test", session: str = "test") -> tuple[Output, list[Message]]:
        """An output that keeps what it is given: for `handle()` tests without sockets."""
        messages: list[Message] = []
        return cls(src, session, messages.append), messages

    def send(self, message: Message) -> None:
        self.count += 1
        self._sink(message)

    def event(self, topic: str, data: dict[str, Any] | None = None) -> Message:
        message = self.stamper.event(topic, data or {}, time.time_ns())
        self.send(message)
        return message

    def audio(self, topic: str, pcm: bytes, *, rate: int, channels: int, pts: int, t_capture_ns: int,
              fmt: str = "s16le", **extra: Any) -> Message:
        message = self.stamper.audio(topic, pcm, rate=rate, channels=channels, pts=pts,
                                     t_capture_ns=t_capture_ns, t_ns=time.time_ns(), fmt=fmt, **extra)
        self.send(message)
        return message


class Stage:
    """Base of every stage. Override `handle`; the other hooks are optional."""

    name = "stage"
    subscriptions: list[str] = []
    tick_interval_s: float | None = None  # call tick() this often, if set
    # A stage off the latency path (the logger) sets this: the runner then wakes at most this often
    # and takes everything queued at once, instead of waking the interpreter for every 20 ms frame.
    # ZeroMQ queues meanwhile (up to its high-water mark, then drops and the gap is counted).
    batch_interval_s: float | None = None
    # A stage whose audio thread should publish itself (the mic) sets this; the runner then gives it
    # `thread_out`, an Output on a socket of its own that only that thread may use. One wake-up per
    # frame instead of two (audio thread, then runner).
    publishes_from_thread = False

    def __init__(self) -> None:
        self.out: Output = Output.collecting(self.name)[0]
        self.thread_out: Output | None = None
        self.inbox = Inbox()
        self.finished = False  # a stage with a natural end (a WAV source) sets this
        self.exit_code = 0

    def start(self) -> None:
        """Open devices or connections; called once the bus answers."""

    def handle(self, message: Message) -> None:
        """One message from the bus."""

    def on_inbox(self, item: Any) -> None:
        """One item put in the inbox by another thread of this stage."""

    def tick(self) -> None:
        """Periodic work (every `tick_interval_s`)."""

    def stop(self) -> None:
        """Release devices, flush files. Must return quickly (honcho allows 5 s)."""

    def counters(self) -> dict[str, Any]:
        """Stage-specific figures added to the heartbeat."""
        return {}

    def on_session(self, topic: str, session: str, previous: str) -> None:
        """A conversation began (SESSION_BEGIN; headers already carry `session`) or ended (SESSION_END)."""

    def adopt_session(self, session: str) -> str:
        """Stamp every message from now on with `session`; returns the one it replaces."""
        previous = self.out.stamper.session
        self.out.stamper.session = session
        if self.thread_out is not None:
            self.thread_out.stamper.session = session
        return previous
