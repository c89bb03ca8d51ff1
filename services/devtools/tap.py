"""`voicebus tap`: watch the bus live — each message, and per-topic rates, gaps and bad frames."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import TextIO

import zmq

from common.bus import NO_BUS_WAIT_S, HandshakeWatch, Receiver, connect_sub, no_bus_message, wait_for_bus
from common.config import BusConfig
from common.envelope import AudioHeader, Message
from common.signals import StopFlag

DATA_PREVIEW_CHARS = 100


def describe(message: Message) -> dict[str, object]:
    header = message.header
    row: dict[str, object] = {"t_ns": header.t_ns, "topic": message.topic, "src": header.src, "seq": header.seq,
                              "session": header.session, "size": len(message.raw_header) + len(message.payload)}
    if isinstance(header, AudioHeader):
        row.update(rate=header.rate, channels=header.channels, pts=header.pts, ms=round(message.duration_ms, 1))
    else:
        row["data"] = message.data
    return row


def format_row(row: dict[str, object]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(int(row["t_ns"]) / 1e9)) + f".{int(row['t_ns']) // 1_000_000 % 1000:03d}"
    line = f"{stamp} {row['topic']:<40} {row['src']:<10} seq={row['seq']:<7} {row['size']:>6}B"
    if "rate" in row:
        return line + f" {row['rate']}Hz x{row['channels']} pts={row['pts']} {row['ms']}ms"
    data = json.dumps(row.get("data", {}), default=str, separators=(",", ":"))
    return line + " " + (data if len(data) <= DATA_PREVIEW_CHARS else data[:DATA_PREVIEW_CHARS] + "…")


def run_tap(cfg: BusConfig, prefixes: list[str], as_json: bool, count: int | None, duration_s: float | None,
            stats_interval_s: float, quiet: bool, out: TextIO = sys.stdout) -> int:
    stopping = StopFlag.install()
    ctx = zmq.Context()
    receiver = Receiver(connect_sub(ctx, cfg, prefixes), "tap")
    handshake = HandshakeWatch(receiver.sock, cfg)
    if not wait_for_bus(ctx, cfg, NO_BUS_WAIT_S, sub=receiver.sock):
        print(f"voicebus tap: {no_bus_message(cfg, handshake.verdict())}", file=sys.stderr)
        handshake.close()
        receiver.sock.close(linger=0)
        ctx.term()
        return 1
    per_topic: Counter[str] = Counter()
    seen = 0
    started = last_stats = time.monotonic()

    def stats() -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        summary = {"elapsed_s": round(elapsed, 1), "messages": seen, "gaps": receiver.gaps,
                   "bad": dict(receiver.bad), "rates": {t: round(n / elapsed, 1) for t, n in sorted(per_topic.items())}}
        problem = handshake.poll()
        if problem:
            summary["problem"] = problem
        if as_json:
            print(json.dumps({"stats": summary}), file=out, flush=True)
        else:
            rates = " ".join(f"{t}={r}/s" for t, r in summary["rates"].items())
            print(f"-- {seen} msgs in {summary['elapsed_s']}s gaps={receiver.gaps} bad={sum(receiver.bad.values())} "
                  f"{rates}" + (f"\n-- nothing can arrive: {problem}" if problem else ""), file=out, flush=True)

    try:
        while not stopping:
            if duration_s is not None and time.monotonic() - started >= duration_s:
                break
            if stats_interval_s and time.monotonic() - last_stats >= stats_interval_s:
                stats()
                last_stats = time.monotonic()
            message = receiver.recv(timeout_ms=100)
            if message is None:
                continue
            seen += 1
            per_topic[message.topic] += 1
            if not quiet:
                row = describe(message)
                print(json.dumps(row, default=str) if as_json else format_row(row), file=out, flush=True)
            if count is not None and seen >= count:
                break
    finally:
        stats()
        handshake.close()
        receiver.sock.close(linger=0)
        ctx.term()
    return 0
