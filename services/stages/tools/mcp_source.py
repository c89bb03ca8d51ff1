"""MCP servers as tools, over stdio with the official `mcp` package.

Each server runs as a child process for the stage's lifetime. Its tools are listed on connect;
a server that exits (or stops answering pings) is restarted with doubling backoff, and every call
it had in flight is answered with an error at once. Its stderr goes to the stage's stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.log import kv
from services.stages.tools.registry import DEFAULT_TIMEOUT_S, Tool, ToolError

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0
PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 30.0
# mcp gives a stdio server only a few safe variables (HOME, PATH, ...), so no API key reaches it; the
# machine's sense of time and language goes along too, or a time server and a Python tool in one
# stage would disagree on what "Asia/Tokyo" or the local zone is
PASSED_ENV = ("TZ", "TZDIR", "PYTHONTZPATH", "LANG", "LANGUAGE")
PASSED_ENV_PREFIXES = ("LC_",)

log = logging.getLogger("voicebus.tools")


def server_env() -> dict[str, str]:
    """mcp's default environment for a server, plus the time-zone and locale variables (never secrets)."""
    from mcp.client.stdio import get_default_environment

    passed = {name: value for name, value in os.environ.items()
              if name in PASSED_ENV or name.startswith(PASSED_ENV_PREFIXES)}
    return {**get_default_environment(), **passed}


class McpServer:
    def __init__(self, command: str, on_change: Callable[[], None], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.command = command
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("empty --mcp command")
        self.on_change, self.timeout_s = on_change, timeout_s
        self.tools: dict[str, Tool] = {}
        self.restarts = 0
        self._session: Any = None
        self._in_flight: set[asyncio.Task] = set()
        self._lost = asyncio.Event()

    @property
    def source(self) -> str:
        return f"mcp:{self.command}"

    async def run(self) -> None:
        """Connect, serve, and reconnect until cancelled."""
        from mcp import ClientSession, StdioServerParameters, stdio_client

        backoff = BACKOFF_START_S
        params = StdioServerParameters(command=self.argv[0], args=self.argv[1:], env=server_env())
        while True:
            self._lost.clear()
            reason = "exited"
            try:
                async with stdio_client(params, errlog=sys.stderr) as (read, write), \
                        ClientSession(read, write) as session:
                    await asyncio.wait_for(session.initialize(), CONNECT_TIMEOUT_S)
                    listed = await asyncio.wait_for(session.list_tools(), CONNECT_TIMEOUT_S)
                    self._session = session
                    self.tools = {t.name: self._tool(t) for t in listed.tools}
                    log.info(kv("mcp_connected", command=repr(self.command), tools=",".join(self.tools)))
                    self.on_change()
                    backoff = BACKOFF_START_S
                    reason = await self._watch(session)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # spawn failures, protocol errors, anyio task groups
                reason = f"{type(exc).__name__}: {exc}"[:200]
            self._session = None
            self._fail_in_flight(f"the MCP server {self.argv[0]!r} went away mid-call ({reason})")
            if self.tools:
                self.tools = {}
                self.on_change()
            self.restarts += 1
            log.warning(kv("mcp_restarting", command=repr(self.command), reason=repr(reason), in_s=backoff))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _watch(self, session: Any) -> str:
        """Ping until the server stops answering or a call finds it gone."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), PING_INTERVAL_S)
                return "a call found the server gone"
            except TimeoutError:
                pass
            try:
                await asyncio.wait_for(session.send_ping(), PING_TIMEOUT_S)
            except Exception as exc:
                return f"no answer to ping ({type(exc).__name__})"

    def _fail_in_flight(self, reason: str) -> None:
        for task in list(self._in_flight):
            task.cancel(reason)

    def _tool(self, listed: Any) -> Tool:
        name = listed.name

        async def invoke(arguments: dict[str, Any]) -> Any:
            session = self._session
            if session is None:
                raise ToolError(f"the MCP server for {name} is not connected (restarting)")
            task = asyncio.ensure_future(session.call_tool(name, arguments))
            self._in_flight.add(task)
            try:
                result = await task
            except asyncio.CancelledError as exc:
                if task.cancelled() and not _current_task_cancelling():
                    raise ToolError(str(exc.args[0]) if exc.args else "the MCP server went away") from exc
                raise
            except Exception as exc:
                self._lost.set()
                raise ToolError(f"the MCP server {Path(self.argv[0]).name!r} went away mid-call "
                                f"({type(exc).__name__}: {exc}); restarting it") from exc
            finally:
                self._in_flight.discard(task)
            text = "\n".join(getattr(part, "text", "") for part in result.content if getattr(part, "text", None))
            if result.is_error:
                raise ToolError(text or f"{name} failed")
            structured = getattr(result, "structured_content", None)
            return structured if structured is not None else text

        return Tool(name, listed.description or name, dict(listed.input_schema or {"type": "object"}),
                    self.source, invoke, self.timeout_s)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task and task.cancelling())
