"""`voicebus tools`: answer every `tool.call` with exactly one `tool.result`; announce `tools.available`.

Tools run on an asyncio loop in a thread of their own (MCP sessions are asyncio; sync Python tools
go to worker threads from there), so calls run concurrently and the bus loop never waits on one.
Results come back through the stage inbox: sockets stay on the runner thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

from common.envelope import Message
from common.log import RateLimitedLog, kv
from common.stage import Stage, StageError
from services.stages.tools.mcp_source import McpServer
from services.stages.tools.python_source import python_tools
from services.stages.tools.registry import DEFAULT_TIMEOUT_S, MAX_OUTPUT_CHARS, Tool, run_call

ANNOUNCE_INTERVAL_S = 10.0  # the set again now and then, for a gateway that restarted without asking

log = logging.getLogger("voicebus.tools")


class ToolsStage(Stage):
    name = "tools"
    subscriptions = ["tool.call", "tools.query"]
    tick_interval_s = ANNOUNCE_INTERVAL_S

    def __init__(self, modules: list[str], mcp_commands: list[str], default_timeout_s: float = DEFAULT_TIMEOUT_S,
                 timeouts: dict[str, float] | None = None, max_output_chars: int = MAX_OUTPUT_CHARS) -> None:
        super().__init__()
        self.modules, self.mcp_commands = modules, mcp_commands
        self.default_timeout_s, self.timeouts = default_timeout_s, timeouts or {}
        self.max_output_chars = max_output_chars
        self.python: dict[str, Tool] = {}
        self.servers: list[McpServer] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tools-loop", daemon=True)
        self._announced: list[dict[str, Any]] | None = None
        # which process answers: a gateway seeing a new instance knows calls sent to the old one are lost
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self._warn = RateLimitedLog(log)
        self.counts = {"calls": 0, "errors": 0, "timeouts": 0, "in_flight": 0, "rejected": 0}

    # --- lifecycle -------------------------------------------------------------------------
    def load_modules(self) -> None:
        """Import the Python tool modules; run before waiting for the bus, so a broken one says so at once."""
        for spec in self.modules:
            try:
                for tool in python_tools(spec, self.default_timeout_s):
                    self.python[tool.name] = tool
            except Exception as exc:  # a bad module is the user's to fix: one line, exit 2
                raise StageError(f"cannot load tools from {spec}: {type(exc).__name__}: {exc}") from exc

    def start(self) -> None:
        if self.modules and not self.python:
            self.load_modules()
        self._thread.start()
        for command in self.mcp_commands:
            server = McpServer(command, lambda: self.inbox.put(("changed", None)), self.default_timeout_s)
            self.servers.append(server)
            asyncio.run_coroutine_threadsafe(server.run(), self.loop)
        self.announce()

    def stop(self) -> None:
        def cancel_all() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(cancel_all)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=2.0)

    def counters(self) -> dict[str, Any]:
        return {**self.counts, "tools": len(self.tools()), "mcp_restarts": sum(s.restarts for s in self.servers)}

    # --- the tool set ----------------------------------------------------------------------
    def tools(self) -> dict[str, Tool]:
        merged = dict(self.python)
        for server in self.servers:
            merged.update(server.tools)
        for name, seconds in self.timeouts.items():
            if name in merged:
                merged[name].timeout_s = seconds
        return merged

    def announce(self, force: bool = True) -> None:
        listing = [tool.announce() for tool in self.tools().values()]
        if force or listing != self._announced:
            if listing != self._announced:
                log.info(kv("tools_available", tools=",".join(t["name"] for t in listing) or "-"))
            self._announced = listing
            self.out.event("tools.available", {"tools": listing, "instance": self.instance})

    # --- calls -----------------------------------------------------------------------------
    def handle(self, message: Message) -> None:
        if message.topic == "tools.query":
            self.announce()
            return
        call = message.data
        if not isinstance(call.get("call_id"), str) or not call["call_id"]:
            self.counts["rejected"] += 1
            self._warn.warning("call", kv("call_rejected", reason="no call_id", src=message.header.src))
            return
        self.counts["calls"] += 1
        self.counts["in_flight"] += 1
        future: Future = asyncio.run_coroutine_threadsafe(run_call(self.tools(), call, self.max_output_chars),
                                                          self.loop)
        future.add_done_callback(lambda done, c=call: self.inbox.put(("result", (c, done))))

    def on_inbox(self, item: tuple[str, Any]) -> None:
        kind, value = item
        if kind == "changed":
            self.announce(force=False)
            return
        call, future = value
        self.counts["in_flight"] -= 1
        try:
            result = future.result()
        except BaseException as exc:  # run_call catches everything a tool does; this is our own bug
            result = {"call_id": call.get("call_id"), "name": call.get("name"), "output": None,
                      "error": f"voicebus tools stage failed: {type(exc).__name__}", "duration_ms": None}
        if result.get("error"):
            self.counts["errors"] += 1
            self.counts["timeouts"] += bool(result.get("timed_out"))
            log.info(kv("tool_error", name=result.get("name"), call_id=result.get("call_id"),
                        error=repr(result["error"][:200])))
        else:
            log.info(kv("tool_result", name=result.get("name"), call_id=result.get("call_id"),
                        duration_ms=result.get("duration_ms")))
        self.out.event("tool.result", result)

    def tick(self) -> None:
        self.announce()
