"""Server-side MCP tools (GA `{"type": "mcp", "server_label", "server_url"}` in `session.tools`): what
OpenAI's server does with them, done offline by the simulator against a real MCP server over HTTP.

The server lists a named server's tools when the session is updated (an `mcp_list_tools` item,
`mcp_list_tools.in_progress` then `.completed`, or `.failed`), and calls one when the model decides
(an `mcp_call` item, its arguments streamed, `response.mcp_call.in_progress` then `.completed` or
`.failed`), then speaks about the output in the same response. Where `require_approval` says so
(OpenAI's default is "always") it first asks the client: the response's output is an
`mcp_approval_request` item, and the call is made once the client adds an `mcp_approval_response`
approving it and asks for a response.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

LIST_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 30.0


@dataclass
class RemoteServer:
    label: str
    url: str
    allowed_tools: list[str] | None = None  # None: all it lists
    require_approval: Any = "always"
    tools: list[dict[str, Any]] = field(default_factory=list)  # as listed: name, description, input_schema

    @classmethod
    def from_tool(cls, tool: dict[str, Any]) -> RemoteServer:
        """A session's mcp tool entry (checked by apply_session_update: it has a server_url)."""
        allowed = tool.get("allowed_tools")
        if isinstance(allowed, dict):
            allowed = allowed.get("tool_names")
        return cls(str(tool.get("server_label", "")), str(tool["server_url"]), list(allowed) if allowed else None,
                   tool.get("require_approval") or "always")

    def offers(self, name: str) -> bool:
        return any(t["name"] == name for t in self.tools)

    def needs_approval(self, name: str) -> bool:
        rule = self.require_approval
        if rule in ("always", "never"):
            return rule == "always"
        never = ((rule or {}).get("never") or {}).get("tool_names") or []
        always = ((rule or {}).get("always") or {}).get("tool_names") or []
        return name in always or name not in never


async def list_tools(server: RemoteServer) -> list[dict[str, Any]]:
    """The server's tools (those `allowed_tools` lets through), as an mcp_list_tools item lists them."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def listing() -> list[dict[str, Any]]:
        async with streamable_http_client(server.url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            listed = await session.list_tools()
        return [{"name": t.name, "description": t.description or "", "input_schema": dict(t.input_schema or {}),
                 "annotations": t.annotations.model_dump(exclude_none=True) if t.annotations else None}
                for t in listed.tools if server.allowed_tools is None or t.name in server.allowed_tools]

    return await asyncio.wait_for(listing(), LIST_TIMEOUT_S)


async def call_tool(server: RemoteServer, name: str, arguments: str) -> tuple[str | None, dict[str, Any] | None]:
    """(output, None) or (None, error) as an mcp_call item carries them: a tool's own failure is a
    tool_execution_error, an unreachable server an http_error, a bad exchange a protocol_error."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return None, {"type": "protocol_error", "code": -32602, "message": "arguments are not JSON"}

    async def call() -> Any:
        async with streamable_http_client(server.url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return await session.call_tool(name, parsed)

    try:
        result = await asyncio.wait_for(call(), CALL_TIMEOUT_S)
    except TimeoutError:
        return None, {"type": "http_error", "code": 504, "message": f"{server.label} did not answer in time"}
    except Exception as exc:  # noqa: BLE001 - whatever the transport raised, the item says it
        return None, {"type": "http_error", "code": 502, "message": f"{type(exc).__name__}: {exc}"[:300]}
    text = "\n".join(getattr(part, "text", "") for part in result.content if getattr(part, "text", None))
    if result.is_error:
        return None, {"type": "tool_execution_error", "message": text or f"{name} failed"}
    return text, None


def list_item(item_id: str, server: RemoteServer) -> dict[str, Any]:
    return {"id": item_id, "type": "mcp_list_tools", "server_label": server.label, "tools": server.tools}


def call_item(item_id: str, server: RemoteServer, name: str, arguments: str, approval_request_id: str | None,
              output: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "mcp_call", "server_label": server.label, "name": name, "arguments": arguments,
            "approval_request_id": approval_request_id, "output": output, "error": error}


def approval_request_item(item_id: str, server: RemoteServer, name: str, arguments: str) -> dict[str, Any]:
    return {"id": item_id, "type": "mcp_approval_request", "server_label": server.label, "name": name,
            "arguments": arguments}
