"""The tools stage: Python functions and a real MCP server (mcp-server-time) behind tool.call/tool.result."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from services.stages.tools.python_source import python_tools
from services.stages.tools.registry import run_call
from tests.helpers import REPO, children_of

EXAMPLES = str(REPO / "examples/tools.py")
FIXTURES = str(REPO / "tests/tool_fixtures.py")
MCP_TIME = str(Path(sys.executable).parent / "mcp-server-time")


def _run(tools, name, arguments, **kw):
    return asyncio.run(run_call(tools, {"call_id": "c1", "name": name, "arguments": arguments}, **kw))


def test_python_functions_become_tools_with_schemas_from_their_signatures():
    tools = {t.name: t for t in python_tools(EXAMPLES)}
    assert set(tools) == {"get_current_time", "convert_units"}
    schema = tools["convert_units"].parameters
    assert schema["required"] == ["value", "from_unit", "to_unit"] and schema["properties"]["value"]["type"] == "number"
    assert "km" in schema["properties"]["from_unit"]["enum"]
    assert tools["get_current_time"].parameters["properties"]["timezone"]["description"].startswith("IANA")
    assert tools["get_current_time"].description == "The current time in a timezone."
    result = _run(tools, "convert_units", {"value": 10, "from_unit": "km", "to_unit": "mi"})
    assert result["error"] is None and json.loads(result["output"]) == {"value": 6.213712, "unit": "mi"}


def test_every_failure_is_one_error_result_the_model_can_read():
    tools = {t.name: t for t in python_tools(FIXTURES, timeout_s=0.5)}
    cases = {
        "raises": (("explode", {"reason": "disk on fire"}), "explode failed: RuntimeError: disk on fire"),
        "timeout": (("hang", {"seconds": 3}), "hang did not finish within 0.5 s"),
        "invalid": (("echo", {"text": 5, "extra": 1}), "invalid arguments for echo"),
        "unknown": (("nosuch", {}), "no tool named 'nosuch'"),
        "bad json": (("echo", '{"text": '), "arguments are not valid JSON"),
    }
    for label, ((name, arguments), expected) in cases.items():
        result = _run(tools, name, arguments)
        assert result["output"] is None and expected in result["error"], (label, result)
        assert result["call_id"] == "c1" and result["duration_ms"] >= 0
    result = _run(tools, "big", {"size": 20000}, max_output_chars=100)
    assert result["error"] is None and result["truncated"] and "cut at 100 of 20000" in result["output"]
    assert json.loads(_run(tools, "async_echo", {"text": "hi"})["output"]) == {"echo": "hi"}
    assert _run(tools, "echo", '{"text": "a", "times": 2}')["output"] == "a a"


def _results(client, call_ids):
    found = {}
    deadline = time.monotonic() + 30
    while len(found) < len(call_ids) and time.monotonic() < deadline:
        message = client.wait_for(lambda m: m.topic == "tool.result" and m.data["call_id"] in call_ids
                                  and m.data["call_id"] not in found, timeout_s=30)
        found[message.data["call_id"]] = message.data
    return found


def test_stage_answers_every_call_once_from_python_and_a_real_mcp_server(procs, client_factory):
    assert os.path.exists(MCP_TIME), "mcp-server-time is a test dependency (pip install -e '.[dev]')"
    stage = procs.voicebus("tools", "--module", EXAMPLES, "--module", FIXTURES, "--mcp", f"{MCP_TIME} "
                           "--local-timezone UTC", "--timeout", "2", "--tool-timeout", "noop=1")
    client = client_factory(["tool.result", "tools.available", "health.tools"])
    announced = client.wait_for(lambda m: m.topic == "tools.available" and any(
        t["source"].startswith("mcp:") for t in m.data["tools"]), timeout_s=60)
    by_name = {t["name"]: t for t in announced.data["tools"]}
    assert {"get_current_time", "convert_units", "echo", "noop"} <= set(by_name)
    assert by_name["noop"]["timeout_s"] == 1 and by_name["echo"]["timeout_s"] == 2
    # both define get_current_time: the MCP server's wins (later sources override), and says so
    assert by_name["get_current_time"]["source"].startswith("mcp:")
    calls = {"t": ("get_current_time", {"timezone": "Asia/Tokyo"}), "bad_tz": ("get_current_time", {"timezone": "X/Y"}),
             "e": ("echo", {"text": "hello"}), "h": ("hang", {"seconds": 5}), "x": ("explode", {}),
             "u": ("nosuch", {}), "j": ("echo", "{nope")}
    for call_id, (name, arguments) in calls.items():
        client.send_event("tool.call", {"call_id": call_id, "name": name, "arguments": arguments})
    results = _results(client, set(calls))
    assert set(results) == set(calls)
    tokyo = json.loads(results["t"]["output"])
    assert tokyo["timezone"] == "Asia/Tokyo" and "+09:00" in tokyo["datetime"] and results["t"]["source"].startswith("mcp:")
    assert "Invalid timezone" in results["bad_tz"]["error"]
    assert results["e"]["output"] == "hello"
    assert "within 2 s" in results["h"]["error"] and results["h"]["duration_ms"] < 3000
    assert all(results[k]["error"] for k in ("x", "u", "j"))
    client.collect(1.0)
    assert len([m for m in client.seen if m.topic == "tool.result"]) == len(calls), "exactly one result per call"
    beat = client.wait_for(lambda m: m.topic == "health.tools" and m.data["calls"] == len(calls)
                           and m.data["in_flight"] == 0, timeout_s=5)
    assert beat.data["errors"] == 5 and beat.data["timeouts"] == 1
    assert stage.poll() is None


def test_mcp_server_that_exits_mid_call_is_restarted_and_the_call_gets_an_error(procs, client_factory, tmp_path):
    # the server is a child of the stage: stop it so a call hangs inside, then kill it
    stage = procs.voicebus("tools", "--mcp", f"{MCP_TIME} --local-timezone UTC", "--timeout", "20")
    client = client_factory(["tool.result", "tools.available", "health.tools"])
    client.wait_for(lambda m: m.topic == "tools.available" and m.data["tools"], timeout_s=60)
    servers = [pid for pid in children_of(stage.pid)
               if b"mcp-server-time" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert servers, "the MCP server runs as a child of the stage"
    os.kill(servers[0], signal.SIGSTOP)  # a call now hangs inside the server...
    client.send_event("tool.call", {"call_id": "mid", "name": "get_current_time", "arguments": {"timezone": "UTC"}})
    time.sleep(0.5)
    os.kill(servers[0], signal.SIGKILL)  # ...and the server dies with it in flight
    result = client.wait_for(lambda m: m.topic == "tool.result" and m.data["call_id"] == "mid", timeout_s=15)
    assert result.data["output"] is None and "MCP server" in result.data["error"]
    assert result.data["duration_ms"] < 15000
    back = client.wait_for(lambda m: m.topic == "health.tools" and m.data["mcp_restarts"] >= 1 and m.data["tools"] > 0,
                           timeout_s=30)
    assert back.data["tools"] >= 2
    client.send_event("tool.call", {"call_id": "after", "name": "get_current_time", "arguments": {"timezone": "UTC"}})
    after = client.wait_for(lambda m: m.topic == "tool.result" and m.data["call_id"] == "after", timeout_s=15)
    assert after.data["error"] is None


def test_tools_built_before_the_fork_are_taken_while_their_file_is_unchanged(tmp_path, monkeypatch):
    from services.stages.tools import python_source

    monkeypatch.setattr(python_source, "_preloaded", {})
    module = tmp_path / "mine.py"
    module.write_text('def shout(word: str) -> str:\n    """Say it louder."""\n    return word.upper()\n')
    assert python_source.preload_python_tools(module) == 1
    [built] = python_source._preloaded[str(module.resolve())][1]

    [taken] = python_tools(str(module), timeout_s=3.0)
    assert taken.invoke is built.invoke and taken.parameters is built.parameters  # not built again
    assert (taken.timeout_s, taken.source) == (3.0, f"python:{module}")
    assert _run({"shout": taken}, "shout", {"word": "hi"})["output"] == "HI"

    module.write_text('def shout(word: str, times: int = 2) -> str:\n    """Say it again."""\n    return word * times\n')
    [rebuilt] = python_tools(str(module))
    assert rebuilt.invoke is not built.invoke and "times" in rebuilt.parameters["properties"]
    assert _run({"shout": rebuilt}, "shout", {"word": "hi"})["output"] == "hihi"
