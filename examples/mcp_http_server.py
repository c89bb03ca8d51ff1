"""A remote MCP server (streamable HTTP), for the Realtime API's server-side MCP tools.

    python examples/mcp_http_server.py --port 8931      # then: gateway --server-mcp demo=http://127.0.0.1:8931/mcp

The Realtime server (OpenAI, or the offline simulator) lists and calls these tools itself; the
gateway only says which server and answers the server's approval requests (`--mcp-approve`).
`get_forecast` only reads; `book_table` changes something, so an allow-list would rather not
approve it blindly.
"""

from __future__ import annotations

import argparse

from mcp.server.mcpserver import MCPServer

server = MCPServer("voicebus-example-remote")
FORECASTS = {"paris": "light rain, 14 degrees", "tokyo": "clear skies, 21 degrees", "london": "fog, 9 degrees"}


@server.tool()
def get_forecast(city: str) -> str:
    """Tomorrow's weather forecast for a city."""
    return FORECASTS.get(city.strip().lower(), "no forecast for that city")


@server.tool()
def book_table(restaurant: str, people: int) -> str:
    """Book a table at a restaurant for some people."""
    return f"booked a table for {people} at {restaurant}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8931)
    args = parser.parse_args()
    server.run("streamable-http", host=args.host, port=args.port, stateless_http=True, json_response=True)


if __name__ == "__main__":
    main()
