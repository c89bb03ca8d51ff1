"""A tool as the stage holds it, and how one call is run: validated, timed, capped, never fatal.

Every call ends in exactly one result: an output (JSON text) or an error the model can speak
about. Nothing a tool does (raise, hang, return something huge or unserialisable) escapes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

DEFAULT_TIMEOUT_S = 10.0
MAX_OUTPUT_CHARS = 8000  # a function_call_output the model reads aloud; more is noise and tokens


class ToolError(Exception):
    """A tool reported failure (an MCP isError result, or a server that went away)."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    source: str  # "python:<module>" or "mcp:<command>"
    invoke: Callable[[dict[str, Any]], Awaitable[Any]]
    timeout_s: float = DEFAULT_TIMEOUT_S

    def announce(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "source": self.source, "timeout_s": self.timeout_s}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


async def run_call(tools: dict[str, Tool], call: dict[str, Any], max_output_chars: int = MAX_OUTPUT_CHARS
                   ) -> dict[str, Any]:
    """The `tool.result` for one `tool.call`: {call_id, name, output, error, duration_ms, source}."""
    started = time.monotonic()
    name = str(call.get("name", ""))
    tool = tools.get(name)
    result: dict[str, Any] = {"call_id": call.get("call_id"), "name": name, "output": None, "error": None,
                              "source": tool.source if tool else None}
    arguments = call.get("arguments", {})
    try:
        if tool is None:
            raise ToolError(f"no tool named {name!r}; available: {', '.join(sorted(tools)) or 'none'}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError as exc:
                raise ToolError(f"arguments are not valid JSON: {exc}") from exc
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        output = _text(await asyncio.wait_for(tool.invoke(arguments), tool.timeout_s))
        if len(output) > max_output_chars:
            output = output[:max_output_chars] + f" [output cut at {max_output_chars} of {len(output)} characters]"
            result["truncated"] = True
        result["output"] = output
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()[:5])
        result["error"] = f"invalid arguments for {name}: {problems}"
    except TimeoutError:
        result["error"] = f"{name} did not finish within {tool.timeout_s:g} s" if tool else "timed out"
        result["timed_out"] = True
    except ToolError as exc:
        result["error"] = str(exc)
    except Exception as exc:  # a tool's own bug: reported to the model, never fatal to the stage
        result["error"] = f"{name} failed: {type(exc).__name__}: {exc}"
    result["duration_ms"] = round(1000 * (time.monotonic() - started), 2)
    return result
