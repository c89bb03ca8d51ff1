"""`voicebus replay`: publish a capture again, with its original pacing (or faster).

Replayed messages get fresh `seq` numbers and `src` = `replay.<original src>`; everything else in
the header (pts, t_capture_ns, item ids, data) is kept, so a stage downstream sees the same stream.
"""

from __future__ import annotations

import logging
import sys
import time

import zmq

from common.bus import NO_BUS_WAIT_S, Publisher, connect_pub, no_bus_message, wait_for_bus
from common.capture_file import ReadReport, Record, read_capture
from common.config import BusConfig
from common.envelope import EnvelopeError, Message, Stamper, decode
from common.log import kv
from common.signals import StopFlag

log = logging.getLogger("voicebus.replay")
SRC_PREFIX = "replay."


def replayed(message: Message, stamper: Stamper, t_ns: int) -> Message:
    fields = message.header.as_dict()
    seq = stamper.seqs.get(message.topic, 0)
    stamper.seqs[message.topic] = seq + 1
    fields.update(src=(SRC_PREFIX + fields["src"])[:64], seq=seq, t_ns=t_ns)
    return Message(message.topic, type(message.header).from_fields(fields), message.payload)


def select(path: str, prefixes: list[str], from_s: float | None, to_s: float | None,
           report: ReadReport) -> list[tuple[float, Message]]:
    """(seconds since the capture's first record, message) for the chosen topics and window."""
    chosen: list[tuple[float, Message]] = []
    first_ns = None
    bad = 0
    for record in read_capture(path, report):
        first_ns = record.t_recv_ns if first_ns is None else first_ns
        offset_s = (record.t_recv_ns - first_ns) / 1e9
        if (from_s is not None and offset_s < from_s) or (to_s is not None and offset_s > to_s):
            continue
        if prefixes and not any(record.topic.startswith(p) for p in prefixes):
            continue
        message = _decode(record)
        if message is None:
            bad += 1
            continue
        chosen.append((offset_s, message))
    if bad:
        log.warning(kv("skipped_bad_records", count=bad))
    return chosen


def _decode(record: Record) -> Message | None:
    try:
        return decode(record.frames)
    except EnvelopeError:
        return None


def run_replay(cfg: BusConfig, path: str, prefixes: list[str], speed: float | None, loop: bool,
               from_s: float | None, to_s: float | None, session: str) -> int:
    report = ReadReport()
    messages = select(path, prefixes, from_s, to_s, report)
    if report.lost_bytes:
        log.warning(kv("capture_tail_lost", bytes=report.lost_bytes, reason=repr(report.reason)))
    if not messages:
        log.error(kv("nothing_to_replay", path=path, topics=",".join(prefixes) or "*"))
        return 1
    stopping = StopFlag.install()
    ctx = zmq.Context()
    publisher = Publisher(connect_pub(ctx, cfg))
    if not wait_for_bus(ctx, cfg, timeout_s=NO_BUS_WAIT_S, pub=publisher.sock):
        print(f"voicebus replay: {no_bus_message(cfg)}", file=sys.stderr)
        publisher.sock.close(linger=0)  # a probe still queued would hold the context open forever
        ctx.term()
        return 1
    stamper = Stamper("replay", session)
    base = messages[0][0]
    log.info(kv("replaying", messages=len(messages), seconds=round(messages[-1][0] - base, 2),
                speed="max" if speed is None else speed))
    try:
        while not stopping:
            started = time.monotonic()
            for offset_s, message in messages:
                if stopping:
                    break
                if speed:
                    delay = started + (offset_s - base) / speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                publisher.send(replayed(message, stamper, time.time_ns()))
            if not loop:
                break
        time.sleep(0.2)  # let the last messages leave before the socket closes
    finally:
        publisher.sock.close(linger=1000)
        ctx.term()
    log.info(kv("replayed", sent=publisher.sent, dropped=publisher.dropped))
    return 0
