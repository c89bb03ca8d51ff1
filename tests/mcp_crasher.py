"""A small MCP server (the official SDK's MCPServer over stdio) whose `crash` tool kills the server."""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("voicebus-test-crasher")


@server.tool()
def crash(reason: str = "") -> str:
    """Exits the whole server process mid-call."""
    os._exit(3)


@server.tool()
def lights(room: str) -> str:
    """Turns on the lights."""
    return f"the lights are on in the {room}"


if __name__ == "__main__":
    server.run("stdio")
