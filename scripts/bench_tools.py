#!/usr/bin/env python3
"""Tool round-trip overhead: what the bus and the tools stage add to a function call.

The simulator (text output, so nothing is synthesised) answers a typed question with a call to
the no-op Python tool `noop`; per call it measures, from the gateway's own records:

- round trip: function-call item received on the websocket (`t_recv_ns` of
  rt.response.output_item.done) -> function_call_output sent (rt.sent.conversation.item.create);
- overhead: the round trip minus the tool's own run time (tool.result `duration_ms`): JSON parsing,
  tool.call over the bus, the stage's dispatch to its loop, tool.result back, the send.

    .venv/bin/python scripts/bench_tools.py [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, Rig, machine, pct  # noqa: E402

from common.bus import Publisher, Receiver, connect_pub, connect_sub, wait_for_bus  # noqa: E402
from common.config import BusConfig  # noqa: E402
from common.envelope import Stamper  # noqa: E402

RULES = [{"match": "noop", "call": {"name": "noop", "arguments": {}}, "after_call": "ok"},
         {"match": ".*", "reply": "ok"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    rig = Rig(with_pulse=False)
    port = 18950 + (int(time.time()) % 40)
    (rig.dir / "rules.json").write_text(json.dumps(RULES))
    round_trip_ms, overhead_ms, tool_ms = [], [], []
    try:
        rig.start("simulate", "--port", str(port), "--pace", "fast", "--rules", str(rig.dir / "rules.json"))
        cfg = BusConfig(rig.env["VOICEBUS_BUS_PUB"], rig.env["VOICEBUS_BUS_SUB"])
        ctx = zmq.Context()
        assert wait_for_bus(ctx, cfg, 15)
        receiver = Receiver(connect_sub(ctx, cfg, ["rt.response.output_item.done", "rt.sent.conversation.item.create",
                                                   "tool.result", "rt.response.done", "rt.session.updated"]), "bench")
        publisher = Publisher(connect_pub(ctx, cfg))
        assert wait_for_bus(ctx, cfg, 10, pub=publisher.sock)
        stamper = Stamper("bench", "bench")
        rig.start("tools", "--module", str(REPO / "tests/tool_fixtures.py"))
        rig.start("gateway", extra_env={"VOICEBUS_SIM_URL": f"http://127.0.0.1:{port}/v1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for a session that offers the tools
            message = receiver.recv(100)
            if message is not None and message.topic == "rt.session.updated" and \
                    message.data["event"]["session"].get("tools"):
                break

        def command(event: dict) -> None:
            publisher.send(stamper.event("gateway.send", {"event": event}, time.time_ns()))

        command({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
        for _ in range(args.calls):
            command({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "please call noop"}]}})
            command({"type": "response.create"})
            received = sent = None
            duration = None
            dones = 0
            deadline = time.monotonic() + 10
            while dones < 2 and time.monotonic() < deadline:  # the call's response, then the follow-up
                message = receiver.recv(100)
                if message is None:
                    continue
                event = message.data.get("event", {})
                if message.topic == "rt.response.output_item.done" and event["item"]["type"] == "function_call":
                    received = message.data["t_recv_ns"]
                elif message.topic == "rt.sent.conversation.item.create" and \
                        event["item"]["type"] == "function_call_output":
                    sent = message.header.t_ns
                elif message.topic == "tool.result":
                    duration = message.data["duration_ms"]
                elif message.topic == "rt.response.done":
                    dones += 1
            if received and sent and duration is not None:
                round_trip_ms.append((sent - received) / 1e6)
                tool_ms.append(duration)
                overhead_ms.append((sent - received) / 1e6 - duration)
        receiver.sock.close(0)
        publisher.sock.close(0)
        ctx.term()
    finally:
        rig.close()
    print(f"bench_tools {time.strftime('%Y-%m-%d')} on {machine()}; {len(overhead_ms)}/{args.calls} calls of a no-op "
          f"Python tool, gateway + tools stage on the bus, simulator on loopback")
    print("| path | p50 ms | p99 ms | max ms | goal |")
    print("|---|---:|---:|---:|---|")
    print(f"| function-call item received -> function_call_output sent | {pct(round_trip_ms, 50):.2f} | "
          f"{pct(round_trip_ms, 99):.2f} | {max(round_trip_ms, default=float('nan')):.2f} | |")
    print(f"| the tool's own run time (asyncio.to_thread of a no-op) | {pct(tool_ms, 50):.2f} | "
          f"{pct(tool_ms, 99):.2f} | {max(tool_ms, default=float('nan')):.2f} | |")
    print(f"| overhead: bus + tools stage + gateway, tool time apart | {pct(overhead_ms, 50):.2f} | "
          f"{pct(overhead_ms, 99):.2f} | {max(overhead_ms, default=float('nan')):.2f} | p99 <= 5 ms |")
    return 0 if overhead_ms else 1


if __name__ == "__main__":
    sys.exit(main())
