"""Function calls between the Realtime server and the tools stage: pure bookkeeping, no sockets.

The server's `function_call` output items become `tool.call`s; each `tool.result` (or a timeout
the gateway enforces itself, so a dead tools stage never hangs the conversation) becomes a
`function_call_output` item. Once every call of a response is answered, one `response.create`
asks the model to speak about the outputs, unless that would be stale:

- the user has started a new turn since: the outputs are still sent (the next response sees them),
  but no `response.create`; the server's own VAD response for the new turn answers instead;
- a response is already active (the server started one on its own after an output): nothing to ask.

A follow-up requested but not yet created when the user starts speaking is an orphan in waiting:
it is tagged in `metadata`, and if the server creates it anyway it is cancelled by id.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

FOLLOWUP_TAG = "voicebus_followup"


@dataclass
class PendingCall:
    call_id: str
    name: str
    response_id: str
    deadline: float  # monotonic
    started_ns: int = field(default_factory=time.time_ns)


@dataclass
class ResponseCalls:
    call_ids: set[str] = field(default_factory=set)
    done: bool = False  # response.done seen
    user_spoke_since: bool = False


class FunctionCalls:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.pending: dict[str, PendingCall] = {}
        self.responses: dict[str, ResponseCalls] = {}
        self.followups: dict[str, bool] = {}  # response id asked about -> stale (user spoke before it was created)
        self.counts = {"tool_calls": 0, "tool_timeouts": 0, "followups": 0, "followups_skipped": 0,
                       "orphans_cancelled": 0}

    def on_call_item(self, item: dict[str, Any], response_id: str, now: float,
                     timeout_s: float | None = None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A finished function_call item -> (tool.call data, or an immediate output when it cannot be called)."""
        call_id, name = str(item.get("call_id") or ""), str(item.get("name") or "")
        self.responses.setdefault(response_id, ResponseCalls()).call_ids.add(call_id)
        self.counts["tool_calls"] += 1
        raw = item.get("arguments") or "{}"
        try:
            arguments = json.loads(raw)
        except ValueError:
            return None, error_output(call_id, name, f"the arguments the model wrote for {name} are not valid "
                                      f"JSON: {raw[:200]!r}")
        self.pending[call_id] = PendingCall(call_id, name, response_id, now + (timeout_s or self.timeout_s))
        return {"call_id": call_id, "name": name, "arguments": arguments, "response_id": response_id,
                "item_id": item.get("id")}, None

    def on_result(self, result: dict[str, Any]) -> PendingCall | None:
        """The pending call a tool.result answers (None when unknown, answered already, or expired)."""
        return self.pending.pop(str(result.get("call_id")), None)

    def expired(self, now: float) -> list[PendingCall]:
        late = [call for call in self.pending.values() if now > call.deadline]
        for call in late:
            del self.pending[call.call_id]
            self.counts["tool_timeouts"] += 1
        return late

    def abandon_pending(self) -> list[PendingCall]:
        """Every call still waiting (its tools stage is gone); the caller answers them."""
        calls = list(self.pending.values())
        self.pending.clear()
        return calls

    def answered(self, call_id: str, response_id: str) -> None:
        calls = self.responses.get(response_id)
        if calls is not None:
            calls.call_ids.discard(call_id)

    def on_response_done(self, response_id: str) -> None:
        if response_id in self.responses:
            self.responses[response_id].done = True

    def on_speech_started(self) -> None:
        for calls in self.responses.values():
            calls.user_spoke_since = True
        for tag in self.followups:
            self.followups[tag] = True  # requested, not created yet: an orphan if it appears now

    def followup_due(self, response_id: str, response_active: bool) -> tuple[dict[str, str] | None, str]:
        """(metadata for a response.create, or None; why) once every call of the response is answered."""
        calls = self.responses.get(response_id)
        if calls is None or calls.call_ids or not calls.done:
            return None, "waiting"
        del self.responses[response_id]
        if calls.user_spoke_since:
            self.counts["followups_skipped"] += 1
            return None, "the user started a new turn: the server's response to it will see the outputs"
        if response_active:
            self.counts["followups_skipped"] += 1
            return None, "a response is already active (the server started it on its own)"
        self.followups[response_id] = False
        self.counts["followups"] += 1
        return {FOLLOWUP_TAG: response_id}, "all calls answered"

    def on_response_created(self, response: dict[str, Any]) -> bool:
        """True when this response is a follow-up the user has since talked over: cancel it."""
        asked_about = (response.get("metadata") or {}).get(FOLLOWUP_TAG) or ""
        stale = self.followups.pop(asked_about, False) if asked_about else False
        if stale:
            self.counts["orphans_cancelled"] += 1
        return stale

    def reset(self) -> None:
        """A new server session knows none of these calls."""
        self.pending.clear()
        self.responses.clear()
        self.followups.clear()


def error_output(call_id: str, name: str, error: str) -> dict[str, Any]:
    return {"call_id": call_id, "name": name, "output": None, "error": error}


def output_item(result: dict[str, Any]) -> dict[str, Any]:
    """conversation.item.create carrying a tool.result as the function_call_output the model reads."""
    output = result.get("output")
    text = output if result.get("error") is None and isinstance(output, str) else json.dumps(
        {"error": result.get("error") or "no output"})
    return {"type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": result["call_id"], "output": text}}
