"""Faults on demand, so clients can be tested against a misbehaving server.

Chosen per server (`voicebus simulate --fault KIND`) or per connection (`?fault=KIND` on the
websocket URL). A fault fires on every response unless a count is given (`--fault-count N` or
`&fault_count=N`); counts are kept per server, so a client that reconnects with the same URL sees
the fault N times in all, not N times per connection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

FAULT_KINDS = ("drop_mid_response", "error_event", "unknown_event", "malformed_json", "slow",
               # function calling: what the model or the server get wrong, and races peers shipped
               "bad_arguments",  # the model writes arguments that are not JSON
               "unknown_tool",  # the model calls a tool the session does not have
               "auto_response",  # after a function_call_output the server starts a response on its own
               "late_response")  # response.create is honoured ~3 s late, even if the user spoke meanwhile


@dataclass(frozen=True)
class Fault:
    kind: str
    after_deltas: int = 3  # drop_mid_response: close after this many audio deltas
    delay_ms: int = 200  # slow: delay before every event
    count: int | None = None  # None: every time

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; choose from {', '.join(FAULT_KINDS)}")


class FaultBudget:
    """How many times each fault may still fire, shared by all connections of one server."""

    def __init__(self) -> None:
        self._fired: dict[Fault, int] = {}
        self._lock = threading.Lock()

    def take(self, fault: Fault) -> bool:
        with self._lock:
            fired = self._fired.get(fault, 0)
            if fault.count is not None and fired >= fault.count:
                return False
            self._fired[fault] = fired + 1
            return True
